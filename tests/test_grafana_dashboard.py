"""The Grafana dashboard (monitoring/grafana/deberta-rad.json) as a contract: every panel queries the
Prometheus datasource variable, every metric its queries read is one the service or the monitor exports
(or a Prometheus built-in), and the variables its rows repeat over exist. No Grafana needed; with
`promtool` installed, each query must also parse as PromQL."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import REPO

DASHBOARD = REPO / "monitoring" / "grafana" / "deberta-rad.json"

SERVICE = {  # deberta-rad serve (src/deberta_rad/service.py)
    "deberta_rad_label_request_seconds_bucket",
    "deberta_rad_reports_labelled_total",
    "deberta_rad_served_model",
    "deberta_rad_registry_alias",
}
BENTOML = {"bentoml_service_request_total", "bentoml_service_adaptive_batch_size_bucket"}
MONITOR = {  # deberta-rad monitor --follow
    "deberta_rad_status_share",
    "deberta_rad_drift_js_distance",
    "deberta_rad_drift_p_value",
    "deberta_rad_drift_share",
    "deberta_rad_drift_window_reports",
    "deberta_rad_drift_alarm",
    "deberta_rad_confidence_drift_alarm",
    "deberta_rad_monitor_windows_judged_total",
    "deberta_rad_monitor_last_judged_timestamp_seconds",
    "deberta_rad_monitor_window_seconds",
}
BUILTIN = {"ALERTS", "up"}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers left once strings, label matchers, grouping
    clauses and ranges are cut out, less functions and keywords."""
    expr = re.sub(r'"[^"]*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)
    functions = set(re.findall(r"([A-Za-z_]\w*)\s*\(", expr))
    return set(re.findall(r"[A-Za-z_:][\w:]*", expr)) - functions - KEYWORDS


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(dashboard: dict) -> list[dict]:
    """The panels that query (rows only group them)."""
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def exprs(dashboard: dict) -> list[str]:
    return [t["expr"] for p in panels(dashboard) for t in p["targets"]]


def test_every_panel_queries_the_prometheus_variable(dashboard: dict) -> None:
    assert dashboard["schemaVersion"] >= 39 and dashboard["uid"] == "deberta-rad"
    for panel in panels(dashboard):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"]), panel["title"]
        assert all(t["datasource"] == panel["datasource"] for t in panel["targets"]), panel["title"]


def test_queries_read_only_exported_metrics(dashboard: dict) -> None:
    used = set().union(*(metric_names(e) for e in exprs(dashboard)))
    assert used <= SERVICE | BENTOML | MONITOR | BUILTIN, used - (SERVICE | BENTOML | MONITOR | BUILTIN)
    assert used >= SERVICE | BENTOML | MONITOR  # and the dashboard shows each of them


def test_the_metric_name_parser() -> None:
    expr = 'histogram_quantile(0.95, sum by (le) (rate(a_bucket{endpoint="/x",code=~"5.."}[5m]))) / time() - b'
    assert metric_names(expr) == {"a_bucket", "b"}


def test_the_service_and_the_monitor_export_those_metrics() -> None:
    source = (REPO / "src" / "deberta_rad" / "service.py").read_text()
    for name in SERVICE:
        assert f'"{re.sub(r"_(bucket|total)$", "", name)}"' in source, name
    live_monitor = pytest.importorskip("deberta_rad.live_monitor")
    families = live_monitor.MonitorMetrics().registry.collect()
    exported = {f.name + ("_total" if f.type == "counter" else "") for f in families}
    assert exported >= MONITOR, MONITOR - exported


def test_the_variables_rows_and_panels_repeat_over(dashboard: dict) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    institution = variables["institution"]
    assert institution["definition"] == "label_values(deberta_rad_drift_alarm, institution)"
    assert institution["multi"] and institution["includeAll"]
    for variable in ("institution", "finding"):
        metric, label = re.fullmatch(r"label_values\((\w+), (\w+)\)", variables[variable]["definition"]).groups()
        assert metric in MONITOR and label == variable
    repeats = {p["title"]: p["repeat"] for p in dashboard["panels"] if "repeat" in p}
    assert repeats == {"Drift: $institution": "institution", "Status mix: $finding": "finding"}
    assert set(repeats.values()) <= set(variables)


def test_every_query_is_valid_promql(dashboard: dict, tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (make test installs Debian's prometheus)")
    rules = [
        {"record": f"dashboard:query_{n}", "expr": re.sub(r"\$\w+", "x", e)} for n, e in enumerate(exprs(dashboard))
    ]
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
