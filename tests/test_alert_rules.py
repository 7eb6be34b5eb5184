"""The monitoring configuration as Prometheus and Alertmanager read it: `promtool` checks the scrape
config and the rules and runs the rules' unit tests (monitoring/alerts_test.yml, synthetic series);
`amtool` checks Alertmanager's config and where each kind of alert is routed."""

from __future__ import annotations

import subprocess

import pytest
from conftest import REPO
from monitoring_stack import tool

MONITORING = REPO / "monitoring"


def run_tool(*command: str) -> str:
    result = subprocess.run(command, cwd=MONITORING, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{' '.join(command)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_the_prometheus_config_and_its_rules_are_valid() -> None:
    out = run_tool(tool("promtool"), "check", "config", "prometheus.yml")
    assert "SUCCESS: prometheus.yml is valid" in out and "SUCCESS: 9 rules found" in out


def test_every_alert_fires_as_its_unit_tests_say() -> None:
    assert "SUCCESS" in run_tool(tool("promtool"), "test", "rules", "alerts_test.yml")


@pytest.mark.parametrize(
    ("labels", "receiver"),
    [
        (["alertname=LabelDrift", "kind=label_drift", "institution=riverside"], "relabel-on-alert"),
        (["alertname=ConfidenceDrift", "kind=confidence_drift", "institution=riverside"], "team-webhook"),
        (["alertname=LabelServiceErrors", "kind=service"], "team-webhook"),
    ],
)
def test_label_drift_goes_to_relabeling_and_the_rest_to_the_team(labels: list[str], receiver: str) -> None:
    amtool = tool("amtool")
    run_tool(amtool, "check-config", "alertmanager.yml")
    routed = run_tool(amtool, "config", "routes", "test", "--config.file", "alertmanager.yml", *labels)
    assert routed.strip() == receiver
