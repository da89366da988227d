"""PDConnector settings: everything lives in ``kv_connector_extra_config``.

vLLM rejects unknown top-level keys in ``--kv-transfer-config``, so every knob
of the connector is a field of :class:`PDSettings`, read from
``kv_connector_extra_config``. Each field's ``doc`` metadata is the operator
documentation (``python -m engine_ext.config`` prints it as a markdown table), so docs
cannot drift from the code. Unknown keys are rejected: a typo in a lease length should
fail at start-up, not silently hold blocks for the default time.
"""

from __future__ import annotations

import socket
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

MiB = 1 << 20
TRANSPORTS = ("auto", "ipc", "nccl", "host")


def outward_ip() -> str:
    """This host's address on its default route (no packet is sent), else loopback."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect(("10.255.255.255", 1))
            return sock.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def _doc(text: str, **kwargs: Any) -> Any:
    return field(metadata={"doc": text}, **kwargs)


@dataclass(frozen=True)
class PDSettings:
    """Settings of one PDConnector instance (every instance can be P and D)."""

    host: str = _doc(
        "Address that peers dial to reach this engine (ZMQ data plane and HTTP control "
        "plane). Empty: this host's outward IP.",
        default="",
    )
    bind_host: str = _doc("Interface the ZMQ and control sockets bind to.", default="0.0.0.0")
    zmq_port: int = _doc(
        "ZMQ ROUTER port of TP rank 0; TP rank r binds zmq_port + r. 0: each rank binds "
        "a free port (peers learn them from kv_transfer_params), so several engines "
        "share a host with no settings.",
        default=0,
    )
    control_port: int = _doc(
        "HTTP control plane (POST /pd/release, GET /pd/stats, GET /metrics) in the "
        "engine-core process. 0: a free port (advertised in kv_transfer_params, where "
        "the proxy finds it); -1 disables it.",
        default=0,
    )
    transport: str = _doc(
        "Data path: 'auto' (CUDA engines on one host: device to device over CUDA IPC; "
        "CUDA engines on different hosts: NCCL; otherwise host memory), 'ipc' or 'nccl' "
        "(that path or a failed pull, which D recomputes), 'host' (ZMQ frames through "
        "host memory only).",
        default="auto",
    )
    lease_seconds: float = _doc(
        "How long P holds a finished prefill's blocks waiting for its pulls. A prefill "
        "request may ask for less with kv_transfer_params.lease_seconds.",
        default=30.0,
    )
    pull_timeout_seconds: float = _doc(
        "D's deadline for a whole pull; past it the load fails and D recomputes.",
        default=30.0,
    )
    connect_timeout_seconds: float = _doc(
        "How long D keeps trying to reach a P that is gone before failing its pulls "
        "(D then recomputes): a connection refused or never handshaken for this long, or "
        "one lost (a killed P's kernel resets it; a frozen or vanished P stops answering "
        "heartbeats for half of this) and not back within half of this. A P that is up "
        "but slow to answer is waited for, up to pull_timeout_seconds.",
        default=5.0,
    )
    unknown_wait_seconds: float = _doc(
        "How long P waits for the registration of a transfer id it does not know yet "
        "before answering 'unknown'.",
        default=5.0,
    )
    chunk_bytes: int = _doc(
        "Largest data message: a pull is cut into chunks of whole blocks (all layers) "
        "of at most this size. 16 MiB keeps ZMQ's receive buffers below glibc's mmap "
        "threshold, so they are reused instead of page-faulted for every chunk.",
        default=16 * MiB,
    )
    max_inflight_bytes: int = _doc(
        "Per worker bound on staging memory: P's gathered chunks not yet on the wire, "
        "and D's requested chunks not yet scattered.",
        default=64 * MiB,
    )
    idle_step_sleep_ms: float = _doc(
        "An engine holding blocks or waiting for a pull keeps stepping with nothing "
        "scheduled. Such a step waits instead: never while a finished transfer is still "
        "on its way through the engine, at most this long while a request here waits "
        "for its KV (or where the connector cannot be woken), and, while the engine "
        "only holds blocks for others, until a transfer ends, a request arrives, a "
        "release or the next lease expiry (10 s at most), so a holding engine does not "
        "spin a core. 0 disables the waits.",
        default=2.0,
    )

    def __post_init__(self) -> None:
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {self.transport!r}")
        if not 0 <= self.zmq_port < 65536:
            raise ValueError(f"zmq_port out of range: {self.zmq_port}")
        if not -1 <= self.control_port < 65536:
            raise ValueError(f"control_port out of range: {self.control_port}")
        for name in (
            "lease_seconds",
            "pull_timeout_seconds",
            "connect_timeout_seconds",
            "unknown_wait_seconds",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        if self.chunk_bytes < 4096 or self.max_inflight_bytes < self.chunk_bytes:
            raise ValueError("need chunk_bytes >= 4096 and max_inflight_bytes >= chunk_bytes")
        if self.idle_step_sleep_ms < 0:
            raise ValueError("idle_step_sleep_ms must be >= 0")

    @property
    def advertised_host(self) -> str:
        return self.host or outward_ip()

    @classmethod
    def from_extra(cls, extra: dict[str, Any] | None) -> PDSettings:
        """Parse ``kv_connector_extra_config``; unknown keys and bad types raise."""
        extra = dict(extra or {})
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(extra) - set(known))
        if unknown:
            raise ValueError(f"unknown PDConnector settings {unknown}; known: {sorted(known)}")
        values: dict[str, Any] = {}
        for name, value in extra.items():
            kind = type(known[name].default)
            try:
                values[name] = kind(value) if not isinstance(value, bool) else None
            except (TypeError, ValueError) as exc:
                raise ValueError(f"PDConnector setting {name}={value!r}: {exc}") from None
            if values[name] is None or (kind is int and float(value) != int(value)):
                raise ValueError(f"PDConnector setting {name}={value!r} is not a {kind.__name__}")
        return cls(**values)


def markdown_table() -> str:
    rows = ["| setting | default | meaning |", "|---|---|---|"]
    for f in fields(PDSettings):
        default = f.default if f.default is not MISSING else ""
        rows.append(f"| `{f.name}` | `{default!r}` | {f.metadata['doc']} |")
    return "\n".join(rows)


README_BEGIN, README_END = "<!-- connector-settings:begin -->", "<!-- connector-settings:end -->"


def readme_with_table(readme: str) -> str:
    """The README with its connector settings table regenerated between the markers."""
    head, rest = readme.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    return f"{head}{README_BEGIN}\n{markdown_table()}\n{README_END}{tail}"


if __name__ == "__main__":
    import sys
    from pathlib import Path

    if sys.argv[1:] == ["write"]:  # regenerate README.md's table in place
        readme = Path(__file__).resolve().parent.parent / "README.md"
        readme.write_text(readme_with_table(readme.read_text()))
    else:
        print(markdown_table())
