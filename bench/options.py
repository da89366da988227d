"""What a ``python -m bench`` run measures: its options and their command line."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"

DIRECT, PDPROXY, TOY, ROUTER = "direct-pd", "pdproxy", "toy-proxy", "vllm-router"


@dataclasses.dataclass
class Options:
    quick: bool
    concurrency: list[int]
    endpoints: list[str]
    duration: float
    duration_c1: float
    warmup: float
    tokens: int
    prefill_ms: float
    itl_ms: float
    proxy_core: int
    load_cores: str
    workers: list[int]
    workers_concurrency: list[int]
    toy_proxy: str | None
    vllm_router: str | None
    out: Path
    log_dir: Path
    proxy_env: dict[str, str]
    proxy_python: str  # the interpreter pdproxy runs on (the fakes and the load keep ours)
    peer_log_level: str | None
    profile: list[tuple[str, int]]  # (endpoint, concurrency) cells whose window py-spy records


# --- processes ---------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a ~1-minute smoke run (c=1,32, short cells, no worker scaling)",
    )
    parser.add_argument(
        "--concurrency", type=_ints, default=None, help="comma list (default 1,32,256,1024)"
    )
    parser.add_argument("--endpoints", default="chat,completions")
    parser.add_argument(
        "--duration",
        type=float,
        default=None,
        help="measurement window per cell, seconds (default 8)",
    )
    parser.add_argument(
        "--duration-c1", type=float, default=None, help="window of the c=1 cells (default 16)"
    )
    parser.add_argument(
        "--warmup", type=float, default=None, help="seconds before each window (default 2)"
    )
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prefill-ms", type=float, default=50.0)
    parser.add_argument("--itl-ms", type=float, default=20.0)
    parser.add_argument("--proxy-core", type=int, default=0)
    parser.add_argument(
        "--load-cores",
        default=None,
        help="cores of the fakes and the load generator (default: all but the proxy's)",
    )
    parser.add_argument(
        "--workers", type=_ints, default=None, help="PDPROXY_WORKERS values to run (default 1,2)"
    )
    parser.add_argument(
        "--workers-concurrency",
        type=_ints,
        default=None,
        help="concurrency of the workers>1 cells (default 256,1024)",
    )
    parser.add_argument(
        "--toy-proxy",
        default=os.environ.get("BENCH_TOY_PROXY"),
        help="path of vLLM's toy_proxy_server.py",
    )
    parser.add_argument(
        "--vllm-router",
        default=os.environ.get("BENCH_VLLM_ROUTER"),
        help="path of the vllm-router executable",
    )
    parser.add_argument(
        "--peer-log-level",
        default=None,
        help="--log-level for vllm-router (default: its own, info)",
    )
    parser.add_argument(
        "--proxy-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for pdproxy",
    )
    parser.add_argument(
        "--proxy-python",
        default=sys.executable,
        metavar="PATH",
        help="the Python interpreter pdproxy runs on (with the proxy's dependencies "
        "installed), e.g. to compare CPython versions (default: this one)",
    )
    parser.add_argument(
        "--profile",
        action="append",
        default=[],
        metavar="ENDPOINT:CONC",
        help="py-spy the proxies during this cell (repeatable), e.g. chat:256",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON results (default bench/results/bench-<time>.json)",
    )
    args = parser.parse_args(argv)

    cpus = os.cpu_count() or 1
    load_cores = (
        args.load_cores
        or ",".join(str(c) for c in range(cpus) if c != args.proxy_core)
        or str(args.proxy_core)
    )
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or RESULTS / f"bench-{'quick-' if args.quick else ''}{stamp}.json"
    proxy_env = dict(item.split("=", 1) for item in args.proxy_env)
    return Options(
        quick=args.quick,
        concurrency=args.concurrency or ([1, 32] if args.quick else [1, 32, 256, 1024]),
        endpoints=[e for e in args.endpoints.split(",") if e],
        duration=args.duration or (3.0 if args.quick else 8.0),
        duration_c1=args.duration_c1 or (4.0 if args.quick else 16.0),
        warmup=args.warmup if args.warmup is not None else (1.0 if args.quick else 2.0),
        tokens=args.tokens,
        prefill_ms=args.prefill_ms,
        itl_ms=args.itl_ms,
        proxy_core=args.proxy_core,
        load_cores=load_cores,
        workers=args.workers or ([1] if args.quick else [1, 2]),
        workers_concurrency=args.workers_concurrency or [256, 1024],
        toy_proxy=args.toy_proxy,
        vllm_router=args.vllm_router,
        out=out,
        log_dir=out.parent / (out.stem + "-logs"),
        proxy_env=proxy_env,
        proxy_python=args.proxy_python,
        peer_log_level=args.peer_log_level,
        profile=[(e, int(c)) for e, c in (item.split(":") for item in args.profile)],
    )
