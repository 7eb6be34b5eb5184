"""The label service: its contract and guard as plain code, then the real thing. A tiny random student is
registered twice in a SQLite MLflow store, `deberta-rad serve --model models:/deberta-rad@champion`
starts `bentoml serve` on a free loopback port, and the tests talk HTTP to it: the contract, bad input,
a concurrent load, the model swap when the alias moves, the metrics, and that no report text reaches
the log. Last, `deberta-rad bento` builds a Bento with the model packed in and `bentoml serve` serves it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import free_port, mlflow_store, stop_server, wait_for_http, wait_until
from mlflow import MlflowClient
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient
from tiny_backbones import tiny_deberta_backbone
from typer.testing import CliRunner

from deberta_rad.cli import app
from deberta_rad.data import read_label_records
from deberta_rad.model import student_from_backbone
from deberta_rad.net import is_loopback_host
from deberta_rad.registry import CHAMPION, register_model
from deberta_rad.schema import FINDINGS, STATUSES
from deberta_rad.serve import RequestGuard, absolute_tracking_uri, error_location, label_result
from deberta_rad.synthetic import generate_corpus

BIN = Path(sys.executable).parent
NAME = "deberta-rad"
API_KEY = "test-key-0123"
MAX_REPORTS, MAX_CHARS = 50, 3000
READY_WAIT_S = 240
SENTINEL = "SENTINEL-PHI-7Q4Z"  # report text that must never appear in the server log
HEADERS = {"X-API-Key": API_KEY}

# ----------------------------------------------------------------------------------------------
# The contract and the guard, without a server
# ----------------------------------------------------------------------------------------------


def test_label_result_keeps_the_asked_findings_and_flags_low_confidence_without_changing_the_status() -> None:
    probabilities = np.full((len(FINDINGS), len(STATUSES)), 0.1, dtype=np.float32)
    probabilities[:, 0] = 0.75  # every finding: present with 0.75
    result = label_result("r1", probabilities, ["Edema", "Pneumothorax"], threshold=None)
    assert result.labels == {"Edema": "present", "Pneumothorax": "present"} and result.low_confidence == []
    assert set(result.probabilities["Edema"]) == set(STATUSES)
    unsure = label_result("r1", probabilities, None, threshold=0.8)
    assert unsure.labels == dict.fromkeys(FINDINGS, "present") and unsure.low_confidence == list(FINDINGS)
    assert label_result("r1", probabilities, None, threshold=0.75).low_confidence == []


def test_error_locations_read_like_the_json_path() -> None:
    assert error_location(("reports", 3, "text")) == "reports[3].text"
    assert error_location(()) == "body"


def test_loopback_addresses() -> None:
    assert all(map(is_loopback_host, ["127.0.0.1", "127.8.9.1", "::1", "[::1]", "localhost", "LocalHost."]))
    assert not any(map(is_loopback_host, ["0.0.0.0", "10.1.2.3", "example.org", "localhost.example.com", "", None]))


def test_a_relative_sqlite_store_is_made_absolute(tmp_path: Path) -> None:
    assert absolute_tracking_uri("sqlite:///mlflow.db", tmp_path) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert absolute_tracking_uri("http://127.0.0.1:5000", tmp_path) == "http://127.0.0.1:5000"


def guarded_client(api_key: str | None) -> TestClient:
    """The guard in front of an app that echoes; TestClient's server address is `testserver`, off loopback."""

    async def echo(request):
        return JSONResponse(await request.json())

    inner = Starlette(routes=[Route("/label", echo, methods=["POST"])])
    return TestClient(RequestGuard(inner, api_key=api_key, max_reports=2, max_chars=10))


def test_the_guard_refuses_off_loopback_without_a_key_and_checks_the_key() -> None:
    body = {"reports": [{"report_id": "a", "text": "clear"}]}
    assert guarded_client(None).post("/label", json=body).status_code == 503
    client = guarded_client(API_KEY)
    assert client.post("/label", json=body).status_code == 401
    assert client.post("/label", json=body, headers={"X-API-Key": "wrong"}).status_code == 401
    answer = client.post("/label", json=body, headers=HEADERS)
    assert answer.status_code == 200 and answer.json() == body  # the app saw the body unchanged


def test_the_guard_passes_other_paths() -> None:
    assert guarded_client(API_KEY).get("/elsewhere").status_code == 404  # the app's answer, not the guard's


def test_serving_off_loopback_without_a_key_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DEBERTA_RAD_SERVE_API_KEY", raising=False)
    result = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0", "--model", "models/student"])
    assert result.exit_code == 2
    assert "DEBERTA_RAD_SERVE_API_KEY" in result.output


# ----------------------------------------------------------------------------------------------
# The real server
# ----------------------------------------------------------------------------------------------


@dataclass
class Server:
    url: str
    log: Path
    root: Path

    def label(self, body: dict, headers: dict | None = None) -> requests.Response:
        headers = HEADERS if headers is None else headers
        return requests.post(f"{self.url}/label", json=body, headers=headers, timeout=300)

    def set_champion(self, version: str) -> None:
        MlflowClient().set_registered_model_alias(NAME, CHAMPION, version)


def reports(n: int, seed: int, prefix: str) -> list[dict]:
    """Synthetic reports of realistic lengths as /label items."""
    return [
        {"report_id": f"{prefix}-{i}", "text": report.text} for i, (report, _) in enumerate(generate_corpus(n, seed))
    ]


def serve_env(root: Path, tracking_uri: str) -> dict[str, str]:
    return os.environ | {
        "MLFLOW_TRACKING_URI": tracking_uri,
        "BENTOML_HOME": str(root / "bentoml"),
        "DEBERTA_RAD_MODEL_CACHE": str(root / "cache"),
        "DEBERTA_RAD_SERVE_API_KEY": API_KEY,
        "DEBERTA_RAD_SERVE_MAX_REPORTS": str(MAX_REPORTS),
        "DEBERTA_RAD_SERVE_MAX_CHARS": str(MAX_CHARS),
        "DEBERTA_RAD_SERVE_POLL_S": "1",
        "DEBERTA_RAD_SERVE_CAPTURE_DIR": str(root / "capture"),
    }


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """Two registered versions of a tiny student in a SQLite store; version 1 is champion."""
    root = tmp_path_factory.mktemp("serving")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with mlflow_store(root, uri):
        student = student_from_backbone(str(tiny_deberta_backbone(root / "tiny-deberta")), max_length=64)
        student.save(root / "student")
        assert CHAMPION in register_model(root / "student", {})["aliases"]
        register_model(root / "student", {})
        yield root, uri


@pytest.fixture(scope="module")
def server(registered: tuple[Path, str]) -> Iterator[Server]:
    root, uri = registered
    port, log = free_port(), root / "serve.log"
    command = [str(BIN / "deberta-rad"), "serve", "--model", f"models:/{NAME}@{CHAMPION}", "--port", str(port)]
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=serve_env(root, uri), start_new_session=True
        )
        try:
            url = f"http://127.0.0.1:{port}"
            wait_for_http(f"{url}/readyz", process, log, READY_WAIT_S)
            yield Server(url, log, root)
        finally:
            stop_server(process)


slow = pytest.mark.slow


@slow
def test_probes_answer(server: Server) -> None:
    assert requests.get(f"{server.url}/readyz", timeout=10).status_code == 200
    assert requests.get(f"{server.url}/livez", timeout=10).status_code == 200


@slow
def test_label_answers_the_contract_in_request_order(server: Server) -> None:
    items = reports(5, seed=1, prefix="order")[::-1]
    answer = server.label({"reports": items})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["model_version"] == f"{NAME}/1"
    assert [r["report_id"] for r in body["results"]] == [item["report_id"] for item in items]
    for result in body["results"]:
        assert list(result["labels"]) == list(FINDINGS)
        assert all(status in STATUSES for status in result["labels"].values())
        for finding, probabilities in result["probabilities"].items():
            assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-3)
            assert result["labels"][finding] == max(probabilities, key=probabilities.get)


@slow
def test_findings_filter_and_threshold(server: Server) -> None:
    body = {"reports": reports(2, seed=2, prefix="filter"), "findings": ["Edema", "Pneumothorax"], "threshold": 1.0}
    results = server.label(body).json()["results"]
    assert all(r["low_confidence"] == ["Edema", "Pneumothorax"] for r in results)
    for result in results:  # the statuses stay the model's own
        assert result["labels"] == {f: max(p, key=p.get) for f, p in result["probabilities"].items()}


def item(text: str = "Heart size normal.") -> dict:
    return {"report_id": "r1", "text": text}


BAD_REQUESTS = [
    pytest.param(b'{"reports": [', 400, "not valid JSON", id="invalid-json"),
    pytest.param({"reports": []}, 422, "reports", id="no-reports"),
    pytest.param({"reports": [{"report_id": "r1"}]}, 422, "reports[0].text", id="missing-text"),
    pytest.param({"reports": [item("   ")]}, 422, "reports[0].text", id="blank-text"),
    pytest.param({"reports": [{"report_id": "", "text": SENTINEL}]}, 422, "reports[0].report_id", id="empty-id"),
    pytest.param({"reports": [{"report_id": "r1", "text": 5}]}, 422, "reports[0].text", id="text-not-a-string"),
    pytest.param({"reports": [item(SENTINEL)], "findings": ["Pneumonia"]}, 422, "Pneumonia", id="unknown-finding"),
    pytest.param({"reports": [item(SENTINEL)], "threshold": 2}, 422, "threshold", id="threshold-out-of-range"),
    pytest.param({"reports": [item(SENTINEL)] * (MAX_REPORTS + 1)}, 413, f"limit is {MAX_REPORTS}", id="too-many"),
    pytest.param({"reports": [item(), item(SENTINEL * 400)]}, 413, "reports[1].text", id="too-long"),
]


@slow
@pytest.mark.parametrize(("body", "status", "named"), BAD_REQUESTS)
def test_bad_requests_get_a_4xx_naming_the_problem_and_the_service_keeps_serving(
    server: Server, body: bytes | dict, status: int, named: str
) -> None:
    if isinstance(body, bytes):
        answer = requests.post(
            f"{server.url}/label", data=body, headers=HEADERS | {"Content-Type": "application/json"}, timeout=60
        )
    else:
        answer = server.label(body)
    assert answer.status_code == status, answer.text
    assert named in answer.text
    assert SENTINEL not in answer.text  # answers never echo the input
    assert server.label({"reports": [item()]}).status_code == 200


@slow
def test_a_missing_or_wrong_api_key_is_refused(server: Server) -> None:
    assert server.label({"reports": [item()]}, headers={}).status_code == 401
    assert server.label({"reports": [item()]}, headers={"X-API-Key": "nope"}).status_code == 401


@slow
def test_concurrent_clients_get_every_report_once_in_order(server: Server) -> None:
    """400 reports from 8 clients, 25 calls of 2 each, all at once: more calls than BentoML's connection
    renewal interval (100), which once dropped calls in flight."""

    def client(number: int) -> list[tuple[list[str], list[str]]]:
        calls = []
        for call in range(25):
            items = reports(2, seed=100 * number + call, prefix=f"c{number}-{call}")
            answer = server.label({"reports": items})
            assert answer.status_code == 200, answer.text
            calls.append(([i["report_id"] for i in items], [r["report_id"] for r in answer.json()["results"]]))
        return calls

    with ThreadPoolExecutor(8) as pool:
        calls = [call for calls in pool.map(client, range(8)) for call in calls]
    assert all(sent == answered for sent, answered in calls)
    answered = [rid for _, ids in calls for rid in ids]
    assert len(answered) == len(set(answered)) == 400


@slow
def test_metrics_count_requests_by_model_version(server: Server) -> None:
    server.label({"reports": reports(3, seed=3, prefix="metrics")})
    metrics = requests.get(f"{server.url}/metrics", timeout=30).text
    assert f'deberta_rad_reports_labelled_total{{model_version="{NAME}/1"}}' in metrics
    assert f'deberta_rad_label_request_seconds_count{{model_version="{NAME}/1"}}' in metrics
    assert "adaptive_batch_size" in metrics  # BentoML's own batching histogram


@slow
def test_answers_are_captured_for_monitoring_without_text(server: Server) -> None:
    items = [{"report_id": "captured-1", "text": f"{SENTINEL} small effusion", "institution": "northfield"}]
    assert server.label({"reports": items, "findings": ["Edema"]}).status_code == 200
    batches = sorted((server.root / "capture").glob("*.jsonl"))
    assert batches and SENTINEL not in "".join(b.read_text() for b in batches)
    captured = {r.report_id: r for batch in batches for r in read_label_records(batch, unique=False)}
    record = captured["captured-1"]
    assert list(record.labels) == list(FINDINGS) and record.probabilities  # all 13, whatever was asked
    assert record.institution == "northfield" and record.timestamp and record.teacher.model == f"{NAME}/1"


@slow
def test_a_new_champion_is_served_without_downtime(server: Server) -> None:
    """Move the alias, reload while clients keep calling: every call succeeds and the version changes,
    and the gate's verdict is on the version. Moving it back is picked up by the poller alone."""
    server.set_champion("2")
    with ThreadPoolExecutor(4) as pool:
        load = [pool.submit(server.label, {"reports": reports(10, seed=9, prefix=f"swap{i}")}) for i in range(12)]
        reload = requests.post(f"{server.url}/reload", headers=HEADERS, timeout=300)
        statuses = [call.result().status_code for call in load]
    assert reload.status_code == 200, reload.text
    assert reload.json()["model_version"] == f"{NAME}/2"
    assert statuses == [200] * len(load)
    assert server.label({"reports": [item()]}).json()["model_version"] == f"{NAME}/2"
    # Moved outside `deberta-rad promote`: the service ran the gate; unevaluated versions do not compare.
    assert MlflowClient().get_model_version(NAME, "2").tags["promotion.gate"] == "not comparable"

    server.set_champion("1")
    wait_until(  # the poller checks every second; loading the version takes what the machine's load lets it
        lambda: server.label({"reports": [item()]}).json()["model_version"] == f"{NAME}/1",
        timeout_s=120,
        what=f"the poller serving {NAME}/1 after the alias moved back",
    )


@slow
def test_the_log_holds_no_report_text(server: Server) -> None:
    server.label({"reports": [item(f"{SENTINEL} small left pleural effusion")]})
    log = server.log.read_text()
    assert SENTINEL not in log
    assert "labelled 1 reports" in log  # the service's own line: counts and sizes


# ----------------------------------------------------------------------------------------------
# A Bento with the model packed in
# ----------------------------------------------------------------------------------------------


@slow
def test_a_built_bento_serves_its_packed_model(registered: tuple[Path, str]) -> None:
    root, uri = registered
    env = serve_env(root, uri) | {"BENTOML_HOME": str(root / "bento-home")}
    build = subprocess.run(
        [str(BIN / "deberta-rad"), "bento", "--model", f"models:/{NAME}@{CHAMPION}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=root,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    tag = build.stdout.split("built Bento ")[1].split()[0]
    port, log = free_port(), root / "bento-serve.log"
    env.pop("MLFLOW_TRACKING_URI")  # the Bento must not need the registry
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(BIN / "bentoml"), "serve", tag, "--host", "127.0.0.1", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=root,
            start_new_session=True,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            wait_for_http(f"{url}/readyz", process, log, READY_WAIT_S)
            answer = requests.post(f"{url}/label", json={"reports": [item()]}, headers=HEADERS, timeout=120)
        finally:
            stop_server(process)
    assert answer.status_code == 200, answer.text
    assert answer.json()["model_version"] == f"{NAME}/1"
