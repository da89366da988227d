"""Where a benchmark's result goes: its JSON (``bench/results/`` by default, which git
ignores) and, when matplotlib is installed, its figure beside it."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from .plots import draw_beside


def save(report: dict[str, Any], out: str | None, name: str) -> Path:
    """Write ``report`` to ``out`` (default ``bench/results/<name>-<time>.json``)."""
    path = Path(out or f"bench/results/{name}-{int(time.time())}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}", flush=True)
    draw_beside(path)
    return path
