"""Promotion: alias `champion` moves to a registered version that passes the gate against the current
champion (same test data, no finding's F1 down by more than `promote.max_finding_drop`, Macro F1 not
down), or that a person overrides the gate for, with the reason recorded on the version."""

from __future__ import annotations

import getpass
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from deberta_rad.registry import CHALLENGER, CHAMPION, alias_version, finding_f1_tag
from deberta_rad.schema import FINDINGS
from deberta_rad.settings import get_settings

logger = logging.getLogger(__name__)

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
    """Who promotes: the tracking server's account where it has accounts (the platform), else the login."""
    if account := get_settings().mlflow_tracking_username:
        return account
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
