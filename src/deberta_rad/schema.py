"""The fixed label schema and the record types every lifecycle step exchanges (DESIGN.md 2-3)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

FINDINGS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Enlarged Cardiomediastinum",
    "Fracture",
    "Infiltrate",
    "Lung Lesion",
    "Lung Opacity",
    "No Finding",
    "Pleural Effusion",
    "Pleural Thickening",
    "Pneumothorax",
)
STATUSES: tuple[str, ...] = ("present", "absent", "uncertain", "not_mentioned")
SCORED_STATUSES: tuple[str, ...] = ("present", "absent", "uncertain")
Status = Literal["present", "absent", "uncertain", "not_mentioned"]

STATUS_INDEX = {status: i for i, status in enumerate(STATUSES)}
FINDING_INDEX = {finding: i for i, finding in enumerate(FINDINGS)}

# CheXpert/CheXbert CSV convention: 1.0 present, 0.0 absent, -1.0 uncertain, blank not mentioned.
CHEXPERT_TO_STATUS = {
    "1.0": "present",
    "1": "present",
    "0.0": "absent",
    "0": "absent",
    "-1.0": "uncertain",
    "-1": "uncertain",
    "": "not_mentioned",
}
STATUS_TO_CHEXPERT = {"present": "1.0", "absent": "0.0", "uncertain": "-1.0", "not_mentioned": ""}


class Report(BaseModel):
    """One free-text report; optional fields let the split group by patient and monitoring by site."""

    model_config = ConfigDict(extra="ignore")

    report_id: str = Field(min_length=1)
    text: str
    institution: str | None = None
    patient_id: str | None = None
    study_date: str | None = None


class TeacherInfo(BaseModel):
    """Which labeler produced a label record, so every label can be traced to its source."""

    name: str
    model: str | None = None
    prompt_version: str | None = None


class LabelRecord(BaseModel):
    """Statuses for all 13 findings of one report, with optional probabilities and provenance."""

    model_config = ConfigDict(extra="ignore")

    report_id: str = Field(min_length=1)
    labels: dict[str, Status]
    probabilities: dict[str, dict[str, float]] | None = None
    teacher: TeacherInfo | None = None
    evidence: dict[str, list[str]] | None = None
    # Where and when the report comes from, carried along with predictions for drift monitoring.
    institution: str | None = None
    timestamp: str | None = None

    @field_validator("labels")
    @classmethod
    def _all_findings(cls, labels: dict[str, Status]) -> dict[str, Status]:
        missing = [f for f in FINDINGS if f not in labels]
        unknown = [f for f in labels if f not in FINDING_INDEX]
        if missing or unknown:
            raise ValueError(f"labels must hold exactly the 13 findings; missing {missing}, unknown {unknown}")
        return {f: labels[f] for f in FINDINGS}


def apply_no_finding_rule(labels: dict[str, str]) -> dict[str, str]:
    """Set `No Finding` the CheXpert way: present when no other finding is present or uncertain,
    otherwise not mentioned (CheXpert leaves it blank then). Returns all 13 findings in order."""
    others_positive = any(labels.get(f) in ("present", "uncertain") for f in FINDINGS if f != "No Finding")
    result = {f: labels.get(f, "not_mentioned") for f in FINDINGS}
    result["No Finding"] = "not_mentioned" if others_positive else "present"
    return result
