"""ZeroMQ host data plane, D side: pull held blocks from P workers (DEALERs).

One :class:`HostClient` per D worker, on its own thread. It cuts each pull into chunks
of whole blocks, keeps a small window of them requested (bounded memory, and P's
gather of chunk k+1 overlaps the wire time of chunk k), scatters each arriving chunk
into the local blocks, and reports every pull exactly once through
:meth:`HostClient.take_results` (and calls ``on_result``, so the engine can stop waiting
at once). A socket monitor per peer tells a dead, frozen or vanished P from a slow one:
ZMQ heartbeats are answered by P's I/O thread even while its Python threads are busy,
so a connection that stays up means a live P (its pull runs to the pull deadline), and
one that is refused, dropped or never handshaken means a dead one (its pulls fail about
``connect_timeout_seconds`` after the last sign of life). Chunk requests lost with a
dropped connection are sent again when it comes back. See
:mod:`engine_ext.transport_host` for the protocol.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from engine_ext.config import PDSettings
from engine_ext.layout import BlockSource, KVLayout, plan_chunks
from engine_ext.metadata import Notice, PullSpec
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

WINDOW = 3  # chunks a pull keeps requested: enough to overlap gather, wire and scatter


@dataclass
class PullResult:
    req_id: str
    ok: bool
    cancelled: bool
    local_block_ids: tuple[int, ...]
    reason: str = ""


# "Up" means the ZMTP handshake completed, not just TCP: a dying process's listening
# socket still accepts connections while it is torn down, and never answers.
_UP_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED
_DOWN_EVENTS = (
    zmq.EVENT_DISCONNECTED
    | zmq.EVENT_CONNECT_RETRIED
    | zmq.EVENT_CLOSED
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


@dataclass
class _Peer:
    """A DEALER to one P worker, with connection state from a ZMQ socket monitor."""

    endpoint: str
    sock: zmq.Socket
    monitor: zmq.Socket
    up: bool = False
    ever_up: bool = False
    down_since: float = field(default_factory=time.monotonic)


@dataclass
class _Job:
    spec: PullSpec
    endpoint: str
    chunks: list[tuple[int, int]]
    deadline: float
    started: float
    next_chunk: int = 0
    outstanding: dict[int, int] = field(default_factory=dict)  # seq -> bytes reserved
    done_chunks: int = 0
    nbytes: int = 0
    via: str = "host"


class HostClient:
    """D side of one worker: runs pulls, reports each exactly once via take_results."""

    def __init__(
        self,
        settings: PDSettings,
        rank: int,
        block_io: BlockSource,
        layout_digest: str,
        layout_desc: dict[str, Any],
        counters: WorkerCounters,
        nccl: Any = None,
        on_result: Callable[[PullResult], None] | None = None,
        ipc: Any = None,
    ):
        self.settings = settings
        self.on_result = on_result  # called (client thread) after each result is queued
        self.rank = rank
        self.block_io = block_io
        self.layout_digest = layout_digest
        self.layout_desc = layout_desc
        self.counters = counters
        self.nccl = nccl  # transport_nccl.NcclClient or None
        self.ipc = ipc  # transport_ipc.IpcClient or None
        self._cpus = engine_cpus()
        self._ctx = new_context(self._cpus)
        self._waker = Waker(self._ctx, "pd-client-wake")
        self._commands: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._results: list[PullResult] = []
        self._results_lock = threading.Lock()
        self._jobs: dict[str, _Job] = {}  # consumer key -> job
        self._peers: dict[str, _Peer] = {}
        self._poller = zmq.Poller()
        self._inflight_bytes = 0
        self._rr = 0  # round-robin start for _pump
        self._thread = threading.Thread(target=self._run, name=f"pd-client-{rank}", daemon=True)

    # --- engine thread API

    def start(self) -> HostClient:
        self._thread.start()
        return self

    def submit(self, spec: PullSpec) -> None:
        self._command("pull", spec)

    def notice(self, notice: Notice) -> None:
        self._command("notice", notice)

    def cancel(self, req_ids: set[str]) -> None:
        self._command("cancel", set(req_ids))

    def take_results(self) -> list[PullResult]:
        with self._results_lock:
            out, self._results = self._results, []
        return out

    def stop(self) -> None:
        self._command("stop", None)
        self._thread.join(timeout=5)
        self._ctx.destroy(linger=0)

    def _command(self, kind: str, arg: Any) -> None:
        self._commands.put((kind, arg))
        self._waker.wake()

    # --- client thread

    def endpoint(self, host: str, port: int, ports: tuple[int, ...] = ()) -> str:
        """P's worker of our rank: its own port if P said, else rank 0's port + rank."""
        return f"tcp://{host}:{ports[self.rank] if self.rank < len(ports) else port + self.rank}"

    def _peer(self, endpoint: str) -> _Peer:
        peer = self._peers.get(endpoint)
        if peer is None:
            sock = self._ctx.socket(zmq.DEALER)
            socket_defaults(sock, self.settings.connect_timeout_seconds)
            # Drop (and retry) a connection whose handshake stalls, e.g. a frozen P.
            sock.setsockopt(zmq.HANDSHAKE_IVL, int(self.settings.connect_timeout_seconds * 1000))
            monitor = sock.get_monitor_socket(_UP_EVENTS | _DOWN_EVENTS)
            try:
                sock.connect(endpoint)
            except zmq.ZMQError as exc:  # an address no socket takes (P's params say so)
                sock.disable_monitor()
                monitor.close(linger=0)
                sock.close(linger=0)
                raise RuntimeError(f"cannot connect to {endpoint}: {exc}") from exc
            peer = self._peers[endpoint] = _Peer(endpoint, sock, monitor)
            self._poller.register(sock, zmq.POLLIN)
            self._poller.register(monitor, zmq.POLLIN)
        return peer

    def _drop_peer(self, endpoint: str) -> None:
        """Forget an unreachable peer: its queued requests and stale replies vanish."""
        if any(job.endpoint == endpoint for job in self._jobs.values()):
            return
        peer = self._peers.pop(endpoint, None)
        if peer is not None:
            for sock in (peer.sock, peer.monitor):
                self._poller.unregister(sock)
            peer.sock.disable_monitor()
            peer.monitor.close(linger=0)
            peer.sock.close(linger=0)
        if self.ipc is not None:  # its memory may be freed now; a new one is tried anew
            self.ipc.unmap(endpoint)
            self.ipc.forget(endpoint)

    def _on_monitor(self, peer: _Peer) -> None:
        from zmq.utils.monitor import recv_monitor_message

        while True:
            try:
                event = recv_monitor_message(peer.monitor, zmq.NOBLOCK)["event"]
            except zmq.Again:
                return
            if event & _UP_EVENTS:
                if not peer.up:
                    logger.info("PD client: connected to %s", peer.endpoint)
                reconnected = peer.ever_up
                peer.up = peer.ever_up = True
                if reconnected:
                    self._resend(peer)
            elif event & _DOWN_EVENTS and peer.up:
                peer.up, peer.down_since = False, time.monotonic()
                logger.info("PD client: lost %s (event %d)", peer.endpoint, event)

    def _resend(self, peer: _Peer) -> None:
        """A new connection to a peer: chunk requests sent on the old one may be lost
        (P answers a repeated request again; the extra answer is ignored)."""
        for job in self._jobs.values():
            if job.endpoint == peer.endpoint:
                for seq in job.outstanding:
                    self._request_chunk(job, seq)

    def _run(self) -> None:
        unpin_current_thread(self._cpus)
        self._poller.register(self._waker.socket, zmq.POLLIN)
        while True:
            try:
                now = time.monotonic()
                wait = min((job.deadline for job in self._jobs.values()), default=now + 1.0) - now
                if any(not self._peer(job.endpoint).up for job in self._jobs.values()):
                    wait = min(wait, 0.05)  # watch unreachable peers' deadlines
                elif any(not peer.up for peer in self._peers.values()):
                    wait = min(wait, 0.25)  # and forget the ones that stay gone
                events = dict(self._poller.poll(max(1, min(1000, int(wait * 1000) + 1))))
                if self._waker.socket in events:
                    self._waker.drain()
                    if not self._drain_commands():
                        return
                for peer in list(self._peers.values()):
                    if peer.monitor in events:
                        self._on_monitor(peer)
                    if peer.sock in events:
                        self._drain_replies(peer)
                self._expire()
                self._forget_gone_peers()
                self._pump()
            except zmq.ContextTerminated:
                return
            except Exception:
                logger.exception("PD client loop error")

    def _drain_commands(self) -> bool:
        while True:
            try:
                kind, arg = self._commands.get_nowait()
            except queue.Empty:
                return True
            if kind == "stop":
                for job in list(self._jobs.values()):
                    self._finish(job, ok=False, reason="connector shutdown")
                return False
            if kind == "pull":
                self._start(arg)
            elif kind == "notice":
                done = {"op": "done", "tid": arg.transfer_id, "key": arg.consumer_key, "ok": False}
                self._send(self.endpoint(arg.host, arg.port, arg.ports), done)
            elif kind == "cancel":
                for job in [j for j in self._jobs.values() if j.spec.req_id in arg]:
                    self._finish(job, ok=False, reason="request aborted", cancelled=True)

    def _send(self, endpoint: str, header: dict[str, Any]) -> None:
        try:
            self._peer(endpoint).sock.send(dumps(header), zmq.NOBLOCK)
        except zmq.Again:
            logger.warning("PD client: %s not accepting messages (queue full)", endpoint)
        except RuntimeError as exc:
            logger.warning("PD client: notice not sent: %s", exc)

    def _start(self, spec: PullSpec) -> None:
        now = time.monotonic()
        endpoint = self.endpoint(spec.host, spec.port, spec.ports)
        job = _Job(
            spec, endpoint, [], deadline=now + self.settings.pull_timeout_seconds, started=now
        )
        self._jobs[spec.consumer_key] = job
        if len(spec.remote_block_ids) != len(spec.local_block_ids) or not spec.local_block_ids:
            self._finish(job, ok=False, reason="malformed pull (block lists differ)")
            return
        try:
            self._peer(endpoint)  # connected first: every live job has its peer
            self._set_path(job, self._choose(endpoint, spec.remote_layout))
        except RuntimeError as exc:
            self._finish(job, ok=False, reason=str(exc))

    def _choose(self, endpoint: str, remote_layout: dict[str, Any]) -> str:
        """The fastest data path both ends may share: device to device on one host
        (IPC), else NCCL between CUDA devices, else host memory."""
        transport = self.settings.transport
        if self.ipc is not None and transport in ("auto", "ipc"):
            if self.ipc.usable(endpoint, remote_layout):
                return "ipc"
        if transport == "ipc":
            raise RuntimeError("transport=ipc, but this pull cannot use CUDA IPC")
        if self.nccl is not None:
            return self.nccl.choose(endpoint, remote_layout)
        return "host"

    def _set_path(self, job: _Job, via: str) -> None:
        """(Re)plan a pull for a data path: one piece for a device-to-device copy
        (nothing is staged), chunks of at most chunk_bytes otherwise."""
        self._inflight_bytes -= sum(job.outstanding.values())
        job.outstanding.clear()
        job.via, job.next_chunk = via, 0
        count = len(job.spec.remote_block_ids)
        job.chunks = (
            [(0, count)]
            if via == "ipc"
            else plan_chunks(count, self.block_io.nbytes(1), self.settings.chunk_bytes)
        )

    def _leave_ipc(self, job: _Job, reason: str) -> None:
        """IPC is impossible with this peer: the next path takes the pull over."""
        if self.settings.transport == "ipc":
            raise RuntimeError(f"transport=ipc, but {reason}")
        self.ipc.refuse(job.endpoint, reason)
        via = self.nccl.choose(job.endpoint, job.spec.remote_layout) if self.nccl else "host"
        self._set_path(job, via)

    def _pump(self) -> None:
        """Request more chunks, within each pull's window and the byte budget.

        One chunk per pull per round, from a rotating first pull; a chunk that does not
        fit is skipped, not waited for, so smaller ones of other pulls still go. No P
        holds more than the budget less one chunk (the default window, 3 x 16 MiB of
        64 MiB, is just that), nor more than half while pulls from several P wait
        (always one chunk), so a P that stalls with chunks outstanding cannot hold up
        the pulls from the others.
        """
        jobs = list(self._jobs.values())
        if not jobs:
            return
        self._rr = (self._rr + 1) % len(jobs)
        jobs = jobs[self._rr :] + jobs[: self._rr]
        budget = self.settings.max_inflight_bytes
        peer_cap = budget - self.settings.chunk_bytes
        per_peer: dict[str, int] = {}
        for job in jobs:
            per_peer[job.endpoint] = per_peer.get(job.endpoint, 0) + sum(job.outstanding.values())
        waiting = {j.endpoint for j in jobs if j.next_chunk < len(j.chunks)}
        progress = True
        while progress:
            progress = False
            for job in jobs:
                if job.next_chunk >= len(job.chunks) or len(job.outstanding) >= WINDOW:
                    continue
                start, end = job.chunks[job.next_chunk]
                # A device-to-device copy stages nothing: it needs none of the budget.
                size = self.block_io.nbytes(end - start) if job.via != "ipc" else 0
                if self._inflight_bytes and self._inflight_bytes + size > budget:
                    continue
                held = per_peer[job.endpoint]
                cap = min(peer_cap, budget // 2) if len(waiting) > 1 else peer_cap
                if held and held + size > cap:
                    continue
                seq = job.next_chunk
                job.outstanding[seq] = size
                self._inflight_bytes += size
                per_peer[job.endpoint] = held + size
                job.next_chunk += 1
                self._request_chunk(job, seq)
                progress = True

    def _request_chunk(self, job: _Job, seq: int) -> None:
        start, end = job.chunks[seq]
        request = {
            "op": "chunk",
            "tid": job.spec.transfer_id,
            "key": job.spec.consumer_key,
            "seq": seq,
            "blocks": list(job.spec.remote_block_ids[start:end]),
            "layout": self.layout_digest,
            "engine": job.spec.remote_engine_id,
            "via": job.via,
            "dev": self.nccl.device_id if self.nccl is not None else "",
        }
        if job.via == "ipc":
            request["epoch"] = self.ipc.epoch(job.endpoint, job.spec.remote_engine_id)
        self._send(job.endpoint, request)

    def _drain_replies(self, peer: _Peer) -> None:
        while True:
            try:
                frames = peer.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            peer.up = peer.ever_up = True  # an answer proves it, whatever the monitor said
            header = json.loads(frames[0].bytes)
            job = self._jobs.get(header.get("key"))
            seq = header.get("seq")
            if job is None or seq not in job.outstanding:
                continue  # a reply for a pull that already ended
            self._on_reply(job, seq, header, frames[1:])

    def _on_reply(
        self, job: _Job, seq: int, header: dict[str, Any], payload: list[zmq.Frame]
    ) -> None:
        status = header.get("status")
        start, end = job.chunks[seq]
        local = job.spec.local_block_ids[start:end]
        moving = time.monotonic()
        try:
            if status == "ok" and header.get("via") == "ipc":
                remote = job.spec.remote_block_ids[start:end]
                self.ipc.copy(job.endpoint, remote, local, job.deadline)
            elif status == "ok" and header.get("via") == "nccl":
                self.nccl.recv_chunk(job.endpoint, header, local, job.deadline)
            elif status == "ok":
                expected = self.block_io.nbytes(end - start)
                data = (
                    np.frombuffer(payload[0].buffer, np.uint8) if payload else np.empty(0, np.uint8)
                )
                if data.nbytes != expected:
                    raise ValueError(f"chunk {seq}: got {data.nbytes} bytes, expected {expected}")
                self.block_io.scatter(local, data)
            elif status == "ipc_setup" or (status == "use_host" and job.via == "ipc"):
                # P sent the handles to map (D has no map of this P process yet), or
                # offers no IPC: map and ask again, or hand the pull to the next path.
                description = header.get("ipc") if status == "ipc_setup" else None
                if not (
                    description
                    and self.ipc.map(job.endpoint, job.spec.remote_engine_id, description)
                ):
                    self._leave_ipc(job, "P's KV cannot be mapped here")
                    return
                self._request_chunk(job, seq)
                return
            elif status in ("use_host", "nccl_setup"):
                # P prefers the host path (same device, host setting, no NCCL), or it
                # created a communicator for us: join it, else fall back to host.
                if status == "use_host" or not self.nccl.join(job.endpoint, header["uid"]):
                    if self.settings.transport == "nccl":
                        raise RuntimeError("transport=nccl, but P cannot use NCCL with this worker")
                    job.via = "host"
                    self.nccl.remember_host(job.endpoint)
                self._request_chunk(job, seq)
                return
            else:
                reason = f"P refused chunk {seq}: {status}"
                if status == "mismatch":
                    reason = "KV layout mismatch: " + str(
                        KVLayout.mismatch(
                            self.layout_desc, json.loads(header.get("detail") or "{}")
                        )
                    )
                elif header.get("detail"):
                    reason += f" ({header['detail']})"
                self._finish(job, ok=False, reason=reason)
                return
        except Exception as exc:
            logger.exception("PD client: chunk %d of %s failed", seq, job.spec.transfer_id)
            self._finish(job, ok=False, reason=f"chunk {seq}: {exc}")
            return
        self.counters.add(move_seconds_total=time.monotonic() - moving)
        self._inflight_bytes -= job.outstanding.pop(seq)
        job.done_chunks += 1
        job.nbytes += self.block_io.nbytes(end - start)
        if job.done_chunks == len(job.chunks):
            self._finish(job, ok=True)

    def _forget_gone_peers(self) -> None:
        """Drop peers that stayed unreachable for the connect timeout with no pull
        waiting on them: a dead P's socket, and its KV memory that an IPC mapping
        would otherwise keep allocated on the GPU."""
        now, timeout = time.monotonic(), self.settings.connect_timeout_seconds
        busy = {job.endpoint for job in self._jobs.values()}
        for endpoint, peer in list(self._peers.items()):
            if endpoint not in busy and not peer.up and now - peer.down_since >= timeout:
                logger.info("PD client: forgetting %s (unreachable for %.1fs)", endpoint, timeout)
                self._drop_peer(endpoint)

    def _expire(self) -> None:
        now, timeout = time.monotonic(), self.settings.connect_timeout_seconds
        for job in list(self._jobs.values()):
            peer = self._peer(job.endpoint)
            if now >= job.deadline:
                self._finish(
                    job,
                    ok=False,
                    drop_peer=True,
                    reason=f"timed out after {self.settings.pull_timeout_seconds:g}s",
                )
            elif not peer.up:
                # Never reached (refused, or no handshake): P is dead or not there; give
                # it the whole connect timeout. Lost after being reached: the process
                # closed its socket (killed) or stopped answering heartbeats for half the
                # connect timeout (frozen, vanished); half again to come back.
                since = max(job.started, peer.down_since)
                grace = timeout / 2 if peer.ever_up and peer.down_since > job.started else timeout
                if now - since >= grace:
                    what = "connection lost" if peer.ever_up else "no connection"
                    self._finish(
                        job,
                        ok=False,
                        reason=f"P unreachable ({what} for {now - since:.1f}s)",
                        drop_peer=True,
                    )

    def _finish(
        self,
        job: _Job,
        ok: bool,
        reason: str = "",
        cancelled: bool = False,
        drop_peer: bool = False,
    ) -> None:
        if self._jobs.pop(job.spec.consumer_key, None) is None:
            return
        self._inflight_bytes -= sum(job.outstanding.values())
        job.outstanding.clear()
        done = {"op": "done", "tid": job.spec.transfer_id, "key": job.spec.consumer_key, "ok": ok}
        self._send(job.endpoint, done)
        elapsed = time.monotonic() - job.started
        if ok:
            self.counters.add(
                bytes_received=job.nbytes,
                blocks_received=len(job.spec.local_block_ids),
                transfers_ok=1,
                transfer_seconds_total=elapsed,
                **{f"transfers_{job.via}": 1},
            )
        elif cancelled:
            self.counters.add(transfers_cancelled=1)
        else:
            self.counters.add(transfers_failed=1)
            logger.warning(
                "PD pull of %s for %s from %s failed after %.2fs: %s; the request "
                "will be recomputed",
                job.spec.transfer_id,
                job.spec.req_id,
                job.endpoint,
                elapsed,
                reason,
            )
            if drop_peer:
                self._drop_peer(job.endpoint)
        result = PullResult(job.spec.req_id, ok, cancelled, job.spec.local_block_ids, reason)
        with self._results_lock:
            self._results.append(result)
        if self.on_result is not None:
            try:
                self.on_result(result)
            except Exception:  # a wake-up is an optimisation; never lose the result
                logger.exception("PD client: on_result callback failed")
