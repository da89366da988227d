"""ZeroMQ plumbing both ends of the data plane use (P's server, D's client).

One I/O thread per context, placed on this engine's cores; socket options that let a
dead, frozen or vanished peer be told from a slow one; a waker that ends a poll loop's
wait from any thread; and the JSON header encoding of the protocol
(:mod:`engine_ext.transport_host` describes it).
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any

import zmq


def dumps(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def engine_cpus() -> set[int]:
    """CPUs this engine may use: ours plus our parent's (the unbound engine-core process).

    vLLM's CPU worker binds its whole process, and so every thread it starts later, to
    the cores of its OpenMP threads. A transport thread there waits behind the model's
    compute and vLLM's own busy-polling even while other cores idle, which on a shared
    host turned millisecond pulls into hundreds of milliseconds.
    """
    try:
        return set(os.sched_getaffinity(0)) | set(os.sched_getaffinity(os.getppid()))
    except (AttributeError, OSError):
        return set()


def new_context(cpus: set[int]) -> zmq.Context:
    """A one-I/O-thread ZMQ context whose I/O thread may run on ``cpus``."""
    ctx = zmq.Context(io_threads=1)
    for cpu in sorted(cpus):
        try:
            ctx.set(zmq.THREAD_AFFINITY_CPU_ADD, cpu)
        except (AttributeError, zmq.ZMQError):
            break
    return ctx


def unpin_current_thread(cpus: set[int]) -> None:
    """Let the calling (transport) thread run on any of ``cpus``."""
    try:
        if cpus and cpus != set(os.sched_getaffinity(0)):
            os.sched_setaffinity(0, cpus)
    except (AttributeError, OSError):
        pass


class Waker:
    """Wakes a ZMQ poll loop from any thread: an inproc PUSH/PULL pair.

    Wake-ups coalesce: the loop drains them all, then looks at its own state (queued
    commands, new registrations), so a wake-up already pending is as good as a new one.
    """

    def __init__(self, ctx: zmq.Context, name: str) -> None:
        address = f"inproc://{name}-{id(self)}"
        self.socket = ctx.socket(zmq.PULL)  # the loop polls this
        self.socket.bind(address)
        self._send = ctx.socket(zmq.PUSH)
        self._send.setsockopt(zmq.SNDHWM, 1)
        self._send.connect(address)
        self._lock = threading.Lock()  # ZMQ sockets are not thread-safe

    def wake(self) -> None:
        with self._lock:
            try:
                self._send.send(b"", zmq.NOBLOCK)
            except (zmq.Again, zmq.ContextTerminated):
                pass  # a wake-up is already pending (or the loop is stopping)

    def drain(self) -> None:
        """Loop thread: consume every pending wake-up."""
        while True:
            try:
                self.socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                return


def socket_defaults(sock: zmq.Socket, connect_timeout: float = 5.0) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    # Heartbeats (answered by the peer's ZMQ I/O thread, busy Python or not) drop the
    # pipe of a frozen or vanished peer after half the connect timeout; a killed peer's
    # pipe drops at once (its kernel resets the connection).
    timeout_ms = max(500, int(connect_timeout * 500))
    sock.setsockopt(zmq.HEARTBEAT_IVL, max(100, timeout_ms // 3))
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, timeout_ms)
