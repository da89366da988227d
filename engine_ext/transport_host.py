"""ZeroMQ control and host data plane, P side: serve pulls of held blocks (ROUTER).

One :class:`HostServer` per P worker (rank r binds ``zmq_port + r``, or a free port);
its D-side peer
is :class:`engine_ext.transport_pull.HostClient` (a DEALER per P endpoint, rank r dials
rank r). Both run on their own thread and own their sockets; the engine thread only
registers work and collects results, so KV bytes never cross the engine loop.

Protocol (JSON header frame, then an optional payload frame):

* D -> P ``chunk`` {tid, key, seq, blocks, layout, via, dev}: "send me these of your
  blocks". D cuts a pull into chunks of whole blocks (``chunk_bytes``) and keeps a
  small window of them requested, so memory stays bounded on both sides and P's gather
  of chunk k+1 overlaps the wire time of chunk k.
* P -> D reply {key, seq, status, ...} + payload (status ``ok``, host path): the
  gathered blocks, sent zero-copy from a pooled staging buffer.
* D -> P ``done`` {tid, key, ok}: this consumer is finished (pulled, failed, aborted or
  skipped); P frees the blocks when all consumers are done.

Every wait has a deadline: D fails a pull after ``pull_timeout_seconds``; P parks a
pull for an unknown transfer at most ``unknown_wait_seconds`` (and serves it the moment
the engine thread registers the transfer: :meth:`HostServer.wake`); a chunk waiting for
a staging buffer waits in a queue, never in the loop, so one slow consumer cannot stall
the others; a pull for another incarnation of this engine (P restarted) is refused at
once.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from typing import Any

import numpy as np
import zmq

from engine_ext.config import PDSettings
from engine_ext.layout import BlockSource
from engine_ext.leases import SendRegistry
from engine_ext.sockets import (
    Waker,
    dumps,
    engine_cpus,
    new_context,
    socket_defaults,
    unpin_current_thread,
)
from engine_ext.stats import WorkerCounters

logger = logging.getLogger("vllm.pd.transport")

STAGING_WAIT_SECONDS = 5.0  # longest P waits for a staging buffer before refusing a chunk


class StagingPool:
    """Reusable, pre-faulted host buffers for chunks in flight, bounded in bytes.

    A buffer sent zero-copy belongs to ZMQ until its tracker says the bytes are on the
    wire; only then is it reused. Fresh buffers are touched once at creation: page
    faults on a new 16 MiB buffer per chunk cost more than the copy itself.
    """

    def __init__(self, buf_bytes: int, max_bytes: int):
        self.buf_bytes = buf_bytes
        self.max_bytes = max_bytes
        self._free: list[np.ndarray] = []
        self._busy: deque[tuple[np.ndarray, zmq.MessageTracker]] = deque()
        self._busy_bytes = 0

    def _reap(self) -> None:
        keep: deque[tuple[np.ndarray, zmq.MessageTracker]] = deque()
        for buf, tracker in self._busy:
            if tracker.done:
                self._busy_bytes -= buf.nbytes
                pooled = len(self._free) * self.buf_bytes
                if buf.nbytes == self.buf_bytes and pooled + self.buf_bytes <= self.max_bytes:
                    self._free.append(buf)
            else:
                keep.append((buf, tracker))
        self._busy = keep

    def try_acquire(self, nbytes: int) -> np.ndarray | None:
        """A buffer now, or None while the bytes on the wire fill the budget."""
        self._reap()
        if not self._busy or self._busy_bytes + max(nbytes, self.buf_bytes) <= self.max_bytes:
            if nbytes <= self.buf_bytes:
                return self._free.pop() if self._free else np.ones(self.buf_bytes, np.uint8)
            return np.ones(nbytes, np.uint8)  # one block larger than a chunk: a one-off
        return None

    def acquire(self, nbytes: int, timeout: float) -> np.ndarray | None:
        deadline = time.monotonic() + timeout
        while True:
            buf = self.try_acquire(nbytes)
            if buf is not None:
                return buf
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                self._busy[0][1].wait(timeout=min(left, 0.5))
            except zmq.NotDone:
                pass

    def give_back(self, buf: np.ndarray) -> None:
        """An acquired buffer that was not sent after all."""
        if (
            buf.nbytes == self.buf_bytes
            and (len(self._free) + 1) * self.buf_bytes <= self.max_bytes
        ):
            self._free.append(buf)

    def track(self, buf: np.ndarray, tracker: zmq.MessageTracker) -> None:
        self._busy.append((buf, tracker))
        self._busy_bytes += buf.nbytes


class HostServer:
    """P side of one worker: answers chunk requests for held transfers."""

    def __init__(
        self,
        settings: PDSettings,
        port: int,
        registry: SendRegistry,
        block_io: BlockSource,
        layout_digest: str,
        layout_desc: dict[str, Any],
        counters: WorkerCounters,
        nccl: Any = None,
        engine_id: str = "",
        ipc: Any = None,
    ):
        self.settings = settings
        self.registry = registry
        self.block_io = block_io
        self.layout_digest = layout_digest
        self.layout_desc = layout_desc
        self.counters = counters
        self.nccl = nccl  # transport_nccl.NcclServer or None
        self.ipc = ipc  # transport_ipc.IpcServer or None
        # Blocks pinned for D's device-to-device copies: consumer key -> (entry, lapse).
        self._pins: dict[str, tuple[Any, float]] = {}
        self.engine_id = engine_id
        self.pool = StagingPool(settings.chunk_bytes, settings.max_inflight_bytes)
        self._cpus = engine_cpus()
        self._ctx = new_context(self._cpus)
        self.sock = self._ctx.socket(zmq.ROUTER)
        socket_defaults(self.sock, settings.connect_timeout_seconds)
        self.sock.setsockopt(zmq.SNDHWM, 0)  # bounded by the staging pool instead
        try:
            # Port 0: any free port (the scheduler side advertises the one bound).
            self.sock.bind(f"tcp://{settings.bind_host}:{port or '*'}")
        except zmq.ZMQError as exc:
            self._ctx.destroy(linger=0)
            raise RuntimeError(f"PDConnector cannot bind ZMQ port {port}: {exc}") from exc
        self.port = int(self.sock.getsockopt(zmq.LAST_ENDPOINT).decode().rsplit(":", 1)[1])
        # The engine thread wakes the loop when it registers transfers (parked pulls).
        self._waker = Waker(self._ctx, "pd-server-wake")
        self._parked: list[tuple[float, bytes, dict[str, Any]]] = []
        # Chunks waiting for a staging buffer (bytes of earlier chunks still on the wire).
        self._backlog: deque[tuple[float, bytes, dict[str, Any]]] = deque()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"pd-server-{port}", daemon=True)
        registry.on_register.append(self.wake)

    def start(self) -> HostServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._stop.is_set():
            return
        if self.wake in self.registry.on_register:
            self.registry.on_register.remove(self.wake)
        self._stop.set()
        self.wake()
        self._thread.join(timeout=5)
        self._ctx.destroy(linger=0)
        self._unpin_all()

    def wake(self) -> None:
        """Any thread: new transfers were registered; serve the pulls parked for them."""
        self._waker.wake()

    # --- loop

    def _timeout_ms(self) -> int:
        if self._backlog:
            return 2  # staging trackers cannot be polled: look again soon
        if self._pins:  # a pin lapses at its deadline (seconds away: coarse is fine)
            left = min(lapse for _, lapse in self._pins.values()) - time.monotonic()
            return max(1, min(1000, int(left * 1000) + 1))
        if self._parked:  # registration wakes us; this is a fallback and the deadline
            left = min(p[0] for p in self._parked) - time.monotonic()
            return max(1, min(50, int(left * 1000) + 1))
        return 1000

    def _run(self) -> None:
        unpin_current_thread(self._cpus)
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self._waker.socket, zmq.POLLIN)
        while not self._stop.is_set():
            try:
                events = dict(poller.poll(self._timeout_ms()))
                if self._waker.socket in events:
                    self._waker.drain()
                if self.sock in events:
                    for _ in range(64):  # drain, but keep parked pulls moving
                        try:
                            frames = self.sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._handle(frames)
                self._drain_backlog()
                self._retry_parked()
                self._lapse_pins()
            except zmq.ContextTerminated:
                self._unpin_all()
                return
            except Exception:  # one bad message must not kill the data plane
                logger.exception("PD server loop error")

    def _handle(self, frames: list[bytes]) -> None:
        if len(frames) < 2:
            return
        ident, header = frames[0], json.loads(frames[1])
        op = header.get("op")
        if op == "chunk":
            self._chunk(ident, header)
        elif op == "done":
            self._unpin(header["key"])
            self.registry.consumer_done(header["tid"], header["key"])
            if header.get("ok"):
                self.counters.add(pulls_served=1)
        else:
            logger.warning("PD server: unknown op %r", op)

    def _reply(self, ident: bytes, request: dict[str, Any], reply: dict[str, Any]) -> None:
        reply.update(key=request.get("key"), seq=request.get("seq"))
        self.sock.send_multipart([ident, dumps(reply)])

    def _refuse(self, ident: bytes, request: dict[str, Any], status: str, detail: str) -> None:
        self.counters.add(pulls_refused=1)
        self._reply(ident, request, {"status": status, "detail": detail})

    # --- pins (device-to-device copies by D)

    def _unpin(self, key: str) -> None:
        pin = self._pins.pop(key, None)
        if pin is not None:
            self.registry.end_read(pin[0])

    def _lapse_pins(self) -> None:
        now = time.monotonic()
        for key in [k for k, (_, lapse) in self._pins.items() if now >= lapse]:
            logger.warning("PD server: D never finished copying for %s; unpinning", key)
            self.counters.add(pins_lapsed=1)
            self._unpin(key)

    def _unpin_all(self) -> None:
        for key in list(self._pins):
            self._unpin(key)

    def _serve_ipc(self, ident: bytes, h: dict[str, Any], entry: Any) -> bool:
        """A pull D copies itself; True if the entry stays pinned for it."""
        if self.ipc is None:
            self._reply(ident, h, {"status": "use_host"})
            return False
        if h.get("epoch") != self.ipc.epoch:  # D has no (or a stale) map of us
            self._reply(ident, h, {"status": "ipc_setup", "ipc": self.ipc.description})
            return False
        if h["key"] in self._pins:  # asked again (a reconnect): the pin stands
            self._reply(ident, h, {"status": "ok", "via": "ipc"})
            return False
        lapse = time.monotonic() + self.settings.pull_timeout_seconds
        self._pins[h["key"]] = (entry, lapse)
        self._reply(ident, h, {"status": "ok", "via": "ipc"})
        self.counters.add(
            blocks_sent=len(h["blocks"]), bytes_sent=self.block_io.nbytes(len(h["blocks"]))
        )
        return True

    def _retry_parked(self) -> None:
        if not self._parked:
            return
        now, parked, self._parked = time.monotonic(), self._parked, []
        for deadline, ident, header in parked:
            state = self.registry.state(header["tid"])
            if state != "unknown":
                self._chunk(ident, header)
            elif now >= deadline:
                self._refuse(ident, header, "unknown", f"transfer {header['tid']} unknown here")
            else:
                self._parked.append((deadline, ident, header))

    def _drain_backlog(self) -> None:
        """Serve chunks that waited for a staging buffer, oldest first."""
        while self._backlog:
            since, ident, header = self._backlog[0]
            if not self._serve(ident, header, wait_since=since):
                return  # still no buffer: keep the order
            self._backlog.popleft()

    def _chunk(self, ident: bytes, h: dict[str, Any]) -> None:
        tid = h["tid"]
        if h.get("layout") != self.layout_digest:
            detail = json.dumps(self.layout_desc)
            logger.warning("PD server: refusing pull of %s: KV layout of the peer differs", tid)
            self._refuse(ident, h, "mismatch", detail)
            return
        engine = h.get("engine")
        if engine and self.engine_id and engine != self.engine_id:
            # Held by an earlier incarnation of this engine (P restarted on the same
            # port): it will never be registered here.
            self._refuse(ident, h, "unknown", f"transfer {tid} of engine {engine}, not this one")
            return
        if self._backlog:  # keep chunk order behind those waiting for staging
            self._backlog.append((time.monotonic(), ident, h))
            return
        if not self._serve(ident, h, wait_since=None):
            self._backlog.append((time.monotonic(), ident, h))

    def _serve(self, ident: bytes, h: dict[str, Any], wait_since: float | None) -> bool:
        """Answer one chunk request; False (nothing sent) when no staging buffer is free."""
        tid = h["tid"]
        entry = self.registry.begin_read(tid)
        if entry is None:
            if not h.get("parked") and self.registry.state(tid) == "unknown":
                # The prefill may have finished a step ago and its registration not
                # reached this worker yet: wait for it, but not forever.
                h["parked"] = True
                self._parked.append(
                    (time.monotonic() + self.settings.unknown_wait_seconds, ident, h)
                )
            else:
                self._refuse(ident, h, "unknown", f"transfer {tid} released or expired")
            return True
        blocks: list[int] = h["blocks"]
        pinned = False
        try:
            if not set(blocks) <= set(entry.spec.block_ids):
                self._refuse(ident, h, "error", "blocks outside the transfer")
                return True
            if h.get("via") == "ipc":
                pinned = self._serve_ipc(ident, h, entry)
                return True
            if h.get("via") == "nccl":
                if self.nccl is None:
                    self._reply(ident, h, {"status": "use_host"})
                else:  # replies itself, before it waits for the send to complete
                    self.nccl.send_chunk(h, blocks, lambda reply: self._reply(ident, h, reply))
                return True
            nbytes = self.block_io.nbytes(len(blocks))
            buf = self.pool.try_acquire(nbytes)
            if buf is None:
                if wait_since is not None and time.monotonic() - wait_since > STAGING_WAIT_SECONDS:
                    self._refuse(ident, h, "busy", "no staging buffer free")
                    return True
                return False
            try:
                self.block_io.gather(blocks, buf[:nbytes])
            except Exception as exc:  # D must hear of it, not time out
                logger.exception("PD server: gathering %s failed", tid)
                self.pool.give_back(buf)
                self._refuse(ident, h, "error", f"gather failed: {exc}")
                return True
        finally:
            if not pinned:
                self.registry.end_read(entry)
        head = dumps({"key": h["key"], "seq": h["seq"], "status": "ok", "nbytes": nbytes})
        tracker = self.sock.send_multipart(
            [ident, head, memoryview(buf[:nbytes])], copy=False, track=True
        )
        self.pool.track(buf, tracker)
        self.counters.add(bytes_sent=nbytes, blocks_sent=len(blocks), chunks_sent=1)
        return True
