"""Reading the operator files in config/ for tests: PromQL metric names and exported series.

- :func:`metric_names` tokenizes a PromQL expression far enough to be sure which
  identifiers are metric names: identifiers that stand before ``{``, ``[``, an operator, a
  closing bracket or the end, and are not functions, aggregations or keywords. It checks
  as it goes what would make the name list wrong: unbalanced brackets, malformed label
  matchers and range selectors, calls to functions PromQL does not have (a typo such as
  ``histogram_quantil(`` would otherwise read as a metric name), and stray characters.
  The real parse is promtool's (the tests run it too); this one gives the names.
- :func:`exported_series` turns a Prometheus text exposition into the series names a query
  can select, from its ``# TYPE`` lines as well as its samples: a labelled family that has
  no samples yet still declares itself, and a histogram ``x`` is queried as ``x_bucket``,
  ``x_sum`` and ``x_count``.
- :func:`dashboard_queries` and :func:`alert_queries` list every expression of the Grafana
  dashboard and of the alert rules, with where it came from.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "config" / "grafana" / "pdproxy-dashboard.json"
ALERTS = ROOT / "config" / "prometheus" / "pdproxy-alerts.yaml"
ALERT_TESTS = ROOT / "config" / "prometheus" / "pdproxy-alerts.test.yaml"

# PromQL functions (Prometheus 2.x and 3.x), including the @ modifier's start() and end().
FUNCTIONS = frozenset(
    """abs absent absent_over_time acos acosh asin asinh atan atanh avg_over_time ceil changes
    clamp clamp_max clamp_min cos cosh count_over_time day_of_month day_of_week day_of_year
    days_in_month deg delta deriv double_exponential_smoothing end exp floor histogram_avg
    histogram_count histogram_fraction histogram_quantile histogram_stddev histogram_stdvar
    histogram_sum holt_winters hour idelta increase info irate label_join label_replace
    last_over_time ln log10 log2 mad_over_time max_over_time min_over_time minute month pi
    predict_linear present_over_time quantile_over_time rad rate resets round scalar sgn sin
    sinh sort sort_by_label sort_by_label_desc sort_desc sqrt start stddev_over_time
    stdvar_over_time sum_over_time tan tanh time timestamp vector year""".split()
)
AGGREGATIONS = frozenset(
    "sum min max avg group stddev stdvar count count_values bottomk topk quantile limitk "
    "limit_ratio".split()
)
# Keywords followed by a parenthesised list of label names (group_left/right: optionally).
LABEL_LIST_KEYWORDS = frozenset("by without on ignoring group_left group_right".split())
BINARY_KEYWORDS = frozenset("and or unless atan2".split())
OTHER_KEYWORDS = frozenset("bool offset".split())
NUMBER_WORDS = frozenset(("inf", "nan"))

_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<number>0[xX][0-9a-fA-F]+
      |(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?(?:(?:ms|[smhdwy])(?:\d+(?:ms|[smhdwy]))*)?)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<op>==|!=|>=|<=|=~|!~|[-+*/%^<>=@])
  | (?P<punct>[(){}\[\],])
    """,
    re.VERBOSE,
)
_DURATION = r"\d+(?:\.\d+)?(?:ms|[smhdwy])(?:\d+(?:ms|[smhdwy]))*"
_RANGE = re.compile(rf"^\s*{_DURATION}\s*(?::\s*(?:{_DURATION})?\s*)?$")
_LABEL = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_MATCH_OPS = frozenset(("=", "!=", "=~", "!~"))


class PromQLError(ValueError):
    pass


def _tokens(expr: str) -> list[tuple[str, str, int]]:
    """(kind, text, offset); range selectors come back whole, as kind 'range'."""
    out: list[tuple[str, str, int]] = []
    pos = 0
    while pos < len(expr):
        if expr[pos] == "[":
            end = expr.find("]", pos)
            if end < 0:
                raise PromQLError(f"unclosed '[' at {pos}: {expr!r}")
            inner = expr[pos + 1 : end]
            if not _RANGE.match(inner):
                raise PromQLError(f"bad range or subquery [{inner}] in {expr!r}")
            out.append(("range", inner, pos))
            pos = end + 1
            continue
        match = _TOKEN.match(expr, pos)
        if not match:
            raise PromQLError(f"unexpected {expr[pos]!r} at {pos}: {expr!r}")
        if match.lastgroup != "space":
            out.append((match.lastgroup, match.group(), pos))
        pos = match.end()
    return out


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (see the module docstring)."""
    tokens = _tokens(expr)
    names: set[str] = set()
    depth = 0
    i = 0

    def peek(j: int) -> tuple[str, str, int] | None:
        return tokens[j] if j < len(tokens) else None

    while i < len(tokens):
        kind, text, pos = tokens[i]
        nxt = peek(i + 1)
        if kind == "punct" and text == "{":
            i = _skip_matchers(tokens, i + 1, expr)
            continue
        if kind == "punct" and text in "()":
            depth += 1 if text == "(" else -1
            if depth < 0:
                raise PromQLError(f"unbalanced ')' at {pos}: {expr!r}")
        elif kind == "punct" and text == "}":
            raise PromQLError(f"unbalanced '}}' at {pos}: {expr!r}")
        elif kind == "ident":
            lower = text.lower()
            calls = nxt is not None and nxt[1] == "("
            if text in LABEL_LIST_KEYWORDS:
                if calls:
                    i = _skip_label_list(tokens, i + 2, expr)
                    continue
                if text not in ("group_left", "group_right"):
                    raise PromQLError(f"'{text}' without a label list at {pos}: {expr!r}")
            elif text in AGGREGATIONS:
                if not calls and not (nxt and nxt[1] in ("by", "without")):
                    raise PromQLError(f"aggregation '{text}' without arguments at {pos}: {expr!r}")
            elif text in FUNCTIONS:
                if not calls:
                    raise PromQLError(f"function '{text}' not called at {pos}: {expr!r}")
            elif text in BINARY_KEYWORDS or text in OTHER_KEYWORDS or lower in NUMBER_WORDS:
                pass
            elif calls:
                raise PromQLError(f"unknown function '{text}' at {pos}: {expr!r}")
            else:
                names.add(text)
        i += 1
    if depth:
        raise PromQLError(f"unbalanced '(' in {expr!r}")
    return names


def _skip_matchers(tokens, i: int, expr: str) -> int:
    """Past ``label op "value", ...}``; returns the index after the closing brace."""
    while True:
        if i < len(tokens) and tokens[i][1] == "}":
            return i + 1
        window = tokens[i : i + 3]
        if (
            len(window) < 3
            or window[0][0] != "ident"
            or not _LABEL.match(window[0][1])
            or window[1][1] not in _MATCH_OPS
            or window[2][0] != "string"
        ):
            raise PromQLError(
                f"bad label matcher at {tokens[i][2] if i < len(tokens) else 'end'}: {expr!r}"
            )
        i += 3
        if i < len(tokens) and tokens[i][1] == ",":
            i += 1
        elif not (i < len(tokens) and tokens[i][1] == "}"):
            raise PromQLError(f"expected ',' or '}}' in label matchers: {expr!r}")


def _skip_label_list(tokens, i: int, expr: str) -> int:
    """Past ``label, label)`` (the '(' already consumed); returns the index after ')'."""
    while i < len(tokens):
        kind, text, _ = tokens[i]
        if text == ")":
            return i + 1
        if not (kind == "ident" and _LABEL.match(text)) and text != ",":
            raise PromQLError(f"bad label list in {expr!r}")
        i += 1
    raise PromQLError(f"unclosed label list in {expr!r}")


# --- Grafana ----------------------------------------------------------------------------------

# Values that make a panel's query plain PromQL: the interval variables become durations;
# every other variable is a label value, used only inside a regex matcher ("=~"), so ".*".
# A variable anywhere else then fails the parse, as it should.
GRAFANA_DURATIONS = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h"}
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")
_LABEL_VALUES = re.compile(
    r"^\s*label_values\(\s*(?:(.*),\s*)?([A-Za-z_][A-Za-z0-9_]*)\s*\)\s*$", re.S
)


def expand_grafana(expr: str) -> str:
    def value(match: re.Match) -> str:
        name = next(group for group in match.groups() if group)
        return GRAFANA_DURATIONS.get(name, ".*")

    return _VARIABLE.sub(value, expr)


def variable_selector(query: str) -> str | None:
    """The series selector of a ``label_values(selector, label)`` variable query."""
    match = _LABEL_VALUES.match(query)
    if not match:
        raise PromQLError(f"unsupported variable query: {query!r}")
    return match.group(1)


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels(dashboard: dict) -> list[dict]:
    """All panels, rows' collapsed children included; rows themselves left out."""
    out = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            out.extend(panel.get("panels", []))
        else:
            out.append(panel)
    return out


def dashboard_queries(dashboard: dict) -> list[tuple[str, str]]:
    """(where, PromQL with Grafana variables expanded) for panels and variables."""
    out = []
    for panel in dashboard_panels(dashboard):
        for target in panel.get("targets", []):
            out.append(
                (
                    f"panel {panel['id']} {panel['title']!r} {target['refId']}",
                    expand_grafana(target["expr"]),
                )
            )
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = (
                variable["query"]["query"]
                if isinstance(variable["query"], dict)
                else variable["query"]
            )
            selector = variable_selector(query)
            if selector:
                out.append((f"variable {variable['name']}", expand_grafana(selector)))
    return out


# --- alert rules ------------------------------------------------------------------------------


def load_alerts() -> dict:
    return yaml.safe_load(ALERTS.read_text())


def alert_queries(rules: dict) -> list[tuple[str, str]]:
    return [
        (f"rule {rule.get('alert') or rule.get('record')}", rule["expr"])
        for group in rules["groups"]
        for rule in group["rules"]
    ]


# --- expositions ------------------------------------------------------------------------------

_SERIES_OF_TYPE = {
    "counter": lambda n: {n if n.endswith("_total") else n + "_total"},
    "gauge": lambda n: {n},
    "untyped": lambda n: {n},
    "unknown": lambda n: {n},
    "histogram": lambda n: {n + "_bucket", n + "_sum", n + "_count"},
    "gaugehistogram": lambda n: {n + "_bucket", n + "_gsum", n + "_gcount"},
    "summary": lambda n: {n, n + "_sum", n + "_count"},
    "info": lambda n: {n + "_info"},
    "stateset": lambda n: {n},
}
_SAMPLE_NAME = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def exported_series(text: str) -> dict[str, str]:
    """Series name -> family name and type ("pdproxy_phase_seconds histogram") of an exposition."""
    series: dict[str, str] = {}
    families: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            if kind not in _SERIES_OF_TYPE:
                raise ValueError(f"unknown metric type in {line!r}")
            families[name] = kind
            for serie in _SERIES_OF_TYPE[kind](name):
                series[serie] = f"{name} {kind}"
        elif line and not line.startswith("#"):
            match = _SAMPLE_NAME.match(line)
            if not match:
                raise ValueError(f"not a sample line: {line!r}")
            series.setdefault(match.group(), f"{match.group()} untyped")
    return series


def families(text: str) -> dict[str, str]:
    """Family name -> type, from the ``# TYPE`` lines."""
    return {
        line.split()[2]: line.split()[3] for line in text.splitlines() if line.startswith("# TYPE ")
    }
