"""Who holds which prefill blocks, and until when: pure bookkeeping, no sockets.

Two tables, one per side of the process boundary:

* :class:`LeaseTable` (scheduler process) is the single authority on when P's blocks
  stop being held: on an explicit release (the proxy's ``/pd/release``) or when the
  lease expires. Either way it only *asks* the workers to let go (through the next
  step's metadata); the blocks are freed when every worker reports the request as
  finished sending, which is what removes the lease.
* :class:`SendRegistry` (each worker) serves pulls: it knows the blocks of every held
  transfer, counts consumers (a transfer is done when ``consumers`` pulls finished),
  keeps blocks alive while a gather reads them, and yields the request ids to report
  from ``get_finished``.

Every entry leaves both tables on a bounded path: consumers done, release, or expiry.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from engine_ext.metadata import SendSpec

logger = logging.getLogger("vllm.pd.leases")


@dataclass
class Lease:
    transfer_id: str
    req_id: str
    deadline: float
    releasing: bool = False


class LeaseTable:
    """Scheduler-side leases; single-threaded except :meth:`release` (control server)."""

    def __init__(self, lease_seconds: float, clock=time.monotonic):
        self.lease_seconds = lease_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._by_tid: dict[str, Lease] = {}
        self._by_req: dict[str, str] = {}
        self._to_release: list[str] = []

    def add(self, transfer_id: str, req_id: str, seconds: float | None = None) -> None:
        """Hold for ``seconds`` (a request may shorten the configured lease, never extend it)."""
        length = (
            self.lease_seconds if seconds is None else max(0.0, min(seconds, self.lease_seconds))
        )
        with self._lock:
            self._by_tid[transfer_id] = Lease(transfer_id, req_id, self._clock() + length)
            self._by_req[req_id] = transfer_id

    def release(self, transfer_id: str) -> bool:
        """Explicit release. True only the first time, for a transfer still held."""
        with self._lock:
            lease = self._by_tid.get(transfer_id)
            if lease is None or lease.releasing:
                return False
            lease.releasing = True
            self._to_release.append(transfer_id)
            return True

    def expire(self) -> list[str]:
        """Mark leases past their deadline for release; returns their transfer ids."""
        now = self._clock()
        out = []
        with self._lock:
            for lease in self._by_tid.values():
                if not lease.releasing and now >= lease.deadline:
                    lease.releasing = True
                    out.append(lease.transfer_id)
            self._to_release.extend(out)
        return out

    def next_deadline(self) -> float | None:
        """The earliest deadline of a lease not yet releasing (None if there is none)."""
        with self._lock:
            return min(
                (lease.deadline for lease in self._by_tid.values() if not lease.releasing),
                default=None,
            )

    def take_releases(self) -> list[str]:
        with self._lock:
            out, self._to_release = self._to_release, []
            return out

    def finished(self, req_id: str) -> Lease | None:
        """Workers reported the request finished sending: the blocks are free now."""
        with self._lock:
            tid = self._by_req.pop(req_id, None)
            return self._by_tid.pop(tid, None) if tid is not None else None

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_tid)

    def __contains__(self, transfer_id: str) -> bool:
        with self._lock:
            return transfer_id in self._by_tid


@dataclass
class SendEntry:
    spec: SendSpec
    remaining: int
    done_keys: set[str] = field(default_factory=set)
    readers: int = 0
    released: bool = False
    finished: bool = False


class SendRegistry:
    """Worker-side table of held transfers (engine thread registers, server thread reads).

    ``on_register`` callbacks run after transfers are registered (the server serves
    pulls parked for them), ``on_finished`` ones with the request id when a transfer
    may be reported as finished sending (the engine hears of it); both outside the
    lock.
    """

    def __init__(self, memory_seconds: float = 60.0, clock=time.monotonic):
        self.on_register: list[Callable[[], None]] = []
        self.on_finished: list[Callable[[str], None]] = []
        self._lock = threading.Lock()
        self._entries: dict[str, SendEntry] = {}
        self._finished: list[str] = []
        # Consumers that gave up before the registration reached this worker.
        self._early: dict[str, tuple[float, set[str]]] = {}
        # Transfers that ended recently: a late pull is refused at once, not parked.
        self._gone: dict[str, float] = {}
        self._ttl = memory_seconds
        self._clock = clock

    def register(self, spec: SendSpec) -> None:
        with self._lock:
            entry = SendEntry(spec, remaining=max(1, spec.consumers))
            self._entries[spec.transfer_id] = entry
            _, early = self._early.pop(spec.transfer_id, (0.0, set()))
            for key in early:
                self._consumer_done_locked(entry, key)
            finished = entry.finished
        self._notify(self.on_register)
        if finished:
            self._notify(self.on_finished, spec.req_id)

    @staticmethod
    def _notify(callbacks: list[Callable[..., None]], *args: str) -> None:
        for callback in list(callbacks):
            try:
                callback(*args)
            except Exception:  # wake-ups are an optimisation; the state is what counts
                logger.exception("PD registry: callback failed")

    def state(self, transfer_id: str) -> str:
        """'held' (pullable), 'gone' (ended recently) or 'unknown' (not registered yet)."""
        with self._lock:
            entry = self._entries.get(transfer_id)
            if entry is not None:
                return "gone" if entry.released else "held"
            return "gone" if transfer_id in self._gone else "unknown"

    def begin_read(self, transfer_id: str) -> SendEntry | None:
        """Pin an entry's blocks while a gather reads them; None if gone or released."""
        with self._lock:
            entry = self._entries.get(transfer_id)
            if entry is None or entry.released or entry.finished:
                return None
            entry.readers += 1
            return entry

    def end_read(self, entry: SendEntry) -> None:
        with self._lock:
            entry.readers -= 1
            if entry.released and entry.readers == 0:
                self._finish_locked(entry)
            finished = entry.finished
        if finished:
            self._notify(self.on_finished, entry.spec.req_id)

    def consumer_done(self, transfer_id: str, key: str) -> None:
        """One consumer finished (pulled, failed or gave up). Idempotent per key."""
        with self._lock:
            entry = self._entries.get(transfer_id)
            if entry is None:
                if transfer_id not in self._gone:
                    self._early.setdefault(transfer_id, (self._clock(), set()))[1].add(key)
                return
            self._consumer_done_locked(entry, key)
            finished = entry.finished
        if finished:
            self._notify(self.on_finished, entry.spec.req_id)

    def _consumer_done_locked(self, entry: SendEntry, key: str) -> None:
        if key in entry.done_keys:
            return
        entry.done_keys.add(key)
        entry.remaining -= 1
        if entry.remaining <= 0:
            entry.released = True
            if entry.readers == 0:
                self._finish_locked(entry)

    def release(self, transfer_id: str) -> bool:
        """Stop serving a transfer (release or lease expiry); blocks free once unread."""
        with self._lock:
            entry = self._entries.get(transfer_id)
            if entry is None:
                return False
            entry.released = True
            if entry.readers == 0:
                self._finish_locked(entry)
            finished = entry.finished
        # Announced although the engine thread reports it in this very step: under
        # async scheduling that step's output is read only after the next is planned.
        if finished:
            self._notify(self.on_finished, entry.spec.req_id)
        return True

    def _finish_locked(self, entry: SendEntry) -> None:
        if not entry.finished:
            entry.finished = True
            self._entries.pop(entry.spec.transfer_id, None)
            self._finished.append(entry.spec.req_id)
            now = self._clock()
            self._gone[entry.spec.transfer_id] = now
            # Both memories are bounded in time; prune them whenever one grows.
            self._gone = {t: at for t, at in self._gone.items() if now - at < self._ttl}
            self._early = {t: v for t, v in self._early.items() if now - v[0] < self._ttl}

    def take_finished(self) -> set[str]:
        """Request ids whose blocks may be freed now (reported once each)."""
        with self._lock:
            out, self._finished = set(self._finished), []
            return out

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
