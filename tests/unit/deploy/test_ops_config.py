"""The operator files: config/grafana/pdproxy-dashboard.json and config/prometheus/.

- The dashboard is an importable Grafana dashboard: every panel queries the data source
  variable, has targets, units and legends that name the labels it splits by, and the
  panels tile the 24-column grid without overlapping.
- Every metric name a panel, a dashboard variable or an alert uses is one the code
  exports, checked against real scrapes: the proxy started as ``python -m proxy`` (the
  command an operator runs) and its ``GET /metrics``; the connector's ``StatsRegistry``
  served by its real ``ControlServer``. ``vllm:*`` names are checked against a real vLLM
  server in tests/e2e/test_ops_metrics_e2e.py. And every family the proxy and the
  connector export is on the dashboard, so a new metric cannot be forgotten there.
- ``promtool check rules`` and ``promtool test rules`` pass on the alerts and their unit
  tests, and every dashboard query parses as PromQL by promtool's parser. promtool
  comes from Debian's ``prometheus`` package, which ``make tools`` installs (``make test``
  depends on it); without it these tests fail, they do not skip.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import httpx
import pytest
import yaml

from devkit import servers
from tests.support import promql
from tests.support.promql import (
    ALERT_TESTS,
    ALERTS,
    PromQLError,
    alert_queries,
    dashboard_panels,
    dashboard_queries,
    exported_series,
    load_alerts,
    load_dashboard,
    metric_names,
)

GRID_COLUMNS = 24
DATASOURCE_UID = "${datasource}"


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return load_dashboard()


@pytest.fixture(scope="module")
def alerts() -> dict:
    return load_alerts()


@pytest.fixture(scope="module")
def used_names(dashboard, alerts) -> dict[str, list[str]]:
    """Metric name -> where it is used (dashboard panels and variables, alert rules)."""
    used: dict[str, list[str]] = {}
    for where, expr in dashboard_queries(dashboard) + alert_queries(alerts):
        for name in metric_names(expr):
            used.setdefault(name, []).append(where)
    return used


# --- real scrapes -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def proxy_exposition(tmp_path_factory) -> str:
    """GET /metrics of a real proxy process; its backends are ports nobody listens on."""
    proc = servers.proxy_server(
        "ops-metrics-proxy",
        tmp_path_factory.mktemp("ops-proxy-logs"),
        prefill_urls=[f"http://127.0.0.1:{servers.free_port()}"],
        decode_urls=[f"http://127.0.0.1:{servers.free_port()}"],
    )
    proc.start()
    try:
        proc.wait_ready(60)
        response = httpx.get(proc.url + "/metrics", timeout=10)
        assert response.status_code == 200, response.text
        return response.text
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def connector_exposition() -> str:
    """GET /metrics of the connector's control server, serving a real StatsRegistry."""
    from engine_ext.control import ControlServer
    from engine_ext.stats import StatsRegistry

    registry = StatsRegistry()
    server = ControlServer(
        "127.0.0.1", 0, lambda _tid: False, registry.snapshot, registry.prometheus
    ).start()
    try:
        response = httpx.get(f"http://127.0.0.1:{server.port}/metrics", timeout=10)
        assert response.status_code == 200, response.text
        return response.text
    finally:
        server.stop()


# --- the PromQL name extractor ----------------------------------------------------------------


@pytest.mark.parametrize(
    "expr, names",
    [
        ("up", {"up"}),
        (
            'sum by (mode, outcome) (rate(pdproxy_requests_total{job=~".*", outcome!="ok"}[5m]))',
            {"pdproxy_requests_total"},
        ),
        (
            "histogram_quantile(0.99, sum by (le) "
            '(rate(pdproxy_phase_seconds_bucket{phase="handoff"}[5m]))) > 1',
            {"pdproxy_phase_seconds_bucket"},
        ),
        ("max by (instance) (vllm:kv_cache_usage_perc)", {"vllm:kv_cache_usage_perc"}),
        ("a / on (job) group_left (instance) b", {"a", "b"}),
        ("a and ignoring (x) b or c unless d", {"a", "b", "c", "d"}),
        ("rate(x[5m] offset 1h) * 60 > bool 0", {"x"}),
        ("max_over_time(rate(x[5m])[1h:1m])", {"x"}),
        ('label_replace(x, "dst", "$1", "src", "(.*)") + Inf', {"x"}),
        ('sum without (le) (x{a="}{[(", b=~"[a-z]+"})', {"x"}),
        ("topk(5, sum(rate(y_total[5m])) by (backend))", {"y_total"}),
        ("1 + 2 * -3 ^ 0x10 % NaN", set()),
    ],
)
def test_metric_names_extracts_exactly_the_metrics(expr, names):
    assert metric_names(expr) == names


@pytest.mark.parametrize(
    "expr",
    [
        "histogram_quantil(0.99, x)",  # a typo would otherwise read as a metric name
        "sum(rate(x[5m])",
        "sum(rate(x[5m])))",
        "rate(x[5 m])",
        "rate(x[$__rate_interval])",  # a Grafana variable left unexpanded
        'x{job="a" instance="b"}',
        "x{job=a}",
        'x{job="a"',
        "sum by mode (x)",
        "x # y",
    ],
)
def test_metric_names_rejects_what_it_cannot_read(expr):
    with pytest.raises(PromQLError):
        metric_names(expr)


def test_exported_series_reads_type_lines_and_samples():
    text = (
        "# TYPE a_total counter\n"
        "# TYPE b counter\n"  # OpenMetrics spelling: the family without _total
        "# TYPE h histogram\n"
        "# TYPE s summary\n"
        "# TYPE g gauge\n"
        "g 1\n"
        'loose{x="1"} 2\n'
    )
    assert set(exported_series(text)) == {
        "a_total",
        "b_total",
        "h_bucket",
        "h_sum",
        "h_count",
        "s",
        "s_sum",
        "s_count",
        "g",
        "loose",
    }


def test_grafana_variables_expand_to_plain_promql():
    expanded = promql.expand_grafana('rate(x{job=~"$job", i=~"${instance}"}[$__range])')
    assert expanded == 'rate(x{job=~".*", i=~".*"}[1h])'
    assert promql.variable_selector('label_values(x{job=~"$job"}, instance)') == 'x{job=~"$job"}'
    assert promql.variable_selector("label_values(job)") is None


# --- the dashboard ----------------------------------------------------------------------------


def test_dashboard_is_an_importable_grafana_dashboard(dashboard):
    assert dashboard["schemaVersion"] >= 36 and dashboard["title"] and dashboard["uid"]
    assert dashboard.get("id") is None  # an exported dashboard carries no database id
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource"
        and variables["datasource"]["query"] == "prometheus"
    )
    queries = [
        (f"panel {p['title']!r}", t["expr"])
        for p in dashboard_panels(dashboard)
        for t in p["targets"]
    ]
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"]["uid"] == DATASOURCE_UID, variable["name"]
            queries.append((f"variable {variable['name']}", variable["query"]))
    # Every variable a query refers to is defined (Grafana's built-in intervals aside).
    defined = set(variables) | set(promql.GRAFANA_DURATIONS)
    for where, query in queries:
        for name in re.findall(r"\$\{?(\w+)", query):
            assert name in defined, f"{where} uses undefined ${name}"


def test_every_panel_queries_the_datasource_variable(dashboard):
    panels = dashboard_panels(dashboard)
    assert len(panels) >= 20
    ids = [p["id"] for p in dashboard["panels"]] + [
        c["id"] for p in dashboard["panels"] for c in p.get("panels", [])
    ]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        where = f"panel {panel['id']} {panel['title']!r}"
        assert panel["datasource"]["uid"] == DATASOURCE_UID, where
        assert panel["targets"], f"{where} has no target"
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), where
        for target in panel["targets"]:
            assert target["expr"].strip(), where
            assert target["datasource"]["uid"] == DATASOURCE_UID, where
        assert panel.get("description"), f"{where}: say what it shows"


def test_panels_have_units_and_legends_name_their_labels(dashboard):
    for panel in dashboard_panels(dashboard):
        where = f"panel {panel['id']} {panel['title']!r}"
        assert panel["fieldConfig"]["defaults"].get("unit"), f"{where} has no unit"
        if panel["type"] not in ("timeseries", "state-timeline"):
            continue
        for target in panel["targets"]:
            # Every label a query keeps apart (by (...), histograms' le aside) must show in
            # the legend, or the series are indistinguishable.
            split = {
                label.strip()
                for clause in re.findall(r"\bby\s*\(([^)]*)\)", target["expr"])
                for label in clause.split(",")
            } - {"le", ""}
            for label in split:
                assert "{{" + label + "}}" in target["legendFormat"], (
                    f"{where} {target['refId']}: legend lacks {label}"
                )
            if len(panel["targets"]) > 1:
                assert target["legendFormat"], (
                    f"{where} {target['refId']}: several queries need legends"
                )


def test_rate_windows_are_five_minutes(dashboard, alerts):
    """rate() and increase() over 5m everywhere, except totals over a fixed range or the
    dashboard's."""
    allowed = {"rate": {"5m"}, "increase": {"5m", "1h", "$__range"}}
    queries = [
        (f"panel {p['title']!r}", t["expr"])
        for p in dashboard_panels(dashboard)
        for t in p["targets"]
    ]
    seen = 0
    for where, expr in queries + alert_queries(alerts):
        for func, window in re.findall(r"\b(rate|increase|irate)\([^()\[]*\[([^\]]+)\]", expr):
            assert window in allowed.get(func, set()), f"{where}: {func}[{window}]"
            seen += 1
    assert seen == sum(
        len(re.findall(r"\b(?:rate|increase|irate)\(", e))
        for _, e in queries + alert_queries(alerts)
    )


def test_panels_tile_the_grid(dashboard):
    taken: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert (
            pos["w"] > 0 and pos["h"] > 0 and pos["x"] >= 0 and pos["x"] + pos["w"] <= GRID_COLUMNS
        ), panel["title"]
        cells = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not cells & taken, f"panel {panel['title']!r} overlaps another"
        taken |= cells


# --- metric names against real scrapes --------------------------------------------------------


def test_every_metric_used_is_exported(used_names, proxy_exposition, connector_exposition):
    proxy = exported_series(proxy_exposition)
    connector = exported_series(connector_exposition)
    assert (
        "pdproxy_requests_total" in proxy and "pd_connector_transfers_ok_total" in connector
    )  # real scrapes
    unknown = []
    for name, where in sorted(used_names.items()):
        if name.startswith("pdproxy_"):
            known = name in proxy
        elif name.startswith("pd_connector_"):
            known = name in connector
        elif name.startswith("vllm:"):
            continue  # checked against a real vLLM server in tests/e2e/test_ops_metrics_e2e.py
        else:
            known = False  # neither ours nor vLLM's
        if not known:
            unknown.append(f"{name} (used by {', '.join(sorted(set(where)))})")
    assert not unknown, "metrics nobody exports:\n" + "\n".join(unknown)


def test_the_dashboard_shows_every_family_the_code_exports(
    dashboard, proxy_exposition, connector_exposition
):
    used = {name for _, expr in dashboard_queries(dashboard) for name in metric_names(expr)}
    missing = []
    for text, prefix in ((proxy_exposition, "pdproxy_"), (connector_exposition, "pd_connector_")):
        for family, kind in promql.families(text).items():
            if not family.startswith(prefix) or family.endswith("_created"):
                continue  # prometheus-client's creation timestamps: nothing to show
            series = exported_series(f"# TYPE {family} {kind}\n")
            if not series.keys() & used:
                missing.append(f"{family} ({kind})")
    assert not missing, "exported but on no panel:\n" + "\n".join(missing)


def test_the_dashboard_and_alerts_use_vllm_only_for_load(used_names):
    # What the e2e test must find on a real vLLM server; a new vllm: name there is cheap
    # to check, but it must be checked: keep this list in step with that test's scrape.
    assert {n for n in used_names if n.startswith("vllm:")} == {
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
    }


# --- promtool ---------------------------------------------------------------------------------


def promtool_path() -> str:
    """Called in the test itself, so that a missing promtool is a test failure."""
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool is not installed: `make tools` installs it (Debian package prometheus); "
            "make test runs that first"
        )
    return path


def run_promtool(*args: str) -> str:
    result = subprocess.run([promtool_path(), *args], capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"promtool {' '.join(args)} failed:\n{output}"
    return output


def test_promtool_checks_the_alert_rules(alerts):
    output = run_promtool("check", "rules", str(ALERTS))
    rules = sum(len(group["rules"]) for group in alerts["groups"])
    assert f"SUCCESS: {rules} rules found" in output


def test_promtool_unit_tests_of_the_alerts_pass():
    output = run_promtool("test", "rules", str(ALERT_TESTS))
    assert "SUCCESS" in output and "FAILED" not in output


def test_every_alert_has_firing_and_silent_unit_tests(alerts):
    """Each alert fires in some case and stays silent in another, and carries what it must."""
    cases: dict[str, list[list]] = {}
    for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"]:
        for case in test.get("alert_rule_test", []):
            cases.setdefault(case["alertname"], []).append(case.get("exp_alerts") or [])
    for group in alerts["groups"]:
        for rule in group["rules"]:
            name = rule["alert"]
            assert any(cases.get(name, [])), f"{name}: no test where it fires"
            assert any(not c for c in cases.get(name, [])), (
                f"{name}: no test where it must not fire"
            )
            assert rule.get("for"), f"{name}: no for:"
            assert rule["labels"]["severity"] in ("critical", "warning", "info"), name
            assert rule["annotations"].get("summary") and rule["annotations"].get("description"), (
                name
            )


def test_promtool_parses_every_dashboard_query(dashboard, tmp_path):
    """promtool's own PromQL parser on each panel and variable query (as recording rules)."""
    queries = dashboard_queries(dashboard)
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": expr}
                    for i, (_, expr) in enumerate(queries)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run(
        [promtool_path(), "check", "rules", str(path)], capture_output=True, text=True, timeout=120
    )
    if result.returncode != 0:
        # Name the panel: promtool only knows the rule's index.
        detail = result.stdout + result.stderr
        for i, (where, expr) in enumerate(queries):
            if f'dashboard:query_{i}"' in detail or f"query_{i}:" in detail:
                detail += f"\nquery_{i} is {where}: {expr}"
        pytest.fail(f"promtool rejects dashboard queries:\n{detail}")
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout
