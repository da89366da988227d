"""Sampling profiles of the proxy under load (py-spy), summarised by library and function.

``python -m bench --profile chat:256`` records the proxy while that cell's measurement
window runs and writes ``<out>-profile-<cell>.txt``: collapsed stacks, which speedscope
(https://www.speedscope.app) and flamegraph.pl open as they are. The summary that goes in
the JSON gives each library's share of the samples (a sample belongs to the innermost
frame that names a known library) and the functions with the most samples.

``python -m bench.profile STACKS.txt`` prints the summary of a recorded file.

py-spy is not a dependency of the project: ``pip install py-spy``. Attaching to another
process needs ptrace permission (root, or ``kernel.yama.ptrace_scope=0``).
"""

from __future__ import annotations

import collections
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

# (substring of a frame's file, category), first match wins, innermost frame first.
CATEGORIES = [
    ("asyncio/runners", "event loop (uvloop, in C)"),
    ("httpcore/", "httpx/httpcore/h11 (backend HTTP client)"),
    ("httpx/", "httpx/httpcore/h11 (backend HTTP client)"),
    ("h11/", "httpx/httpcore/h11 (backend HTTP client)"),
    ("aiohttp/", "aiohttp (backend HTTP client)"),
    ("uvicorn/", "uvicorn (client-facing HTTP server)"),
    ("starlette/", "starlette/fastapi (routing, middleware, StreamingResponse)"),
    ("fastapi/", "starlette/fastapi (routing, middleware, StreamingResponse)"),
    ("json/", "json (stdlib)"),
    ("orjson", "orjson"),
    ("prometheus_client/", "prometheus_client (metrics)"),
    ("asyncio/timeouts", "asyncio.timeout"),
    ("logging/", "logging"),
    ("pydantic", "pydantic"),
    ("proxy/", "proxy's own code"),
]


def py_spy() -> str | None:
    here = Path(sys.executable).with_name("py-spy")
    return str(here) if here.exists() else shutil.which("py-spy")


def start(
    pid: int, seconds: float, out: Path, rate: int = 200, cores: str | None = None
) -> subprocess.Popen | None:
    """Record ``pid`` and its worker subprocesses for ``seconds`` into ``out`` (collapsed
    stacks)."""
    exe = py_spy()
    if exe is None:
        return None
    argv = [
        exe,
        "record",
        "-p",
        str(pid),
        "-d",
        str(max(1, int(seconds))),
        "-r",
        str(rate),
        "-f",
        "raw",
        "-o",
        str(out),
        "--nonblocking",
        "--subprocesses",
    ]
    if cores:
        argv = ["taskset", "-c", cores, *argv]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _category(frames: list[str]) -> str:
    anyio_seen = False
    for frame in reversed(frames):
        if "anyio/" in frame:
            anyio_seen = True
            continue
        for key, name in CATEGORIES:
            if key in frame:
                if anyio_seen and name == "proxy's own code":
                    return "anyio (task groups, cancel scopes)"
                return name
    return "other (asyncio internals, C, unresolved)"


def _short(frame: str) -> str:
    # "func (path/to/site-packages/pkg/mod.py:123)" -> "func (pkg/mod.py)"
    if " (" not in frame:
        return frame
    name, where = frame.split(" (", 1)
    where = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "/lib/python3"):
        if marker in where:
            where = where.split(marker, 1)[1]
            if marker == "/lib/python3":
                where = where.split("/", 1)[1] if "/" in where else where
    if "/proxy/" in where:
        where = "proxy/" + where.split("/proxy/", 1)[1]
    return f"{name} ({where})"


def summarize(path: Path, top: int = 25) -> dict[str, Any]:
    total = 0
    categories: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        stack, _, count = line.rpartition(" ")
        try:
            n = int(count)
        except ValueError:
            continue
        frames = [f for f in stack.split(";") if f]
        if not frames:
            continue
        total += n
        categories[_category(frames)] += n
        own[_short(frames[-1])] += n
        for frame in {_short(f) for f in frames}:
            inclusive[frame] += n
    if not total:
        return {"samples": 0}

    def pct(counter: collections.Counter[str], k: int) -> list[tuple[str, float]]:
        return [(name, round(100 * n / total, 1)) for name, n in counter.most_common(k)]

    return {
        "samples": total,
        "by_library_pct": dict(pct(categories, len(categories))),
        "top_self_pct": pct(own, top),
        "top_inclusive_pct": pct(inclusive, top + 15),
    }


def main(argv: list[str] | None = None) -> None:
    args = argv if argv is not None else sys.argv[1:]
    for name in args:
        summary = summarize(Path(name))
        print(f"{name}: {summary['samples']} samples")
        for key in ("by_library_pct", "top_self_pct", "top_inclusive_pct"):
            print(f"  {key}:")
            items = summary.get(key, {})
            for label, value in items.items() if isinstance(items, dict) else items:
                print(f"    {value:5.1f}%  {label}")


if __name__ == "__main__":
    main()
