"""The rebalancer moves streams from the most to the least loaded decode instance, a
few at a time, never back and forth."""

import time

from proxy.fleet.backends import Registry
from proxy.fleet.live import LiveStreams
from proxy.fleet.rebalance import Rebalancer
from proxy.settings import Settings


class Stream:
    def __init__(self, moved_at: float = 0.0, movable: bool = True) -> None:
        self.moved_at, self.movable, self.moves = moved_at, movable, []
        self.moving = False

    def move(self, reason, target=None) -> bool:
        if not self.movable:
            return False
        self.moves.append((reason, target.url if target else None))
        self.moving = True
        return True


def setup(**overrides):
    settings = Settings(
        prefill_urls=["http://p"],
        decode_urls=["http://d1", "http://d2", "http://d3"],
        rebalance=True,
        **overrides,
    )
    registry = Registry(settings)
    live = LiveStreams()
    return Rebalancer(settings, registry, live), registry, live


def test_streams_move_from_the_busiest_to_the_idlest():
    balancer, registry, live = setup(rebalance_threshold=3, rebalance_max_moves=5)
    d1, d2, d3 = registry.decode.instances
    d1.in_flight, d2.in_flight, d3.in_flight = 10, 4, 2
    streams = [Stream() for _ in range(10)]
    for s in streams:
        live.attach(d1.url, s)
    # A gap of 8: at most half of it moves (the two cannot swap places), capped at 5.
    assert balancer.look() == 4
    assert [s.moves for s in streams if s.moves] == [[("rebalance", "http://d3")]] * 4


def test_below_the_threshold_nothing_moves():
    balancer, registry, live = setup(rebalance_threshold=4)
    d1, d2, d3 = registry.decode.instances
    d1.in_flight, d2.in_flight, d3.in_flight = 5, 3, 2
    stream = Stream()
    live.attach(d1.url, stream)
    assert balancer.look() == 0 and not stream.moves


def test_no_ping_pong_and_no_unavailable_target():
    balancer, registry, live = setup(rebalance_threshold=1, migration_cooldown=30)
    d1, d2, d3 = registry.decode.instances
    d1.in_flight, d2.in_flight, d3.in_flight = 8, 6, 0
    d3.draining = True  # never a target, never counted
    recent, old, stuck = Stream(time.monotonic()), Stream(), Stream(movable=False)
    for s in (recent, old, stuck):
        live.attach(d1.url, s)
    assert balancer.look() == 1
    assert old.moves == [("rebalance", "http://d2")] and not recent.moves


def test_no_new_look_while_moves_are_on_their_way():
    balancer, registry, live = setup(rebalance_threshold=1, rebalance_max_moves=2)
    d1, d2, d3 = registry.decode.instances
    d3.draining = True
    d1.in_flight, d2.in_flight = 6, 0
    streams = [Stream() for _ in range(6)]
    for s in streams:
        live.attach(d1.url, s)
    assert balancer.look() == 2
    # The two left d1 and are not on d2 yet: the loads say 4 / 0, but nothing more moves.
    d1.in_flight = 4
    assert balancer.look() == 0
    for s in streams:
        if s.moving:
            s.moving = False  # arrived
            live.detach(d1.url, s)
            live.attach(d2.url, s)
    d2.in_flight = 2
    assert balancer.look() == 1  # 4 / 2: half the gap
