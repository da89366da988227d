"""Micro-benchmarks behind the proxy's library choices: ``python -m bench.micro [NAME ...]``.

Each prints CPU microseconds per operation (``time.process_time``, so other processes on
the machine matter less than for wall-clock figures):

- ``clients``: receiving an SSE stream from a backend -- httpx (the proxy's transport;
  ``aiter_raw``), aiohttp, and a raw asyncio+httptools protocol -- at a fixed chunk rate
  (a fake engine in a subprocess on another core), each with the proxy's SSE parser; and
  one small non-streaming POST (the prefill leg) per client.
- ``json``: one stitched chunk's rewrite: stdlib json loads+dumps, orjson, and a byte splice.
- ``timeout``: ``asyncio.timeout`` around every awaited event versus none.
- ``metrics``: prometheus ``Histogram.labels(x).observe`` per chunk versus a cached child.
- ``pool``: httpx's per-request cost as its pool holds more connections.
- ``sse``: the proxy's ``SSEParser`` versus splitting on blank lines with a fast path for
  the one-line ``data: ...`` events vLLM sends.
- ``relay``: one decode chunk's parse and rewrite per writer (completions and chat
  stitched, decode mode), the client not asking for token ids.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
STREAM_CHUNK = (
    b'{"id":"cmpl-1d0285930000000001f3","object":"text_completion","created":1795561950,"model":"fake",'
    b'"choices":[{"index":0,"text":" w1775","logprobs":null,"finish_reason":null,'
    b'"stop_reason":null,'
    b'"prompt_token_ids":null,"token_ids":null}]}'
)


def _cpu_us(fn: Callable[[], Any], n: int) -> float:
    start = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - start) / n * 1e6


# --- json ----------------------------------------------------------------------------------


def bench_json() -> dict[str, float]:
    import orjson

    ident = {"id": "cmpl-abc", "created": 1, "model": "fake"}

    def stdlib() -> bytes:
        chunk = json.loads(STREAM_CHUNK)
        chunk["id"], chunk["created"], chunk["model"] = (
            ident["id"],
            ident["created"],
            ident["model"],
        )
        for choice in chunk["choices"]:
            if choice.get("prompt_token_ids") is not None:
                choice["prompt_token_ids"] = None
        return (
            b"data: "
            + json.dumps(chunk, separators=(",", ":"), ensure_ascii=False).encode()
            + b"\n\n"
        )

    def with_orjson() -> bytes:
        chunk = orjson.loads(STREAM_CHUNK)
        chunk["id"], chunk["created"], chunk["model"] = (
            ident["id"],
            ident["created"],
            ident["model"],
        )
        for choice in chunk["choices"]:
            if choice.get("prompt_token_ids") is not None:
                choice["prompt_token_ids"] = None
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    prefix = b'{"id":"cmpl-abc","object":"text_completion","created":1,"model":"fake",'

    def splice() -> bytes:
        # D's envelope up to "choices" replaced by the client's; the rest relayed as is.
        at = STREAM_CHUNK.find(b'"choices":')
        return b"data: " + prefix + STREAM_CHUNK[at:] + b"\n\n"

    n = 100_000
    return {
        "json.loads only (validation, stdlib)": _cpu_us(lambda: json.loads(STREAM_CHUNK), n),
        "orjson.loads only (validation)": _cpu_us(lambda: orjson.loads(STREAM_CHUNK), n),
        "json loads+dumps (stdlib)": _cpu_us(stdlib, n),
        "orjson loads+dumps": _cpu_us(with_orjson, n),
        "byte splice of the envelope": _cpu_us(splice, n),
        "relay as is (event framing only)": _cpu_us(lambda: b"data: " + STREAM_CHUNK + b"\n\n", n),
    }


# --- asyncio.timeout ---------------------------------------------------------------------------


def bench_timeout() -> dict[str, float]:
    async def main() -> dict[str, float]:
        loop = asyncio.get_running_loop()
        n = 100_000

        async def ready() -> int:
            return 1

        async def plain() -> None:
            for _ in range(n):
                await ready()

        async def with_timeout() -> None:
            for _ in range(n):
                async with asyncio.timeout(60):
                    await ready()

        async def deadline_check() -> None:
            # What a per-stream watchdog costs per event: read the clock, compare.
            last = 0.0
            for _ in range(n):
                await ready()
                last = loop.time()
            del last

        out = {}
        for name, fn in (
            ("await, no timeout", plain),
            ("asyncio.timeout per await", with_timeout),
            ("clock read per await", deadline_check),
        ):
            start = time.process_time()
            await fn()
            out[name] = (time.process_time() - start) / n * 1e6
        return out

    return _run(main())


# --- SSE parsing ------------------------------------------------------------------------------


def bench_sse() -> dict[str, float]:
    from proxy.wire.sse import SSEParser

    event = b"data: " + STREAM_CHUNK + b"\n\n"

    def fast_split(buffer: bytes, piece: bytes) -> tuple[list[bytes], bytes]:
        data = buffer + piece if buffer else piece
        out, start = [], 0
        while True:
            end = data.find(b"\n\n", start)
            if end < 0:
                return out, data[start:]
            raw = data[start:end]
            if raw.startswith(b"data: ") and b"\n" not in raw and b"\r" not in raw:
                out.append(raw[6:])
            else:  # comments, several data lines, CRLF: the general parser's job
                out.extend(SSEParser().feed(raw + b"\n\n"))
            start = end + 2

    parser = SSEParser()
    n = 100_000
    four = event * 4
    return {
        "SSEParser.feed, one event per read (us/event)": _cpu_us(
            lambda: list(parser.feed(event)), n
        ),
        "fast split, one event per read (us/event)": _cpu_us(lambda: fast_split(b"", event), n),
        "SSEParser.feed, four events per read (us/event)": _cpu_us(
            lambda: list(parser.feed(four)), n // 4
        )
        / 4,
        "fast split, four events per read (us/event)": _cpu_us(
            lambda: fast_split(b"", four), n // 4
        )
        / 4,
    }


# --- the relay's per-chunk work ----------------------------------------------------------------


def bench_relay() -> dict[str, float]:
    """What the proxy does to each decode chunk it relays, without the sockets: parse the
    SSE read, rewrite the event for the client (token tracking, ids nulled), frame it."""
    from proxy.serve.plan import plan_request
    from proxy.serve.stitch import PrefillResult
    from proxy.serve.transcript import Transcript
    from proxy.serve.vocabulary import CHAT, COMPLETIONS, Mode
    from proxy.serve.writers import make_writer
    from proxy.wire.sse import SSEParser

    ident = b'"id":"cmpl-1d0285930000000001f3-0","created":1795561950,"model":"fake"'
    reads = [
        b'data: {"object":"text_completion",%s,"choices":[{"index":0,"text":" w%d",'
        b'"logprobs":null,"finish_reason":null,"stop_reason":null,"prompt_token_ids":null,'
        b'"token_ids":[%d]}]}\n\n' % (ident, i, 1000 + i)
        for i in range(1000)
    ]
    out = {}
    for kind, mode in (
        (COMPLETIONS, Mode.STITCHED),
        (CHAT, Mode.STITCHED),
        (COMPLETIONS, Mode.DECODE),
    ):
        raw = {"id": "cmpl-1d0285930000000001f3-0", "created": 1795561950, "model": "fake"}
        prompt = (
            {"prompt": "hi"}
            if kind == COMPLETIONS
            else {"messages": [{"role": "user", "content": "x"}]}
        )
        choice = (
            {"text": "A"}
            if kind == COMPLETIONS
            else {"message": {"role": "assistant", "content": "A"}}
        )
        p = PrefillResult(kind, raw, choice, "A", [65], [1, 2], None, {"prompt_tokens": 2}, None)
        plan = plan_request(kind, {"model": "fake", "max_tokens": 10**6, "stream": True, **prompt})
        writer = make_writer(mode, plan, p, Transcript())
        writer.opening()
        parser = SSEParser()
        count = iter(range(10**9))

        def one() -> None:
            for data in parser.feed(reads[next(count) % 1000]):
                writer.rewrite(data)

        out[f"{kind} {mode.value}: SSE read + rewrite (us/chunk)"] = _cpu_us(one, 100_000)
    return out


# --- prometheus ----------------------------------------------------------------------------


def bench_metrics() -> dict[str, float]:
    from prometheus_client import CollectorRegistry, Histogram

    registry = CollectorRegistry()
    hist = Histogram(
        "x_seconds",
        "x",
        ["endpoint"],
        registry=registry,
        buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
    )
    child = hist.labels("chat")
    n = 200_000
    return {
        "Histogram.labels(x).observe": _cpu_us(lambda: hist.labels("chat").observe(0.01), n),
        "cached child .observe": _cpu_us(lambda: child.observe(0.01), n),
        "perf_counter() only": _cpu_us(time.perf_counter, n),
    }


# --- clients ---------------------------------------------------------------------------------


def _start_fake(port: int, itl_ms: float, core: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    argv = [
        "taskset",
        "-c",
        core,
        sys.executable,
        "-m",
        "bench.fake",
        "--port",
        str(port),
        "--prefill-ms",
        "1",
        "--itl-ms",
        str(itl_ms),
    ]
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    import httpx

    for _ in range(100):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", trust_env=False).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("fake engine did not start")


async def _streams(
    open_stream: Callable[[], Awaitable[int]], streams: int, rounds: int
) -> tuple[float, int]:
    async def user() -> int:
        total = 0
        for _ in range(rounds):
            total += await open_stream()
        return total

    start = time.process_time()
    counts = await asyncio.gather(*(user() for _ in range(streams)))
    return time.process_time() - start, sum(counts)


def bench_clients(
    streams: int = 128, tokens: int = 128, itl_ms: float = 10.0, posts: int = 3000
) -> dict[str, float]:
    from devkit.servers import free_port

    port = free_port()
    core = "1" if (os.cpu_count() or 1) > 1 else "0"
    os.sched_setaffinity(0, {0})
    fake = _start_fake(port, itl_ms, core)
    try:
        return _run(_bench_clients(port, streams, tokens, posts))
    finally:
        fake.terminate()
        fake.wait(10)


async def _bench_clients(port: int, streams: int, tokens: int, posts: int) -> dict[str, float]:
    import aiohttp
    import httpx

    from bench.loadgen import _Conn, _request_bytes, _WholeSink
    from proxy.wire.sse import SSEParser

    url = f"http://127.0.0.1:{port}"
    body = json.dumps(
        {"model": "fake", "prompt": "hello", "max_tokens": tokens, "stream": True}
    ).encode()
    small = json.dumps(
        {
            "model": "fake",
            "prompt": "hello",
            "max_tokens": 1,
            "kv_transfer_params": {"do_remote_decode": True},
        }
    ).encode()
    headers = {"content-type": "application/json"}
    out: dict[str, float] = {}

    limits = httpx.Limits(max_connections=2048, max_keepalive_connections=512)
    async with httpx.AsyncClient(limits=limits, trust_env=False, timeout=60) as client:

        async def httpx_stream() -> int:
            parser, count = SSEParser(), 0
            async with client.stream(
                "POST", url + "/v1/completions", content=body, headers=headers
            ) as response:
                async for piece in response.aiter_raw():
                    count += sum(1 for _ in parser.feed(piece))
            return count

        await _streams(httpx_stream, 8, 1)
        cpu, events = await _streams(httpx_stream, streams, 2)
        out["stream: httpx aiter_raw + SSEParser (us/event)"] = cpu / events * 1e6

        async def httpx_post() -> int:
            response = await client.post(url + "/v1/completions", content=small, headers=headers)
            response.json()
            return 1

        cpu, n = await _streams(httpx_post, 16, posts // 16)
        out["POST: httpx (us/request)"] = cpu / n * 1e6

    connector = aiohttp.TCPConnector(limit=2048, limit_per_host=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def aiohttp_stream() -> int:
            parser, count = SSEParser(), 0
            async with session.post(
                url + "/v1/completions", data=body, headers=headers
            ) as response:
                async for piece in response.content.iter_any():
                    count += sum(1 for _ in parser.feed(piece))
            return count

        await _streams(aiohttp_stream, 8, 1)
        cpu, events = await _streams(aiohttp_stream, streams, 2)
        out["stream: aiohttp iter_any + SSEParser (us/event)"] = cpu / events * 1e6

        async def aiohttp_post() -> int:
            async with session.post(
                url + "/v1/completions", data=small, headers=headers
            ) as response:
                json.loads(await response.read())
            return 1

        cpu, n = await _streams(aiohttp_post, 16, posts // 16)
        out["POST: aiohttp (us/request)"] = cpu / n * 1e6

    class _Sink:
        __slots__ = ("count", "parser", "status")

        def __init__(self) -> None:
            self.status, self.parser, self.count = 0, SSEParser(), 0

        def feed(self, data: bytes) -> None:
            for _ in self.parser.feed(data):
                self.count += 1

    pools: dict[int, _Conn] = {}

    async def raw_stream() -> int:
        key = id(asyncio.current_task())
        conn = pools.get(key)
        if conn is None or conn.closed:
            conn = pools[key] = await _Conn.open("127.0.0.1", port)
        sink = _Sink()
        await conn.send(_request_bytes("POST", f"127.0.0.1:{port}", "/v1/completions", body), sink)
        return sink.count

    await _streams(raw_stream, 8, 1)
    cpu, events = await _streams(raw_stream, streams, 2)
    out["stream: raw asyncio+httptools + SSEParser (us/event)"] = cpu / events * 1e6

    async def raw_post() -> int:
        key = id(asyncio.current_task())
        conn = pools.get(key)
        if conn is None or conn.closed:
            conn = pools[key] = await _Conn.open("127.0.0.1", port)
        sink = _WholeSink()
        await conn.send(_request_bytes("POST", f"127.0.0.1:{port}", "/v1/completions", small), sink)
        json.loads(sink.body())
        return 1

    cpu, n = await _streams(raw_post, 16, posts // 16)
    out["POST: raw asyncio+httptools (us/request)"] = cpu / n * 1e6
    for conn in pools.values():
        conn.close()
    return out


# --- httpx pool size ---------------------------------------------------------------------------


def bench_pool() -> dict[str, float]:
    from devkit.servers import free_port

    port = free_port()
    core = "1" if (os.cpu_count() or 1) > 1 else "0"
    os.sched_setaffinity(0, {0})
    fake = _start_fake(port, 1.0, core)
    try:
        return _run(_bench_pool(port))
    finally:
        fake.terminate()
        fake.wait(10)


async def _bench_pool(port: int) -> dict[str, float]:
    import httpx

    url = f"http://127.0.0.1:{port}/v1/completions"
    small = json.dumps({"model": "fake", "prompt": "hello", "max_tokens": 1}).encode()
    out = {}
    for held in (0, 256, 1024):
        limits = httpx.Limits(max_connections=4096, max_keepalive_connections=4096)
        async with httpx.AsyncClient(limits=limits, trust_env=False, timeout=60) as client:
            # Park `held` idle keep-alive connections in the pool, then time sequential POSTs.
            if held:
                await asyncio.gather(
                    *(
                        client.post(
                            url, content=small, headers={"content-type": "application/json"}
                        )
                        for _ in range(held)
                    )
                )
            n = 1000
            start = time.process_time()
            for _ in range(n):
                await client.post(url, content=small, headers={"content-type": "application/json"})
            out[f"httpx POST with {held} idle pooled connections (us/request)"] = (
                (time.process_time() - start) / n * 1e6
            )
    return out


def _run(coro: Awaitable[Any]) -> Any:
    try:
        import uvloop

        return uvloop.run(coro)  # type: ignore[arg-type]
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)  # type: ignore[arg-type]


BENCHES = {
    "json": bench_json,
    "sse": bench_sse,
    "relay": bench_relay,
    "timeout": bench_timeout,
    "metrics": bench_metrics,
    "clients": bench_clients,
    "pool": bench_pool,
}


def main(argv: list[str] | None = None) -> None:
    names = (argv if argv is not None else sys.argv[1:]) or list(BENCHES)
    results = {}
    for name in names:
        results[name] = BENCHES[name]()
        for key, value in results[name].items():
            print(f"{name:>8}  {value:9.2f}  {key}", flush=True)
    if os.environ.get("BENCH_MICRO_JSON"):
        Path(os.environ["BENCH_MICRO_JSON"]).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
