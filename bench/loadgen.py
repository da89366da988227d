"""A closed-loop load generator for streaming (and non-streaming) OpenAI requests.

``concurrency`` virtual users each send one request, wait for its whole answer, and send
the next, for ``duration`` seconds (after ``warmup``) or until ``requests`` are done. Per
request it records TTFT (first chunk that carries a token), every inter-token gap, the
end-to-end time, token chunks and errors; it reports percentiles, requests/s and
chunks/s over the measurement window.

It must not be the bottleneck, so it is a raw asyncio client: one keep-alive HTTP/1.1
connection per virtual user, responses parsed by httptools in protocol callbacks (no
task, no await per chunk), SSE events found with ``bytes.find`` and classified without
JSON parsing (only the one usage chunk per request is parsed).

Modes:

- ``proxy`` (default): requests go to ``url`` (a proxy, or a single engine).
- ``direct-pd``: the load generator is itself a zero-overhead P/D proxy: it sends the
  prefill leg to ``prefill_url`` (``max_tokens=1``, ``kv_transfer_params.do_remote_decode``,
  ``return_token_ids``), counts P's token as the first token the moment P's answer is in,
  then streams D's continuation from ``decode_url`` (a token-id completion of P's prompt
  plus P's token, ``max_tokens - 1``, P's ``kv_transfer_params``) -- the same legs the
  proxy runs in stitched mode, with nothing in between.

Command line: ``python -m bench.loadgen --url http://127.0.0.1:8000 --concurrency 32
--duration 10`` (``--help`` for the rest); prints a JSON summary.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import collections
import dataclasses
import json
import random
import socket
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httptools

try:
    import orjson

    _loads = orjson.loads
    _dumps = orjson.dumps
except ImportError:  # pragma: no cover
    _loads = json.loads

    def _dumps(obj: Any) -> bytes:  # type: ignore[misc]
        return json.dumps(obj, separators=(",", ":")).encode()


PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
DEFAULT_PROMPT = (
    "You are a careful assistant. Summarise the following text in one paragraph, keeping "
    "every number and name: the quick brown fox jumps over the lazy dog while the five boxing "
    "wizards jump quickly and a sphinx of black quartz judges my vow. "
)


@dataclasses.dataclass
class LoadSpec:
    """What to send, how hard, for how long."""

    url: str = "http://127.0.0.1:8000"  # proxy mode target
    endpoint: str = "completions"  # completions | chat
    mode: str = "proxy"  # proxy | direct-pd
    prefill_url: str | None = None  # direct-pd
    decode_url: str | None = None  # direct-pd
    concurrency: int = 1
    duration: float = 10.0  # measurement window (seconds), after warmup
    warmup: float = 2.0
    requests: int | None = None  # stop after this many requests instead (no warmup/window)
    tokens: int = 64  # max_tokens per request
    stream: bool = True
    include_usage: bool = True
    model: str | None = "fake"
    prompt: str = DEFAULT_PROMPT
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # merged into every body
    timeout: float = 120.0  # per request
    ramp: float = 1.0  # spread the users' first requests over this many seconds
    keep_events: bool = False  # keep every request's raw SSE events (tests)
    keep_samples: bool = True  # keep per-request samples in the result


@dataclasses.dataclass
class Sample:
    """One request, times in seconds relative to the run's start."""

    start: float
    ttft: float | None
    e2e: float | None
    chunks: int
    status: int
    error: str | None = None
    completion_tokens: int | None = None
    max_gap: float | None = None
    events: list[bytes] | None = None
    headers: dict[str, str] | None = None
    served_mode: str | None = None  # x-pdproxy-mode, when the target is pdproxy


class _Window:
    """Shared counters for the measurement window."""

    __slots__ = ("chunks", "completed", "end", "gaps", "start", "t0")

    def __init__(self, t0: float, start: float, end: float) -> None:
        self.t0, self.start, self.end = t0, start, end
        self.chunks = 0
        self.completed = 0
        self.gaps = array.array("d")


class ClientError(Exception):
    pass


class _Conn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 client connection; one request at a time."""

    __slots__ = (
        "closed",
        "headers",
        "headers_wanted",
        "keep_alive",
        "parser",
        "served_mode",
        "sink",
        "transport",
        "waiter",
    )

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.sink: Any = None
        self.waiter: asyncio.Future[int] | None = None
        self.closed = False
        self.keep_alive = True
        self.headers_wanted = False
        self.headers: dict[str, str] = {}
        self.served_mode: str | None = None  # the proxy's x-pdproxy-mode answer header

    @classmethod
    async def open(cls, host: str, port: int) -> _Conn:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(cls, host, port)
        return conn

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(
                ClientError("connection closed before the answer was complete")
            )

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_exception(ClientError(f"bad HTTP from server: {exc}"))
            self.transport.abort()  # type: ignore[union-attr]

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        if self.headers_wanted:
            self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")
        if len(name) == 14 and name.lower() == b"x-pdproxy-mode":
            self.served_mode = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.sink.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.sink.feed(body)

    def on_message_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(self.sink.status)

    def send(self, data: bytes, sink: Any, want_headers: bool = False) -> asyncio.Future[int]:
        self.sink = sink
        self.headers_wanted = want_headers
        self.headers = {}
        self.served_mode = None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)  # type: ignore[union-attr]
        return self.waiter

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()


class _StreamSink:
    """Reads an SSE answer; timestamps token chunks as they arrive."""

    __slots__ = (
        "body",
        "buf",
        "chunks",
        "done",
        "error",
        "events",
        "first",
        "last",
        "max_gap",
        "status",
        "usage",
        "window",
    )

    def __init__(self, window: _Window, keep_events: bool) -> None:
        self.window = window
        self.status = 0
        self.buf = b""
        self.first: float | None = None
        self.last = 0.0
        self.chunks = 0
        self.done = False
        self.error: str | None = None
        self.usage: dict[str, Any] | None = None
        self.max_gap = 0.0
        self.events: list[bytes] | None = [] if keep_events else None
        self.body = b""  # a non-200 answer's body

    def feed(self, data: bytes) -> None:
        now = time.perf_counter()
        if self.status != 200:
            self.body += data
            return
        buf = self.buf + data if self.buf else data
        start = 0
        find = buf.find
        while True:
            end = find(b"\n\n", start)
            if end < 0:
                break
            self._event(buf[start:end], now)
            start = end + 2
        self.buf = buf[start:] if start < len(buf) else b""

    def token(self, now: float) -> None:
        """Count one token chunk received at ``now``."""
        window = self.window
        if self.first is None:
            self.first = now
        else:
            gap = now - self.last
            self.max_gap = max(self.max_gap, gap)
            if window.start <= now < window.end:
                window.gaps.append(gap)
        self.last = now
        self.chunks += 1
        if window.start <= now < window.end:
            window.chunks += 1

    def _event(self, event: bytes, now: float) -> None:
        if self.events is not None:
            self.events.append(event)
        if event.startswith(b"data: [DONE]"):
            self.done = True
        elif event.startswith(b'data: {"error"'):
            self.error = "error event: " + event[6:300].decode("utf-8", "replace")
        elif b'"choices":[]' in event:
            try:
                self.usage = _loads(event[6:]).get("usage")
            except ValueError:
                self.error = "bad usage chunk"
        elif b'"role":"assistant"' in event:
            pass  # the chat role chunk carries no token
        elif event.startswith(b"data: "):
            self.token(now)


class _WholeSink:
    """Collects a non-streaming answer."""

    __slots__ = ("parts", "status")

    def __init__(self) -> None:
        self.status = 0
        self.parts: list[bytes] = []

    def feed(self, data: bytes) -> None:
        self.parts.append(data)

    def body(self) -> bytes:
        return b"".join(self.parts)


def _request_bytes(
    method: str, host: str, path: str, body: bytes, extra_headers: str = ""
) -> bytes:
    return (
        f"{method} {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
        f"accept: */*\r\ncontent-length: {len(body)}\r\n{extra_headers}\r\n"
    ).encode() + body


class _Target:
    """A base URL and a per-user keep-alive connection to it."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.hostport = f"{self.host}:{self.port}"

    async def conn(self, cached: _Conn | None) -> _Conn:
        if cached is not None and not cached.closed and cached.keep_alive:
            return cached
        if cached is not None:
            cached.close()
        return await _Conn.open(self.host, self.port)


def request_body(spec: LoadSpec) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if spec.model:
        body["model"] = spec.model
    if spec.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": spec.prompt}]
    else:
        body["prompt"] = spec.prompt
    body["max_tokens"] = spec.tokens
    body["temperature"] = 0
    body["ignore_eos"] = True
    if spec.stream:
        body["stream"] = True
        if spec.include_usage:
            body["stream_options"] = {"include_usage": True}
    body.update(spec.extra)
    return body


class _User:
    """One closed-loop virtual user."""

    def __init__(self, spec: LoadSpec, window: _Window) -> None:
        self.spec = spec
        self.window = window
        self.conns: dict[str, _Conn | None] = {}

    def close(self) -> None:
        for conn in self.conns.values():
            if conn is not None:
                conn.close()

    async def _send(
        self, target: _Target, data: bytes, sink: Any, want_headers: bool = False
    ) -> tuple[int, _Conn]:
        conn = await target.conn(self.conns.get(target.hostport))
        self.conns[target.hostport] = conn
        try:
            status = await conn.send(data, sink, want_headers)
        except BaseException:
            conn.close()
            self.conns[target.hostport] = None
            raise
        if not conn.keep_alive:
            conn.close()
            self.conns[target.hostport] = None
        return status, conn

    async def one(self, target: _Target, path: str, body: bytes) -> Sample:
        """One request in proxy mode."""
        spec = self.spec
        t0 = time.perf_counter()
        data = _request_bytes("POST", target.hostport, path, body)
        if not spec.stream:
            whole = _WholeSink()
            status, conn = await self._send(target, data, whole)
            end = time.perf_counter()
            error = None if status == 200 else f"HTTP {status}: {whole.body()[:200]!r}"
            if status == 200:
                self.window.chunks += 1 if self.window.start <= end < self.window.end else 0
            sample = Sample(
                t0 - self.window.t0, end - t0, end - t0, 1 if status == 200 else 0, status, error
            )
            sample.served_mode = conn.served_mode
            return sample
        sink = _StreamSink(self.window, spec.keep_events)
        status, conn = await self._send(target, data, sink, want_headers=spec.keep_events)
        sample = self._finish_stream(t0, sink, status, conn.headers if spec.keep_events else None)
        sample.served_mode = conn.served_mode
        return sample

    def _finish_stream(
        self, t0: float, sink: _StreamSink, status: int, headers: dict[str, str] | None
    ) -> Sample:
        end = time.perf_counter()
        error = sink.error
        if status != 200:
            error = f"HTTP {status}: {sink.body[:200]!r}"
        elif error is None and not sink.done:
            error = "stream ended without [DONE]"
        elif error is None and sink.chunks == 0:
            error = "no token chunk"
        completion = (sink.usage or {}).get("completion_tokens")
        return Sample(
            start=t0 - self.window.t0,
            ttft=(sink.first - t0) if sink.first is not None else None,
            e2e=end - t0,
            chunks=sink.chunks,
            status=status,
            error=error,
            completion_tokens=completion,
            max_gap=sink.max_gap if sink.chunks > 1 else None,
            events=sink.events,
            headers=headers,
        )

    async def one_direct(self, p: _Target, d: _Target, body: dict[str, Any]) -> Sample:
        """One request in direct-pd mode: P's leg, then D's stitched continuation."""
        spec = self.spec
        t0 = time.perf_counter()
        p_body = dict(body)
        p_body.pop("stream_options", None)
        p_body["stream"] = False
        p_body["max_tokens"] = 1
        p_body["return_token_ids"] = True
        p_body["kv_transfer_params"] = {"do_remote_decode": True}
        whole = _WholeSink()
        path = PATHS[spec.endpoint]
        status, _ = await self._send(
            p, _request_bytes("POST", p.hostport, path, _dumps(p_body)), whole
        )
        if status != 200:
            return Sample(
                t0 - self.window.t0,
                None,
                time.perf_counter() - t0,
                0,
                status,
                f"prefill HTTP {status}",
            )
        answer = _loads(whole.body())
        sink = _StreamSink(self.window, spec.keep_events)
        sink.status = 200
        sink.token(time.perf_counter())  # P's token is in hand: a stitching proxy sends it now
        if sink.events is not None:
            sink.events.append(b"data: " + whole.body())
        choice = answer["choices"][0]
        prompt_ids = (
            answer["prompt_token_ids"] if spec.endpoint == "chat" else choice["prompt_token_ids"]
        )
        d_body = {k: v for k, v in body.items() if k not in ("prompt", "messages")}
        d_body["prompt"] = [*prompt_ids, choice["token_ids"][0]]
        d_body["max_tokens"] = spec.tokens - 1
        d_body["stream"] = True
        d_body["stream_options"] = {"include_usage": True}
        d_body["kv_transfer_params"] = answer.get("kv_transfer_params")
        if spec.tokens <= 1:
            sink.done = True
            return self._finish_stream(t0, sink, 200, None)
        sink.status = 0
        status, _ = await self._send(
            d, _request_bytes("POST", d.hostport, PATHS["completions"], _dumps(d_body)), sink
        )
        sample = self._finish_stream(t0, sink, status, None)
        if sample.completion_tokens is not None:
            sample.completion_tokens += 1
        return sample


@dataclasses.dataclass
class LoadResult:
    spec: dict[str, Any]
    window_s: float
    requests_started: int  # requests counted (started inside the window)
    requests_completed_in_window: int
    chunks_in_window: int
    requests_per_s: float
    chunks_per_s: float
    errors: int
    error_kinds: dict[str, int]
    served_modes: dict[str, int]  # x-pdproxy-mode of the answers (pdproxy only)
    ttft_ms: dict[str, float]
    itl_ms: dict[str, float]
    e2e_ms: dict[str, float]
    chunks_per_request: float
    loadgen_cpu_s: float
    samples: list[Sample] | None = None

    def to_json(self, with_samples: bool = False) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if with_samples and self.samples is not None:
            out["samples"] = [
                {k: v for k, v in dataclasses.asdict(s).items() if k not in ("events", "headers")}
                for s in self.samples
            ]
        else:
            out.pop("samples")
        return out


def percentiles(values: Any, points: tuple[float, ...] = (50, 90, 99)) -> dict[str, float]:
    """``{"p50": ..., "mean": ..., "max": ...}`` in milliseconds (input in seconds)."""
    values = [v for v in values if v is not None]
    if not values:
        return {}
    try:
        import numpy as np

        arr = np.asarray(values, dtype=float) * 1000
        out = {f"p{p:g}": float(np.percentile(arr, p)) for p in points}
        out["mean"] = float(arr.mean())
        out["max"] = float(arr.max())
        return out
    except ImportError:  # pragma: no cover
        ordered = sorted(v * 1000 for v in values)
        out = {
            f"p{p:g}": ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]
            for p in points
        }
        out["mean"] = sum(ordered) / len(ordered)
        out["max"] = ordered[-1]
        return out


async def run(
    spec: LoadSpec,
    on_window: Callable[[str], None] | None = None,
) -> LoadResult:
    """Run one closed-loop load; ``on_window("start"|"end")`` marks the measurement window."""
    loop = asyncio.get_running_loop()
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    counted_only_window = spec.requests is None
    if counted_only_window:
        window = _Window(t0, t0 + spec.warmup, t0 + spec.warmup + spec.duration)
    else:
        window = _Window(t0, t0, float("inf"))
    if on_window is not None:
        if counted_only_window:
            loop.call_at(loop.time() + spec.warmup, on_window, "start")
            loop.call_at(loop.time() + spec.warmup + spec.duration, on_window, "end")
        else:
            on_window("start")

    base = request_body(spec)
    body_bytes = _dumps(base)
    path = PATHS[spec.endpoint]
    if spec.mode == "direct-pd":
        if not (spec.prefill_url and spec.decode_url):
            raise ValueError("direct-pd needs prefill_url and decode_url")
        p_target, d_target = _Target(spec.prefill_url), _Target(spec.decode_url)
    else:
        target = _Target(spec.url)
    samples: list[Sample] = []
    remaining = [spec.requests] if spec.requests is not None else None
    error_kinds: collections.Counter[str] = collections.Counter()

    async def user(index: int) -> None:
        u = _User(spec, window)
        if spec.ramp > 0 and spec.concurrency > 1:
            await asyncio.sleep(random.random() * spec.ramp)
        try:
            while True:
                now = time.perf_counter()
                if remaining is not None:
                    if remaining[0] <= 0:
                        return
                    remaining[0] -= 1
                elif now >= window.end:
                    return
                started = now
                try:
                    coro = (
                        u.one_direct(p_target, d_target, base)
                        if spec.mode == "direct-pd"
                        else u.one(target, path, body_bytes)
                    )
                    sample = await asyncio.wait_for(coro, spec.timeout)
                except TimeoutError:
                    u.close()
                    u.conns.clear()
                    sample = Sample(started - t0, None, None, 0, 0, "timeout")
                except (OSError, ClientError) as exc:
                    u.close()
                    u.conns.clear()
                    sample = Sample(
                        started - t0,
                        None,
                        time.perf_counter() - started,
                        0,
                        0,
                        f"{type(exc).__name__}: {exc}",
                    )
                    await asyncio.sleep(0.05)  # do not spin on a refused connection
                end = time.perf_counter()
                if window.start <= end < window.end and sample.error is None:
                    window.completed += 1
                if not counted_only_window or started >= window.start:
                    samples.append(sample)
                    if sample.error:
                        error_kinds[sample.error.split(":")[0][:80]] += 1
        finally:
            u.close()

    await asyncio.gather(*(user(i) for i in range(spec.concurrency)))
    if not counted_only_window:
        window.end = time.perf_counter()
        if on_window is not None:
            on_window("end")
    window_s = window.end - window.start
    cpu = time.process_time() - cpu0
    ok = [s for s in samples if s.error is None]
    return LoadResult(
        spec={k: v for k, v in dataclasses.asdict(spec).items() if k not in ("prompt",)},
        window_s=window_s,
        requests_started=len(samples),
        requests_completed_in_window=window.completed,
        chunks_in_window=window.chunks,
        requests_per_s=window.completed / window_s if window_s > 0 else 0.0,
        chunks_per_s=window.chunks / window_s if window_s > 0 else 0.0,
        errors=len(samples) - len(ok),
        error_kinds=dict(error_kinds),
        served_modes=dict(collections.Counter(s.served_mode for s in samples if s.served_mode)),
        ttft_ms=percentiles([s.ttft for s in ok]),
        itl_ms=percentiles(window.gaps),
        e2e_ms=percentiles([s.e2e for s in ok]),
        chunks_per_request=(sum(s.chunks for s in ok) / len(ok)) if ok else 0.0,
        loadgen_cpu_s=cpu,
        samples=samples if spec.keep_samples else None,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.loadgen", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--endpoint", choices=sorted(PATHS), default="completions")
    parser.add_argument("--direct-pd", nargs=2, metavar=("PREFILL_URL", "DECODE_URL"))
    parser.add_argument("--concurrency", "-c", type=int, default=1)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--requests", "-n", type=int, default=None)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--model", default="fake")
    parser.add_argument("--no-stream", action="store_true")
    parser.add_argument(
        "--samples", action="store_true", help="include per-request samples in the JSON"
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    spec = LoadSpec(
        url=args.url,
        endpoint=args.endpoint,
        mode="direct-pd" if args.direct_pd else "proxy",
        prefill_url=args.direct_pd[0] if args.direct_pd else None,
        decode_url=args.direct_pd[1] if args.direct_pd else None,
        concurrency=args.concurrency,
        duration=args.duration,
        warmup=args.warmup,
        requests=args.requests,
        tokens=args.tokens,
        model=args.model or None,
        stream=not args.no_stream,
    )
    try:
        import uvloop

        result = uvloop.run(run(spec))
    except ImportError:  # pragma: no cover
        result = asyncio.run(run(spec))
    print(json.dumps(result.to_json(with_samples=args.samples), indent=2))


if __name__ == "__main__":
    main()
