"""Readers for the gold standards the evaluator scores against.

Status gold (label JSONL, CheXpert/CheXbert CSV, CheX-GPT MIMIC-500 JSONL, the radlabels peer labels)
becomes ``report_id -> {finding: status}`` with all 13 findings. IU X-ray MeSH codes only mark findings
as present, so that reader returns ``report_id -> {finding: bool}``. `read_gold` returns a `GoldSet`
that says which kind it holds and which findings the source codes at all: a format without a column for
a finding (CheXpert/CheXbert CSV has none for Infiltrate or Pleural Thickening) cannot score it, so that
finding is listed as not scored and the evaluator leaves it out (its cells hold a `not_mentioned`
placeholder only so that every row has the 13 findings; it is never counted as gold `not_mentioned`).
CSV report ids follow `data.csv_report_id`, the same scheme as the report reader's. Error messages name
the file and line, never report text.
"""

from __future__ import annotations

import csv
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from deberta_rad.data import (
    InputError,
    csv_id_column,
    csv_report_id,
    iter_label_records,
    json_lines,
    utf8_lines,
)
from deberta_rad.metrics import StatusCodes
from deberta_rad.schema import CHEXPERT_TO_STATUS, FINDINGS, STATUSES, apply_no_finding_rule

StatusGold = dict[str, dict[str, str]]
PresenceGold = dict[str, dict[str, bool]]
GOLD_FORMATS = ("labels", "chexpert", "chexgpt", "iu", "radlabels")
IUHalf = Literal["development", "locked"]

# CheX-GPT style values besides the CheXpert numbers: status names and a few spelled-out forms.
VALUE_ALIASES = {
    **{status: status for status in STATUSES},
    "positive": "present",
    "negative": "absent",
    "not mentioned": "not_mentioned",
    "none": "not_mentioned",
    "null": "not_mentioned",
    "nan": "not_mentioned",
}

# IU MeSH head terms (before the first "/") that code one of the 13 findings outright.
IU_HEAD_TO_FINDINGS: dict[str, tuple[str, ...]] = {
    "pulmonary atelectasis": ("Atelectasis",),
    "cardiomegaly": ("Cardiomegaly",),
    "consolidation": ("Consolidation",),
    "pulmonary edema": ("Edema",),
    "fractures, bone": ("Fracture",),
    "infiltrate": ("Infiltrate",),
    "nodule": ("Lung Lesion",),
    "mass": ("Lung Lesion",),
    "opacity": ("Lung Opacity",),
    "airspace disease": ("Lung Opacity",),
    "normal": ("No Finding",),
    "pleural effusion": ("Pleural Effusion",),
    "pneumothorax": ("Pneumothorax",),
    # Both contain a pneumothorax by definition; the hydro- form also a pleural fluid collection.
    "hydropneumothorax": ("Pneumothorax", "Pleural Effusion"),
    "hemopneumothorax": ("Pneumothorax",),
}
# Qualifiers that place a mass/nodule/opacity outside the lung (bone, breast, mediastinum).
IU_NON_LUNG_QUALIFIERS = frozenset(
    {"breast", "ribs", "clavicle", "thoracic vertebrae", "spine", "humerus", "shoulder", "mediastinum"}
)
IU_ENLARGED_QUALIFIERS = frozenset({"enlarged", "widened", "prominent"})
IU_UNCODED = "no indexing"

# The radlabels labeler's findings (RadGraph-XL + alias dictionary, 49 in all) that are one of the 13;
# the others (devices, emphysema, pneumonia, vascular congestion, ...) have no counterpart here.
RADLABELS_TO_FINDING: dict[str, str] = {
    "atelectasis": "Atelectasis",
    "lobar_segmental_collapse": "Atelectasis",
    "whole_lung_or_majority_collapse": "Atelectasis",
    "cardiomegaly": "Cardiomegaly",
    "consolidation": "Consolidation",
    "pulmonary_edema": "Edema",
    "enlarged_cardiomediastinum": "Enlarged Cardiomediastinum",
    "fracture_generic": "Fracture",
    "acute_rib_fracture": "Fracture",
    "non_acute_rib_fracture": "Fracture",
    "infiltration": "Infiltrate",
    "lung_nodule_or_mass": "Lung Lesion",
    "lung_lesion": "Lung Lesion",
    "air_space_opacity": "Lung Opacity",
    "lung_opacity": "Lung Opacity",
    "ground_glass_opacity": "Lung Opacity",
    "pleural_effusion": "Pleural Effusion",
    "pleural_thickening": "Pleural Thickening",
    "pneumothorax": "Pneumothorax",
}
RADLABELS_STATUS = {"definitely present": "present", "definitely absent": "absent", "uncertain": "uncertain"}
STATUS_RANK = {"not_mentioned": 0, "absent": 1, "uncertain": 2, "present": 3}


@dataclass(frozen=True)
class GoldSet:
    """Gold labels plus their kind, `status` (4 statuses) or `presence` (booleans, presence F1 only), and
    the findings the source codes (schema order): the only ones that can be scored against it."""

    kind: Literal["status", "presence"]
    labels: StatusGold | StatusCodes | PresenceGold
    findings: tuple[str, ...] = FINDINGS

    @property
    def not_scored(self) -> list[str]:
        """Findings the source has no label for: reported as not scored, never as not_mentioned."""
        return [f for f in FINDINGS if f not in self.findings]


def read_label_jsonl(path: str | Path) -> StatusCodes:
    """Label-record JSONL (schema.LabelRecord), validated record by record as it streams, kept as status
    codes (a corpus-sized gold file costs 13 bytes per report, not a dict of dicts)."""
    return StatusCodes(iter_label_records(path))


def read_chexpert_csv(path: str | Path) -> GoldSet:
    """CheXpert/CheXbert CSV: one column per finding, 1.0/0.0/-1.0/blank; other columns are ignored.

    Only the findings with a column are scored (CheXpert has no Infiltrate or Pleural Thickening
    column: `GoldSet.not_scored` lists them). Report ids follow `data.csv_report_id`: the `report_id` or
    `study_id` column, else `<file stem>-<data row number>`, as the report reader gives them.
    """
    path = Path(path)
    reader = csv.DictReader(utf8_lines(path))
    columns = reader.fieldnames = [c.strip() for c in reader.fieldnames or []]
    finding_columns = [f for f in FINDINGS if f in columns]
    if not finding_columns:
        raise InputError(f"{path}:1: CSV header names none of the 13 findings; found {columns}")
    id_column = csv_id_column(columns)
    gold: StatusGold = {}
    for row_number, row in enumerate(reader, start=1):
        where = f"{path}:{reader.line_num}"
        if None in row:
            raise InputError(f"{where}: more fields than the header has")
        report_id = csv_report_id(path, row_number, row, id_column, where)
        statuses = {f: _chexpert_status(row[f], f, where) for f in finding_columns}
        _add_unique(gold, report_id, _complete(statuses), where)
    return GoldSet("status", gold, tuple(finding_columns))


def read_chexgpt_jsonl(path: str | Path) -> GoldSet:
    """CheX-GPT MIMIC-500 JSONL: `study_id`, `text`, `label` ({finding: 1/0/-1/null or a string}).

    Finding names are matched leniently (case, spacing, underscores, an unambiguous truncation such
    as "Enlarged Cardiom."); names outside the 13 findings (Pneumonia, Support Devices) are ignored.
    Only findings that some record's `label` names are scored (`GoldSet.not_scored` lists the rest);
    a null value of a named finding is gold not_mentioned.
    """
    path = Path(path)
    gold: StatusGold = {}
    coded: set[str] = set()
    for number, record in json_lines(path):
        where = f"{path}:{number}"
        report_id = record.get("study_id", record.get("report_id"))
        if report_id is None or str(report_id).strip() == "":
            raise InputError(f"{where}: no 'study_id'")
        label = record.get("label")
        if not isinstance(label, dict):
            raise InputError(f"{where}: 'label' must be an object mapping findings to values")
        statuses: dict[str, str] = {}
        for name, value in label.items():
            finding = match_finding_name(name)
            if finding is not None:
                statuses[finding] = _chexgpt_status(value, finding, where)
        coded.update(statuses)
        _add_unique(gold, str(report_id), _complete(statuses), where)
    return GoldSet("status", gold, tuple(f for f in FINDINGS if f in coded))


def iu_presence_gold(path: str | Path) -> PresenceGold:
    """IU X-ray JSONL to presence of each of the 13 findings from its MeSH codes (DESIGN.md 6).

    Records coded "No Indexing" were never coded by the annotators and are left out.
    """
    path = Path(path)
    gold: PresenceGold = {}
    for number, record in json_lines(path):
        where = f"{path}:{number}"
        mesh = record.get("mesh")
        if "report_id" not in record or not isinstance(mesh, list):
            raise InputError(f"{where}: IU record needs 'report_id' and a 'mesh' list")
        if any(term.strip().lower() == IU_UNCODED for term in mesh):
            continue
        present = set().union(*(iu_mesh_findings(term) for term in mesh)) if mesh else set()
        _add_unique(gold, str(record["report_id"]), {f: f in present for f in FINDINGS}, where)
    return gold


def iu_mesh_findings(term: str) -> set[str]:
    """Findings coded by one MeSH term such as "Opacity/lung/base/left/mild" (head/qualifiers)."""
    head, *rest = [part.strip().lower() for part in term.split("/")]
    qualifiers = set(rest)
    if head == "cardiac shadow":
        return {"Cardiomegaly"} if "enlarged" in qualifiers else set()
    if head == "mediastinum":
        return {"Enlarged Cardiomediastinum"} if qualifiers & IU_ENLARGED_QUALIFIERS else set()
    if head == "thickening":
        return {"Pleural Thickening"} if "pleura" in qualifiers else set()
    findings = set(IU_HEAD_TO_FINDINGS.get(head, ()))
    if findings & {"Lung Lesion", "Lung Opacity"} and qualifiers & IU_NON_LUNG_QUALIFIERS:
        return set()
    return findings


def iu_half(report_id: str) -> IUHalf:
    """DESIGN.md section 6: which half of IU dev a report is in. Read errors only on the development
    half; the locked half is only scored, and its figure is the one to quote."""
    return "locked" if int(hashlib.sha256(report_id.encode()).hexdigest(), 16) % 2 == 1 else "development"


def read_radlabels_jsonl(path: str | Path) -> StatusGold:
    """The radlabels synthetic reports' `peer_labels` as statuses of the 13 findings.

    A peer labeler's output, not gold: several of its findings can map to one of ours (the CheXpert
    aggregation keeps the strongest), its findings outside the 13 are left out, and No Finding follows
    `schema.apply_no_finding_rule` on what is left.
    """
    path = Path(path)
    gold: StatusGold = {}
    for number, record in json_lines(path):
        where = f"{path}:{number}"
        peer = record.get("peer_labels")
        if "report_id" not in record or not isinstance(peer, dict):
            raise InputError(f"{where}: radlabels record needs 'report_id' and a 'peer_labels' object")
        statuses: dict[str, str] = {}
        for name, value in peer.items():
            finding = RADLABELS_TO_FINDING.get(name)
            if finding is None:
                continue
            if value not in RADLABELS_STATUS:
                raise InputError(f"{where}: {name!r} has value {value!r}; expected one of {sorted(RADLABELS_STATUS)}")
            status = RADLABELS_STATUS[value]
            if STATUS_RANK[status] > STATUS_RANK[statuses.get(finding, "not_mentioned")]:
                statuses[finding] = status
        _add_unique(gold, str(record["report_id"]), apply_no_finding_rule(statuses), where)
    return gold


def read_gold(path: str | Path, fmt: str = "auto") -> GoldSet:
    """Read any supported gold file; `fmt` is one of GOLD_FORMATS or "auto" (sniffed from the file)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such gold file")
    fmt = sniff_gold_format(path) if fmt == "auto" else fmt
    if fmt == "labels":
        return GoldSet("status", read_label_jsonl(path))
    if fmt == "chexpert":
        return read_chexpert_csv(path)
    if fmt == "chexgpt":
        return read_chexgpt_jsonl(path)
    if fmt == "iu":
        return GoldSet("presence", iu_presence_gold(path))
    if fmt == "radlabels":
        return GoldSet("status", read_radlabels_jsonl(path))
    raise ValueError(f"unknown gold format {fmt!r}; choose one of auto, {', '.join(GOLD_FORMATS)}")


def sniff_gold_format(path: Path) -> str:
    """CSV is CheXpert; JSONL is told apart by the keys of its first record."""
    if path.suffix.lower() == ".csv":
        return "chexpert"
    for number, record in json_lines(path):
        if "labels" in record:
            return "labels"
        if "label" in record:
            return "chexgpt"
        if "mesh" in record:
            return "iu"
        if "peer_labels" in record:
            return "radlabels"
        raise InputError(
            f"{path}:{number}: cannot tell the gold format (no 'labels', 'label', 'mesh' or 'peer_labels')"
        )
    raise InputError(f"{path}: empty gold file")


def match_finding_name(name: str) -> str | None:
    """The finding a (possibly abbreviated or re-spelled) column name stands for, or None."""
    key = _name_key(name)
    if not key:
        return None
    exact = [f for f in FINDINGS if _name_key(f) == key]
    if exact:
        return exact[0]
    prefixed = [f for f in FINDINGS if _name_key(f).startswith(key)] if len(key) >= 6 else []
    return prefixed[0] if len(prefixed) == 1 else None


def _name_key(name: str) -> str:
    return re.sub(r"[^a-z]", "", name.lower())


def _chexpert_status(value: str | None, finding: str, where: str) -> str:
    text = (value or "").strip()
    if text not in CHEXPERT_TO_STATUS:
        raise InputError(f"{where}: {finding!r} has value {text!r}; expected 1.0, 0.0, -1.0 or blank")
    return CHEXPERT_TO_STATUS[text]


def _chexgpt_status(value: Any, finding: str, where: str) -> str:
    if value is None:
        return "not_mentioned"
    if isinstance(value, bool):
        raise InputError(f"{where}: {finding!r} has boolean value {value}; expected 1, 0, -1 or null")
    if isinstance(value, (int, float)):
        value = f"{float(value):.1f}"
    text = str(value).strip().lower()
    status = CHEXPERT_TO_STATUS.get(text) or VALUE_ALIASES.get(text.replace("_", " ")) or VALUE_ALIASES.get(text)
    if status is None:
        raise InputError(f"{where}: {finding!r} has value {value!r}; expected 1, 0, -1 or null")
    return status


def _complete(statuses: dict[str, str]) -> dict[str, str]:
    """All 13 findings in schema order; a finding the source does not code gets a not_mentioned
    placeholder (the reader's `GoldSet.findings` leaves it out of scoring)."""
    return {f: statuses.get(f, "not_mentioned") for f in FINDINGS}


def _add_unique(gold: dict[str, Any], report_id: str, labels: dict[str, Any], where: str) -> None:
    if report_id in gold:
        raise InputError(f"{where}: report {report_id!r} appears twice")
    gold[report_id] = labels
