"""A stream asked to move that ends some other way first (its answer completes, its
client leaves) must not stay "moving": the rebalancer waits for every stream it asked to
move before it looks again, so one such stream would stop rebalancing for good."""

from __future__ import annotations

import asyncio
import json

import pytest

from proxy.fleet.backends import Registry
from proxy.fleet.live import LiveStreams
from proxy.fleet.rebalance import Rebalancer
from proxy.observe.metrics import RequestRecord
from proxy.serve.dispatch import Dispatcher
from proxy.serve.plan import plan_request
from proxy.serve.session import DecodeSession
from proxy.serve.vocabulary import Mode
from proxy.settings import Settings


def event(text: str, token: int, finish: str | None = None) -> bytes:
    choice = {"index": 0, "text": text, "token_ids": [token], "finish_reason": finish}
    return json.dumps(
        {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
         "choices": [choice]}
    ).encode()  # fmt: skip


class ScriptedLeg:
    """A decode leg whose batches the test hands over; None is ``[DONE]``."""

    def __init__(self) -> None:
        self.batches: asyncio.Queue[list[bytes] | None] = asyncio.Queue()
        self.done_seen = False

    async def next_batch(self) -> list[bytes] | None:
        batch = await self.batches.get()
        self.done_seen = batch is None
        return batch

    async def aclose(self) -> None:
        pass


class Other:
    """Another live stream, on the instance that becomes busy later."""

    moved_at = float("-inf")
    moving = False

    def move(self, reason, target=None) -> bool:
        self.moving = True
        return True


@pytest.mark.parametrize("ending", ["answer complete", "client left"])
def test_a_move_that_never_happened_does_not_stop_the_rebalancer(ending):
    async def scenario() -> None:
        settings = Settings(
            prefill_urls=["http://p:1"], decode_urls=["http://d1:1", "http://d2:1"], rebalance=True
        )
        registry, live = Registry(settings), LiveStreams()
        balancer = Rebalancer(settings, registry, live)
        d1, d2 = registry.decode.instances
        plan = plan_request(
            "completions", {"model": "m", "prompt": "hi", "max_tokens": 10, "stream": True}
        )
        leg = ScriptedLeg()
        session = DecodeSession(
            Dispatcher(settings, registry), live, plan, None, None, Mode.COLOCATED,
            RequestRecord("r1", "completions"), {}, float("inf"), opened=(leg, d1),
        )  # fmt: skip
        session.transcript.prompt_ids = [1, 2]

        async def client() -> None:
            async for _ in session.body():
                pass

        reading = asyncio.ensure_future(client())
        for i in range(3):
            await leg.batches.put([event("ab"[i % 2], 10 + i)])
        await asyncio.sleep(0.05)
        d1.in_flight = 20
        assert balancer.look() == 1 and session.moving  # asked to move at the next boundary
        if ending == "answer complete":
            await leg.batches.put(None)  # [DONE] before any other chunk
            await reading
        else:
            reading.cancel()
            with pytest.raises(asyncio.CancelledError):
                await reading
        assert not session.moving
        # Later, d2 is the busy one: the rebalancer must act on it.
        d1.in_flight, d2.in_flight = 0, 20
        live.attach(d2.url, Other())
        assert balancer.look() == 1
        await registry.aclose()

    asyncio.run(scenario())


def test_a_stream_on_its_way_refuses_another_move():
    # While a move arms the source (its leg still open, its ask already taken), a second
    # ask would stay behind and move the new leg again at once.
    async def scenario() -> None:
        settings = Settings(prefill_urls=["http://p:1"], decode_urls=["http://d1:1", "http://d2:1"])
        registry = Registry(settings)
        d1, d2 = registry.decode.instances
        plan = plan_request(
            "completions", {"model": "m", "prompt": "hi", "max_tokens": 10, "stream": True}
        )
        session = DecodeSession(
            Dispatcher(settings, registry), LiveStreams(), plan, None, None, Mode.COLOCATED,
            RequestRecord("r1", "completions"), {}, float("inf"),
        )  # fmt: skip
        session.transcript.prompt_ids = [1, 2]
        session._attach(ScriptedLeg(), d1)
        assert session.move("drain")
        session._move = None  # what _continue does first; the arm is now in flight
        assert session.moving and not session.move("rebalance", d2)
        await registry.aclose()

    asyncio.run(scenario())
