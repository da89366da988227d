"""The fake vLLM server: the OpenAI API and the ``kv_transfer_params`` protocol, no model.

Used by the benchmarks (it must never be the bottleneck: a raw asyncio HTTP/1.1 server on
httptools, with streams driven by loop timers rather than tasks) and by the proxy's tests
for fault injection. It answers the way vLLM 0.32 does, field for field, for:

- ``POST /v1/completions`` and ``POST /v1/chat/completions``, streaming (SSE ``data: {...}``
  events, ``data: [DONE]``, one ``choices: []`` usage chunk with
  ``stream_options.include_usage``, per-chunk usage with ``continuous_usage_stats``) and
  not; ``return_token_ids`` adds ``prompt_token_ids`` / ``token_ids``.
- ``GET /health``, ``GET /v1/models`` (with ``max_model_len``), ``GET /metrics``
  (``vllm:num_requests_running``, ``vllm:num_requests_waiting``, ``vllm:kv_cache_usage_perc``).
- The P/D hand-off: a request whose ``kv_transfer_params`` has ``do_remote_decode`` is a
  *prefill leg*: after ``prefill_ms`` it answers its tokens (one, as the proxy asks) plus
  ``kv_transfer_params`` = ``{"do_remote_prefill": true, "transfer_id": ..., "remote_host":
  ..., "control_port": ..., ...}`` and "holds the KV" (a lease) until released with
  ``POST /pd/release {"transfer_id": ...}`` or until ``kv_lease_s``. A request with
  ``do_remote_prefill`` is a *decode leg*: no prefill time; its first token comes after
  ``decode_first_ms`` (the KV pull; default ``itl_ms``), then one every ``itl_ms``. Any other
  request is *plain* (colocated): ``prefill_ms``, then tokens every ``itl_ms``.

Tokens are a deterministic function of the sequence so far (``next_token``), so "greedy"
outputs are reproducible: P's token followed by D's continuation of ``prompt + [P's token]``
equals what one engine generates from the prompt, exactly as with a real greedy vLLM. Each
output token has the text ``" w<id>"``. A string prompt is tokenised as its UTF-8 bytes; a
chat prompt is a simple template over the messages, then bytes.

Fault modes (``fault``; they hit generation requests of the legs in ``fault_legs``, the
next ``fault_times`` of them or all when 0):

- ``"error"``: answer ``fault_status`` (500) with vLLM's error JSON.
- ``"hang"``: read the request, never answer (until the client goes away).
- ``"close"``: streams send ``close_after_chunks`` token chunks then drop the connection
  (no chunked terminator, no ``[DONE]``); non-streaming requests are dropped unanswered.
- ``"slow_first_byte"``: wait ``first_byte_ms`` before the response starts, then normal.
- ``"flap"``: every other matching request fails as ``"error"`` does (the 2nd, 4th, ...).

``fault_health`` makes ``/health`` answer 503 while a fault is set.

Control and inspection (for tests): ``GET /fake/stats`` (what it served: see ``stats()``),
``POST /fake/config`` with a JSON object of ``FakeConfig`` fields to change (returns the
new config), ``POST /fake/reset`` (zero the counters, forget recent requests).

Use it three ways::

    # in a test, on the test's own event loop
    async with FakeEngine(prefill_ms=5, itl_ms=1) as engine:
        url = engine.url

    # on a background thread with its own loop (sync tests, or to keep it off your loop)
    with FakeEngine(itl_ms=1).in_thread() as engine:
        engine.configure(fault="error", fault_times=1)
        ...; engine.stats()["generations"]

    # as a process
    python -m bench.fake --port 8100 --prefill-ms 20 --itl-ms 10 --tokens 64
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import os
import socket
import threading
import time
from typing import Any, Self

import httptools

from .config import FakeConfig, new_stats
from .model import chat_prompt_ids, next_token
from .shapes import (
    SYSTEM_FINGERPRINT,
    chat_role_chunk,
    chat_token_chunk,
    completion_token_chunk,
    dumps,
    error_json,
    loads,
    metrics_text,
    models_answer,
    stream_prefix,
    stream_usage,
    whole_answer,
)

# transfer_id -> (engine, expiry): lets an in-process decode leg mark a transfer pulled.
_HELD_EVERYWHERE: dict[str, tuple[FakeEngine, float]] = {}


class FakeEngine:
    """One fake vLLM server. Start it on a loop (``start``/``async with``) or a thread."""

    def __init__(self, config: FakeConfig | None = None, **overrides: Any) -> None:
        self.config = dataclasses.replace(config or FakeConfig(), **overrides)
        self.config.validate()
        self.host = "127.0.0.1"
        self.port = 0
        self.engine_id = os.urandom(6).hex()
        self._server: asyncio.base_events.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[_Conn] = set()
        self.ids_json = itertools.count(1)
        self._id_prefix = os.urandom(4).hex()
        self._held: dict[str, float] = {}
        self._running_keys: dict[str, _Gen] = {}  # migration key -> its generation
        self._armed: set[str] = set()  # keys the proxy asked to hold when they end
        self._outcomes: dict[str, dict[str, Any]] = {}  # what became of armed keys
        self._fault_seen = 0  # matching requests seen since the fault was set (flap, fault_times)
        self.recent: collections.deque[dict[str, Any]] = collections.deque(
            maxlen=self.config.keep_requests
        )
        self._stats = new_stats()

    # --- lifecycle --------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(
        self, host: str = "127.0.0.1", port: int = 0, backlog: int = 4096
    ) -> FakeEngine:
        self._loop = asyncio.get_running_loop()
        self._server = await self._loop.create_server(
            lambda: _Conn(self), host, port, backlog=backlog, reuse_address=True
        )
        sock = self._server.sockets[0]
        self.host, self.port = sock.getsockname()[:2]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for conn in list(self._conns):
                conn.abort()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> Self:
        if self._server is None:
            await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def in_thread(self, host: str = "127.0.0.1", port: int = 0) -> FakeEngine:
        """Run on a daemon thread with its own event loop (uvloop where installed)."""
        started = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = _new_loop()
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.start(host, port))
            except BaseException as exc:  # noqa: BLE001 - reported to the starting thread
                failure.append(exc)
                started.set()
                return
            started.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self.stop())
                loop.close()

        self._thread = threading.Thread(target=run, name=f"fake-engine-{port}", daemon=True)
        self._thread.start()
        started.wait(30)
        if failure:
            raise failure[0]
        return self

    def close(self) -> None:
        """Stop a thread started with ``in_thread`` (no-op otherwise)."""
        if self._thread is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._thread = None

    def __enter__(self) -> Self:
        if self._thread is None:
            self.in_thread()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- control ----------------------------------------------------------------------

    def configure(self, **changes: Any) -> FakeConfig:
        """Change the config live (e.g. ``fault="hang"``); resets the fault counters.

        Setting ``fault`` also resets ``fault_times`` and ``fault_legs`` to their defaults
        (every request, every leg) unless they are given in the same call.
        """
        fields = {f.name for f in dataclasses.fields(FakeConfig)}
        unknown = set(changes) - fields
        if unknown:
            raise ValueError(f"unknown FakeConfig fields: {sorted(unknown)}")
        if "fault" in changes:
            changes.setdefault("fault_times", FakeConfig.fault_times)
            changes.setdefault("fault_legs", FakeConfig.fault_legs)
        config = dataclasses.replace(self.config, **changes)
        config.validate()
        self.config = config
        self._fault_seen = 0
        return config

    def reset_stats(self) -> None:
        self._stats = new_stats()
        self.recent.clear()

    def stats(self) -> dict[str, Any]:
        """Counters of what was served (plain JSON types), plus ``kv_held`` and ``recent``."""
        self._expire_held()
        out = {
            k: (dict(v) if isinstance(v, collections.Counter) else v)
            for k, v in self._stats.items()
        }
        out["kv_held"] = len(self._held)
        out["held_transfer_ids"] = sorted(self._held)
        out["recent"] = list(self.recent)
        return out

    # --- KV leases --------------------------------------------------------------------

    # --- live migration: the connector's /pd/hold and /pd/held --------------------------

    def _migration_started(self, key: str, gen: _Gen) -> None:
        self._running_keys[key] = gen

    def _migration_ended(self, key: str, gen: _Gen, completed: bool) -> None:
        """A generation with a migration key ended: hold its KV if the proxy armed it."""
        if self._running_keys.get(key) is gen:
            del self._running_keys[key]
        if key not in self._armed:
            return
        self._armed.discard(key)
        if completed:
            self._outcomes[key] = {"outcome": "finished", "reason": "completed"}
            return
        tokens = len(gen.req.prompt_ids) + len(gen.tokens)
        self._outcomes[key] = {"outcome": "held", "kv_transfer_params": self._kv_params(tokens)}
        self._stats["kv_migrations_held"] += 1

    def _issue_transfer(self) -> str:
        transfer_id = f"fake-{self._id_prefix}-{next(self.ids_json)}"
        expiry = time.monotonic() + self.config.kv_lease_s
        self._held[transfer_id] = expiry
        _HELD_EVERYWHERE[transfer_id] = (self, expiry)
        self._stats["kv_issued"] += 1
        return transfer_id

    def _release(self, transfer_id: str) -> bool:
        _HELD_EVERYWHERE.pop(transfer_id, None)
        if self._held.pop(transfer_id, None) is None:
            self._stats["kv_release_unknown"] += 1
            return False
        self._stats["kv_released"] += 1
        return True

    def _expire_held(self) -> None:
        now = time.monotonic()
        for transfer_id, expiry in list(self._held.items()):
            if expiry <= now:
                del self._held[transfer_id]
                _HELD_EVERYWHERE.pop(transfer_id, None)
                self._stats["kv_expired"] += 1

    def _decode_pulls(self, params: dict[str, Any]) -> None:
        owner = _HELD_EVERYWHERE.pop(str(params.get("transfer_id")), None)
        if owner is not None:
            engine = owner[0]
            if engine._held.pop(str(params.get("transfer_id")), None) is not None:
                engine._stats["kv_pulled"] += 1

    def _kv_params(self, prompt_tokens: int) -> dict[str, Any]:
        host = self.config.advertise_host or self.host
        return {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "transfer_id": self._issue_transfer(),
            "remote_engine_id": self.engine_id,
            "remote_host": host,
            "remote_port": self.port,
            "control_port": self.port,
            "remote_block_ids": list(range(1, 1 + (prompt_tokens + 127) // 128)),
            "remote_num_tokens": prompt_tokens,
            "tp_size": 1,
            "remote_prefill_cached_tokens": self.config.cached_tokens,
        }

    # --- faults -----------------------------------------------------------------------

    def _pick_fault(self, leg: str) -> str | None:
        config = self.config
        if config.fault is None or leg not in config.fault_legs:
            return None
        self._fault_seen += 1
        if config.fault_times and self._fault_seen > config.fault_times:
            return None
        if config.fault == "flap":
            return "error" if self._fault_seen % 2 == 0 else None
        return config.fault

    def _new_id(self) -> str:
        return f"{self._id_prefix}{next(self.ids_json):012x}"


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:  # pragma: no cover
        return asyncio.new_event_loop()


# --- HTTP --------------------------------------------------------------------------------

_REASONS = {
    200: b"OK",
    400: b"Bad Request",
    404: b"Not Found",
    405: b"Method Not Allowed",
    500: b"Internal Server Error",
    503: b"Service Unavailable",
}
_STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nserver: fake-vllm\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)
_END = b"0\r\n\r\n"
_DONE_CHUNK = b"e\r\ndata: [DONE]\n\n\r\n"  # len(b"data: [DONE]\n\n") == 14


class _BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


class _Conn(asyncio.Protocol):
    """One client connection: parses requests with httptools, answers them in order."""

    __slots__ = ("active", "body", "closed", "engine", "parser", "pending", "transport", "url")

    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.body: list[bytes] = []
        self.pending: collections.deque[tuple[bytes, bytes, bytes, bool]] = collections.deque()
        self.active: _Gen | _Delayed | None = None
        self.closed = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        self.engine._conns.add(self)
        stats = self.engine._stats
        stats["connections_open"] += 1
        stats["connections_total"] += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.engine._conns.discard(self)
        self.engine._stats["connections_open"] -= 1
        if self.active is not None:
            self.active.cancel(client_gone=True)
            self.active = None
        self.pending.clear()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.write_simple(400, error_json(400, "malformed HTTP request"), keep_alive=False)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url = b""
        self.body = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        request = (
            self.parser.get_method(),
            self.url,
            b"".join(self.body),
            self.parser.should_keep_alive(),
        )
        if self.active is None and not self.pending:
            self.dispatch(*request)
        else:
            self.pending.append(request)

    # responses
    def write_simple(
        self,
        status: int,
        body: bytes,
        content_type: bytes = b"application/json",
        keep_alive: bool = True,
    ) -> None:
        if self.closed or self.transport is None:
            return
        head = (
            b"HTTP/1.1 %d %s\r\nserver: fake-vllm\r\ncontent-type: %s\r\ncontent-length: %d\r\n"
            % (
                status,
                _REASONS.get(status, b"Error"),
                content_type,
                len(body),
            )
        )
        if not keep_alive:
            head += b"connection: close\r\n"
        self.transport.write(head + b"\r\n" + body)
        if not keep_alive:
            self.transport.close()

    def finished(self) -> None:
        """The active request is answered: take the next pipelined one, if any."""
        self.active = None
        while self.pending and self.active is None and not self.closed:
            self.dispatch(*self.pending.popleft())

    def dispatch(self, method: bytes, url: bytes, body: bytes, keep_alive: bool) -> None:
        engine = self.engine
        stats = engine._stats
        stats["requests"] += 1
        path = url.split(b"?", 1)[0].decode("latin-1")
        stats["paths"][path] += 1
        config = engine.config
        if path in ("/v1/completions", "/v1/chat/completions"):
            if method != b"POST":
                return self.write_simple(405, error_json(405, "use POST"), keep_alive=keep_alive)
            return self._generation(
                "chat" if path == "/v1/chat/completions" else "completions", body, keep_alive
            )
        if path == "/health":
            status = 503 if (config.fault_health and config.fault) else 200
            return self.write_simple(status, b"", keep_alive=keep_alive)
        if path == "/v1/models":
            return self.write_simple(200, dumps(models_answer(config)), keep_alive=keep_alive)
        if path == "/metrics":
            return self.write_simple(
                200, metrics_text(engine), b"text/plain; version=0.0.4; charset=utf-8", keep_alive
            )
        if path == "/pd/release":
            try:
                transfer_id = str(loads(body).get("transfer_id"))
            except (ValueError, AttributeError):
                return self.write_simple(
                    400,
                    error_json(400, 'body must be {"transfer_id": ...}'),
                    keep_alive=keep_alive,
                )
            released = engine._release(transfer_id)
            return self.write_simple(200, dumps({"released": released}), keep_alive=keep_alive)
        if path in ("/pd/hold", "/pd/held"):
            try:
                request = loads(body)
                key = str(request["key"])
            except (ValueError, KeyError, TypeError):
                return self.write_simple(
                    400, error_json(400, 'body must be {"key": ...}'), keep_alive=keep_alive
                )
            if path == "/pd/hold":
                armed = key in engine._running_keys
                if armed:
                    engine._armed.add(key)
                return self.write_simple(200, dumps({"armed": armed}), keep_alive=keep_alive)
            deadline = time.monotonic() + float(request.get("wait_seconds") or 0)
            return self._answer_held(key, deadline, keep_alive)
        if path == "/fake/stats":
            return self.write_simple(200, dumps(engine.stats()), keep_alive=keep_alive)
        if path == "/fake/config":
            if method == b"POST":
                try:
                    engine.configure(**(loads(body) if body else {}))
                except (ValueError, TypeError) as exc:
                    return self.write_simple(400, error_json(400, str(exc)), keep_alive=keep_alive)
            return self.write_simple(
                200, dumps(dataclasses.asdict(engine.config)), keep_alive=keep_alive
            )
        if path == "/fake/reset":
            engine.reset_stats()
            return self.write_simple(200, b"{}", keep_alive=keep_alive)
        return self.write_simple(404, error_json(404, f"no route {path}"), keep_alive=keep_alive)

    def _answer_held(self, key: str, deadline: float, keep_alive: bool) -> None:
        """POST /pd/held: the outcome of an armed migration, once there is one."""
        engine = self.engine
        outcome = engine._outcomes.pop(key, None)
        if outcome is None and key in engine._armed and time.monotonic() < deadline:
            asyncio.get_running_loop().call_later(
                0.005, self._answer_held, key, deadline, keep_alive
            )
            return
        answer = outcome or {"outcome": "pending" if key in engine._armed else "unknown"}
        self.write_simple(200, dumps(answer), keep_alive=keep_alive)

    def _generation(self, endpoint: str, raw: bytes, keep_alive: bool) -> None:
        engine = self.engine
        stats = engine._stats
        try:
            request = _parse_generation(engine.config, endpoint, raw)
        except _BadRequest as exc:
            stats["bad_requests"] += 1
            return self.write_simple(
                exc.status, error_json(exc.status, exc.message, exc.param), keep_alive=keep_alive
            )
        if engine.config.keep_requests:
            engine.recent.append({"endpoint": endpoint, "leg": request.leg, "body": request.body})
        stats["generations"][request.leg] += 1
        stats["by_endpoint"][endpoint] += 1
        if request.leg == "decode":
            engine._decode_pulls(request.kv)
        fault = engine._pick_fault(request.leg)
        if fault is not None:
            stats["faults"][fault] += 1
        if fault == "error":
            status = engine.config.fault_status
            return self.write_simple(
                status, error_json(status, f"fake engine fault ({status})"), keep_alive=keep_alive
            )
        if fault == "hang":
            self.active = _Delayed(self, None)  # holds the connection; nothing is scheduled
            return
        gen = _Gen(
            self,
            request,
            keep_alive,
            close_after=engine.config.close_after_chunks if fault == "close" else None,
        )
        if fault == "slow_first_byte":
            self.active = _Delayed(self, gen)
            self.active.handle = asyncio.get_running_loop().call_later(
                engine.config.first_byte_ms / 1000, self.active.fire
            )
            return
        self.active = gen
        gen.begin()


class _Delayed:
    """A request that waits (slow first byte) or never answers (hang)."""

    __slots__ = ("conn", "gen", "handle")

    def __init__(self, conn: _Conn, gen: _Gen | None) -> None:
        self.conn, self.gen, self.handle = conn, gen, None

    def fire(self) -> None:
        if self.gen is not None and not self.conn.closed:
            self.conn.active = self.gen
            self.gen.begin()

    def cancel(self, client_gone: bool = False) -> None:
        if self.handle is not None:
            self.handle.cancel()
        if client_gone:
            self.conn.engine._stats["client_gone"] += 1


@dataclasses.dataclass
class _Request:
    endpoint: str  # completions | chat
    body: dict[str, Any]
    leg: str  # prefill | decode | plain
    kv: dict[str, Any]
    prompt_ids: list[int]
    max_tokens: int
    stream: bool
    include_usage: bool
    continuous_usage: bool
    return_token_ids: bool
    model: str


def _parse_generation(config: FakeConfig, endpoint: str, raw: bytes) -> _Request:
    try:
        body = loads(raw)
    except ValueError as exc:
        raise _BadRequest(f"invalid JSON body: {exc}") from exc
    if not isinstance(body, dict):
        raise _BadRequest("the body must be a JSON object")
    model = body.get("model")
    if model is not None and model != config.model:
        raise _BadRequest(
            f"The model `{model}` does not exist. Valid aliases: {config.model}.", "model", 404
        )
    if endpoint == "completions":
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str) and prompt:
            prompt_ids = list(prompt.encode())
        elif (
            isinstance(prompt, list)
            and prompt
            and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
        ):
            prompt_ids = prompt
        else:
            raise _BadRequest(
                "Either prompt or prompt_embeds must be provided and non-empty.", "prompt"
            )
        max_tokens = body.get("max_tokens")
    else:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _BadRequest("'messages' must be a non-empty list", "messages")
        prompt_ids = chat_prompt_ids(messages)
        max_tokens = body.get("max_completion_tokens")
        if max_tokens is None:
            max_tokens = body.get("max_tokens")
    if max_tokens is None:
        max_tokens = config.tokens
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise _BadRequest(f"max_tokens must be at least 1, got {max_tokens}.", "max_tokens")
    if len(prompt_ids) + max_tokens > config.max_model_len:
        raise _BadRequest(
            f"This model's maximum context length is {config.max_model_len} tokens. "
            f"However, you requested {max_tokens} output tokens and your prompt contains "
            f"{len(prompt_ids)} input tokens, for a total "
            f"of {len(prompt_ids) + max_tokens} tokens.",
        )
    stream = bool(body.get("stream"))
    options = body.get("stream_options") or {}
    if options and not stream:
        raise _BadRequest(
            "Stream options can only be defined when `stream=True`.", "stream_options"
        )
    kv = body.get("kv_transfer_params") or {}
    if kv.get("do_remote_decode"):
        leg = "prefill"
    elif kv.get("do_remote_prefill"):
        leg = "decode"
    else:
        leg = "plain"
    return _Request(
        endpoint=endpoint,
        body=body,
        leg=leg,
        kv=kv,
        prompt_ids=prompt_ids,
        max_tokens=max_tokens,
        stream=stream,
        include_usage=bool(options.get("include_usage")),
        continuous_usage=bool(
            options.get("include_usage") and options.get("continuous_usage_stats")
        ),
        return_token_ids=bool(body.get("return_token_ids")),
        model=config.model,
    )


class _Gen:
    """One generation, driven by loop timers (no task per request)."""

    __slots__ = (
        "close_after",
        "conn",
        "created",
        "done",
        "handle",
        "itl",
        "keep_alive",
        "loop",
        "next_at",
        "position",
        "prefix",
        "prev",
        "req",
        "rid",
        "started",
        "tokens",
    )

    def __init__(
        self, conn: _Conn, req: _Request, keep_alive: bool, close_after: int | None
    ) -> None:
        self.conn, self.req, self.keep_alive, self.close_after = conn, req, keep_alive, close_after
        self.loop = asyncio.get_running_loop()
        self.handle: asyncio.TimerHandle | None = None
        self.tokens: list[int] = []
        self.prev = req.prompt_ids[-1] if req.prompt_ids else 0
        self.position = len(req.prompt_ids)
        self.created = int(time.time())
        self.rid = ("chatcmpl-" if req.endpoint == "chat" else "cmpl-") + conn.engine._new_id()
        self.done = False
        self.started = False

    def begin(self) -> None:
        engine = self.conn.engine
        stats = engine._stats
        key = self.req.kv.get("migration_key")
        if isinstance(key, str):
            engine._migration_started(key, self)
        stats["in_flight"] += 1
        stats["max_in_flight"] = max(stats["max_in_flight"], stats["in_flight"])
        self.started = True
        config = engine.config
        self.itl = config.itl_ms / 1000
        if self.req.leg == "decode":
            first = (
                config.decode_first_ms if config.decode_first_ms is not None else config.itl_ms
            ) / 1000
        else:
            first = config.prefill_ms / 1000
        self.next_at = self.loop.time() + first
        if self.req.stream:
            stats["streams"] += 1
            self.prefix = stream_prefix(self.req, self.rid, self.created)
            self.conn.transport.write(_STREAM_HEAD)
            if self.req.endpoint == "chat":
                self._event(chat_role_chunk(self.req, self.prefix))
            self.handle = self.loop.call_at(self.next_at, self._stream_step)
        else:
            stats["non_streams"] += 1
            if self.close_after is not None:
                self.conn.transport.close()
                return
            self.next_at += self.itl * (self.req.max_tokens - 1)
            self.handle = self.loop.call_at(self.next_at, self._answer_whole)

    def _next(self) -> int:
        token = next_token(self.prev, self.position)
        self.prev = token
        self.position += 1
        self.tokens.append(token)
        return token

    def _event(self, payload: bytes) -> None:
        data = b"data: " + payload + b"\n\n"
        self.conn.transport.write(b"%x\r\n%s\r\n" % (len(data), data))

    def _stream_step(self) -> None:
        if self.conn.closed:
            return
        token = self._next()
        req = self.req
        last = len(self.tokens) >= req.max_tokens
        stats = self.conn.engine._stats
        stats["chunks"] += 1
        stats["tokens"] += 1
        if req.endpoint == "chat":
            payload = chat_token_chunk(self, token, last)
        else:
            payload = completion_token_chunk(self, token, last)
        self._event(payload)
        if self.close_after is not None and len(self.tokens) >= self.close_after:
            self.done = True
            self._finish_counters(completed=False)
            self.conn.transport.close()
            return
        if last:
            tail = b""
            if req.include_usage:
                usage = dumps(stream_usage(self))
                data = (
                    b"data: "
                    + self.prefix
                    + b'"choices":[],"usage":'
                    + usage
                    + b',"system_fingerprint":"'
                    + SYSTEM_FINGERPRINT.encode()
                    + b'"}\n\n'
                )
                tail = b"%x\r\n%s\r\n" % (len(data), data)
            self.conn.transport.write(tail + _DONE_CHUNK + _END)
            self._complete()
            return
        self.next_at += self.itl
        self.handle = self.loop.call_at(self.next_at, self._stream_step)

    def _answer_whole(self) -> None:
        if self.conn.closed:
            return
        for _ in range(self.req.max_tokens):
            self._next()
        stats = self.conn.engine._stats
        stats["tokens"] += len(self.tokens)
        body = dumps(whole_answer(self))
        self.conn.write_simple(200, body, keep_alive=self.keep_alive)
        self._complete()

    def _finish_counters(self, completed: bool) -> None:
        engine = self.conn.engine
        stats = engine._stats
        stats["in_flight"] -= 1
        if completed:
            stats["completed"] += 1
        key = self.req.kv.get("migration_key")
        if isinstance(key, str):
            engine._migration_ended(key, self, completed)

    def _complete(self) -> None:
        self.done = True
        self._finish_counters(completed=True)
        if not self.keep_alive:
            self.conn.transport.close()
            return
        self.conn.finished()

    def cancel(self, client_gone: bool = False) -> None:
        if self.handle is not None:
            self.handle.cancel()
        if not self.done and self.started:
            self.done = True
            self._finish_counters(completed=False)
            if client_gone:
                self.conn.engine._stats["client_gone"] += 1


# --- response bodies, shaped like vLLM 0.32's ---------------------------------------------
