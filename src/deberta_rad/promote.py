"""Promotion: alias `champion` moves to a registered version that passes the gate against the current
champion (same test data, no finding's F1 down by more than `promote.max_finding_drop`, Macro F1 not
down), or that a person overrides the gate for, with the reason recorded on the version. A champion
scored on an older test split than the candidate's is scored again on the candidate's first."""

from __future__ import annotations

import getpass
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from deberta_rad.net import post_alert
from deberta_rad.params import PromoteParams
from deberta_rad.registry import CHALLENGER, CHAMPION, alias_version, finding_f1_tag
from deberta_rad.schema import FINDINGS
from deberta_rad.settings import get_settings

logger = logging.getLogger(__name__)

# The test split (reports, teacher labels, gold) a version was evaluated on, as dvc.lock names it.
EVALUATION_DATA_TAG = "data.data/splits.md5"
MACRO_F1 = "Macro F1"
# How a version became champion (tag `promotion.route`) and the tags a promotion writes.
CLI_ROUTE = "deberta-rad promote"
OTHER_ROUTE = "MLflow UI or API"
PROMOTION_TAGS = (
    "promotion.by",
    "promotion.at",
    "promotion.previous_champion",
    "promotion.gate",
    "promotion.route",
    "promotion.forced_reason",
    "promotion.gate_detail",
    "promotion.reverted",
)
# How long after `deberta-rad promote` tags a version the service takes the alias move as that command's.
CLI_CLAIM_S = 600
# Verdicts `deberta-rad promote` refuses without --force: a UI promotion with one is alerted (and reverted
# in strict mode).
REFUSED = ("refused", "not comparable")
UNKNOWN_USER = "unknown (set outside deberta-rad promote; MLflow does not record who sets an alias)"
MAX_TAG_CHARS = 4000


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


class Evaluated(Protocol):
    """What the gate reads of a version: a registered ModelVersion, or the champion scored again."""

    @property
    def version(self) -> str: ...

    @property
    def tags(self) -> Mapping[str, str]: ...


def comparability_problems(champion: Evaluated, candidate: Evaluated, reference: str) -> list[str]:
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


@dataclass(frozen=True)
class Rescored:
    """The champion as the gate reads it after it was scored again on the candidate's test data: its
    number, that evaluation's tags and the data tag of that test split. Only the gate sees these: the
    registered tags stay as they were, since `data.data/splits.md5` there also names the data the
    champion was trained on."""

    version: str
    tags: Mapping[str, str]


def champion_on_candidates_test_data(
    champion: ModelVersion,
    candidate: ModelVersion,
    split_dir: Path,
    batch_size: int,
    lock_path: Path = Path("dvc.lock"),
) -> Rescored | None:
    """The champion scored now on the workspace's test split, when the candidate was evaluated on that
    split (its data tag is dvc.lock's) and the champion on other test data: a review round moves
    reviewed gold into the test split, which would otherwise leave every retrained version incomparable
    with the champion. None when there is nothing to do or no way to do it (no dvc.lock, split not
    checked out)."""
    from deberta_rad.evaluate import evaluate_split
    from deberta_rad.registry import evaluation_tags, resolve_model
    from deberta_rad.tracking import data_version_tags

    current = data_version_tags(lock_path).get(EVALUATION_DATA_TAG)
    if (
        current is None
        or candidate.tags.get(EVALUATION_DATA_TAG) != current
        or champion.tags.get(EVALUATION_DATA_TAG) == current
        or not (split_dir / "reports.jsonl").is_file()
    ):
        return None
    model_dir, _ = resolve_model(f"models:/{champion.name}/{champion.version}")
    metrics = evaluate_split(model_dir, split_dir, plots_dir=None, batch_size=batch_size)
    return Rescored(champion.version, {**evaluation_tags(metrics), EVALUATION_DATA_TAG: current})


def gate_reference(config: PromoteParams, champion: Evaluated, candidate: Evaluated) -> str:
    """`auto`: the reviewed gold when both versions were scored on at least `min_reviewed_reports` of it
    (a radiologist's labels, but on the first few dozen reviews the gate would be a coin toss), else
    ground truth when both were scored against it (sources that carry gold), else the teacher labels;
    any other value is used as it is."""
    if config.reference != "auto":
        return config.reference
    if all(_reviewed_reports(version) >= config.min_reviewed_reports for version in (champion, candidate)):
        return "reviewed"
    if all("eval.gold.macro_f1" in version.tags for version in (champion, candidate)):
        return "gold"
    return "teacher"


def _reviewed_reports(version: Evaluated) -> int:
    """How many reviewed gold reports a version was scored on (0 when none, or when it was registered
    before the count was tagged)."""
    if "eval.reviewed.macro_f1" not in version.tags:
        return 0
    return int(version.tags.get("eval.reviewed.n_reports", 0))


def promotion_gate(champion: Evaluated, candidate: Evaluated, reference: str, max_finding_drop: float) -> GateResult:
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
    """Who promotes: the tracking server's account where it has accounts (the platform), else the login."""
    if account := get_settings().mlflow_tracking_username:
        return account
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _record_promotion(candidate: ModelVersion, tags: Mapping[str, str]) -> None:
    """Write a promotion's tags on the version and drop those an earlier promotion of it left (a forced
    reason, a revert) that this one does not set."""
    client = MlflowClient()
    for key in PROMOTION_TAGS:
        if key in candidate.tags and key not in tags:
            client.delete_model_version_tag(candidate.name, candidate.version, key)
    for key, value in tags.items():
        client.set_model_version_tag(candidate.name, candidate.version, key, value)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def promote_version(
    candidate: ModelVersion,
    previous: ModelVersion | None,
    gate: GateResult | None,
    forced_reason: str | None,
    detail: str | None = None,
) -> None:
    """Move `champion` to ``candidate`` and record on it who promoted it, when, over which version and
    how (`promotion.gate`: passed, forced or no champion). The tags are written before the alias moves,
    so a forced promotion never happens without its reason on record."""
    outcome = "no champion" if gate is None else "passed" if gate.passed else "forced"
    tags = {
        "promotion.by": _user(),
        "promotion.at": _now(),
        "promotion.previous_champion": str(previous.version) if previous else "none",
        "promotion.gate": outcome,
        "promotion.route": CLI_ROUTE,
    }
    if outcome == "forced":
        tags["promotion.forced_reason"] = forced_reason or ""
    if detail:
        tags["promotion.gate_detail"] = detail[:MAX_TAG_CHARS]
    _record_promotion(candidate, tags)
    MlflowClient().set_registered_model_alias(candidate.name, CHAMPION, candidate.version)
    logger.info("version %s of %s is now %s (gate: %s)", candidate.version, candidate.name, CHAMPION, outcome)


# ----------------------------------------------------------------------------------------------
# Promotions by any other route (the MLflow UI, the API): reviewed by the service that follows `champion`
# ----------------------------------------------------------------------------------------------


def promoted_by_cli(candidate: ModelVersion) -> bool:
    """Whether `deberta-rad promote` made this move: it tags the version just before it moves the alias
    (so its gate already ran, and a forced promotion carries its reason). Only a fresh tag counts: moving
    `champion` back to an old promotion's version later, in the UI, is a new promotion."""
    tags = candidate.tags
    if tags.get("promotion.route") != CLI_ROUTE:
        return False
    try:
        tagged_at = datetime.fromisoformat(tags["promotion.at"])
    except (KeyError, ValueError):
        return False
    return (datetime.now(UTC) - tagged_at).total_seconds() <= CLI_CLAIM_S


@dataclass(frozen=True)
class Review:
    """The gate's verdict on a promotion made outside `deberta-rad promote`, and what was done about it."""

    candidate: str
    previous: str | None
    verdict: str  # passed | refused | not comparable | no champion
    detail: str
    reverted: bool
    alert_failure: str | None

    def describe(self) -> str:
        over = f"over version {self.previous}" if self.previous else "with no champion before it"
        text = f"version {self.candidate} was made {CHAMPION} {over} outside deberta-rad promote; gate: {self.verdict}"
        text += f" ({self.detail})" if self.detail else ""
        if self.reverted:
            text += f"; {CHAMPION} moved back to version {self.previous} (DEBERTA_RAD_PROMOTION_STRICT)"
        return text


def _verdict(gate: GateResult | None) -> tuple[str, str]:
    if gate is None:
        return "no champion", ""
    if gate.problems:
        return "not comparable", "; ".join(gate.problems)
    if gate.failures:
        return "refused", f"F1 down on {', '.join(gate.failures)}"
    return "passed", ""


def review_promotion(
    candidate: ModelVersion, previous: ModelVersion | None, config: PromoteParams, strict: bool, alert_url: str | None
) -> Review:
    """Run `deberta-rad promote`'s gate on a promotion made elsewhere and record the verdict on the version
    (`promotion.gate`, `promotion.route`; `promotion.by` is unknown: MLflow does not record who set an
    alias). One that `promote` would refuse (refused, not comparable) is reported to ``alert_url``; with
    ``strict`` `champion` goes back to ``previous``."""
    gate = None
    if previous is not None:
        gate = promotion_gate(previous, candidate, gate_reference(config, previous, candidate), config.max_finding_drop)
    verdict, detail = _verdict(gate)
    refused = verdict in REFUSED
    reverted = strict and refused and previous is not None
    tags = {
        "promotion.by": UNKNOWN_USER,
        "promotion.at": _now(),
        "promotion.previous_champion": str(previous.version) if previous else "none",
        "promotion.gate": verdict,
        "promotion.route": OTHER_ROUTE,
    }
    if detail:
        tags["promotion.gate_detail"] = detail[:MAX_TAG_CHARS]
    if reverted:
        tags["promotion.reverted"] = f"{CHAMPION} moved back to version {previous.version}"
    _record_promotion(candidate, tags)
    if reverted:
        MlflowClient().set_registered_model_alias(candidate.name, CHAMPION, previous.version)
    alert_failure = None
    if refused and alert_url:
        alert_failure = post_alert(alert_url, promotion_alert(candidate, previous, gate, verdict, reverted))
    previous_version = str(previous.version) if previous else None
    return Review(str(candidate.version), previous_version, verdict, detail, reverted, alert_failure)


def promotion_alert(
    candidate: ModelVersion, previous: ModelVersion | None, gate: GateResult | None, verdict: str, reverted: bool
) -> dict:
    """What the alert webhook receives about a refused promotion: versions, the failing findings, the gate."""
    return {
        "source": "deberta-rad",
        "event": "a promotion outside deberta-rad promote did not pass the gate",
        "verdict": verdict,
        "model": candidate.name,
        "version": str(candidate.version),
        "previous_champion": str(previous.version) if previous else None,
        "route": OTHER_ROUTE,
        "failures": gate.failures if gate else [],
        "problems": gate.problems if gate else [],
        "reverted": reverted,
        "gate": format_gate_table(gate) if gate else "",
    }
