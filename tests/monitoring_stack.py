"""The production monitoring picture on loopback, for the end-to-end alert test: the label service with
capture on, `deberta-rad monitor --follow`, `deberta-rad relabel-on-alert`, a plain webhook receiver for
the other alerts, and Debian's Prometheus and Alertmanager reading the repo's configs with only the
addresses and intervals changed (README "Monitoring")."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import yaml
from conftest import REPO, AlertSink, free_port, stop_server, wait_for_http

START_WAIT_S = 180


@dataclass
class Stack:
    """Where each part listens, and what the plain webhook receiver got."""

    service: str
    monitor: str
    receiver: str
    prometheus: str
    alertmanager: str
    team_alerts: list[dict]

    def query(self, promql: str) -> list[dict]:
        answer = requests.get(f"{self.prometheus}/api/v1/query", params={"query": promql}, timeout=10).json()
        return answer["data"]["result"]

    def firing(self, alertname: str) -> list[dict]:
        """Prometheus's firing alerts of that name, as label sets."""
        return [r["metric"] for r in self.query(f'ALERTS{{alertname="{alertname}",alertstate="firing"}}')]

    def jobs(self) -> list[dict]:
        return requests.get(f"{self.receiver}/jobs", timeout=10).json()["jobs"]


def tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (make test installs Debian's prometheus and prometheus-alertmanager)")
    return found


def prometheus_config(ports: dict[str, int], rules: Path) -> dict:
    """monitoring/prometheus.yml with this test's addresses, a 1 s scrape and rule evaluation."""
    config = yaml.safe_load((REPO / "monitoring/prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(rules)]
    config["alerting"]["alertmanagers"][0]["static_configs"] = [{"targets": [f"127.0.0.1:{ports['alertmanager']}"]}]
    targets = {"deberta-rad-service": ports["service"], "deberta-rad-monitor": ports["monitor"]}
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [f"127.0.0.1:{targets[job['job_name']]}"]}]
    return config


def alertmanager_config(ports: dict[str, int]) -> dict:
    """monitoring/alertmanager.yml with this test's receivers and a 1 s group wait."""
    config = yaml.safe_load((REPO / "monitoring/alertmanager.yml").read_text())
    config["route"] |= {"group_wait": "1s", "group_interval": "5s"}
    urls = {
        "relabel-on-alert": f"http://127.0.0.1:{ports['receiver']}/alerts",
        "team-webhook": f"http://127.0.0.1:{ports['team']}/alerts",
    }
    for receiver in config["receivers"]:
        receiver["webhook_configs"][0]["url"] = urls[receiver["name"]]
    return config


@contextmanager
def started(command: list[str], cwd: Path, env: dict[str, str], ready_url: str, log: Path) -> Iterator[None]:
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_for_http(ready_url, process, log, START_WAIT_S)
        yield
    finally:
        stop_server(process)


@contextmanager
def monitoring_stack(project: Path, work: Path, reference: Path, feed: Path, env: dict[str, str]) -> Iterator[Stack]:
    """Start every part (in the project checkout, with the venv's commands from `env`) and stop them all."""
    prometheus, alertmanager = tool("prometheus"), tool("prometheus-alertmanager")  # or skip, before starting
    team = AlertSink()  # the plain webhook receiver the other alerts go to
    names = ("service", "monitor", "receiver", "prometheus", "alertmanager")
    ports = {name: free_port() for name in names} | {"team": team.port}
    url = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    stack = Stack(
        url["service"], url["monitor"], url["receiver"], url["prometheus"], url["alertmanager"], team.received
    )
    (work / "prometheus.yml").write_text(yaml.safe_dump(prometheus_config(ports, project / "monitoring/alerts.yml")))
    (work / "alertmanager.yml").write_text(yaml.safe_dump(alertmanager_config(ports)))
    service_env = env | {"DEBERTA_RAD_SERVE_CAPTURE_DIR": str(work / "capture"), "BENTOML_HOME": str(work / "bentoml")}
    (work / "capture").mkdir()
    parts = {
        "service": (
            ["deberta-rad", "serve", "--model", "models/student", "--port", str(ports["service"])],
            service_env,
            f"{url['service']}/readyz",
        ),
        "monitor": (
            [
                "deberta-rad",
                "monitor",
                "--follow",
                "--reference",
                str(reference),
                "--incoming",
                str(work / "capture"),
                "--output",
                str(work / "monitor"),
                "--workspace",
                str(work / "workspace"),
                "--metrics-port",
                str(ports["monitor"]),
                "--interval",
                "1",
            ],
            env,
            f"{url['monitor']}/metrics",
        ),
        "receiver": (
            ["deberta-rad", "--verbose", "relabel-on-alert", "--port", str(ports["receiver"]), "--reports", str(feed)],
            env,
            f"{url['receiver']}/healthz",
        ),
        "alertmanager": (
            [
                alertmanager,
                f"--config.file={work / 'alertmanager.yml'}",
                f"--storage.path={work / 'alertmanager'}",
                f"--web.listen-address=127.0.0.1:{ports['alertmanager']}",
                "--cluster.listen-address=",
            ],
            env,
            f"{url['alertmanager']}/-/ready",
        ),
        "prometheus": (
            [
                prometheus,
                f"--config.file={work / 'prometheus.yml'}",
                f"--storage.tsdb.path={work / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{ports['prometheus']}",
            ],
            env,
            f"{url['prometheus']}/-/ready",
        ),
    }
    with ExitStack() as running:
        running.callback(team.close)
        for name, (command, part_env, ready) in parts.items():
            running.enter_context(started(command, project, part_env, ready, work / f"{name}.log"))
        yield stack
