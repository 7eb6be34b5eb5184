"""The team platform (`deberta-rad platform up|down|status`): a real PostgreSQL and a real `mlflow server`
with basic-auth on loopback, the pipeline and `promote` run against it as the README says, and only the
promoter may move `champion`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_pipeline import BIN, clean_env, copy_of_repo, run

from deberta_rad.platform_stack import PlatformPaths, as_user, load_secrets, postgres_bindir, read_state

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
