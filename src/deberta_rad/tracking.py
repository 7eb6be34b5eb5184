"""MLflow tracking: where the store is (and whether it answers), the run each stage logs into, and the
data version a run trained on, read from DVC's dvc.lock."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx
import mlflow
import yaml

from deberta_rad.settings import get_settings

# DVC-tracked data that a model version is trained on; their dvc.lock hashes name the data version.
DATA_OUTPUTS = ("data/reports.jsonl", "data/pseudo_labels.jsonl", "data/splits", "data/augmented", "data/sentences")
# Written beside a trained model: the MLflow run that trained it, so registration logs into that run.
RUN_FILE = "training_run.json"


class RegistryUnavailableError(Exception):
    """The configured MLflow store does not exist or does not answer, found before MLflow would create
    an empty store for a lookup or retry an unreachable server for minutes."""


def require_registry(timeout_s: float = 5.0) -> None:
    """Fail fast when there is no registry to look a model up in: a SQLite store whose file does not
    exist, or a tracking server whose /health does not answer within ``timeout_s``."""
    uri = get_settings().mlflow_tracking_uri
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        if not path.is_file():
            raise RegistryUnavailableError(
                f"no MLflow registry at {uri} ({path} does not exist): train and register a model first "
                "(dvc repro), pass a model directory, or set MLFLOW_TRACKING_URI"
            )
    elif uri.startswith(("http://", "https://")):
        try:
            httpx.get(f"{uri.rstrip('/')}/health", timeout=timeout_s).raise_for_status()
        except httpx.HTTPError as err:
            raise RegistryUnavailableError(
                f"MLflow server {uri} does not answer ({type(err).__name__}): start it or fix MLFLOW_TRACKING_URI"
            ) from None


def configure_mlflow() -> str:
    """Point MLflow at the configured store (embedded SQLite by default) and the project experiment."""
    settings = get_settings()
    export_credentials()
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    mlflow.set_registry_uri(settings.mlflow_tracking_uri)
    experiment = mlflow.set_experiment(settings.mlflow_experiment)
    return experiment.experiment_id


def export_credentials() -> None:
    """MLflow's client reads a tracking server's credentials from the environment only: put those the
    settings found (in a .env file) there, without overriding what the environment already says."""
    settings = get_settings()
    if settings.mlflow_tracking_username:
        os.environ.setdefault("MLFLOW_TRACKING_USERNAME", settings.mlflow_tracking_username)
    if settings.mlflow_tracking_password:
        os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", settings.mlflow_tracking_password.get_secret_value())


def data_version_tags(lock_path: Path = Path("dvc.lock")) -> dict[str, str]:
    """`data.<path>.md5` tags from dvc.lock for the data a model was trained on (empty outside DVC)."""
    if not lock_path.is_file():
        return {}
    lock = yaml.safe_load(lock_path.read_text()) or {}
    tags = {}
    for stage in (lock.get("stages") or {}).values():
        for out in stage.get("outs", []):
            if out.get("path") in DATA_OUTPUTS and out.get("md5"):
                tags[f"data.{out['path']}.md5"] = out["md5"]
    return tags


def flatten_metrics(metrics: Mapping, prefix: str = "") -> dict[str, float]:
    """Nested metric dicts to MLflow's flat `a.b.c` keys; non-numbers (n/a) are left out."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}".replace(" ", "_")
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, f"{name}."))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


def training_run_id(model_dir: Path) -> str | None:
    """The MLflow run that trained this model directory (None for a model trained outside `train`)."""
    run_file = model_dir / RUN_FILE
    return json.loads(run_file.read_text())["mlflow_run_id"] if run_file.is_file() else None


def log_evaluation(model_dir: Path, metrics: Mapping, files: Sequence[Path]) -> str:
    """The evaluate stage's record in the training run: every test metric as `test.<reference>.<key>`,
    plus the metrics JSON and the confusion-matrix PNGs as artifacts under `evaluation/`."""
    configure_mlflow()
    with mlflow.start_run(run_id=training_run_id(model_dir)) as run:
        mlflow.log_metrics(flatten_metrics(metrics, "test."))
        for path in files:
            mlflow.log_artifact(str(path), artifact_path="evaluation")
    return run.info.run_id
