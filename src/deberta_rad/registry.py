"""The MLflow model registry: the student logged as a pyfunc model that runs anywhere (its exact
requirements), a registered version per training run tagged with its data version and evaluation,
aliases (`challenger` for the newest candidate, `champion` for the one that is served), and resolving a
model reference to a local directory."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

import deberta_rad
from deberta_rad.settings import get_settings
from deberta_rad.tracking import configure_mlflow, data_version_tags, require_registry, training_run_id

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


# Run in a fresh interpreter by model_requirements: what MLflow's loader, the model's code and
# `mlflow models serve` (uvicorn on mlflow.pyfunc.scoring_server) import to load a model and predict.
_IMPORT_PROBE = """
import json, sys
before = set(sys.modules)
import pandas as pd
import mlflow.pyfunc, mlflow.pyfunc.scoring_server, uvicorn
from deberta_rad.mlflow_model import DebertaRadPyfunc
model = DebertaRadPyfunc()
model.load_context(mlflow.pyfunc.PythonModelContext(artifacts={"student": sys.argv[1]}, model_config={}))
model.predict(None, pd.read_json(sys.stdin, orient="split"))
print(json.dumps(sorted({name.partition(".")[0] for name in set(sys.modules) - before})))
"""


def model_requirements(model_dir: Path) -> list[str]:
    """The logged model's pip requirements: `name==version` of every installed distribution whose
    modules loading the model, predicting and serving it imports, found by doing that in a fresh
    interpreter, so the registered model installs the versions it was tested with, in any venv.

    Not MLflow's own inference (`log_model` without `pip_requirements`): MLflow 3.17 maps the
    `deberta_rad` import to this project's distribution (`deberta-rad==0.1.0`, on no index; code_paths
    carries the package) and then prunes every package that distribution depends on, so torch,
    transformers and pydantic-settings would be missing. Here the project's own distribution is left out
    instead. Local version labels are dropped (`torch==2.13.0` for `2.13.0+cpu`): which build of torch
    a venv gets is its index's choice (PyTorch's CPU index for the CPU build).
    """
    example = SYNTHETIC_INPUT_EXAMPLE.to_json(orient="split", index=False)
    probe = subprocess.run(
        [sys.executable, "-c", _IMPORT_PROBE, str(Path(model_dir).resolve())],
        input=example,
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        raise RuntimeError(f"loading {model_dir} to find its requirements failed:\n{probe.stderr[-3000:]}")
    providers = importlib.metadata.packages_distributions()
    own = set(providers.get(deberta_rad.__name__, []))
    imported = json.loads(probe.stdout.splitlines()[-1])
    distributions = {dist for module in imported for dist in providers.get(module, [])} - own
    pins = {}
    for dist in distributions:
        # The name as PEP 503 writes it; the version without its PEP 440 local label.
        pins[re.sub(r"[-_.]+", "-", dist).lower()] = importlib.metadata.version(dist).partition("+")[0]
    return [f"{name}=={version}" for name, version in sorted(pins.items())]


def log_student_model(model_dir: Path) -> str:
    """Log the model directory as an MLflow pyfunc model in the active run; returns its model URI."""
    info = mlflow.pyfunc.log_model(
        name="deberta-rad",
        python_model=str(MODEL_CODE),
        artifacts={"student": str(model_dir)},
        code_paths=[str(Path(deberta_rad.__file__).parent)],
        input_example=SYNTHETIC_INPUT_EXAMPLE,
        pip_requirements=model_requirements(model_dir),
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


def check_model_ref(ref: str) -> None:
    """Fail before any download or server start when ``ref`` is neither a directory nor an MLflow model
    URI with a registry behind it."""
    if Path(ref).is_dir():
        if not (Path(ref) / "config.json").is_file():
            raise FileNotFoundError(f"{ref} is not a DeBERTa-RAD model directory (no config.json)")
        return
    if not ref.startswith(("models:/", "runs:/", "mlflow-artifacts:/")):
        raise FileNotFoundError(f"model {ref!r} is neither a model directory nor an MLflow model URI")
    require_registry()


def resolve_model(ref: str, cache_dir: Path | None = None) -> tuple[Path, str]:
    """A model directory or an MLflow model URI (`models:/deberta-rad@champion`, `runs:/...`) to a local
    model directory and a name for it (the registry version when there is one)."""
    check_model_ref(ref)
    local = Path(ref)
    if local.is_dir():
        return local, str(local)
    configure_mlflow()
    try:
        return download_model(ref, cache_dir or get_settings().model_cache)
    except MlflowException as err:
        # MLflow's "Registered Model with name=... not found" does not say which registry was asked.
        raise MlflowException(
            f"{ref}: {err.message} in the MLflow registry at {get_settings().mlflow_tracking_uri} "
            "(`mlflow ui` lists its models and aliases; MLFLOW_TRACKING_URI chooses the registry)",
            error_code=err.error_code,
        ) from None


def download_model(ref: str, cache_dir: Path) -> tuple[Path, str]:
    """Download an MLflow model URI's student into ``cache_dir``; returns its folder and its name."""
    label = ref
    if ref.startswith("models:/") and "@" in ref:
        # Pin the alias to its version first, so a promotion during the download cannot mix versions.
        name, alias = ref.removeprefix("models:/").split("@", 1)
        version = MlflowClient().get_model_version_by_alias(name, alias)
        label, ref = f"{name}/{version.version}", f"models:/{name}/{version.version}"
    destination = cache_dir / label.replace(":", "_").replace("/", "_")
    downloaded = Path(mlflow.artifacts.download_artifacts(artifact_uri=ref, dst_path=str(destination)))
    return downloaded / "artifacts" / "student", label


def finding_f1_tag(reference: str, finding: str) -> str:
    """Version tag key of one finding's F1 against a reference, e.g. `eval.gold.f1.Pleural_Effusion`."""
    return f"eval.{reference}.f1.{finding.replace(' ', '_')}"


def evaluation_tags(metrics: Mapping) -> dict[str, str]:
    """Evaluation figures as version tags: the headline ones, which the registry UI shows next to each
    version, and every finding's F1, which the promotion gate compares. A version's tags are its own
    (the run's `test.*` metrics are overwritten when one run is registered twice), with the number of
    reports scored, which tells the gate how far a reference can be trusted; n/a is left out."""
    headline = ("macro_f1", "agreement", "kappa", "n_reports")
    tags = {}
    for reference, scores in metrics.items():
        if not isinstance(scores, Mapping):
            continue
        tags |= {f"eval.{reference}.{key}": scores.get(key) for key in headline}
        tags |= {
            finding_f1_tag(reference, finding): finding_scores.get("f1")
            for finding, finding_scores in (scores.get("per_finding") or {}).items()
        }
    return {
        key: str(value) if isinstance(value, int) else f"{value:.4f}"
        for key, value in tags.items()
        if isinstance(value, int | float)
    }


def register_model(model_dir: Path, metrics: Mapping) -> dict:
    """The register stage: log the model into the training run (whose test metrics the evaluate stage
    logged), register a version tagged with its data version and evaluation, set the aliases."""
    configure_mlflow()
    with mlflow.start_run(run_id=training_run_id(model_dir)) as run:
        model_uri = log_student_model(model_dir)
    version = register_version(model_uri, run.info.run_id, {**data_version_tags(), **evaluation_tags(metrics)})
    aliases = [
        alias
        for alias in (CHALLENGER, CHAMPION)
        if (found := alias_version(alias)) and found.version == version.version
    ]
    return {"name": version.name, "version": int(version.version), "run_id": run.info.run_id, "aliases": aliases}
