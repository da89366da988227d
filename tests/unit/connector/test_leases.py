"""Lease table (scheduler) and send registry (worker): every hold ends on a bounded path."""

from __future__ import annotations

from engine_ext.leases import LeaseTable, SendRegistry
from engine_ext.metadata import SendSpec


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_lease_expires_once_and_is_removed_when_workers_report():
    clock = Clock()
    leases = LeaseTable(lease_seconds=30, clock=clock)
    leases.add("t1", "req-1")
    leases.add("t2", "req-2")
    clock.now += 29.9
    assert leases.expire() == [] and leases.take_releases() == []
    clock.now += 0.2
    assert sorted(leases.expire()) == ["t1", "t2"]
    assert leases.expire() == []  # marked once
    assert sorted(leases.take_releases()) == ["t1", "t2"]
    assert leases.take_releases() == []
    assert len(leases) == 2  # still held until workers confirm the blocks are free
    assert leases.finished("req-1").transfer_id == "t1"
    assert leases.finished("req-1") is None
    assert "t1" not in leases and "t2" in leases and len(leases) == 1


def test_explicit_release_is_idempotent_and_beats_expiry():
    clock = Clock()
    leases = LeaseTable(lease_seconds=30, clock=clock)
    leases.add("t1", "req-1")
    assert leases.release("t1") is True
    assert leases.release("t1") is False  # second call: already released
    assert leases.release("nope") is False  # unknown id
    clock.now += 60
    assert leases.expire() == []  # releasing already: not counted as an expiry
    assert leases.take_releases() == ["t1"]
    lease = leases.finished("req-1")
    assert lease.releasing and leases.release("t1") is False


def test_completed_transfer_is_not_releasing():
    leases = LeaseTable(lease_seconds=30, clock=Clock())
    leases.add("t1", "req-1")
    lease = leases.finished("req-1")  # workers: all consumers pulled
    assert lease is not None and not lease.releasing and len(leases) == 0


def spec(tid="t1", req="req-1", consumers=1, blocks=(1, 2)):
    return SendSpec(tid, req, tuple(blocks), consumers)


def test_registry_finishes_after_all_consumers_exactly_once():
    reg = SendRegistry()
    reg.register(spec(consumers=2))
    assert reg.state("t1") == "held"
    reg.consumer_done("t1", "d/a")
    reg.consumer_done("t1", "d/a")  # duplicate: same consumer counts once
    assert reg.take_finished() == set() and reg.state("t1") == "held"
    reg.consumer_done("t1", "d/b")
    assert reg.take_finished() == {"req-1"}
    assert reg.take_finished() == set()
    assert reg.state("t1") == "gone" and len(reg) == 0
    assert reg.begin_read("t1") is None


def test_registry_release_waits_for_a_running_gather():
    reg = SendRegistry()
    reg.register(spec())
    entry = reg.begin_read("t1")
    assert entry is not None
    assert reg.release("t1") is True
    assert reg.take_finished() == set()  # blocks still being read
    assert reg.begin_read("t1") is None  # no new reads after release
    assert reg.state("t1") == "gone"
    reg.end_read(entry)
    assert reg.take_finished() == {"req-1"}
    assert reg.release("t1") is False


def test_registry_applies_notices_that_arrive_before_registration():
    clock = Clock()
    reg = SendRegistry(memory_seconds=60, clock=clock)
    assert reg.state("t1") == "unknown"
    reg.consumer_done("t1", "d/a")  # D skipped before P's worker heard of t1
    reg.register(spec(consumers=1))
    assert reg.take_finished() == {"req-1"}


def test_registry_forgets_gone_transfers_after_a_while():
    clock = Clock()
    reg = SendRegistry(memory_seconds=60, clock=clock)
    reg.register(spec("t1", "r1"))
    reg.release("t1")
    assert reg.state("t1") == "gone"
    clock.now += 61
    reg.register(spec("t2", "r2"))
    reg.release("t2")  # pruning happens as entries finish
    assert reg.state("t1") == "unknown" and reg.state("t2") == "gone"


def test_next_deadline_skips_releasing_leases():
    now = [100.0]
    table = LeaseTable(30, clock=lambda: now[0])
    assert table.next_deadline() is None
    table.add("t1", "r1", seconds=5)
    table.add("t2", "r2", seconds=10)
    assert table.next_deadline() == 105.0
    table.release("t1")
    assert table.next_deadline() == 110.0


def test_registry_wakes_the_server_on_registration_and_the_engine_when_done():
    reg = SendRegistry()
    registered, finished = [], []
    reg.on_register.append(lambda: registered.append(1))
    reg.on_finished.append(finished.append)  # told the request id
    reg.register(SendSpec("t1", "r1", (1,), consumers=1))
    assert registered == [1] and finished == []
    entry = reg.begin_read("t1")
    reg.consumer_done("t1", "k")  # still read by a gather: not finished yet
    assert finished == []
    reg.end_read(entry)
    assert finished == ["r1"] and reg.take_finished() == {"r1"}
    # A skip notice that came before the registration finishes it on registration.
    reg.consumer_done("t2", "k")
    reg.register(SendSpec("t2", "r2", (2,), consumers=1))
    assert finished == ["r1", "r2"] and reg.take_finished() == {"r2"}
    # A release by the engine thread is announced too (async scheduling reads the
    # step that reports it only after planning the next).
    reg.register(SendSpec("t3", "r3", (3,), consumers=1))
    reg.release("t3")
    assert finished == ["r1", "r2", "r3"] and reg.take_finished() == {"r3"}
