"""PNG figures of the benchmarks' JSON results.

``python -m bench.plots bench/results/`` redraws a figure beside every result JSON there
(``x.json`` -> ``x.png``); files may be named too. Each benchmark's main also draws its
figure next to its ``--out`` JSON when matplotlib is importable (``pip install
'.[bench]'``); the proxy never needs it.

Which figure a JSON gets depends on its shape:

- ``python -m bench`` (``cells``): the TTFT each target adds to direct-pd's (p50, p99) and
  the proxy's CPU time per streamed chunk, against concurrency, one line per target, one
  row per endpoint;
- ``bench.handoff`` (``handoff_raw_ms``): the hand-off latency distribution, with its
  median and the decode server's own time to first token (the baseline);
- ``bench.goodput`` (``benchmark: goodput``): goodput against arrival rate, one panel
  per workload mix, one line per arm, the offered rate dotted;
- ``bench.kv_transfer`` (``benchmark: kv_transfer_host_path``): GB/s against payload
  size, the connector's host path and raw loopback TCP (the baseline), every repeat as a
  dot and the medians as lines;
- ``bench.scaling`` (``benchmark: scaling``): chunks/s against ``PDPROXY_WORKERS``, with
  one worker's rate times N (linear scaling, the baseline) dotted, and the proxy's CPU
  per chunk.

Figures are drawn on matplotlib's Agg canvas (no display, no pyplot state).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .options import DIRECT


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _log2_axis(ax, values) -> None:
    """A log2 x axis ticked at the measured values, written as plain numbers."""
    ax.set_xscale("log", base=2)
    ticks = sorted(set(values))
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()


# --- python -m bench ---------------------------------------------------------------------


def plot_bench(results: dict[str, Any], out: Path) -> None:
    cells = results["cells"]
    endpoints = sorted({c["endpoint"] for c in cells})
    labels = list(dict.fromkeys(c["label"] for c in cells if c["label"] != DIRECT))
    panels = (
        ("added_ttft_p50_ms", "added TTFT p50 (ms)"),
        ("added_ttft_p99_ms", "added TTFT p99 (ms)"),
        ("proxy_cpu_us_per_chunk", "proxy CPU per chunk (µs)"),
    )
    figure = _figure(5 * len(panels), 3.6 * len(endpoints))
    axes = figure.subplots(len(endpoints), len(panels), squeeze=False)
    for row, endpoint in enumerate(endpoints):
        for col, (key, title) in enumerate(panels):
            ax = axes[row][col]
            for label in labels:
                points = sorted(
                    (c["concurrency"], c[key])
                    for c in cells
                    if c["label"] == label and c["endpoint"] == endpoint and c.get(key) is not None
                )
                if points:
                    ax.plot(*zip(*points, strict=True), marker="o", label=label)
            _log2_axis(ax, [c["concurrency"] for c in cells])
            ax.set_xlabel("concurrency")
            ax.set_title(f"{endpoint}: {title}")
            ax.grid(True, alpha=0.3)
            if key.startswith("added"):
                ax.axhline(0, color="black", linewidth=0.8)  # direct-pd itself
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize="small")
    config = results.get("config", {})
    figure.suptitle(
        "pdproxy vs direct P/D (fakes: prefill {} ms, {} ms between tokens)".format(
            config.get("prefill_ms", "?"), config.get("itl_ms", "?")
        )
    )
    figure.savefig(out)


# --- bench.handoff -----------------------------------------------------------------------


def plot_handoff(results: dict[str, Any], out: Path) -> None:
    raw = results["handoff_raw_ms"]
    figure = _figure(8, 4.5)
    ax = figure.subplots()
    ax.hist(raw, bins=min(40, max(10, len(raw) // 2)), color="#5b8def", label="hand-off")
    ax.axvline(results["handoff"]["p50_ms"], color="#1a3d8f", label="hand-off p50")
    baseline = results["d_ttft_baseline"]["p50_ms"]
    ax.axvline(baseline, color="#c4320a", linestyle="--", label="D's own TTFT p50 (baseline)")
    ax.set_xlabel("ms from P's answer to D's first streamed token")
    ax.set_ylabel("requests")
    ax.yaxis.get_major_locator().set_params(integer=True)
    pulls = results.get("d_pulls") or {}
    extra = f", mean pull {pulls['mean_pull_ms']} ms" if pulls.get("mean_pull_ms") else ""
    ax.set_title(f"P→D hand-off ({len(raw)} requests{extra})")
    ax.legend(fontsize="small")
    figure.savefig(out)


# --- bench.kv_transfer -------------------------------------------------------------------


def plot_kv_transfer(results: dict[str, Any], out: Path) -> None:
    rows = sorted(results["results"], key=lambda r: r["size_mib"])
    figure = _figure(8, 4.5)
    ax = figure.subplots()
    series = (
        ("transport", "PD host path", "#5b8def"),
        ("raw_tcp", "raw loopback TCP (baseline)", "#c4320a"),
    )
    for key, label, color in series:
        sizes = [r["size_mib"] for r in rows]
        ax.plot(sizes, [r[f"{key}_gbps"] for r in rows], marker="o", color=color, label=label)
        for r in rows:  # each repeat, to show the spread behind the median
            gbps = [r["bytes"] / s / 1e9 for s in r.get(f"{key}_seconds", []) if s > 0]
            ax.scatter([r["size_mib"]] * len(gbps), gbps, color=color, alpha=0.3, s=12)
    if all("d2h_then_h2d_gbps" in r for r in rows):
        ax.plot(
            [r["size_mib"] for r in rows],
            [r["d2h_then_h2d_gbps"] for r in rows],
            marker="s",
            color="gray",
            linestyle=":",
            label="device→host→device copies",
        )
    _log2_axis(ax, [r["size_mib"] for r in rows])
    ax.set_xlabel("payload (MiB)")
    ax.set_ylabel("GB/s (medians; dots: each repeat)")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.set_title(f"KV transfer throughput ({results.get('device', 'cpu')})")
    ax.legend(fontsize="small")
    figure.savefig(out)


# --- bench.goodput ----------------------------------------------------------------------


def plot_goodput(results: dict[str, Any], out: Path) -> None:
    """Goodput against arrival rate, a column per workload mix, a line per arm: the
    top row with the TPOT SLO, the bottom one with the worst-gap SLO."""
    rows = results["rows"]
    mixes = list(dict.fromkeys(r["mix"] for r in rows))
    kinds = (("goodput_rps", "tpot"), ("goodput_gap_rps", "gap"))
    figure = _figure(5.5 * len(mixes), 7.5)
    axes = figure.subplots(len(kinds), len(mixes), squeeze=False)
    for col, mix in enumerate(mixes):
        mine = [r for r in rows if r["mix"] == mix]
        for row, (key, slo) in enumerate(kinds):
            ax = axes[row][col]
            for arm in dict.fromkeys(r["arm"] for r in mine):
                points = sorted((r["rate"], r.get(key, 0.0)) for r in mine if r["arm"] == arm)
                ax.plot(*zip(*points), "o-", label=arm)
            rates = sorted({r["rate"] for r in mine})
            ax.plot(rates, rates, ":", color="grey", label="offered")
            first = mine[0]
            ax.set_title(
                f"{mix}: TTFT <= {first['ttft_slo_ms']:g} ms, "
                f"{slo.upper()} <= {first[f'{slo}_slo_ms']:g} ms"
            )
            ax.set_xlabel("arrival rate (requests/s)")
            ax.set_ylabel("goodput (requests/s)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
    figure.savefig(out)


def plot_scaling(results: dict[str, Any], out: Path) -> None:
    cells = sorted(results["cells"], key=lambda c: c["workers"])
    workers = [c["workers"] for c in cells]
    figure = _figure(10, 4)
    rate, cost = figure.subplots(1, 2)
    rate.plot(workers, [c["chunks_per_s"] for c in cells], "o-", label="pdproxy")
    one = next((c["chunks_per_s"] for c in cells if c["workers"] == 1), None)
    if one:
        rate.plot(workers, [one * w for w in workers], ":", color="gray", label="1 worker x N")
    for c in cells:
        if not c["proxy_bound"]:
            rate.annotate(
                "proxy not saturated", (c["workers"], c["chunks_per_s"]), fontsize="small"
            )
    rate.set_title("throughput (chunks/s)")
    cost.plot(workers, [c["proxy_cpu_us_per_chunk"] for c in cells], "o-")
    cost.set_title("proxy CPU per chunk (us)")
    cost.set_ylim(bottom=0)
    for ax in (rate, cost):
        _log2_axis(ax, workers)
        ax.set_xlabel("PDPROXY_WORKERS (one core each)")
        ax.grid(alpha=0.3)
    rate.legend(fontsize="small")
    figure.savefig(out)


# --- which figure, and the command line --------------------------------------------------

Plotter = Callable[[dict[str, Any], Path], None]


def plotter_for(results: Any) -> Plotter | None:
    if not isinstance(results, dict):
        return None
    if results.get("benchmark") == "scaling":
        return plot_scaling
    if "cells" in results:
        return plot_bench
    if results.get("benchmark") == "kv_transfer_host_path":
        return plot_kv_transfer
    if "handoff_raw_ms" in results:
        return plot_handoff
    if results.get("benchmark") == "goodput":
        return plot_goodput
    return None


def draw(json_path: Path | str) -> Path | None:
    """The figure of one result file, written beside it; None for anything else."""
    json_path = Path(json_path)
    try:
        results = json.loads(json_path.read_text())
    except ValueError:
        return None
    plot = plotter_for(results)
    if plot is None:
        return None
    out = json_path.with_suffix(".png")
    plot(results, out)
    return out


def draw_beside(json_path: Path | str) -> Path | None:
    """What the benchmarks' mains call after writing their JSON: a figure if matplotlib
    is importable (it is an optional extra), else nothing."""
    if not available():
        print("matplotlib is not installed: no figure (pip install '.[bench]')", flush=True)
        return None
    out = draw(json_path)
    if out is not None:
        print(f"wrote {out}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="result JSON files or folders")
    args = parser.parse_args(argv)
    if not available():
        print("matplotlib is not installed: pip install '.[bench]'", file=sys.stderr)
        return 1
    files = [f for p in args.paths for f in (sorted(p.glob("*.json")) if p.is_dir() else [p])]
    for path in files:
        out = draw(path)
        print(f"wrote {out}" if out else f"skipped {path}: not a benchmark result")
    return 0


if __name__ == "__main__":
    sys.exit(main())
