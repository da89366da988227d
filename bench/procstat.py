"""CPU time and memory of a process and its descendants, read from /proc (Linux)."""

from __future__ import annotations

import os

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("latin-1")
    except OSError:
        return None
    # The command name (field 2) may contain spaces; it is wrapped in parentheses.
    return raw[raw.rindex(")") + 2 :].split()


def descendants(pid: int) -> list[int]:
    """``pid`` and every live process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is None:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo.extend(children.get(current, ()))
    return out


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of the given processes (their own threads included)."""
    total = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            # After the ")": state(0) ppid(1) ... utime(11) stime(12)
            total += int(fields[11]) + int(fields[12])
    return total / _TICKS


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm", "rb") as f:
                total += int(f.read().split()[1]) * _PAGE
        except OSError:
            pass
    return total


class TreeMeter:
    """CPU and RSS of a process tree; the tree is re-read at each call (workers may fork)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._mark = 0.0
        self.peak_rss = 0

    def pids(self) -> list[int]:
        return descendants(self.pid)

    def cpu(self) -> float:
        return cpu_seconds(self.pids())

    def cpu_by_pid(self) -> dict[int, float]:
        return {pid: cpu_seconds([pid]) for pid in self.pids()}

    def rss(self) -> int:
        value = rss_bytes(self.pids())
        self.peak_rss = max(self.peak_rss, value)
        return value
