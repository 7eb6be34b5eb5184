"""MLflow tracking and registry: one run per training, a registered version per run, aliases for
promotion (`challenger` for the newest candidate, `champion` for the one that is served)."""

from __future__ import annotations

import getpass
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import mlflow
import pandas as pd
import yaml
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

import deberta_rad
from deberta_rad.schema import FINDINGS
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
    local = Path(ref)
    if local.is_dir():
        return local, str(local)
    check_model_ref(ref)
    configure_mlflow()
    label = ref
    if ref.startswith("models:/") and "@" in ref:
        # Pin the alias to its version first, so a promotion during the download cannot mix versions.
        name, alias = ref.removeprefix("models:/").split("@", 1)
        version = MlflowClient().get_model_version_by_alias(name, alias)
        label, ref = f"{name}/{version.version}", f"models:/{name}/{version.version}"
    destination = (cache_dir or get_settings().model_cache) / label.replace(":", "_").replace("/", "_")
    downloaded = Path(mlflow.artifacts.download_artifacts(artifact_uri=ref, dst_path=str(destination)))
    return downloaded / "artifacts" / "student", label


def finding_f1_tag(reference: str, finding: str) -> str:
    """Version tag key of one finding's F1 against a reference, e.g. `eval.gold.f1.Pleural_Effusion`."""
    return f"eval.{reference}.f1.{finding.replace(' ', '_')}"


def evaluation_tags(metrics: Mapping) -> dict[str, str]:
    """Evaluation figures as version tags: the headline ones, which the registry UI shows next to each
    version, and every finding's F1, which the promotion gate compares. A version's tags are its own
    (the run's `test.*` metrics are overwritten when one run is registered twice); n/a is left out."""
    headline = ("macro_f1", "agreement", "kappa")
    tags = {}
    for reference, scores in metrics.items():
        if not isinstance(scores, Mapping):
            continue
        tags |= {f"eval.{reference}.{key}": scores.get(key) for key in headline}
        tags |= {
            finding_f1_tag(reference, finding): finding_scores.get("f1")
            for finding, finding_scores in (scores.get("per_finding") or {}).items()
        }
    return {key: f"{value:.4f}" for key, value in tags.items() if isinstance(value, int | float)}


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
    return {"name": version.name, "version": version.version, "run_id": run.info.run_id, "aliases": aliases}


# ----------------------------------------------------------------------------------------------
# Promotion: `champion` moves to a candidate that passes the gate, or that a person overrides it for
# ----------------------------------------------------------------------------------------------

PROMOTION_DEFAULTS = {"reference": "auto", "max_finding_drop": 0.05}
# The test split (reports, teacher labels, gold) a version was evaluated on, as dvc.lock names it.
EVALUATION_DATA_TAG = "data.data/splits.md5"
MACRO_F1 = "Macro F1"


class PromotionError(Exception):
    """A promotion that cannot even be attempted (no such version, no challenger)."""


@dataclass(frozen=True)
class GateRow:
    """One line of the gate: a finding's F1 (or the Macro F1) of the champion and of the candidate."""

    name: str
    champion: float | None
    candidate: float | None
    allowed_change: float  # -max_finding_drop for a finding, 0 for the Macro F1

    @property
    def change(self) -> float | None:
        """Candidate minus champion, at the 4 decimals the tags hold (None when either is n/a)."""
        if self.champion is None or self.candidate is None:
            return None
        return round(self.candidate - self.champion, 4)

    @property
    def verdict(self) -> str:
        change = self.change
        return "n/a" if change is None else "ok" if change >= self.allowed_change else "FAIL"


@dataclass(frozen=True)
class GateResult:
    """The comparison of a candidate version with the champion on one evaluation reference."""

    champion: str
    candidate: str
    reference: str
    max_finding_drop: float
    rows: list[GateRow]
    problems: list[str]  # why the two cannot be compared; empty when they can

    @property
    def failures(self) -> list[str]:
        return [row.name for row in self.rows if row.verdict == "FAIL"]

    @property
    def passed(self) -> bool:
        return not self.problems and not self.failures


def _tag_score(tags: Mapping[str, str], key: str) -> float | None:
    try:
        return float(tags[key])
    except (KeyError, ValueError):
        return None


def comparability_problems(champion: ModelVersion, candidate: ModelVersion, reference: str) -> list[str]:
    """Why two versions' evaluations cannot be compared: unknown or different test data, no scores
    against ``reference``, or a finding scored on one of them only. Empty when they are comparable."""
    problems = []
    for role, version in (("champion", champion), ("candidate", candidate)):
        label = f"version {version.version} ({role})"
        if EVALUATION_DATA_TAG not in version.tags:
            problems.append(f"{label} has no {EVALUATION_DATA_TAG} tag, so its test data is unknown")
        if f"eval.{reference}.macro_f1" not in version.tags:
            problems.append(f"{label} has no evaluation against {reference!r}")
        elif not any(finding_f1_tag(reference, f) in version.tags for f in FINDINGS):
            problems.append(f"{label} has no per-finding F1 tags for {reference!r} (registered before they existed)")
    if problems:
        return problems
    if champion.tags[EVALUATION_DATA_TAG] != candidate.tags[EVALUATION_DATA_TAG]:
        return [
            f"they were evaluated on different test data ({EVALUATION_DATA_TAG} "
            f"{champion.tags[EVALUATION_DATA_TAG]} vs {candidate.tags[EVALUATION_DATA_TAG]})"
        ]
    one_sided = [
        f
        for f in FINDINGS
        if (finding_f1_tag(reference, f) in champion.tags) != (finding_f1_tag(reference, f) in candidate.tags)
    ]
    return [f"scored on one version only: {', '.join(one_sided)}"] if one_sided else []


def gate_reference(reference: str, champion: ModelVersion, candidate: ModelVersion) -> str:
    """`auto`: ground truth when both versions were scored against it (sources that carry gold), else
    the teacher labels; any other value is used as it is."""
    if reference != "auto":
        return reference
    both_have_gold = all("eval.gold.macro_f1" in version.tags for version in (champion, candidate))
    return "gold" if both_have_gold else "teacher"


def promotion_gate(
    champion: ModelVersion, candidate: ModelVersion, reference: str, max_finding_drop: float
) -> GateResult:
    """The gate: on the same test data, the candidate's Macro F1 is not lower than the champion's and no
    finding's F1 drops by more than ``max_finding_drop``."""
    rows = [
        GateRow(
            finding,
            _tag_score(champion.tags, finding_f1_tag(reference, finding)),
            _tag_score(candidate.tags, finding_f1_tag(reference, finding)),
            -max_finding_drop,
        )
        for finding in FINDINGS
    ]
    macro = f"eval.{reference}.macro_f1"
    rows.append(GateRow(MACRO_F1, _tag_score(champion.tags, macro), _tag_score(candidate.tags, macro), 0.0))
    return GateResult(
        champion=champion.version,
        candidate=candidate.version,
        reference=reference,
        max_finding_drop=max_finding_drop,
        rows=rows,
        problems=comparability_problems(champion, candidate, reference),
    )


def _score_text(value: float | None, width: int, signed: bool = False) -> str:
    return f"{'n/a' if value is None else f'{value:+.4f}' if signed else f'{value:.4f}':>{width}}"


def format_gate_table(gate: GateResult) -> str:
    """The gate as a table: finding, champion F1, candidate F1, change, verdict; then the outcome."""
    width = max(len(name) for name in (*FINDINGS, MACRO_F1))
    lines = [
        f"Promotion gate on {gate.reference!r}: candidate version {gate.candidate} vs champion version {gate.champion}",
        f"{'Finding':<{width}} {'Champion':>9} {'Candidate':>9} {'Change':>8}  Verdict",
    ]
    lines += [
        f"{row.name:<{width}} {_score_text(row.champion, 9)} {_score_text(row.candidate, 9)} "
        f"{_score_text(row.change, 8, signed=True)}  {row.verdict}"
        for row in gate.rows
    ]
    lines.append(f"(a finding fails when its F1 drops by more than {gate.max_finding_drop}; Macro F1 when it is lower)")
    if gate.problems:
        lines.append("Not comparable: " + "; ".join(gate.problems))
    elif gate.failures:
        lines.append(f"Gate failed: {', '.join(gate.failures)}")
    else:
        lines.append("Gate passed")
    return "\n".join(lines)


def promotion_candidates(version: int | None) -> tuple[ModelVersion, ModelVersion | None]:
    """The version to promote (``version``, or the `challenger` when None) and the current champion."""
    name = get_settings().registered_model
    if version is None:
        candidate = alias_version(CHALLENGER)
        if candidate is None:
            raise PromotionError(f"{name} has no {CHALLENGER!r} version; name one with --version")
    else:
        try:
            candidate = MlflowClient().get_model_version(name, str(version))
        except MlflowException as err:
            raise PromotionError(f"{name} has no version {version}") from err
    return candidate, alias_version(CHAMPION)


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def promote_version(
    candidate: ModelVersion, previous: ModelVersion | None, gate: GateResult | None, forced_reason: str | None
) -> None:
    """Move `champion` to ``candidate`` and record on it who promoted it, when, over which version and
    how (`promotion.gate`: passed, forced or no champion). The tags are written before the alias moves,
    so a forced promotion never happens without its reason on record."""
    name = get_settings().registered_model
    client = MlflowClient()
    outcome = "no champion" if gate is None else "passed" if gate.passed else "forced"
    tags = {
        "promotion.by": _user(),
        "promotion.at": datetime.now(UTC).isoformat(timespec="seconds"),
        "promotion.previous_champion": previous.version if previous else "none",
        "promotion.gate": outcome,
    }
    if outcome == "forced":
        tags["promotion.forced_reason"] = forced_reason or ""
    elif "promotion.forced_reason" in candidate.tags:  # from an earlier forced promotion of this version
        client.delete_model_version_tag(name, candidate.version, "promotion.forced_reason")
    for key, value in tags.items():
        client.set_model_version_tag(name, candidate.version, key, value)
    client.set_registered_model_alias(name, CHAMPION, candidate.version)
    logger.info("version %s of %s is now %s (gate: %s)", candidate.version, name, CHAMPION, outcome)
