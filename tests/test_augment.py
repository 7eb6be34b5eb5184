"""Teacher-labelled augmentation: how reports are cut and recombined, that nothing leaks from val or
test or across institutions, that the teacher labels every variant, and that train refuses id clashes."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
from conftest import project_params

from deberta_rad.augment import (
    augment_reports,
    augment_splits,
    recombined,
    sections,
    variant_counts,
)
from deberta_rad.data import InputError, read_label_records, read_reports, write_jsonl
from deberta_rad.params import AugmentParams
from deberta_rad.schema import Report
from deberta_rad.synthetic import generate_corpus
from deberta_rad.teachers.rules import RuleTeacher
from deberta_rad.train import read_augmented

IU_STYLE = (
    "FINDINGS: The heart is mildly enlarged. Small left pleural effusion. No pneumothorax.\n"
    "IMPRESSION: 1. Cardiomegaly. 2. Small left effusion."
)


def report(report_id: str, text: str, institution: str | None = "a") -> Report:
    return Report(report_id=report_id, text=text, institution=institution)


def test_sections_keep_headers_and_numbered_items_whole() -> None:
    assert sections(IU_STYLE) == [
        ("FINDINGS:", ["The heart is mildly enlarged.", "Small left pleural effusion.", "No pneumothorax."]),
        ("IMPRESSION:", ["1. Cardiomegaly.", "2. Small left effusion."]),
    ]
    assert sections("No acute disease. Lungs clear.") == [("", ["No acute disease.", "Lungs clear."])]
    assert sections("EXAM: CXR\nFINDINGS:\nIMPRESSION: Normal.") == [("EXAM:", ["CXR"]), ("IMPRESSION:", ["Normal."])]


def test_a_variant_keeps_every_section_and_borrows_into_the_section_of_the_same_name() -> None:
    donor = sections("FINDINGS: Borrowed sentence here.")
    config = AugmentParams(per_report=1, drop=0.9, borrow=1)
    for seed in range(20):
        text = recombined(sections(IU_STYLE), [donor], config, random.Random(seed))
        findings, impression = text.split("\n")
        assert findings.startswith("FINDINGS: ") and impression.startswith("IMPRESSION: ")
        assert "Borrowed sentence here." in findings and len(findings) > len("FINDINGS: Borrowed sentence here.")


def test_variants_are_seeded_named_after_their_base_and_borrow_only_within_an_institution() -> None:
    train = [
        report("a1", "FINDINGS: Alpha one. Alpha two. Alpha three.", "a"),
        report("a2", "FINDINGS: Alpha four. Alpha five.", "a"),
        report("b1", "FINDINGS: Beta one. Beta two. Beta three.", "b"),
        report("b2", "FINDINGS: Beta four. Beta five.", "b"),
    ]
    config = AugmentParams(per_report=3, drop=0.3, borrow=2, seed=5)
    variants, left_out = augment_reports(train, config)
    assert variants == augment_reports(train, config)[0]
    assert len(variants) + left_out == 3 * len(train)
    for variant in variants:
        base_id, _, k = variant.report_id.partition("~aug")
        assert base_id in {r.report_id for r in train} and k.isdigit()
        assert variant.institution == base_id[0]
        assert ("Beta" if variant.institution == "a" else "Alpha") not in variant.text
    assert len({v.text for v in variants}) == len(variants)


def test_a_variant_equal_to_a_held_out_or_train_text_is_left_out_and_counted() -> None:
    train = [report("t1", "FINDINGS: No effusion. No pneumothorax.")]
    held_out = ["FINDINGS: No effusion.", "FINDINGS: No pneumothorax."]
    variants, left_out = augment_reports(train, AugmentParams(per_report=8, drop=0.5, borrow=0), held_out)
    assert variants == [] and left_out == 8


def test_a_report_with_a_rare_pair_gets_more_variants_when_rare_threshold_is_set() -> None:
    train = [report(f"n{i}", "FINDINGS: No pneumothorax.") for i in range(99)]
    train.append(report("ptx", "FINDINGS: Small right apical pneumothorax."))
    labels = {r.report_id: r.labels for r in RuleTeacher().label(train)}
    assert labels["ptx"]["Pneumothorax"] == "present"
    uniform = variant_counts(train, labels, AugmentParams(per_report=2))
    assert uniform == [2] * len(train)
    boosted = variant_counts(train, labels, AugmentParams(per_report=2, rare_threshold=0.1))
    assert boosted[-1] in (2 * 3, 2 * 4) and set(boosted[:-1]) == {2}  # sqrt(0.1 / 0.01) = 3.16, seeded rounding


def write_split_dirs(root: Path, train: list[Report]) -> Path:
    write_jsonl(root / "train" / "reports.jsonl", train)
    write_jsonl(root / "train" / "labels.jsonl", RuleTeacher().label(train))
    for name in ("val", "test"):
        write_jsonl(root / name / "reports.jsonl", [])
    return root


def test_the_stage_labels_every_variant_with_the_pipelines_teacher(tmp_path: Path) -> None:
    train = [r for r, _ in generate_corpus(40, seed=3)]
    splits = write_split_dirs(tmp_path / "splits", train)
    params = project_params({"augment": {"per_report": 2}})
    summary = augment_splits(splits, tmp_path / "augmented", params)
    variants = read_reports(tmp_path / "augmented" / "reports.jsonl")
    records = read_label_records(tmp_path / "augmented" / "labels.jsonl")
    assert summary["variants"] == len(variants) > 60 and summary["train_reports"] == 40
    assert [r.report_id for r in records] == [v.report_id for v in variants]
    assert [r.labels for r in records] == [r.labels for r in RuleTeacher().label(variants)]


def test_a_teacher_that_fails_leaves_the_old_variants_with_their_labels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    splits = write_split_dirs(tmp_path / "splits", [r for r, _ in generate_corpus(20, seed=3)])
    augment_splits(splits, tmp_path / "augmented", project_params({"augment": {"per_report": 1}}))
    before = {p.name: p.read_bytes() for p in (tmp_path / "augmented").iterdir()}

    def failing_teacher(*args: object, **kwargs: object) -> None:
        raise InputError("the LLM endpoint is down")

    monkeypatch.setattr("deberta_rad.teachers.write_labels", failing_teacher)
    with pytest.raises(InputError, match="endpoint is down"):  # new variants (another seed), same ids
        augment_splits(splits, tmp_path / "augmented", project_params({"augment": {"per_report": 1, "seed": 9}}))
    assert {p.name: p.read_bytes() for p in (tmp_path / "augmented").iterdir()} == before


def test_per_report_zero_writes_empty_files_that_train_reads_as_none(tmp_path: Path) -> None:
    train = [report("t1", IU_STYLE)]
    splits = write_split_dirs(tmp_path / "splits", train)
    params = project_params({"augment": {"per_report": 0}})
    assert augment_splits(splits, tmp_path / "augmented", params)["variants"] == 0
    assert read_augmented(tmp_path / "augmented", train) == ([], [])


def test_the_stage_names_train_reports_without_a_teacher_label(tmp_path: Path) -> None:
    splits = write_split_dirs(tmp_path / "splits", [report("t1", IU_STYLE)])
    write_jsonl(splits / "train" / "reports.jsonl", [report("t1", IU_STYLE), report("t2", IU_STYLE)])
    params = project_params({"augment": {"per_report": 1}})
    with pytest.raises(InputError, match=re.escape("train/labels.jsonl: 1 reports have no teacher label, e.g. ['t2']")):
        augment_splits(splits, tmp_path / "augmented", params)


def test_train_refuses_variants_that_are_unlabelled_or_reuse_train_ids(tmp_path: Path) -> None:
    train = [report("t1", IU_STYLE)]
    variant = report("t1~aug0", "FINDINGS: No pneumothorax.")
    write_jsonl(tmp_path / "augmented" / "reports.jsonl", [variant])
    write_jsonl(tmp_path / "augmented" / "labels.jsonl", [])
    with pytest.raises(InputError, match=re.escape("1 reports have no label, e.g. ['t1~aug0']")):
        read_augmented(tmp_path / "augmented", train)
    write_jsonl(tmp_path / "augmented" / "reports.jsonl", train)
    write_jsonl(tmp_path / "augmented" / "labels.jsonl", RuleTeacher().label(train))
    with pytest.raises(InputError, match="also train ids"):
        read_augmented(tmp_path / "augmented", train)
