"""The writers' bookkeeping at a continuation's seam: which tokens end a character,
and what a continuation that repeats tokens the client has must not send again.

vLLM merges a request's outputs into one chunk while its server is behind (several
tokens, their text joined), and it sends ``""`` for a token that ends inside a
character. A continuation restarts at the last token known to end a character; greedy
decoding repeats what followed, and the client must see each token and character once.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest

from proxy.errors import ProxyError
from proxy.fleet.backends import Instance
from proxy.serve.plan import plan_request
from proxy.serve.session import DecodeSession
from proxy.serve.stitch import PrefillResult
from proxy.serve.transcript import Transcript
from proxy.serve.vocabulary import CHAT, COMPLETIONS, Mode
from proxy.serve.writers import make_writer, resume_writer, without_ids
from proxy.settings import Settings

PROMPT_IDS = [1, 2]


def prefill(kind: str) -> PrefillResult:
    raw = {"id": "cmpl-p", "created": 7, "model": "m"}
    choice = {"text": "A"} if kind == COMPLETIONS else {"message": {"role": "assistant"}}
    return PrefillResult(kind, raw, choice, "A", [65], PROMPT_IDS, None, {"prompt_tokens": 2}, None)


def plan(kind: str, **extra: Any):
    prompt = {"prompt": "hi"} if kind == COMPLETIONS else {"messages": [{"role": "user"}]}
    body = {"model": "m", **prompt, "max_tokens": 20, "stream": True, **extra}
    return plan_request(kind, body)


def chunk(ids: list[int], text: str, offsets: list[int] | None = None) -> bytes:
    choice: dict[str, Any] = {"index": 0, "text": text, "token_ids": ids, "finish_reason": None}
    if offsets is not None:
        choice["logprobs"] = {
            "tokens": [f"t{i}" for i in ids],
            "token_logprobs": [-0.5] * len(ids),
            "top_logprobs": [{f"t{i}": -0.5} for i in ids],
            "text_offset": offsets,
        }
    body = {"id": "cmpl-d", "object": "text_completion", "created": 9, "model": "m"}
    return json.dumps({**body, "choices": [choice]}).encode()


def sent(events: list[bytes | None]) -> list[dict[str, Any]]:
    """The choices the client got."""
    out = []
    for data in events:
        if data is not None:
            out.extend(json.loads(data.removeprefix(b"data: "))["choices"])
    return out


def first_leg(kind: str, **extra: Any):
    """An answer under way: P's "A", then "B" alone, "CD" merged, and a token that ends
    inside a character."""
    the_plan, p, t = plan(kind, **extra), prefill(kind), Transcript()
    writer = make_writer(Mode.STITCHED, the_plan, p, t)
    writer.opening()
    offsets = extra.get("logprobs") is not None
    for ids, text, at in (([66], "B", [0]), ([67, 68], "CD", [1, 2]), ([69], "", [3])):
        writer.rewrite(chunk(ids, text, at if offsets else None))
    return the_plan, p, t


def test_only_a_single_token_with_text_marks_a_character_boundary():
    _, _, t = first_leg(COMPLETIONS)
    assert t.ids == [65, 66, 67, 68, 69] and t.text_len == 4
    # "CD" came as one chunk of two tokens: which of them completed its text is unknown.
    assert t.boundary == 2 and t.text_at_boundary == 2
    assert not t.at_boundary


def test_a_continuation_sends_no_token_or_character_twice():
    the_plan, p, t = first_leg(COMPLETIONS, return_token_ids=True, logprobs=1)
    writer = resume_writer(the_plan, p, t, t.boundary)
    # The new leg restarts after "AB" and repeats C, D and the partial token, merged
    # differently, before its news (the character the partial token began).
    out = sent(
        [
            writer.rewrite(chunk([67], "C", [0])),
            writer.rewrite(chunk([68, 69, 70], "Dé", [1, 2, 2])),
            writer.rewrite(chunk([71], "F", [3])),
        ]
    )
    assert [c["text"] for c in out] == ["é", "F"]
    assert [c["token_ids"] for c in out] == [[70], [71]]
    # Logprobs go with their tokens, and offsets count from the answer's start ("ABCD").
    assert out[0]["logprobs"]["tokens"] == ["t70"] and out[0]["logprobs"]["text_offset"] == [4]
    assert out[1]["logprobs"]["text_offset"] == [5]
    assert t.ids == [65, 66, 67, 68, 69, 70, 71] and t.text_len == 6
    assert t.at_boundary


def test_a_chat_continuation_sends_no_token_or_character_twice():
    the_plan, p, t = first_leg(CHAT)
    writer = resume_writer(the_plan, p, t, t.boundary)
    out = sent([writer.rewrite(chunk([67, 68], "CD")), writer.rewrite(chunk([69, 70], "é"))])
    assert [c["delta"]["content"] for c in out] == ["é"]
    assert t.ids == [65, 66, 67, 68, 69, 70]


def session(the_plan, t: Transcript) -> DecodeSession:
    settings = Settings(prefill_urls=["http://p"], decode_urls=["http://d"])
    dispatcher = SimpleNamespace(settings=settings)
    record = SimpleNamespace(request_id="r")
    s = DecodeSession(dispatcher, None, the_plan, prefill(the_plan.kind), None, Mode.STITCHED,
                      record, {}, 0.0)  # fmt: skip
    s.transcript = t
    return s


def test_a_stream_whose_text_lags_its_tokens_is_not_continued_elsewhere():
    # With a stop string of several characters vLLM keeps the last characters back:
    # a continuation after the tokens sent would never send them.
    for stop, movable in ((["\n"], True), (["END"], False)):
        the_plan, _, t = first_leg(COMPLETIONS, stop=stop)
        t.boundary = len(t.ids)
        assert session(the_plan, t).can_continue() is movable
    the_plan, _, t = first_leg(COMPLETIONS, stop=["END"], include_stop_str_in_output=True)
    t.boundary = len(t.ids)
    assert session(the_plan, t).can_continue()


def test_a_merged_chunk_leaves_the_boundary_unsure_until_settled():
    the_plan, p, t = first_leg(COMPLETIONS, return_token_ids=True)
    assert t.unsure and t.boundary == 2  # "CD" came merged after "B"
    writer = make_writer(Mode.STITCHED, the_plan, p, t)
    writer.rewrite(chunk([70], "é"))  # one token with text: a boundary again
    assert not t.unsure and t.at_boundary
    writer.rewrite(chunk([71, 72], "F"))  # merged: F, then the start of a character
    assert t.unsure and t.boundary == 6
    t.settle(7)  # the tokenizer says: whole after F
    assert t.boundary == 7 and t.text_at_boundary == t.text_len and not t.unsure


# The bytes of each token id for the tokenizer below: 69 and 72 begin two-byte characters.
BYTES = {65: b"A", 66: b"B", 67: b"C", 68: b"D", 69: b"\xc3", 70: b"\xa9", 71: b"F", 72: b"\xc3"}


async def detokenize(pool, inst, leg, path, body, headers, timeout):
    assert path == "/detokenize"
    return {"prompt": b"".join(BYTES[i] for i in body["tokens"]).decode(errors="replace")}


async def test_a_move_after_a_merged_chunk_restarts_where_the_text_is_whole(monkeypatch):
    monkeypatch.setattr("proxy.serve.session.call_json", detokenize)
    the_plan, p, t = first_leg(COMPLETIONS, return_token_ids=True)
    writer = make_writer(Mode.STITCHED, the_plan, p, t)
    writer.rewrite(chunk([70, 71, 72], "éF"))  # merged, and ends inside a character
    s = session(the_plan, t)
    s.inst = SimpleNamespace(url="http://d")
    s.dispatcher.registry = SimpleNamespace(http=None)
    assert await s._settle_boundary()
    assert t.boundary == 7 and t.ids[t.boundary :] == [72]  # after F; 72 had no text yet
    # The continuation restarts after F; it repeats 72 (no text), then completes it.
    resumed = resume_writer(the_plan, p, t, t.boundary)
    out = sent([resumed.rewrite(chunk([72], "")), resumed.rewrite(chunk([70], "é"))])
    assert [(c["token_ids"], c["text"]) for c in out] == [([70], "é")]


async def test_after_a_failure_another_instances_tokenizer_finds_where_to_restart(monkeypatch):
    # The source died after a merged chunk: its tokenizer cannot be asked, another
    # decode instance's can (the same model), so the continuation restarts after F
    # rather than at the last one-token chunk ("B"), and generates less again.
    asked: list[str] = []

    async def detokenize_on(pool, inst, leg, path, body, headers, timeout):
        asked.append(inst.url)
        return await detokenize(pool, inst, leg, path, body, headers, timeout)

    monkeypatch.setattr("proxy.serve.session.call_json", detokenize_on)
    the_plan, p, t = first_leg(COMPLETIONS, return_token_ids=True)
    make_writer(Mode.STITCHED, the_plan, p, t).rewrite(chunk([70, 71, 72], "éF"))
    assert t.unsure and t.boundary == 2
    s = session(the_plan, t)
    source, other = Instance("http://d1"), Instance("http://d2")
    s.inst = source
    opened: list[dict[str, Any]] = []

    async def open_stream(record, endpoint, body, *args, **kwargs):
        opened.append(body)
        raise ProxyError(503, "no decode instance available")

    s.dispatcher.registry = SimpleNamespace(
        http=None,
        pool=lambda role: SimpleNamespace(available=lambda: [source, other]),
        context_length=lambda model: 4096,
    )
    s.dispatcher.open_stream = open_stream
    s.dispatcher.background = lambda work: work.close()
    s._failure = ProxyError(502, "decode backend closed the stream")
    with pytest.raises(ProxyError):
        await s._continue_on_another("failure", None)
    assert set(asked) == {"http://d2"}
    assert opened[0]["prompt"] == [*PROMPT_IDS, *t.ids[:7]]  # after F


@pytest.mark.parametrize(
    "data",
    [
        b'{"choices":[{"text":"a","prompt_token_ids":[1,2],"token_ids":[3]}]}',
        b'{"choices": [{"text": "a", "prompt_token_ids" : [1, 2], "token_ids": [ 3 ]}]}',
        b'{"choices":[{"text":"a","prompt_token_ids":null,"token_ids":[3,4,5]}]}',
        b'{"choices":[{"text":"\\"token_ids\\":[9]","token_ids":[]}]}',
    ],
)
def test_token_ids_the_client_did_not_ask_for_are_nulled(data: bytes):
    chunk = json.loads(without_ids(data))
    choice = chunk["choices"][0]
    assert choice["token_ids"] is None
    assert choice.get("prompt_token_ids") is None
    assert choice["text"] == json.loads(data)["choices"][0]["text"]
