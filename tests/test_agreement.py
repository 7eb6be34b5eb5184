"""Teacher agreement: per finding and status, a rows and b columns, nothing dropped silently."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deberta_rad.cli import app
from deberta_rad.data import write_jsonl
from deberta_rad.schema import FINDINGS, STATUS_INDEX, Report
from deberta_rad.teachers.agreement import format_agreement_table, teacher_agreement


def labels(**overrides: str) -> dict[str, str]:
    """All findings not mentioned except the overrides (underscores stand for spaces)."""
    result = dict.fromkeys(FINDINGS, "not_mentioned")
    result.update({name.replace("_", " "): status for name, status in overrides.items()})
    return result


RULES = {
    "r1": labels(Pneumothorax="present", Edema="absent"),
    "r2": labels(Pneumothorax="present"),
    "r3": labels(Pneumothorax="absent"),
    "r4": labels(Pneumothorax="uncertain"),
    "only_rules": labels(),
}
LLM = {
    "r1": labels(Pneumothorax="absent", Edema="absent"),
    "r2": labels(Pneumothorax="absent"),
    "r3": labels(Pneumothorax="absent"),
    "r4": labels(Pneumothorax="uncertain"),
    "only_llm": labels(),
}


def test_counts_cross_tab_with_a_in_rows_and_b_in_columns() -> None:
    result = teacher_agreement(RULES, LLM)

    pneumothorax = result["per_finding"]["Pneumothorax"]
    present, absent = STATUS_INDEX["present"], STATUS_INDEX["absent"]
    assert pneumothorax["crosstab"][present][absent] == 2
    assert pneumothorax["crosstab"][absent][present] == 0
    assert pneumothorax["agreement"] == pytest.approx(2 / 4)
    assert pneumothorax["n_disagreements"] == 2
    assert pneumothorax["most_common_disagreement"] == {"a": "present", "b": "absent", "count": 2}
    assert sum(map(sum, pneumothorax["crosstab"])) == 4


def test_kappa_matches_the_textbook_value() -> None:
    # Pneumothorax rows (rules) present 2, absent 1, uncertain 1; columns (llm) absent 3, uncertain 1.
    # p_o = 2/4; p_e = (1*3 + 1*1) / 16 = 1/4; kappa = (1/2 - 1/4) / (3/4) = 1/3.
    result = teacher_agreement(RULES, LLM)
    assert result["per_finding"]["Pneumothorax"]["kappa"] == pytest.approx(1 / 3)


def test_identical_constant_labels_have_full_agreement_and_undefined_kappa() -> None:
    result = teacher_agreement(RULES, LLM)
    atelectasis = result["per_finding"]["Atelectasis"]
    assert atelectasis["agreement"] == 1.0
    assert atelectasis["kappa"] is None
    assert atelectasis["most_common_disagreement"] is None


def test_reports_held_by_one_teacher_are_reported_not_dropped() -> None:
    result = teacher_agreement(RULES, LLM)
    assert result["n_reports"] == 4
    assert result["n_cells"] == 4 * len(FINDINGS)
    assert result["only_in_a"] == ["only_rules"]
    assert result["only_in_b"] == ["only_llm"]


def test_overall_and_per_status_figures() -> None:
    result = teacher_agreement(RULES, LLM)
    cells = 4 * len(FINDINGS)
    assert result["agreement"] == pytest.approx((cells - 2) / cells)
    assert 0 < result["kappa"] < 1
    present = result["per_status"]["present"]
    assert (present["n_a"], present["n_b"], present["both"]) == (2, 0, 0)
    assert present["specific_agreement"] == 0.0
    assert result["per_status"]["uncertain"]["specific_agreement"] == 1.0


def test_no_shared_reports_or_broken_records_are_errors() -> None:
    with pytest.raises(ValueError, match="share no report ids"):
        teacher_agreement({"x": labels()}, {"y": labels()})
    broken = {"r1": {**labels(), "Edema": "maybe"}}
    with pytest.raises(ValueError, match="r1"):
        teacher_agreement(broken, {"r1": labels()})


def test_table_shows_agreement_kappa_and_the_most_common_disagreement() -> None:
    table = format_agreement_table(teacher_agreement(RULES, LLM), "rules", "llm")

    pneumothorax_line = next(line for line in table.splitlines() if line.startswith("Pneumothorax"))
    assert "50.0%" in pneumothorax_line
    assert "0.333" in pneumothorax_line
    assert "present→absent: 2" in pneumothorax_line
    assert "only in rules: 1 (only_rules)" in table
    assert "only in llm: 1 (only_llm)" in table
    assert "Cohen's kappa" in table
    assert all(finding in table for finding in FINDINGS)


def test_agreement_command_names_the_teachers_and_writes_json(tmp_path: Path) -> None:
    from deberta_rad.teachers import label_reports

    reports = [
        Report(report_id="a", text="No pneumothorax. Small left pleural effusion."),
        Report(report_id="b", text="Possible right lower lobe pneumonia. Heart size normal."),
    ]
    for teacher in ("rules", "keyword"):
        records, _ = label_reports(teacher, reports)
        write_jsonl(tmp_path / f"{teacher}.jsonl", records)
    result = CliRunner().invoke(
        app,
        [
            "agreement",
            str(tmp_path / "rules.jsonl"),
            str(tmp_path / "keyword.jsonl"),
            "--json",
            str(tmp_path / "a.json"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "rules:vocabulary" in result.output and "keyword:keywords" in result.output
    written = json.loads((tmp_path / "a.json").read_text())
    assert written["n_reports"] == 2 and set(written["per_finding"]) == set(FINDINGS)


def test_agreement_command_fails_clearly_without_shared_reports(tmp_path: Path) -> None:
    from deberta_rad.teachers import label_reports

    for name, rid in (("one", "a"), ("two", "b")):
        records, _ = label_reports("rules", [Report(report_id=rid, text="Normal chest.")])
        write_jsonl(tmp_path / f"{name}.jsonl", records)
    result = CliRunner().invoke(app, ["agreement", str(tmp_path / "one.jsonl"), str(tmp_path / "two.jsonl")])
    assert result.exit_code == 2 and "share no report ids" in result.output
