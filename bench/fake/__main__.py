"""``python -m bench.fake`` : one fake vLLM server as a process."""

from __future__ import annotations

import argparse
import asyncio
import signal

from .config import FAULTS, LEGS, FakeConfig
from .server import FakeEngine, _new_loop


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fake", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--model", default=FakeConfig.model)
    parser.add_argument("--max-model-len", type=int, default=FakeConfig.max_model_len)
    parser.add_argument("--prefill-ms", type=float, default=FakeConfig.prefill_ms)
    parser.add_argument("--itl-ms", type=float, default=FakeConfig.itl_ms)
    parser.add_argument("--decode-first-ms", type=float, default=None)
    parser.add_argument(
        "--tokens",
        type=int,
        default=FakeConfig.tokens,
        help="output tokens when max_tokens is absent",
    )
    parser.add_argument("--cached-tokens", type=int, default=FakeConfig.cached_tokens)
    parser.add_argument("--fault", choices=[f for f in FAULTS if f], default=None)
    parser.add_argument(
        "--fault-legs", default=",".join(LEGS), help="comma list of prefill,decode,plain"
    )
    parser.add_argument("--fault-times", type=int, default=0)
    parser.add_argument("--fault-status", type=int, default=500)
    parser.add_argument("--fault-health", action="store_true")
    parser.add_argument("--close-after-chunks", type=int, default=FakeConfig.close_after_chunks)
    parser.add_argument("--first-byte-ms", type=float, default=FakeConfig.first_byte_ms)
    parser.add_argument("--kv-lease-s", type=float, default=FakeConfig.kv_lease_s)
    parser.add_argument(
        "--keep-requests", type=int, default=0, help="recent request bodies kept for /fake/stats"
    )
    parser.add_argument("--no-uvloop", action="store_true")
    return parser


def config_from_args(args: argparse.Namespace) -> FakeConfig:
    return FakeConfig(
        model=args.model,
        max_model_len=args.max_model_len,
        prefill_ms=args.prefill_ms,
        itl_ms=args.itl_ms,
        decode_first_ms=args.decode_first_ms,
        tokens=args.tokens,
        cached_tokens=args.cached_tokens,
        fault=args.fault,
        fault_legs=tuple(x for x in args.fault_legs.split(",") if x),
        fault_times=args.fault_times,
        fault_status=args.fault_status,
        fault_health=args.fault_health,
        close_after_chunks=args.close_after_chunks,
        first_byte_ms=args.first_byte_ms,
        kv_lease_s=args.kv_lease_s,
        keep_requests=args.keep_requests,
    )


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    engine = FakeEngine(config_from_args(args))
    loop = asyncio.new_event_loop() if args.no_uvloop else _new_loop()
    asyncio.set_event_loop(loop)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    async def serve() -> None:
        await engine.start(args.host, args.port)
        print(f"fake engine listening on {engine.url}", flush=True)
        await stop.wait()
        await engine.stop()

    loop.run_until_complete(serve())
    loop.close()


if __name__ == "__main__":
    main()
