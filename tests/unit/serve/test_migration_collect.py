"""Collecting a moved stream's KV: the source answers one wait of at most 30 s, so the
proxy asks again until its own ``migration_timeout`` runs out."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from proxy.errors import ProxyError
from proxy.fleet.backends import Instance
from proxy.serve.migration import Migration
from proxy.settings import Settings

HELD = {"outcome": "held", "kv_transfer_params": {"remote_num_tokens": 7}}


def migration(answers: list[tuple[float, dict]], timeout: float) -> tuple[Migration, list]:
    """A migration whose source answers ``/pd/held`` from ``answers``: (how long the
    answer waited, the answer); the calls it got are recorded."""
    settings = Settings(
        prefill_urls=["http://p:1"], decode_urls=["http://d:1"], migration_timeout=timeout
    )
    releases: list = []
    dispatcher = SimpleNamespace(
        post_release=lambda *target: releases.append(target), background=asyncio.ensure_future
    )
    move = Migration(dispatcher, Instance("http://d:1", connector="http://d:2"), "k", settings)
    move.hold = "armed"
    calls: list[dict] = []

    async def post(path: str, body: dict, timeout: float) -> dict:
        calls.append({"path": path, **body, "timeout": timeout})
        waited, answer = answers.pop(0)
        await asyncio.sleep(waited)
        return answer

    move._post = post  # type: ignore[method-assign]
    move.releases = releases  # type: ignore[attr-defined]
    return move, calls


def test_a_pending_answer_after_a_full_wait_is_asked_again():
    # The source's cap (30 s there) scaled down: each "pending" comes after 1.1 s.
    move, calls = migration([(1.1, {"outcome": "pending"}), (0.0, HELD)], timeout=5)
    assert asyncio.run(move.collect()) == HELD["kv_transfer_params"]
    assert [c["path"] for c in calls] == ["/pd/held", "/pd/held"]
    assert 3.5 < calls[1]["wait_seconds"] < calls[0]["wait_seconds"] <= 5  # what is left
    assert move.held is not None  # the KV is now this move's to hand over or release


def test_asking_stops_at_the_proxy_s_own_timeout():
    move, calls = migration([(1.1, {"outcome": "pending"})] * 3, timeout=2)
    start = time.monotonic()
    assert asyncio.run(move.collect()) is None  # recompute instead
    assert len(calls) == 2 and time.monotonic() - start < 3


def test_a_pending_answer_that_did_not_wait_is_not_asked_again():
    # A source that cannot wait must not turn the proxy into a busy loop.
    move, calls = migration([(0.0, {"outcome": "pending"})] * 5, timeout=5)
    assert asyncio.run(move.collect()) is None
    assert len(calls) == 1


def test_unknown_ends_the_asking():
    move, calls = migration([(0.0, {"outcome": "unknown"})], timeout=5)
    assert asyncio.run(move.collect()) is None
    assert len(calls) == 1


HELD_AT_SOURCE = {
    "outcome": "held",
    "kv_transfer_params": {
        "remote_num_tokens": 7,
        "transfer_id": "t1",
        "remote_host": "d",
        "control_port": 2,
    },
}


def test_a_client_leaving_during_the_collect_still_frees_the_source_s_kv():
    async def scenario() -> list:
        # The source holds the KV, but answers only after the client has left.
        move, calls = migration([(0.5, HELD_AT_SOURCE), (0.0, HELD_AT_SOURCE)], timeout=3)
        collecting = asyncio.ensure_future(move.collect())
        await asyncio.sleep(0.1)
        collecting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await collecting
        await move.abandon()  # what the session does when a move stops half way
        assert len(calls) == 2  # asked again
        return move.releases

    assert asyncio.run(scenario()) == [("http://d:2", "t1")]


def test_an_unanswered_arm_moves_by_recomputing_and_frees_what_the_source_holds():
    async def scenario() -> tuple:
        move, calls = migration([(0.0, HELD_AT_SOURCE)], timeout=3)

        async def arm_times_out(path: str, body: dict, timeout: float) -> dict:
            raise ProxyError(504, "no answer")

        asked = move._post
        move._post = arm_times_out
        assert not await move.arm()
        move._post = asked
        assert await move.collect() is None  # at once: the move recomputes
        await asyncio.sleep(0.05)  # the background collect and release
        return calls, move.releases

    calls, releases = asyncio.run(scenario())
    assert [c["path"] for c in calls] == ["/pd/held"]
    assert releases == [("http://d:2", "t1")]
