"""MLflow tracking and registry: one run per training, a registered version per run, aliases for
promotion (`challenger` for the newest candidate, `champion` for the one that is served)."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

import mlflow
import pandas as pd
import yaml
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

import deberta_rad
from deberta_rad.settings import get_settings

logger = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
MODEL_CODE = Path(__file__).with_name("mlflow_model.py")
# Synthetic, never a real report: MLflow stores input examples in plain text beside the model.
SYNTHETIC_INPUT_EXAMPLE = pd.DataFrame(
    {
        "report_id": ["synthetic-example-1", "synthetic-example-2"],
        "text": [
            "FINDINGS: Small left pleural effusion. No pneumothorax.\nIMPRESSION: Small left effusion.",
            "FINDINGS: Heart size is normal. The lungs are clear.\nIMPRESSION: No acute cardiopulmonary process.",
        ],
    }
)
# DVC-tracked data that a model version is trained on; their dvc.lock hashes name the data version.
DATA_OUTPUTS = ("data/reports.jsonl", "data/pseudo_labels.jsonl", "data/splits")
# Written beside a trained model: the MLflow run that trained it, so registration logs into that run.
RUN_FILE = "training_run.json"


def configure_mlflow() -> str:
    """Point MLflow at the configured store (embedded SQLite by default) and the project experiment."""
    settings = get_settings()
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    mlflow.set_registry_uri(settings.mlflow_tracking_uri)
    experiment = mlflow.set_experiment(settings.mlflow_experiment)
    return experiment.experiment_id


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


def log_student_model(model_dir: Path) -> str:
    """Log the model directory as an MLflow pyfunc model in the active run; returns its model URI."""
    info = mlflow.pyfunc.log_model(
        name="deberta-rad",
        python_model=str(MODEL_CODE),
        artifacts={"student": str(model_dir)},
        code_paths=[str(Path(deberta_rad.__file__).parent)],
        input_example=SYNTHETIC_INPUT_EXAMPLE,
        pip_requirements=["torch", "transformers", "safetensors", "pandas<3", "pydantic", "tqdm", "mlflow"],
    )
    return info.model_uri


def register_version(model_uri: str, run_id: str, tags: Mapping[str, str]) -> ModelVersion:
    """Register a version, tag it, make it `challenger`, and `champion` too if there is none yet."""
    name = get_settings().registered_model
    version = mlflow.register_model(model_uri, name, tags=dict(tags))
    client = MlflowClient()
    client.set_registered_model_alias(name, CHALLENGER, version.version)
    if alias_version(CHAMPION) is None:
        client.set_registered_model_alias(name, CHAMPION, version.version)
        logger.info("version %s is the first of %s and becomes %s", version.version, name, CHAMPION)
    return version


def alias_version(alias: str) -> ModelVersion | None:
    """The version an alias points to, or None when the alias (or the model) does not exist yet."""
    try:
        return MlflowClient().get_model_version_by_alias(get_settings().registered_model, alias)
    except MlflowException:
        return None


def resolve_model(ref: str, cache_dir: Path = Path(".cache/models")) -> tuple[Path, str]:
    """A model directory or an MLflow model URI (`models:/deberta-rad@champion`, `runs:/...`) to a local
    model directory and a name for it (the registry version when there is one)."""
    local = Path(ref)
    if local.is_dir():
        return local, str(local)
    if not ref.startswith(("models:/", "runs:/", "mlflow-artifacts:/")):
        raise FileNotFoundError(f"model {ref!r} is neither a model directory nor an MLflow model URI")
    configure_mlflow()
    label = ref
    if ref.startswith("models:/") and "@" in ref:
        # Pin the alias to its version first, so a promotion during the download cannot mix versions.
        name, alias = ref.removeprefix("models:/").split("@", 1)
        version = MlflowClient().get_model_version_by_alias(name, alias)
        label, ref = f"{name}/{version.version}", f"models:/{name}/{version.version}"
    destination = cache_dir / label.replace(":", "_").replace("/", "_")
    downloaded = Path(mlflow.artifacts.download_artifacts(artifact_uri=ref, dst_path=str(destination)))
    return downloaded / "artifacts" / "student", label


def evaluation_tags(metrics: Mapping) -> dict[str, str]:
    """Headline evaluation figures as version tags, so the registry UI shows them next to each version."""
    headline = ("macro_f1", "agreement", "kappa")
    return {
        f"eval.{reference}.{key}": f"{scores[key]:.4f}"
        for reference, scores in metrics.items()
        if isinstance(scores, Mapping)
        for key in headline
        if isinstance(scores.get(key), int | float)
    }


def register_model(model_dir: Path, metrics: Mapping) -> dict:
    """The register stage: log test metrics and the model into the training run, register a version."""
    configure_mlflow()
    run_file = model_dir / RUN_FILE
    run_id = json.loads(run_file.read_text())["mlflow_run_id"] if run_file.is_file() else None
    with mlflow.start_run(run_id=run_id) as run:
        mlflow.log_metrics(flatten_metrics(metrics, "test."))
        model_uri = log_student_model(model_dir)
    version = register_version(model_uri, run.info.run_id, {**data_version_tags(), **evaluation_tags(metrics)})
    aliases = [
        alias
        for alias in (CHALLENGER, CHAMPION)
        if (found := alias_version(alias)) and found.version == version.version
    ]
    return {"name": version.name, "version": version.version, "run_id": run.info.run_id, "aliases": aliases}
