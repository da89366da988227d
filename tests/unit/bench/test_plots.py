"""bench.plots draws a PNG from each benchmark's JSON (synthetic results, the real schema)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import plots
from bench.options import DIRECT, PDPROXY
from bench.report import add_comparisons

pytest.importorskip("matplotlib", reason="matplotlib is in the test and bench extras")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def bench_results() -> dict:
    """What ``python -m bench`` writes, cut down: cells of two targets plus direct-pd, and
    the comparisons report.add_comparisons derives from them (added TTFT)."""
    cells = []
    for label, target, extra_ms, cpu in (
        (DIRECT, DIRECT, 0.0, None),
        (PDPROXY, PDPROXY, 0.4, 30.0),
        (f"{PDPROXY} w2", PDPROXY, 0.3, 35.0),
    ):
        for endpoint in ("chat", "completions"):
            for concurrency in (1, 32, 256):
                cells.append(
                    {
                        "label": label,
                        "target": target,
                        "endpoint": endpoint,
                        "concurrency": concurrency,
                        "ttft_ms": {"p50": 52 + extra_ms * concurrency**0.5, "p99": 60 + extra_ms},
                        "itl_ms": {"p50": 20.0, "p99": 22.0},
                        "errors": 0,
                        "proxy_cpu_us_per_chunk": cpu,
                    }
                )
    results = {"config": {"prefill_ms": 50.0, "itl_ms": 20.0}, "cells": cells}
    add_comparisons(results)
    return results


HANDOFF = {
    "handoff": {"n": 5, "p50_ms": 12.0, "p90_ms": 15.0, "max_ms": 19.0},
    "d_ttft_baseline": {"n": 5, "p50_ms": 9.0, "p90_ms": 10.0, "max_ms": 11.0},
    "handoff_raw_ms": [11.0, 12.0, 12.5, 15.0, 19.0],
    "d_pulls": {"ok": 5, "failed": 0, "mean_pull_ms": 2.1},
}

KV_TRANSFER = {
    "benchmark": "kv_transfer_host_path",
    "device": "cpu",
    "results": [
        {
            "size_mib": size,
            "bytes": size << 20,
            "blocks": size * 2,
            "repeats": 2,
            "raw_tcp_gbps": 3.0,
            "transport_gbps": 2.6,
            "ratio": 0.87,
            "raw_tcp_seconds": [(size << 20) / 3e9] * 2,
            "transport_seconds": [(size << 20) / 2.5e9, (size << 20) / 2.7e9],
        }
        for size in (1, 16, 256)
    ],
}

GOODPUT = {
    "benchmark": "goodput",
    "rows": [
        {
            "mix": mix,
            "rate": rate,
            "arm": arm,
            "goodput_rps": rate * share,
            "goodput_gap_rps": rate * share * 0.9,
            "ttft_slo_ms": 1000.0,
            "tpot_slo_ms": 100.0,
            "gap_slo_ms": 500.0,
        }
        for mix in ("chat", "rag")
        for arm, share in (("pd", 0.9), ("colocated", 0.7))
        for rate in (0.5, 1.0, 2.0)
    ],
}


def write(folder: Path, name: str, results: dict) -> Path:
    path = folder / name
    path.write_text(json.dumps(results))
    return path


SCALING = {
    "benchmark": "scaling",
    "cells": [
        {"workers": w, "chunks_per_s": 27000.0 * w * eff, "proxy_cpu_us_per_chunk": 37.0 / eff,
         "proxy_bound": eff > 0.8}
        for w, eff in ((1, 1.0), (2, 0.97), (4, 0.9), (8, 0.7))
    ],
}  # fmt: skip


def assert_png(path: Path | None) -> None:
    assert path is not None and path.is_file()
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000


@pytest.mark.parametrize(
    "name, results",
    [
        ("bench.json", bench_results()),
        ("handoff.json", HANDOFF),
        ("kv.json", KV_TRANSFER),
        ("goodput.json", GOODPUT),
        ("scaling.json", SCALING),
    ],
)
def test_each_result_gets_a_png_beside_it(tmp_path, name, results):
    out = plots.draw_beside(write(tmp_path, name, results))
    assert out == tmp_path / name.replace(".json", ".png")
    assert_png(out)


def test_the_command_line_redraws_a_folder_and_skips_other_json(tmp_path, capsys):
    write(tmp_path, "bench-1.json", bench_results())
    write(tmp_path, "handoff.json", HANDOFF)
    write(tmp_path, "notes.json", {"something": "else"})
    assert plots.main([str(tmp_path)]) == 0
    assert_png(tmp_path / "bench-1.png")
    assert_png(tmp_path / "handoff.png")
    assert not (tmp_path / "notes.png").exists()
    assert "skipped" in capsys.readouterr().out


def test_without_matplotlib_the_benchmarks_write_no_figure(tmp_path, monkeypatch):
    monkeypatch.setattr(plots, "available", lambda: False)
    assert plots.draw_beside(write(tmp_path, "handoff.json", HANDOFF)) is None
    assert not (tmp_path / "handoff.png").exists()
