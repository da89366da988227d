"""The run's results as comparisons against direct-pd and the peers, and as markdown."""

from __future__ import annotations

from typing import Any

from .options import DIRECT, PDPROXY, ROUTER, TOY


def add_comparisons(results: dict[str, Any]) -> None:
    cells = results["cells"]
    direct = {(c["endpoint"], c["concurrency"]): c for c in cells if c["target"] == DIRECT}
    for cell in cells:
        base = direct.get((cell["endpoint"], cell["concurrency"]))
        if cell["target"] == DIRECT or base is None:
            continue
        for p in ("p50", "p99"):
            ours, theirs = cell["ttft_ms"].get(p), base["ttft_ms"].get(p)
            if ours is not None and theirs is not None:
                cell[f"added_ttft_{p}_ms"] = ours - theirs
                cell[f"added_ttft_{p}_pct"] = 100 * (ours - theirs) / theirs if theirs else None

    def cpu(label: str, endpoint: str, conc: int) -> float | None:
        for c in cells:
            if c["label"] == label and c["endpoint"] == endpoint and c["concurrency"] == conc:
                return c.get("proxy_cpu_us_per_chunk")
        return None

    ratios: dict[str, Any] = {}
    for peer in (TOY, ROUTER):
        per_cell = {}
        for c in cells:
            if c["label"] != PDPROXY:
                continue
            ours, theirs = (
                c.get("proxy_cpu_us_per_chunk"),
                cpu(peer, c["endpoint"], c["concurrency"]),
            )
            if ours and theirs:
                per_cell[f"{c['endpoint']}/c{c['concurrency']}"] = ours / theirs
        if per_cell:
            ratios[peer] = per_cell
    results["cpu_ratio_ours_over_peer"] = ratios

    # The targets, each against its measured value.
    targets: list[dict[str, Any]] = []
    for endpoint in sorted({c["endpoint"] for c in cells}):
        one = next(
            (
                c
                for c in cells
                if c["label"] == PDPROXY and c["endpoint"] == endpoint and c["concurrency"] == 1
            ),
            None,
        )
        if one and "added_ttft_p50_ms" in one:
            targets.append(
                {
                    "target": f"added TTFT p50 at c=1 ({endpoint}) <= 1 ms",
                    "measured": f"{one['added_ttft_p50_ms']:.2f} ms",
                    "met": one["added_ttft_p50_ms"] <= 1.0,
                }
            )
        c256 = next(
            (
                c
                for c in cells
                if c["label"] == PDPROXY and c["endpoint"] == endpoint and c["concurrency"] == 256
            ),
            None,
        )
        if c256 and c256.get("added_ttft_p50_pct") is not None:
            targets.append(
                {
                    "target": f"added TTFT at c=256 ({endpoint}) <= 10%",
                    "measured": f"p50 {c256['added_ttft_p50_pct']:.1f}% "
                    f"({c256['added_ttft_p50_ms']:.2f} ms), "
                    f"p99 {c256['added_ttft_p99_pct']:.1f}% ({c256['added_ttft_p99_ms']:.2f} ms)",
                    "met": c256["added_ttft_p50_pct"] <= 10.0,
                }
            )
    for peer, limit in ((TOY, 1 / 3), (ROUTER, 1.0)):
        values = ratios.get(peer)
        if values:
            busy = {k: v for k, v in values.items() if not k.endswith("/c1")}
            worst = max((busy or values).values())
            targets.append(
                {
                    "target": f"proxy CPU per chunk / {peer}'s "
                    + ("<= 1/3" if peer == TOY else "(parity = 1.0, aim)"),
                    "measured": f"worst {worst:.2f}x over c>1 cells; "
                    + ", ".join(f"{k} {v:.2f}x" for k, v in values.items()),
                    "met": worst <= limit,
                }
            )
    big = [c for c in cells if c["label"] == PDPROXY and c["concurrency"] >= 1024]
    if big:
        targets.append(
            {
                "target": "zero errors at c=1024",
                "measured": ", ".join(f"{c['endpoint']}: {c['errors']}" for c in big),
                "met": all(c["errors"] == 0 for c in big),
            }
        )
        targets.append(
            {
                "target": "memory bounded (peak RSS at c=1024)",
                "measured": ", ".join(
                    f"{c['endpoint']}: {c['proxy_rss_peak_mib']:.0f} MiB" for c in big
                ),
                "met": None,
            }
        )
    results["targets"] = targets


def _f(value: Any, fmt: str = "{:.2f}") -> str:
    if value is None:
        return "–"
    return fmt.format(value)


def markdown(results: dict[str, Any]) -> str:
    cfg = results["config"]
    env = results["environment"]
    lines = [
        f"Fakes: prefill {cfg['prefill_ms']:g} ms, {cfg['itl_ms']:g} ms between tokens, "
        f"{cfg['tokens']} tokens per request; proxies pinned to core {cfg['proxy_core']}, "
        f"fakes + load generator on core(s) {cfg['load_cores']}. "
        f"{env['cpus']} CPUs ({env['cpu']}), Python {env['python']}, {env['time']}."
        + (
            f" **{len(env['other_vllm_servers'])} other vLLM server process(es) were running: "
            "noisy.**"
            if env["other_vllm_servers"]
            else ""
        ),
        "",
        "| target | endpoint | conc | req/s | chunks/s | TTFT p50 ms | TTFT p99 ms | +TTFT p50 "
        "| +TTFT p99 | ITL p50 ms | ITL p99 ms | errors | proxy CPU µs/chunk | CPU-s/1k chunks "
        "| proxy cores | load-side cores | RSS peak MiB | new conns/req P, D |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in results["cells"]:
        added50 = c.get("added_ttft_p50_ms")
        added99 = c.get("added_ttft_p99_ms")
        lines.append(
            "| "
            + " | ".join(
                [
                    c["label"],
                    c["endpoint"],
                    str(c["concurrency"]),
                    _f(c["requests_per_s"], "{:.1f}"),
                    _f(c["chunks_per_s"], "{:.0f}"),
                    _f(c["ttft_ms"].get("p50")),
                    _f(c["ttft_ms"].get("p99")),
                    "–"
                    if added50 is None
                    else f"{added50:+.2f} ms ({c['added_ttft_p50_pct']:+.0f}%)",
                    "–"
                    if added99 is None
                    else f"{added99:+.2f} ms ({c['added_ttft_p99_pct']:+.0f}%)",
                    _f(c["itl_ms"].get("p50")),
                    _f(c["itl_ms"].get("p99")),
                    str(c["errors"]),
                    _f(c.get("proxy_cpu_us_per_chunk"), "{:.1f}"),
                    _f(c.get("proxy_cpu_s_per_1k_chunks"), "{:.3f}"),
                    _f(c.get("proxy_cpu_util")),
                    _f(c.get("load_side_cpu_util")),
                    _f(c.get("proxy_rss_peak_mib"), "{:.0f}"),
                    f"{_f(c.get('p_new_conns_per_request'))}, "
                    f"{_f(c.get('d_new_conns_per_request'))}",
                ]
            )
            + " |"
        )
    if results.get("targets"):
        lines += ["", "| target | measured | met |", "|---|---|---|"]
        for t in results["targets"]:
            met = {True: "yes", False: "**no**", None: "–"}[t["met"]]
            lines.append(f"| {t['target']} | {t['measured']} | {met} |")
    for c in results["cells"]:
        prof = c.get("profile")
        if not prof:
            continue
        if "error" in prof:
            lines += [
                "",
                f"Profile of {c['label']} {c['endpoint']} c={c['concurrency']}: {prof['error']}",
            ]
            continue
        libs = ", ".join(f"{k} {v:.0f}%" for k, v in prof["by_library_pct"].items() if v >= 1)
        top = ", ".join(f"{k} {v:.0f}%" for k, v in prof["top_self_pct"][:8])
        lines += [
            "",
            f"Profile of {c['label']} {c['endpoint']} c={c['concurrency']} "
            f"({prof['samples']} samples, {prof['file']}):",
            f"- by library: {libs}",
            f"- hottest functions (self): {top}",
        ]
    if results.get("skipped"):
        lines += [""] + [f"- skipped {k}: {v}" for k, v in results["skipped"].items()]
    unstitched = [
        f"{c['label']} {c['endpoint']} c={c['concurrency']}: {c['served_modes']}"
        for c in results["cells"]
        if c.get("served_modes") and set(c["served_modes"]) != {"stitched"}
    ]
    if unstitched:
        lines += [
            "",
            "- **not every answer was served stitched** (x-pdproxy-mode): " + "; ".join(unstitched),
        ]
    bad = {
        k: v
        for k, v in results.get("sanity", {}).items()
        if v.get("status") != 200 or not v.get("matches_single_engine")
    }
    if bad:
        lines += [""] + [f"- sanity check failed for {k}: {v}" for k, v in bad.items()]
    return "\n".join(lines) + "\n"


# --- command line ------------------------------------------------------------------------
