"""Readers, ingest and split: every accepted format, the error cases, de-duplication and grouping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import IU_DEV, RADLABELS, needs_shared

from deberta_rad.data import (
    InputError,
    ingest_sources,
    merge_sources,
    normalise_text,
    read_label_records,
    read_reports,
    split_reports,
    write_jsonl,
    write_splits,
)
from deberta_rad.params import Fractions, SyntheticParams
from deberta_rad.schema import FINDINGS, LabelRecord, Report

FRACTIONS = Fractions(train=0.7, val=0.1, test=0.2)


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def labels(report_id: str, **overrides: str) -> LabelRecord:
    statuses = {f: "not_mentioned" for f in FINDINGS}
    statuses.update({k.replace("_", " "): v for k, v in overrides.items()})
    return LabelRecord(report_id=report_id, labels=statuses)


# --- formats --------------------------------------------------------------------------------------


def test_report_jsonl_keeps_optional_fields_and_normalises_whitespace(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "r.jsonl",
        [
            json.dumps(
                {
                    "report_id": "a",
                    "text": "FINDINGS:   No   effusion.\r\n\n\n\nIMPRESSION: XXXX normal.",
                    "patient_id": "p1",
                    "institution": "site-a",
                }
            ),
            "",
            json.dumps({"report_id": "b", "text": "Clear lungs.", "unknown_field": 1}),
        ],
    )
    first, second = read_reports(path)
    assert first.text == "FINDINGS: No effusion.\n\nIMPRESSION: XXXX normal."  # placeholder kept
    assert (first.patient_id, first.institution) == ("p1", "site-a")
    assert second.report_id == "b"


def test_csv_with_report_id_and_text(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "r.csv", ["report_id,text,patient_id", 'x1,"Small left effusion.",p9', "x2,Clear.,"])
    reports = read_reports(path)
    assert [(r.report_id, r.text, r.patient_id) for r in reports] == [
        ("x1", "Small left effusion.", "p9"),
        ("x2", "Clear.", None),
    ]


def test_chexbert_csv_with_report_impression(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "impressions.csv", ["Report Impression", '"1. No acute process."', "Cardiomegaly."])
    reports = read_reports(path)
    assert [r.report_id for r in reports] == ["impressions-1", "impressions-2"]
    assert reports[0].text == "1. No acute process."


def test_iu_jsonl_text_is_findings_and_impression(tmp_path: Path) -> None:
    record = {"report_id": "CXR1", "findings": "The lungs are clear.", "impression": "Normal chest.", "mesh": []}
    (report,) = read_reports(write_lines(tmp_path / "iu.jsonl", [json.dumps(record)]))
    assert report.text == "FINDINGS: The lungs are clear.\nIMPRESSION: Normal chest."
    assert report.institution == "iu-xray"


def test_mimic_txt_folder_takes_ids_from_file_and_patient_folder(tmp_path: Path) -> None:
    study = tmp_path / "files" / "p10" / "p10000032" / "s50414267.txt"
    study.parent.mkdir(parents=True)
    study.write_text(
        "                                 FINAL REPORT\n EXAMINATION:  CHEST (PA AND LAT)\n\n"
        " IMPRESSION:  No acute cardiopulmonary process.\n"
    )
    (report,) = read_reports(tmp_path / "files")
    assert (report.report_id, report.patient_id) == ("s50414267", "p10000032")
    assert report.text.startswith("FINAL REPORT\nEXAMINATION: CHEST (PA AND LAT)")


@needs_shared(IU_DEV)
def test_reads_the_shared_iu_dev_file() -> None:
    reports = read_reports(IU_DEV)
    assert len(reports) == 1867 and all(r.text for r in reports)


@needs_shared(RADLABELS)
def test_reads_the_shared_radlabels_file() -> None:
    assert len(read_reports(RADLABELS)) == 1000


# --- errors name the file and line ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"r\.jsonl:2: not valid JSON"),
        ('["a list"]', r"r\.jsonl:2: expected a JSON object"),
        ('{"report_id": "b"}', r"r\.jsonl:2: no 'text' field"),
        ('{"report_id": "", "text": "x"}', r"r\.jsonl:2: report_id"),
        ('{"report_id": "b", "text": "   "}', r"r\.jsonl:2: report 'b' has empty text"),
        ('{"report_id": "b", "text": 5}', r"r\.jsonl:2: text"),
    ],
)
def test_malformed_jsonl_row_names_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = write_lines(tmp_path / "r.jsonl", [json.dumps({"report_id": "a", "text": "ok"}), line])
    with pytest.raises(InputError, match=message):
        read_reports(path)


def test_csv_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"bad\.csv:1: CSV needs a 'text' or 'Report Impression' column"):
        read_reports(write_lines(tmp_path / "bad.csv", ["id,body", "1,x"]))
    with pytest.raises(InputError, match=r"extra\.csv:3: more fields than the header has"):
        read_reports(write_lines(tmp_path / "extra.csv", ["report_id,text", "a,fine", "b,too,many"]))


def test_unsupported_and_missing_sources(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file or folder"):
        read_reports(tmp_path / "absent.jsonl")
    with pytest.raises(InputError, match="unsupported report source"):
        read_reports(write_lines(tmp_path / "r.xml", ["<r/>"]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"holds no \.txt reports"):
        read_reports(tmp_path / "empty")


def test_non_utf8_txt_report_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "s1.txt").write_bytes(b"caf\xe9")
    with pytest.raises(InputError, match=r"s1\.txt: not UTF-8"):
        read_reports(tmp_path)


def test_label_records_must_hold_the_13_findings_once(tmp_path: Path) -> None:
    good = labels("a").model_dump_json()
    partial = json.dumps({"report_id": "b", "labels": {"Cardiomegaly": "present"}})
    with pytest.raises(InputError, match=r"l\.jsonl:2: labels"):
        read_label_records(write_lines(tmp_path / "l.jsonl", [good, partial]))
    with pytest.raises(InputError, match=r"twice\.jsonl:2: report 'a' is labelled twice"):
        read_label_records(write_lines(tmp_path / "twice.jsonl", [good, good]))
    bad_status = json.dumps({"report_id": "c", "labels": {f: "maybe" for f in FINDINGS}})
    with pytest.raises(InputError, match=r"s\.jsonl:1: labels"):
        read_label_records(write_lines(tmp_path / "s.jsonl", [bad_status]))


def test_errors_never_quote_report_text(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "r.jsonl", [json.dumps({"report_id": 7, "text": "SECRET PATIENT NAME"})])
    with pytest.raises(InputError) as raised:
        read_reports(path)
    assert "SECRET" not in str(raised.value)


# --- ingest ---------------------------------------------------------------------------------------


def test_merge_drops_exact_duplicates_and_counts_them() -> None:
    a = [Report(report_id="a1", text="No effusion."), Report(report_id="a2", text="Cardiomegaly.")]
    b = [Report(report_id="b1", text="No effusion."), Report(report_id="b2", text="Edema.")]
    result = merge_sources([("a", a), ("b", b)])
    assert [r.report_id for r in result.reports] == ["a1", "a2", "b2"]
    assert result.duplicates_dropped == 1
    assert result.per_source == {"a": 2, "b": 2}


def test_merge_refuses_an_id_used_twice() -> None:
    with pytest.raises(InputError, match="report id 'x' occurs in a and in b"):
        merge_sources([("a", [Report(report_id="x", text="one")]), ("b", [Report(report_id="x", text="two")])])


def test_ingest_synthetic_with_a_file_source(tmp_path: Path) -> None:
    extra = write_lines(tmp_path / "extra.jsonl", [json.dumps({"report_id": "ext-1", "text": "Small effusion."})])
    result, gold = ingest_sources(["synthetic", str(extra)], SyntheticParams(n_reports=40, seed=3))
    assert result.per_source == {"synthetic": 40, str(extra): 1}
    assert len(result.reports) == 41 - result.duplicates_dropped
    assert len(gold) == 40  # only the synthetic source carries ground truth
    with pytest.raises(InputError, match=r"ingest\.sources is empty"):
        ingest_sources([], SyntheticParams())


# --- split ----------------------------------------------------------------------------------------


def corpus(n: int) -> list[Report]:
    return [Report(report_id=f"r{i}", text=f"Report number {i}.", patient_id=f"p{i // 3}") for i in range(n)]


def test_split_is_deterministic_and_seeded() -> None:
    reports = corpus(300)
    first, again = split_reports(reports, 13, FRACTIONS), split_reports(list(reversed(reports)), 13, FRACTIONS)
    assert {k: sorted(r.report_id for r in v) for k, v in first.items()} == {
        k: sorted(r.report_id for r in v) for k, v in again.items()
    }
    other = split_reports(reports, 14, FRACTIONS)
    assert [r.report_id for r in other["test"]] != [r.report_id for r in first["test"]]
    assert 0.55 < len(first["train"]) / 300 < 0.85


def test_split_keeps_patients_and_identical_texts_together() -> None:
    reports = [*corpus(300), *(Report(report_id=f"dup{i}", text="Normal chest.") for i in range(20))]
    splits = split_reports(reports, 13, FRACTIONS)
    where = {r.report_id: name for name, group in splits.items() for r in group}
    for patient in range(100):
        assert len({where[f"r{i}"] for i in range(3 * patient, 3 * patient + 3)}) == 1
    assert len({where[f"dup{i}"] for i in range(20)}) == 1


def test_write_splits_writes_reports_labels_and_gold_per_split(tmp_path: Path) -> None:
    reports = corpus(60)
    write_jsonl(tmp_path / "reports.jsonl", reports)
    write_jsonl(tmp_path / "labels.jsonl", [labels(r.report_id, Edema="present") for r in reports])
    write_jsonl(tmp_path / "gold.jsonl", [labels(r.report_id) for r in reports])
    counts = write_splits(
        tmp_path / "reports.jsonl",
        tmp_path / "labels.jsonl",
        tmp_path / "gold.jsonl",
        tmp_path / "splits",
        1,
        FRACTIONS,
    )
    assert sum(counts.values()) == 60
    for name, n in counts.items():
        folder = tmp_path / "splits" / name
        assert len(read_reports(folder / "reports.jsonl")) == n
        assert len(read_label_records(folder / "labels.jsonl")) == n
        assert len(read_label_records(folder / "gold.jsonl")) == n


def test_write_splits_refuses_reports_without_teacher_labels(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "reports.jsonl", corpus(3))
    write_jsonl(tmp_path / "labels.jsonl", [labels("r0")])
    with pytest.raises(InputError, match="2 reports have no teacher label"):
        write_splits(tmp_path / "reports.jsonl", tmp_path / "labels.jsonl", None, tmp_path / "s", 1, FRACTIONS)


def test_normalise_text_is_idempotent() -> None:
    text = "  A\t\tB  \n\n\n\n C\u00a0D "
    assert normalise_text(normalise_text(text)) == normalise_text(text) == "A B\n\nC D"
