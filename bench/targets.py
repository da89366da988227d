"""The processes a run starts: the fake engines, pdproxy and the optional peers, and a
note of the machine they run on."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

from devkit.servers import Process, free_port

from .options import REPO, ROUTER, TOY, Options


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def cores(spec: str) -> list[int]:
    """A ``taskset`` core list as numbers: ``0-3,8`` -> [0, 1, 2, 3, 8]."""
    out: list[int] = []
    for part in filter(None, spec.split(",")):
        first, _, last = part.partition("-")
        out += range(int(first), int(last or first) + 1)
    return out


def child_env() -> dict[str, str]:
    """The environment of a child process: this checkout importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def fake_process(name: str, opts: Options) -> Process:
    port = free_port()
    argv = [
        "taskset", "-c", opts.load_cores,
        sys.executable, "-m", "bench.fake",
        "--port", str(port),
        "--prefill-ms", str(opts.prefill_ms),
        "--itl-ms", str(opts.itl_ms),
        "--tokens", str(opts.tokens),
        "--kv-lease-s", "30",
    ]  # fmt: skip
    return Process(
        name, argv, child_env(), port, opts.log_dir / f"{name}.log", ready_path="/health"
    )


def proxy_process(opts: Options, p_url: str, d_url: str, workers: int, cores: str) -> Process:
    port = free_port()
    env = child_env()
    env.update(
        {
            "PDPROXY_PREFILL_URLS": p_url,
            "PDPROXY_DECODE_URLS": d_url,
            "PDPROXY_HOST": "127.0.0.1",
            "PDPROXY_PORT": str(port),
            "PDPROXY_WORKERS": str(workers),
        }
    )
    env.update(opts.proxy_env)
    argv = ["taskset", "-c", cores, opts.proxy_python, "-m", "proxy"]
    return Process(
        f"pdproxy-w{workers}",
        argv,
        env,
        port,
        opts.log_dir / f"pdproxy-w{workers}.log",
        ready_path="/ready",
    )


def toy_process(opts: Options, p_port: int, d_port: int) -> Process:
    port = free_port()
    argv = [
        "taskset", "-c", str(opts.proxy_core),
        sys.executable, opts.toy_proxy or "",
        "--host", "127.0.0.1", "--port", str(port),
        "--prefiller-hosts", "127.0.0.1", "--prefiller-ports", str(p_port),
        "--decoder-hosts", "127.0.0.1", "--decoder-ports", str(d_port),
    ]  # fmt: skip
    return Process(
        TOY, argv, child_env(), port, opts.log_dir / "toy-proxy.log", ready_path="/healthcheck"
    )


def router_process(opts: Options, p_url: str, d_url: str) -> Process:
    port = free_port()
    argv = [
        "taskset", "-c", str(opts.proxy_core),
        opts.vllm_router or "",
        "--vllm-pd-disaggregation",
        "--prefill", p_url, "--decode", d_url,
        "--host", "127.0.0.1", "--port", str(port),
        "--prometheus-port", str(free_port()),
    ]  # fmt: skip
    if opts.peer_log_level:
        argv += ["--log-level", opts.peer_log_level]
    return Process(
        ROUTER, argv, child_env(), port, opts.log_dir / "vllm-router.log", ready_path="/health"
    )


# --- one cell ----------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    vllm = subprocess.run(
        ["pgrep", "-af", "vllm.entrypoints"], capture_output=True, text=True, check=False
    ).stdout.strip()
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from importlib.metadata import PackageNotFoundError, version

    libs = {}
    for name in (
        "fastapi",
        "starlette",
        "uvicorn",
        "httpx",
        "httpcore",
        "uvloop",
        "httptools",
        "orjson",
        "h11",
        "aiohttp",
    ):
        try:
            libs[name] = version(name)
        except PackageNotFoundError:
            libs[name] = None
    return {
        "time": _dt.datetime.now().isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu": model,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "loadavg_start": os.getloadavg(),
        "other_vllm_servers": vllm.splitlines(),
        "libs": libs,
    }
