"""config/: the Kubernetes manifests and docker-compose.yaml, validated offline.

- Schemas: every Kubernetes object against the official OpenAPI-derived JSON schemas shipped
  in the ``kubernetes-validate`` wheel (strict: unknown fields fail), for the oldest and the
  newest Kubernetes this suite claims; docker-compose.yaml against the Compose Specification
  schema vendored in ``check-jsonschema``.
- Wiring, which no schema checks: selectors match pod labels, Services reach declared ports,
  probes use declared ports, ports are unique inside a pod, every ``$(VAR)`` in args is
  defined, referenced ConfigMaps/PVCs exist, each connector port is a containerPort, the
  proxy's URLs reach pods of the right pool on the right port.
- Settings: every PDPROXY_* name used must be a field of ``proxy.settings.Settings`` (read
  at test time), and the values given must pass the Settings validation.
- Connector: every ``--kv-transfer-config`` uses only KVTransferConfig fields of the vLLM
  installed here (read from its source, not imported), and its ``kv_connector_extra_config``
  parses with ``engine_ext.config.PDSettings``.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from proxy.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parents[3]
CONFIG = ROOT / "config"
K8S_DIRS = sorted(p for p in (CONFIG / "k8s").iterdir() if p.is_dir())
COMPOSE = CONFIG / "docker-compose.yaml"
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")  # oldest we claim, newest the schemas know
SETTINGS = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
POD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}
CONNECTOR = {
    "kv_connector": "PDConnector",
    "kv_connector_module_path": "engine_ext.connector",
    "kv_role": "kv_both",
}


def test_there_are_two_shapes():
    assert [d.name for d in K8S_DIRS] == ["sidecar", "standalone"]


# --- loading --------------------------------------------------------------------------------


def load_dir(directory: Path) -> list[dict]:
    docs = []
    for path in sorted(directory.glob("*.y*ml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                doc["__file__"] = path.name
                docs.append(doc)
    assert docs, f"no manifests in {directory}"
    return docs


def plain(doc: dict) -> dict:
    return {k: v for k, v in doc.items() if k != "__file__"}


def where(doc: dict) -> str:
    return f"{doc['__file__']}: {doc['kind']}/{doc['metadata']['name']}"


@pytest.fixture(scope="module", params=K8S_DIRS, ids=lambda d: d.name)
def shape(request) -> list[dict]:
    return load_dir(request.param)


def of_kind(docs: list[dict], *kinds: str) -> list[dict]:
    return [d for d in docs if d["kind"] in kinds]


def pod_templates(docs: list[dict]) -> list[tuple[dict, dict]]:
    """(workload, pod template) pairs."""
    return [(d, d["spec"]["template"]) for d in of_kind(docs, *POD_KINDS)]


def containers(template: dict) -> list[dict]:
    return template["spec"]["containers"]


def is_proxy(container: dict) -> bool:
    return container["image"].split("/")[-1].split(":")[0] == "pdproxy"


def is_engine(container: dict) -> bool:
    return "--kv-transfer-config" in container.get("args", [])


def arg_value(container: dict, flag: str) -> str:
    args = container.get("args", [])
    for i, arg in enumerate(args):
        if arg == flag:
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{container['name']}: no {flag}")


def kv_config(args_value: str) -> dict:
    return json.loads(args_value)


def declared_ports(container: dict) -> dict[str | int, int]:
    """name -> number and number -> number, for the container's declared ports."""
    found: dict[str | int, int] = {}
    for port in container.get("ports", []):
        found[port["containerPort"]] = port["containerPort"]
        if "name" in port:
            found[port["name"]] = port["containerPort"]
    return found


def pod_ports(template: dict) -> dict[str | int, int]:
    found: dict[str | int, int] = {}
    for c in containers(template):
        found |= declared_ports(c)
    return found


def selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


# --- schema ---------------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_matches_the_kubernetes_schema(shape, version):
    import kubernetes_validate  # the test extra brings it: no schema check is no check

    for doc in shape:
        try:
            kubernetes_validate.validate(plain(doc), version, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(p) for p in error.path)
            pytest.fail(f"{where(doc)} against Kubernetes {version}: {path}: {error.message}")


def test_compose_matches_the_compose_specification():
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.compose-spec",
            str(COMPOSE),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


# --- the connector's configuration -----------------------------------------------------------


def kv_configs() -> list[tuple[str, dict]]:
    """Every --kv-transfer-config in config/, with where it is."""
    found = []
    for directory in K8S_DIRS:
        for workload, template in pod_templates(load_dir(directory)):
            for c in filter(is_engine, containers(template)):
                found.append(
                    (
                        f"{directory.name}/{where(workload)}",
                        kv_config(arg_value(c, "--kv-transfer-config")),
                    )
                )
    for name, service in yaml.safe_load(COMPOSE.read_text())["services"].items():
        if "--kv-transfer-config" in service.get("command", []):
            found.append(
                (f"docker-compose {name}", kv_config(compose_arg(service, "--kv-transfer-config")))
            )
    assert len(found) == 6  # P and D in each of the three deployments
    return found


def vllm_kv_transfer_fields() -> set[str]:
    """KVTransferConfig's fields, read from vLLM's source without importing vLLM (slow)."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("vLLM is not installed here")
    source = Path(next(iter(spec.submodule_search_locations)), "config", "kv_transfer.py")
    tree = ast.parse(source.read_text())
    cls = next(
        n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "KVTransferConfig"
    )
    return {
        n.target.id
        for n in cls.body
        if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
    }


def test_kv_transfer_configs_use_only_keys_vllm_accepts():
    known = vllm_kv_transfer_fields()
    assert {"kv_connector", "kv_load_failure_policy", "kv_connector_extra_config"} <= known
    for place, config in kv_configs():
        assert set(config) <= known, f"{place}: vLLM rejects {sorted(set(config) - known)}"
        assert config.get("kv_load_failure_policy") == "recompute", place


def test_connector_settings_parse():
    from engine_ext.config import PDSettings

    for place, config in kv_configs():
        extra = {
            k: v.replace("$(POD_IP)", "10.0.0.7") if isinstance(v, str) else v
            for k, v in config["kv_connector_extra_config"].items()
        }
        try:
            PDSettings.from_extra(extra)
        except ValueError as error:
            pytest.fail(f"{place}: {error}")


# --- Kubernetes wiring ------------------------------------------------------------------------


def test_objects_are_named_labelled_and_unique(shape):
    seen = set()
    for doc in shape:
        assert doc.get("apiVersion") and doc.get("kind"), doc["__file__"]
        name = doc["metadata"]["name"]
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63, where(doc)
        assert doc["metadata"].get("labels", {}).get("app.kubernetes.io/name") == "pdproxy", where(
            doc
        )
        assert (doc["kind"], name) not in seen, f"{where(doc)} defined twice"
        seen.add((doc["kind"], name))


def test_workload_selectors_match_their_pod_labels(shape):
    for workload, template in pod_templates(shape):
        match = workload["spec"]["selector"]["matchLabels"]
        assert selects(match, template["metadata"]["labels"]), where(workload)
        others = [
            w
            for w, t in pod_templates(shape)
            if w is not workload and selects(match, t["metadata"]["labels"])
        ]
        assert not others, f"{where(workload)}'s selector also matches {[where(o) for o in others]}"
    for pdb in of_kind(shape, "PodDisruptionBudget"):
        match = pdb["spec"]["selector"]["matchLabels"]
        assert any(selects(match, t["metadata"]["labels"]) for _, t in pod_templates(shape)), where(
            pdb
        )


def test_services_select_pods_and_reach_declared_ports(shape):
    templates = [t for _, t in pod_templates(shape)]
    for service in of_kind(shape, "Service"):
        selected = [
            t
            for t in templates
            if selects(service["spec"].get("selector", {}), t["metadata"]["labels"])
        ]
        assert selected, f"{where(service)} selects no pod template"
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for template in selected:
                assert target in pod_ports(template), (
                    f"{where(service)}: targetPort {target!r} is not declared"
                )


def test_pod_ports_are_unique_and_probes_use_declared_ports(shape):
    for workload, template in pod_templates(shape):
        numbers, names = [], []
        for c in containers(template):
            numbers += [p["containerPort"] for p in c.get("ports", [])]
            names += [p["name"] for p in c.get("ports", []) if "name" in p]
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = c.get(kind)
                if probe and "httpGet" in probe:
                    assert probe["httpGet"]["port"] in declared_ports(c), (
                        f"{where(workload)} {c['name']} {kind}"
                    )
        # The containers of a pod share one network namespace.
        assert len(numbers) == len(set(numbers)), f"{where(workload)}: a port number is used twice"
        assert len(names) == len(set(names)), f"{where(workload)}: a port name is used twice"


def test_references_resolve(shape):
    defined = {(d["kind"], d["metadata"]["name"]) for d in shape}
    for workload, template in pod_templates(shape):
        spec = template["spec"]
        for volume in spec.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert (
                    "PersistentVolumeClaim",
                    volume["persistentVolumeClaim"]["claimName"],
                ) in defined
            if "configMap" in volume and not volume["configMap"].get("optional"):
                assert ("ConfigMap", volume["configMap"]["name"]) in defined
        mounts_ok = {v["name"] for v in spec.get("volumes", [])}
        for c in containers(template):
            for mount in c.get("volumeMounts", []):
                assert mount["name"] in mounts_ok, (
                    f"{where(workload)} {c['name']}: volume {mount['name']}"
                )
            for source in c.get("envFrom", []):
                ref = source.get("configMapRef")
                if ref and not ref.get("optional"):
                    assert ("ConfigMap", ref["name"]) in defined, (
                        f"{where(workload)}: ConfigMap {ref['name']}"
                    )
                assert "secretRef" not in source or source["secretRef"].get("optional"), (
                    "secrets are the user's"
                )
            for var in c.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                assert ref is None or ref.get("optional"), (
                    f"{where(workload)}: a secret the user must create"
                )
            # Kubernetes leaves $(VAR) as it is when VAR is not an env var of the container.
            env_names = {v["name"] for v in c.get("env", [])}
            for arg in c.get("args", []) + c.get("command", []):
                for var in re.findall(r"(?<!\$)\$\((\w+)\)", arg):
                    assert var in env_names, (
                        f"{where(workload)} {c['name']}: $({var}) is not defined"
                    )


def test_engines_load_the_connector_on_declared_ports(shape):
    engines = [(w, t, c) for w, t in pod_templates(shape) for c in containers(t) if is_engine(c)]
    assert {
        w["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
        for w, _, _ in engines
    } == {"prefill", "decode"}
    for workload, template, c in engines:
        config = kv_config(arg_value(c, "--kv-transfer-config"))
        assert {k: config.get(k) for k in CONNECTOR} == CONNECTOR, where(workload)
        extra = config["kv_connector_extra_config"]
        ports = declared_ports(c)
        for key in ("zmq_port", "control_port"):
            assert extra[key] in ports, (
                f"{where(workload)}: {key} {extra[key]} is not a containerPort"
            )
        assert extra.get("host") == "$(POD_IP)", (
            f"{where(workload)}: peers must be told the pod's IP"
        )
        assert int(arg_value(c, "--port")) in ports, (
            f"{where(workload)}: --port is not a containerPort"
        )
        assert "nvidia.com/gpu" in c["resources"]["limits"], where(workload)
        for kind in ("readinessProbe", "startupProbe"):
            probe = c[kind]["httpGet"]
            assert probe["path"] == "/health" and ports[probe["port"]] == int(
                arg_value(c, "--port")
            ), where(workload)


def test_proxies_are_non_root_and_probe_ready_and_health(shape, monkeypatch):
    proxies = [(w, t, c) for w, t in pod_templates(shape) for c in containers(t) if is_proxy(c)]
    assert proxies
    for workload, template, c in proxies:
        sc = c.get("securityContext", {})
        assert sc.get("runAsNonRoot") is True and sc.get("runAsUser", 0) != 0, where(workload)
        assert (
            sc.get("allowPrivilegeEscalation") is False and sc.get("readOnlyRootFilesystem") is True
        )
        assert c["readinessProbe"]["httpGet"]["path"] == "/ready", where(workload)
        assert c["livenessProbe"]["httpGet"]["path"] == "/health", where(workload)
        settings = check_settings(monkeypatch, proxy_env(shape, c))
        assert settings.port == declared_ports(c)["http"], where(workload)
        # httpGet probes send no Authorization header.
        assert not settings.protect_ops_endpoints, f"{where(workload)}: probes cannot pass a key"
        # readOnlyRootFilesystem: the prometheus multiprocess dir of PDPROXY_WORKERS > 1 is in /tmp.
        assert any(m["mountPath"] == "/tmp" for m in c.get("volumeMounts", [])), where(workload)
        # Kubernetes would inject PDPROXY_PORT=tcp://... for a Service named pdproxy.
        assert template["spec"].get("enableServiceLinks") is False, where(workload)


def proxy_env(docs: list[dict], container: dict) -> dict[str, str | None]:
    """The container's environment; None for values that come from Secrets."""
    env: dict[str, str | None] = {}
    maps = {d["metadata"]["name"]: d.get("data", {}) for d in of_kind(docs, "ConfigMap")}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env |= {
                source.get("prefix", "") + k: v
                for k, v in maps[source["configMapRef"]["name"]].items()
            }
    for var in container.get("env", []):
        env[var["name"]] = var.get("value")
    return env


def test_proxy_settings_are_real_and_valid(shape, monkeypatch):
    used: set[str] = set()
    for cm in of_kind(shape, "ConfigMap"):
        used |= {k for k in cm.get("data", {}) if k.startswith(ENV_PREFIX)}
    for _, template in pod_templates(shape):
        for c in containers(template):
            used |= {v["name"] for v in c.get("env", []) if v["name"].startswith(ENV_PREFIX)}
            if is_proxy(c):
                env = proxy_env(shape, c)
                assert all(k.startswith(ENV_PREFIX) for k in env), "the proxy reads PDPROXY_* only"
                check_settings(monkeypatch, env)
    unknown = sorted(used - SETTINGS)
    assert not unknown, f"not settings of proxy.settings.Settings: {unknown}"


def check_settings(monkeypatch, env: dict[str, str | None]) -> Settings:
    for name in [k for k in os.environ if k.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        if value is not None:
            monkeypatch.setenv(name, value)
    return Settings()


def test_proxy_urls_reach_the_right_pools(shape):
    """Each URL names a Service of the same shape that selects pods of that pool (headless
    when discovery is on, so that its name resolves to every pod) and uses the port the
    pods' vLLM listens on, or 127.0.0.1 and a port of a vLLM in the proxy's own pod."""
    services = {s["metadata"]["name"]: s for s in of_kind(shape, "Service")}
    for _, template in pod_templates(shape):
        for proxy in filter(is_proxy, containers(template)):
            env = proxy_env(shape, proxy)
            for pool in ("prefill", "decode"):
                for url in env[f"PDPROXY_{pool.upper()}_URLS"].split(","):
                    parts = urlsplit(url.strip())
                    if parts.hostname in ("127.0.0.1", "localhost"):
                        targets = [template]
                        assert (
                            template["metadata"]["labels"]["app.kubernetes.io/component"] == pool
                        ), url
                    else:
                        service = services.get(parts.hostname)
                        assert service, f"{url}: no Service {parts.hostname}"
                        assert service["spec"].get("clusterIP") == "None", (
                            f"{url}: discovery needs a headless Service"
                        )
                        assert "PDPROXY_DISCOVERY_INTERVAL" in env, (
                            f"{url}: set PDPROXY_DISCOVERY_INTERVAL"
                        )
                        targets = [
                            t
                            for _, t in pod_templates(shape)
                            if selects(service["spec"]["selector"], t["metadata"]["labels"])
                        ]
                        assert [
                            t["metadata"]["labels"]["app.kubernetes.io/component"] for t in targets
                        ] == [pool], url
                    for target in targets:
                        engine_ports = [
                            int(arg_value(c, "--port")) for c in containers(target) if is_engine(c)
                        ]
                        assert engine_ports == [parts.port], (
                            f"{url}: the {pool} vLLM listens on {engine_ports}"
                        )


# --- docker-compose -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def compose_arg(service: dict, flag: str) -> str:
    return arg_value({"name": "compose", "args": service["command"]}, flag)


def test_compose_has_prefill_decode_and_proxy_on_gpus(compose):
    services = compose["services"]
    assert set(services) == {"prefill", "decode", "proxy"}
    assert (
        services["prefill"]["build"]["target"] == services["decode"]["build"]["target"] == "engine"
    )
    assert services["proxy"]["build"]["target"] == "proxy"
    http_ports, kv_ports = [], []
    for name in ("prefill", "decode"):
        service = services[name]
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert devices and all("gpu" in d["capabilities"] for d in devices), name
        config = kv_config(compose_arg(service, "--kv-transfer-config"))
        assert {k: config.get(k) for k in CONNECTOR} == CONNECTOR, name
        kv_ports += [
            config["kv_connector_extra_config"]["zmq_port"],
            config["kv_connector_extra_config"]["control_port"],
        ]
        http_ports.append(int(compose_arg(service, "--port")))
        assert str(http_ports[-1]) in " ".join(service["healthcheck"]["test"]), (
            f"{name}'s healthcheck port"
        )
    proxy_port = int(services["proxy"]["environment"].get("PDPROXY_PORT", 8000))
    ports = http_ports + kv_ports + [proxy_port]
    assert all(s.get("network_mode") == "host" for s in services.values())
    assert len(ports) == len(set(ports)), f"host networking: every port must differ: {ports}"


def test_compose_proxy_settings_are_real_valid_and_reach_the_servers(compose, monkeypatch):
    services = compose["services"]
    env = {k: str(v) for k, v in services["proxy"]["environment"].items()}
    unknown = sorted(set(env) - SETTINGS)
    assert not unknown, f"not settings of proxy.settings.Settings: {unknown}"
    settings = check_settings(monkeypatch, env)
    for pool, urls in (("prefill", settings.prefill_urls), ("decode", settings.decode_urls)):
        assert [urlsplit(u).port for u in urls] == [int(compose_arg(services[pool], "--port"))], (
            pool
        )
