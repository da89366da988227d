"""Start and stop local vLLM CPU servers and the proxy as subprocesses.

Used by the end-to-end tests, the demo and the CPU benchmarks, so all of them run the
same commands an operator would. Each server gets its own log file; a server that dies
during start-up raises with the tail of its log instead of leaving a test to time out.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pd_connector_config(**extra: object) -> str:
    """The ``--kv-transfer-config`` that turns a vLLM server into a P/D instance."""
    return json.dumps(
        {
            "kv_connector": "PDConnector",
            "kv_connector_module_path": "engine_ext.connector",
            "kv_role": "kv_both",
            "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": extra,
        }
    )


@dataclass
class Process:
    """A child process with a log file and an HTTP readiness probe."""

    name: str
    argv: list[str]
    env: dict[str, str]
    port: int
    log_path: Path
    ready_path: str = "/health"
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "Process":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.argv,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            start_new_session=True,  # its own process group: stop() reaches every child
        )
        log.close()
        return self

    def wait_ready(self, timeout: float = 600.0) -> "Process":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            try:
                if httpx.get(self.url + self.ready_path, timeout=2.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{self.name} not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """Hard kill, as a crash would: no clean shutdown."""
        self._signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=30)

    def stop(self, grace: float = 15.0) -> None:
        if not self.alive():
            return
        self._signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace)  # type: ignore[union-attr]
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self.proc.wait(timeout=30)  # type: ignore[union-attr]

    def _signal(self, sig: int) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


def vllm_server(
    name: str,
    model_dir: str | Path,
    log_dir: str | Path,
    *,
    port: int | None = None,
    kv_transfer_config: str | None = None,
    cpu_core: int | None = None,
    served_model_name: str = "tiny",
    max_model_len: int = 2048,
    extra_args: list[str] | None = None,
    extra_env: dict[str, str] | None = None,
) -> Process:
    """A vLLM OpenAI server on CPU: float32, a small KV cache, its own OpenMP core."""
    port = port or free_port()
    argv = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        served_model_name,
        "--dtype",
        "float32",
        "--max-model-len",
        str(max_model_len),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--enable-prompt-tokens-details",
        "--disable-uvicorn-access-log",
    ]
    if kv_transfer_config:
        argv += ["--kv-transfer-config", kv_transfer_config]
    argv += extra_args or []
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("VLLM_LOGGING_LEVEL", "INFO")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["HF_HUB_OFFLINE"] = "1"
    env["VLLM_NO_USAGE_STATS"] = "1"
    if cpu_core is not None:
        # Every vLLM CPU server binds its OpenMP threads to core 0 by default: several
        # servers on one machine would share one core.
        env["VLLM_CPU_OMP_THREADS_BIND"] = str(cpu_core % (os.cpu_count() or 1))
    env.update(extra_env or {})
    return Process(name, argv, env, port, Path(log_dir) / f"{name}.log", ready_path="/health")


def engine_pair(shape: str, log_dir: str | Path, max_model_len: int) -> list[Process]:
    """Two vLLM CPU servers with the PDConnector serving devkit's model of ``shape``,
    server ``a`` on core 0 and ``b`` on core 1: the equal hardware the benchmarks that
    compare serving arms (``bench.goodput``, ``bench.migration``) run on."""
    from . import tiny_model

    folder = "tiny-llama" if shape == "tiny" else f"{shape}-llama"
    model = tiny_model.build(REPO_ROOT / ".cache" / folder, shape)
    return [
        vllm_server(
            name,
            model,
            log_dir,
            cpu_core=core,
            max_model_len=max_model_len,
            kv_transfer_config=pd_connector_config(host="127.0.0.1"),
        )
        for name, core in (("a", 0), ("b", 1))
    ]


def proxy_server(
    name: str,
    log_dir: str | Path,
    *,
    prefill_urls: list[str],
    decode_urls: list[str],
    port: int | None = None,
    extra_env: dict[str, str] | None = None,
) -> Process:
    port = port or free_port()
    env = dict(os.environ)
    env.update(
        {
            "PDPROXY_PREFILL_URLS": ",".join(prefill_urls),
            "PDPROXY_DECODE_URLS": ",".join(decode_urls),
            "PDPROXY_HOST": "127.0.0.1",
            "PDPROXY_PORT": str(port),
        }
    )
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.update(extra_env or {})
    argv = [sys.executable, "-m", "proxy"]
    return Process(name, argv, env, port, Path(log_dir) / f"{name}.log", ready_path="/health")


def start_all(processes: list[Process], timeout: float = 900.0) -> list[Process]:
    """Start several processes at once and wait until all are ready (or stop them all)."""
    for proc in processes:
        proc.start()
    try:
        for proc in processes:
            proc.wait_ready(timeout)
    except BaseException:
        for proc in processes:
            proc.stop()
        raise
    return processes
