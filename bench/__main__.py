"""``python -m bench`` (``make bench``): the proxy against the direct P/D path, side by side.

Starts one fake P and one fake D engine (``bench.fake`` subprocesses), then for
each target -- ``direct-pd`` (the load generator runs both legs itself: a proxy with zero
overhead), ``pdproxy`` (``python -m proxy``), and where given vLLM's toy P/D proxy
(``--toy-proxy PATH``) and the Rust ``vllm-router`` (``--vllm-router PATH``) -- runs
closed-loop cells: streaming chat and completions at each concurrency. Every proxy is
pinned to one core with ``taskset`` (``--proxy-core``); the fakes and the load generator
share the other core(s). A last group runs ``pdproxy`` with ``PDPROXY_WORKERS=2`` over all
cores. Per cell: requests/s, token chunks/s, TTFT and its excess over direct-pd, the gaps
between tokens, errors, the proxy's CPU time per 1,000 streamed chunks (its process tree's
utime+stime over the measurement window, from /proc) and its memory.

Prints a markdown table and writes JSON (``--out``) plus the same table as markdown and
a figure (``bench.plots``, when matplotlib is installed) next to it. ``--quick`` is a
one-minute smoke run. Peers are optional: their code is never part of this project; pass
the toy proxy's file and the router's executable to include them.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from .cells import run_bench
from .options import parse_args
from .plots import draw_beside
from .report import markdown


def main(argv: list[str] | None = None) -> None:
    opts = parse_args(argv)
    try:
        import uvloop

        results = uvloop.run(run_bench(opts))
    except ImportError:  # pragma: no cover
        results = asyncio.run(run_bench(opts))
    results["command"] = " ".join(
        [Path(sys.executable).name, "-m", "bench", *(argv if argv is not None else sys.argv[1:])]
    )
    table = markdown(results)
    print()
    print(table)
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(results, indent=2, default=str))
    opts.out.with_suffix(".md").write_text(f"`{results['command']}`\n\n" + table)
    print(f"wrote {opts.out} and {opts.out.with_suffix('.md')}")
    draw_beside(opts.out)


if __name__ == "__main__":
    main()
