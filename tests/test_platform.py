"""The team platform (`deberta-rad platform up|down|status`): a real PostgreSQL and a real `mlflow server`
with basic-auth on loopback, the pipeline and `promote` run against it as the README says, and only the
promoter may move `champion`."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from conftest import REPO, free_port, mlflow_store, stop_server, wait_for_http, wait_until
from test_pipeline import BIN, clean_env, copy_of_repo, run
from test_webhooks import AlertSink, evaluated

from deberta_rad.platform_stack import PlatformPaths, as_user, load_secrets, postgres_bindir, read_state
from deberta_rad.promote import OTHER_ROUTE

pytestmark = pytest.mark.slow

# The pipeline at its smallest: what is under test is where it logs and registers, not what it learns.
TINY_PARAMS = {
    ("ingest", "sources"): ["synthetic"],
    ("ingest", "synthetic", "n_reports"): 60,
    ("pretrain", "enabled"): False,
    ("sentences", "mention_swaps"): 0,
    ("model", "max_length"): 32,
    ("train", "epochs"): 1,
    ("train", "batch_size"): 16,
}


def platform_command(folder: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    return run([str(BIN / "deberta-rad"), "platform", *arguments, "--folder", str(folder)], folder.parent, timeout=600)


@pytest.fixture(scope="module")
def platform() -> Iterator[PlatformPaths]:
    try:
        postgres_bindir()
    except RuntimeError as err:
        pytest.skip(str(err))
    # Not under pytest's private temporary folder: as root, PostgreSQL runs as the postgres account,
    # which must reach its data folder.
    team = Path(tempfile.mkdtemp(prefix="deberta-rad-platform-"))
    team.chmod(0o755)
    paths = PlatformPaths(team / ".platform")
    platform_command(paths.root, "up")
    try:
        yield paths
    finally:
        platform_command(paths.root, "down")
        shutil.rmtree(team, ignore_errors=True)


def as_account(paths: PlatformPaths, account: str) -> dict[str, str]:
    """The environment a team member exports: the platform's URI and their own credentials."""
    state = read_state(paths)
    assert state is not None
    return {
        "MLFLOW_TRACKING_URI": state.tracking_uri,
        "MLFLOW_TRACKING_USERNAME": account,
        "MLFLOW_TRACKING_PASSWORD": load_secrets(paths)[account],
    }


def test_up_starts_postgres_and_mlflow_on_loopback_with_secrets_kept_private(platform: PlatformPaths) -> None:
    status = platform_command(platform.root, "status").stdout
    assert "PostgreSQL: running" in status and "mlflow server: running" in status and "/health answers" in status
    assert oct(platform.secrets.stat().st_mode & 0o777) == "0o600"
    state = read_state(platform)
    assert state is not None
    secrets = load_secrets(platform)
    processes = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert not any(secret in processes for secret in secrets.values())  # passwords never on a command line
    again = platform_command(platform.root, "up")  # already running: found, not started twice
    assert state.tracking_uri in again.stdout and read_state(platform) == state


def test_only_the_promoter_moves_champion(platform: PlatformPaths) -> None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    state = read_state(platform)
    assert state is not None
    secrets = load_secrets(platform)
    client = MlflowClient(tracking_uri=state.tracking_uri, registry_uri=state.tracking_uri)
    with as_user("admin", secrets["admin"]):
        experiment = client.create_experiment("permissions")
        made = client.create_run(experiment)
        client.log_text(made.info.run_id, "weights", "model/weights.txt")
        version = client.create_model_version(
            "deberta-rad", f"runs:/{made.info.run_id}/model", run_id=made.info.run_id
        ).version
    with as_user("reader", secrets["reader"]), pytest.raises(MlflowException, match="Permission denied"):
        client.set_registered_model_alias("deberta-rad", "permissions-check", version)
    with as_user("promoter", secrets["promoter"]):
        client.set_registered_model_alias("deberta-rad", "permissions-check", version)
        assert client.get_model_version_by_alias("deberta-rad", "permissions-check").version == version
        client.delete_registered_model_alias("deberta-rad", "permissions-check")
    artifacts = list((platform.artifacts).rglob("weights.txt"))
    assert artifacts, "the run's artifact went through the server into its artifact store"


@pytest.mark.timeout(1800)
def test_the_pipeline_and_promote_run_unchanged_against_the_platform(platform: PlatformPaths, tmp_path: Path) -> None:
    copy = copy_of_repo(tmp_path, TINY_PARAMS)
    promoter, reader = as_account(platform, "promoter"), as_account(platform, "reader")
    run([str(BIN / "dvc"), "repro"], copy, timeout=900, extra_env=promoter)
    assert not (copy / "mlflow.db").exists()  # nothing went to the embedded store
    registered = json.loads((copy / "metrics/register.json").read_text())
    assert set(registered["aliases"]) == {"champion", "challenger"}
    # A second version of the same model (a retraining would take minutes): the gate finds it no worse.
    register = ["deberta-rad", "register", "--model-dir", "models/student", "--metrics", "metrics/evaluate.json"]
    run([*register, "--output", "second.json"], copy, extra_env=promoter)
    challenger = json.loads((copy / "second.json").read_text())
    assert challenger["version"] == registered["version"] + 1 and challenger["aliases"] == ["challenger"]

    promote = [str(BIN / "deberta-rad"), "promote"]
    refused = subprocess.run(promote, cwd=copy, env=clean_env(reader), capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and "Permission denied" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr
    promoted = run(promote, copy, extra_env=promoter)
    assert f"promoted version {challenger['version']} to champion" in promoted.stdout

    from mlflow import MlflowClient

    with as_user("reader", reader["MLFLOW_TRACKING_PASSWORD"]):
        client = MlflowClient(tracking_uri=reader["MLFLOW_TRACKING_URI"], registry_uri=reader["MLFLOW_TRACKING_URI"])
        champion = client.get_model_version_by_alias("deberta-rad", "champion")
        logged = json.dumps([dict(champion.tags), client.get_run(champion.run_id).data.params])
    assert int(champion.version) == challenger["version"]
    assert (champion.tags["promotion.gate"], champion.tags["promotion.by"]) == ("passed", "promoter")
    assert not any(secret in logged for secret in load_secrets(platform).values())
    assert os.environ.get("MLFLOW_TRACKING_URI") != reader["MLFLOW_TRACKING_URI"]  # nothing leaked into the tests


# ----------------------------------------------------------------------------------------------
# A promotion in the MLflow UI, in headless Chromium, reaching the running service through the webhook
# ----------------------------------------------------------------------------------------------

# Kept after the run (git ignores it): the UI after "Save aliases", and the measured times.
ARTIFACTS = REPO / "test-artifacts"
SERVICE_WAIT_S = 240


def register_versions(paths: PlatformPaths, root: Path, scores: tuple[float, ...]) -> list[str]:
    """A tiny student registered by the promoter, once per score: the versions share its weights and
    carry evaluation tags with that F1 on the same test split. The first one is made champion."""
    import mlflow
    from mlflow import MlflowClient
    from tiny_backbones import tiny_deberta_backbone

    from deberta_rad.model import student_from_backbone
    from deberta_rad.registry import register_model

    account = as_account(paths, "promoter")
    student_from_backbone(str(tiny_deberta_backbone(root / "tiny")), max_length=32).save(root / "student")
    with mlflow_store(root, account["MLFLOW_TRACKING_URI"]), as_user("promoter", account["MLFLOW_TRACKING_PASSWORD"]):
        client = MlflowClient()
        first = client.get_model_version("deberta-rad", str(register_model(root / "student", {})["version"]))
        versions = [str(first.version)]
        for _ in scores[1:]:
            versions.append(str(mlflow.register_model(first.source, "deberta-rad").version))
        for version, score in zip(versions, scores, strict=True):
            for key, value in evaluated(score, score).items():
                client.set_model_version_tag("deberta-rad", version, key, value)
        client.set_registered_model_alias("deberta-rad", "champion", versions[0])
    return versions


@dataclass
class Service:
    url: str
    log: Path


@contextlib.contextmanager
def label_service(paths: PlatformPaths, root: Path, port: int, alert_url: str) -> Iterator[Service]:
    """`deberta-rad serve` of the champion as the README runs it on the platform (polling at its default
    interval), in strict mode, with a promotion alert webhook."""
    env = as_account(paths, "promoter") | {
        "DEBERTA_RAD_SERVE_WEBHOOK_SECRET": load_secrets(paths)["webhook_secret"],
        "DEBERTA_RAD_PROMOTION_STRICT": "true",
        "DEBERTA_RAD_PROMOTION_ALERT_URL": alert_url,
        "BENTOML_HOME": str(root / "bentoml"),
        "DEBERTA_RAD_MODEL_CACHE": str(root / "cache"),
    }
    command = [str(BIN / "deberta-rad"), "serve", "--model", "models:/deberta-rad@champion", "--port", str(port)]
    log = root / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, cwd=root, stdout=out, stderr=subprocess.STDOUT, env=clean_env(env), start_new_session=True
        )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/readyz", process, log, SERVICE_WAIT_S)
        yield Service(f"http://127.0.0.1:{port}", log)
    finally:
        stop_server(process)


def served_version(service: Service) -> str:
    body = {"reports": [{"report_id": "probe", "text": "Heart size normal. No effusion."}]}
    return requests.post(f"{service.url}/label", json=body, timeout=60).json()["model_version"]


def promote_in_ui(platform: PlatformPaths, service: Service, version: str, screenshot: Path) -> float:
    """As the promoter, make ``version`` champion in the MLflow UI; seconds from "Save aliases" to the
    service's first answer from that version."""
    from mlflow_ui import add_alias_in_ui, chromium

    state = read_state(platform)
    with chromium("promoter", load_secrets(platform)["promoter"]) as browser:
        saved_at = add_alias_in_ui(browser, state.tracking_uri, "deberta-rad", version, "champion", screenshot)
    answered_at = wait_until(  # the time of the first answer from that version
        lambda: served_version(service) == f"deberta-rad/{version}" and time.time(),
        timeout_s=120,
        what=f"the service answering with version {version}",
        interval_s=0.2,
    )
    return round(answered_at - saved_at, 2)


@pytest.mark.timeout(1200)
def test_a_ui_promotion_reaches_the_service_at_once_with_its_gate_verdict(platform: PlatformPaths) -> None:
    """The same UI promotion twice: first with the platform's webhook pointing elsewhere (the service
    learns of it by polling: the baseline), then with the webhook pointing at the service."""
    from mlflow import MlflowClient
    from mlflow_ui import add_alias_in_ui, chromium

    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("Debian's chromium and chromium-driver are not installed (make test installs them)")
    root = Path(tempfile.mkdtemp(prefix="deberta-rad-ui-"))
    port, alerts = free_port(), AlertSink()
    champion, polled, hooked, worse = register_versions(platform, root, (0.80, 0.85, 0.90, 0.60))
    state, secrets = read_state(platform), load_secrets(platform)
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        with label_service(platform, root, port, alerts.url) as service:
            assert served_version(service) == f"deberta-rad/{champion}"
            by_polling = promote_in_ui(platform, service, polled, root / "polled.png")

            pointed = platform_command(platform.root, "up", "--service-url", service.url)
            assert f"{service.url}/webhooks/mlflow" in pointed.stdout
            admin = as_account(platform, "admin") | {"DEBERTA_RAD_SERVE_WEBHOOK_SECRET": secrets["webhook_secret"]}
            install = [str(BIN / "deberta-rad"), "webhook", "install", "--url", service.url, "--check"]
            checked = run(install, root, extra_env=admin)
            assert "updated webhook" in checked.stdout and "test delivery was answered" in checked.stdout
            by_webhook = promote_in_ui(platform, service, hooked, ARTIFACTS / "ui-promotion.png")
            assert f"webhook: champion of deberta-rad moved to version {hooked}" in service.log.read_text()
            with as_user("promoter", secrets["promoter"]):
                client = MlflowClient(tracking_uri=state.tracking_uri, registry_uri=state.tracking_uri)
                tags = client.get_model_version("deberta-rad", hooked).tags
            assert (tags["promotion.gate"], tags["promotion.route"]) == ("passed", OTHER_ROUTE)
            metrics = requests.get(f"{service.url}/metrics", timeout=30).text
            assert f'model_version="deberta-rad/{hooked}",promotion_gate="passed"}} 1.0' in metrics
            assert f'deberta_rad_registry_alias{{alias="champion",model_version="deberta-rad/{hooked}"}} 1.0' in metrics

            with chromium("reader", secrets["reader"]) as browser, pytest.raises(AssertionError, match="refused"):
                add_alias_in_ui(browser, state.tracking_uri, "deberta-rad", worse, "champion", root / "reader.png")

            with as_user("promoter", secrets["promoter"]):  # through the API: the gate refuses, strict reverts
                client.set_registered_model_alias("deberta-rad", "champion", worse)
                wait_until(
                    lambda: str(client.get_model_version_by_alias("deberta-rad", "champion").version) == hooked,
                    timeout_s=120,
                    what="champion moved back",
                )
                tags = client.get_model_version("deberta-rad", worse).tags
            assert tags["promotion.gate"] == "refused" and "moved back" in tags["promotion.reverted"]
            wait_until(lambda: alerts.received, timeout_s=120, what="the alert")
            assert alerts.received[0]["version"] == worse and alerts.received[0]["reverted"] is True
            assert served_version(service) == f"deberta-rad/{hooked}"
    finally:
        alerts.server.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    timing = {"save_to_first_answer_s": {"webhook": by_webhook, "polling every 30 s (no webhook)": by_polling}}
    (ARTIFACTS / "ui-promotion.json").write_text(json.dumps(timing, indent=2) + "\n")
