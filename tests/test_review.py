"""Radiologist review without a server: choosing what to review, the store, the checks on pulled
annotations, and how reviewed labels enter the split, the sentences and training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import project_params

from deberta_rad.data import AppendOnlyStore, InputError, read_label_records, write_jsonl, write_split, write_splits
from deberta_rad.params import Fractions, Params, ReviewParams
from deberta_rad.review import (
    REVIEW_TEACHER,
    PullResult,
    append_new_reviews,
    convention_problems,
    diverse_top,
    finding_uncertainty,
    is_gold,
    normalised_no_finding,
    pair_rarity,
    read_selection,
    review_rows,
    reviewed_for_split,
    reviewed_records,
    reviewed_sentence_examples,
    reviewer_pseudonym,
    score_candidates,
    select_for_review,
    write_selection,
)
from deberta_rad.schema import FINDINGS, STATUSES, LabelRecord, Report, apply_no_finding_rule

NORMAL = apply_no_finding_rule({})


def labels(**statuses: str) -> dict[str, str]:
    """All 13 findings, the named ones as given (underscores for spaces), No Finding by the convention."""
    return apply_no_finding_rule({f.replace("_", " "): s for f, s in statuses.items()})


def prediction(report_id: str, labels_: dict[str, str], sure: float = 0.97) -> LabelRecord:
    """A student record whose chosen status has probability `sure`, the rest spread evenly."""
    rest = (1 - sure) / 3
    probabilities = {f: {s: sure if s == labels_[f] else rest for s in STATUSES} for f in FINDINGS}
    return LabelRecord(report_id=report_id, labels=labels_, probabilities=probabilities)


def test_uncertainty_is_low_for_a_sure_prediction_and_one_for_a_tie() -> None:
    sure = np.array([[0.97, 0.01, 0.01, 0.01]])
    tie = np.array([[0.5, 0.5, 0.0, 0.0]])
    for kind in ("margin", "entropy"):
        assert finding_uncertainty(sure, kind)[0] < 0.3
    assert finding_uncertainty(tie, "margin")[0] == pytest.approx(1.0)
    assert finding_uncertainty(np.full((1, 4), 0.25), "entropy")[0] == pytest.approx(1.0)


def test_a_report_with_a_rare_finding_and_status_is_rarer() -> None:
    pool = [NORMAL] * 8 + [labels(Cardiomegaly="present")] * 3 + [labels(Pneumothorax="uncertain")]
    rarity = pair_rarity(pool)
    assert rarity[0] == 0  # No Finding and not_mentioned do not count
    assert rarity[-1] > rarity[8] > 0


def test_disagreement_uncertainty_and_rarity_each_raise_a_report() -> None:
    reports = [Report(report_id=f"r{i}", text=f"Report {i}.") for i in range(4)]
    student = [
        prediction("r0", NORMAL),
        prediction("r1", NORMAL, sure=0.4),  # unsure
        prediction("r2", NORMAL),  # the teacher says otherwise
        prediction("r3", NORMAL),
    ]
    teacher = {"r0": NORMAL, "r1": NORMAL, "r2": labels(Edema="present"), "r3": NORMAL}
    config = ReviewParams(weights={"uncertainty": 1.0, "disagreement": 1.0, "rarity": 0.0})
    scores = {c.report.report_id: c for c in score_candidates(reports, student, teacher, config)}
    assert scores["r1"].uncertainty == 1.0 and scores["r2"].disagreement == 1.0
    assert scores["r0"].score < scores["r1"].score and scores["r0"].score < scores["r2"].score
    assert scores["r2"].rarity == 1.0  # Edema present once in the pool (teacher labels)


def test_selection_skips_reviewed_reports_and_near_duplicates_and_is_repeatable() -> None:
    texts = [
        "Heart size is normal. Small left pleural effusion.",
        "Heart size is normal. Small left pleural effusion.  ",  # the same text, other whitespace
        "Heart size is normal. Small right pleural effusion.",
        "No pneumothorax. Lungs are clear.",
        "Mild cardiomegaly without edema.",
    ]
    reports = [Report(report_id=f"r{i}", text=t) for i, t in enumerate(texts)]
    student = [prediction(r.report_id, NORMAL, sure=0.5 + 0.1 * i) for i, r in enumerate(reports)]
    reviewed = [Report(report_id="old", text=texts[4])]
    config = ReviewParams(max_similarity=0.5)
    first = select_for_review(reports, student, {}, reviewed, 3, config)
    chosen = [c.report.report_id for c in first.chosen]
    assert "r4" not in chosen and first.already_reviewed == 1  # same text as a reviewed report
    assert not {"r0", "r1"} <= set(chosen) and first.near_duplicates_skipped >= 1
    assert [c.report.report_id for c in select_for_review(reports, student, {}, reviewed, 3, config).chosen] == chosen
    with pytest.raises(InputError, match="no student prediction"):
        select_for_review(reports, student[:2], {}, [], 1, config)


def test_diverse_top_keeps_to_the_budget() -> None:
    reports = [Report(report_id=f"r{i}", text=f"finding number {i} seen") for i in range(10)]
    candidates = score_candidates(reports, [prediction(r.report_id, NORMAL) for r in reports], {}, ReviewParams())
    chosen, skipped = diverse_top(candidates, 4, 0.9)
    assert len(chosen) == 4 and skipped == 0


def test_the_selection_file_round_trips_and_a_foreign_file_is_named(tmp_path: Path) -> None:
    reports = [Report(report_id="r0", text="Small effusion.", institution="north")]
    selection = select_for_review(reports, [prediction("r0", NORMAL)], {}, [], 1, ReviewParams())
    write_selection(tmp_path / "selected.jsonl", selection, "models/student")
    (row,) = read_selection(tmp_path / "selected.jsonl")
    assert row["institution"] == "north" and row["prediction"] == NORMAL and row["model"] == "models/student"
    (tmp_path / "other.jsonl").write_text(json.dumps({"report_id": "x", "text": "t"}) + "\n")
    with pytest.raises(InputError, match=r"other.jsonl:1: not a line of `deberta-rad review select`"):
        read_selection(tmp_path / "other.jsonl")


def test_the_no_finding_convention_is_checked() -> None:
    assert convention_problems(NORMAL) == []
    assert convention_problems(labels(Edema="present")) == []
    both = {**labels(Edema="present"), "No Finding": "present"}
    assert "No Finding is present beside Edema" in convention_problems(both)[0]
    neither = {**NORMAL, "No Finding": "absent"}
    assert "no other finding is present or uncertain" in convention_problems(neither)[0]
    missing = {f: s for f, s in NORMAL.items() if f != "Fracture"}
    assert convention_problems(missing) == ["no status for Fracture"]
    assert normalised_no_finding({**labels(Edema="uncertain"), "No Finding": "absent"})["No Finding"] == "not_mentioned"


def store_row(report_id: str, statuses: dict[str, str], annotation: int, at: str) -> dict:
    return {
        "report_id": report_id,
        "text": f"text of {report_id}",
        "labels": statuses,
        "teacher": REVIEW_TEACHER.model_dump(exclude_none=True),
        "project": 1,
        "task": annotation,
        "annotation": annotation,
        "reviewed_at": at,
    }


def test_the_store_appends_only_what_is_new_and_the_latest_review_wins(tmp_path: Path) -> None:
    store = AppendOnlyStore(tmp_path / "reviewed/labels.jsonl")
    first = [store_row("a", NORMAL, 1, "t1"), store_row("b", labels(Edema="present"), 2, "t1")]
    result = PullResult()
    append_new_reviews(store, first, result)
    append_new_reviews(store, first, result)  # a second pull of the same annotations
    assert (result.appended, result.already_stored) == (2, 2)
    edited = store_row("b", labels(Edema="absent"), 2, "t2")
    append_new_reviews(store, [edited], result)
    assert len(store.records()) == 3
    latest = reviewed_records(store.path)["b"]
    assert latest["labels"]["Edema"] == "absent" and latest["teacher"] == REVIEW_TEACHER.model_dump(exclude_none=True)


def test_a_bad_store_line_is_named_by_number_without_its_text(tmp_path: Path) -> None:
    store = AppendOnlyStore(tmp_path / "labels.jsonl")
    store.append_rows([store_row("a", NORMAL, 1, "t1"), {"report_id": "b", "text": "secret words of b"}])
    with pytest.raises(InputError, match=r"labels.jsonl: record 2: labels: Field required") as refused:
        reviewed_records(store.path)
    assert "secret" not in str(refused.value)
    store.path.write_text(store.path.read_text().splitlines()[0] + '\n{"report_id": "c", "te')  # torn by a crash
    assert list(reviewed_records(store.path)) == ["a"]
    assert store.path.read_text().endswith('"te'), "a reader leaves the store (a DVC dependency) as it is"


def task_with(*results: list[dict], ground_truth: int | None = None) -> dict:
    annotations = [
        {"id": i, "result": result, "completed_by": i, "ground_truth": i == ground_truth, "updated_at": f"t{i}"}
        for i, result in enumerate(results)
    ]
    return {"id": 5, "data": {"report_id": "r5", "text": "Some report."}, "annotations": annotations}


def test_pull_settles_agreement_and_ground_truth_and_refuses_what_it_cannot_read() -> None:
    from deberta_rad.label_studio import prediction_result

    edema = prediction_result(labels(Edema="present"))
    normal = prediction_result(NORMAL)
    broken = [{**edema[0], "value": {"choices": []}}]
    cases = {
        "agreed": task_with(edema, edema),
        "ground truth": task_with(edema, normal, ground_truth=1),
        "disagree": task_with(edema, normal),
        "unreadable": task_with(edema, broken),
    }
    settled = {}
    for name, task in cases.items():
        result = PullResult()
        rows = review_rows([task], "http://ls", 1, result)
        settled[name] = (rows[0]["settled_by"], rows[0]["labels"]) if rows else result.refused
    assert settled["agreed"] == ("agreed", labels(Edema="present"))
    assert settled["ground truth"] == ("ground truth", NORMAL)
    assert "2 annotations disagree" in settled["disagree"][0]
    assert settled["unreadable"][0].startswith("task 5 (report 'r5'): an annotation cannot be read")


def test_a_task_everyone_skipped_is_counted_apart_from_one_nobody_opened() -> None:
    skipped = task_with([]) | {"annotations": [{"id": 1, "result": [], "was_cancelled": True}]}
    result = PullResult()
    assert review_rows([skipped, task_with()], "http://ls", 1, result) == []
    assert (result.skipped, result.not_annotated, result.refused) == (1, 1, [])
    assert "1 tasks await review, 1 skipped by all who opened them" in result.describe(Path("store.jsonl"))


def test_gold_is_a_stable_share_of_the_reviewed_ids() -> None:
    ids = [f"r{i}" for i in range(2000)]
    gold = [rid for rid in ids if is_gold(rid, 13, 0.3)]
    assert 0.25 < len(gold) / len(ids) < 0.35
    assert gold == [rid for rid in ids if is_gold(rid, 13, 0.3)]
    assert not any(is_gold(rid, 13, 0.0) for rid in ids) and all(is_gold(rid, 13, 1.0) for rid in ids)


def test_the_split_puts_reviewed_gold_in_test_and_writes_the_reviewed_labels_beside_the_teachers(
    tmp_path: Path,
) -> None:
    reports = [Report(report_id=f"r{i}", text=f"Report number {i}.", patient_id=f"p{i % 20}") for i in range(60)]
    write_jsonl(tmp_path / "reports.jsonl", reports)
    write_jsonl(tmp_path / "labels.jsonl", [LabelRecord(report_id=r.report_id, labels=NORMAL) for r in reports])
    store = AppendOnlyStore(tmp_path / "reviewed.jsonl")
    store.append_rows(
        [store_row(f"r{i}", labels(Edema="present"), i, "t") | {"text": f"Report number {i}."} for i in range(30)]
    )
    store.append_rows([store_row("elsewhere", NORMAL, 99, "t")])
    config = ReviewParams(gold_fraction=0.5)
    reviewed, gold, outside = reviewed_for_split(store.path, reports, config)
    assert outside == ["elsewhere"] and len(reviewed) == 30 and 0 < len(gold) < 30
    counts = write_splits(
        tmp_path / "reports.jsonl",
        tmp_path / "labels.jsonl",
        None,
        tmp_path / "splits",
        13,
        Fractions(),
        reviewed,
        gold,
    )
    test_ids = {r.report_id for r in read_label_records(tmp_path / "splits/test/labels.jsonl")}
    patients = {r.report_id: r.patient_id for r in reports}
    assert gold <= test_ids  # gold is held out, with every report of its patients
    assert {patients[rid] for rid in test_ids} >= {patients[rid] for rid in gold}
    train_ids = {r.report_id for r in read_label_records(tmp_path / "splits/train/labels.jsonl")}
    assert not {patients[rid] for rid in train_ids} & {patients[rid] for rid in gold}
    in_splits = [
        r
        for name in ("train", "val", "test")
        for r in read_label_records_if(tmp_path / f"splits/{name}/reviewed.jsonl")
    ]
    assert sorted(r.report_id for r in in_splits) == sorted(reviewed)
    assert all(r.labels["Edema"] == "present" and r.teacher == REVIEW_TEACHER for r in in_splits)
    assert counts["test reviewed"] >= len(gold)
    clash = [store_row("r0", NORMAL, 100, "t2") | {"text": "another text"}]
    store.append_rows(clash)
    with pytest.raises(InputError, match="name another text in the corpus"):
        reviewed_for_split(store.path, reports, config)


def read_label_records_if(path: Path) -> list[LabelRecord]:
    return read_label_records(path) if path.is_file() else []


def sentence_record(sid: str, **statuses: str) -> LabelRecord:
    return LabelRecord(report_id=sid, labels={**labels(**statuses), "No Finding": "not_mentioned"})


def test_reviews_correct_the_sentences_and_add_the_report_where_no_sentence_can_carry_them() -> None:
    sentences = {
        "s1": sentence_record("s1", Pleural_Effusion="present"),
        "s2": sentence_record("s2", Pneumothorax="absent"),
        "s3": sentence_record("s3", Cardiomegaly="present"),
    }
    struck = Report(report_id="a", text="Effusion? No pneumothorax.")
    review_a = LabelRecord(report_id="a", labels=labels(Pneumothorax="absent"), teacher=REVIEW_TEACHER)
    missed = Report(report_id="b", text="Heart enlarged. The costophrenic angle is blunted.")
    review_b = LabelRecord(
        report_id="b", labels=labels(Cardiomegaly="present", Pleural_Effusion="present"), teacher=REVIEW_TEACHER
    )
    corrected, examples = reviewed_sentence_examples(
        [(struck, review_a), (missed, review_b)], sentences, {"a": ["s1", "s2"], "b": ["s3"]}
    )
    assert corrected["s1"].labels["Pleural Effusion"] == "not_mentioned"  # struck out by the reviewer
    assert "s2" not in corrected and "s3" not in corrected  # confirmed: they keep the teacher's provenance
    assert all(r.teacher == REVIEW_TEACHER and r.labels["No Finding"] == "not_mentioned" for r in corrected.values())
    # Report b's effusion is in no sentence the teacher labelled: the whole report carries it.
    ((report, record),) = examples
    assert report.report_id == "review-b" and report.text == missed.text
    assert record.labels["Pleural Effusion"] == "present" and record.teacher == REVIEW_TEACHER


def test_a_finding_the_reviewer_rates_stronger_is_raised_in_the_sentence_that_hedged_it() -> None:
    sentences = {
        "hedge": sentence_record("hedge", Pleural_Effusion="uncertain"),  # "Possible small left effusion."
        "negation": sentence_record("negation", Pleural_Effusion="absent"),  # "No effusion on the right."
        "heart": sentence_record("heart"),  # "Heart size normal."
    }
    hedged = Report(report_id="a", text="Possible small left effusion. No effusion on the right. Heart size normal.")
    read_as_present = LabelRecord(report_id="a", labels=labels(Pleural_Effusion="present"), teacher=REVIEW_TEACHER)
    sentences_of = {"a": ["hedge", "negation", "heart"], "b": ["hedge", "heart"]}

    corrected, examples = reviewed_sentence_examples([(hedged, read_as_present)], sentences, sentences_of)

    assert corrected["hedge"].labels["Pleural Effusion"] == "present"
    assert "negation" not in corrected and "heart" not in corrected  # the strongest mention only
    assert examples == []  # the sentences carry the review: no whole-report example

    # Another reviewed report holds the same sentence and keeps it hedged: the sentence stays as the
    # weaker review has it, and report a's effusion can only come as a whole-report example.
    kept = Report(report_id="b", text="Possible small left effusion. Heart size normal.")
    kept_hedged = LabelRecord(report_id="b", labels=labels(Pleural_Effusion="uncertain"), teacher=REVIEW_TEACHER)
    corrected, examples = reviewed_sentence_examples(
        [(hedged, read_as_present), (kept, kept_hedged)], sentences, sentences_of
    )
    assert "hedge" not in corrected
    assert [report.report_id for report, _ in examples] == ["review-a"]


@pytest.mark.parametrize("report_examples", [True, False])
def test_the_sentences_stage_takes_a_missed_finding_as_a_report_example_only_when_params_say_so(
    tmp_path: Path, report_examples: bool
) -> None:
    from deberta_rad.sentences import label_sentence_splits
    from deberta_rad.teachers import get_teacher

    missed = Report(report_id="b", text="The heart is enlarged. Deformity of the left sixth rib.")
    normal = Report(report_id="c", text="No pleural effusion. Lungs are clear.")
    teacher = {r.report_id: r for r in get_teacher("rules").label([missed, normal])}
    assert teacher["b"].labels["Fracture"] == "not_mentioned"  # the rules do not read the deformity as one
    review = LabelRecord(
        report_id="b",
        labels=apply_no_finding_rule({**teacher["b"].labels, "Fracture": "present"}),
        teacher=REVIEW_TEACHER,
    )
    write_split(tmp_path / "splits/train", [missed], teacher, {}, {"b": review})
    write_split(tmp_path / "splits/val", [normal], teacher, {}, {})
    write_split(tmp_path / "splits/test", [], teacher, {}, {})
    params = project_params({"sentences": {"review_report_examples": report_examples, "mention_swaps": 0}})

    summary = label_sentence_splits(tmp_path / "splits", None, tmp_path / "sentences", params)

    train = {r.report_id: r for r in read_label_records(tmp_path / "sentences/train/labels.jsonl")}
    assert ("review-b" in train) == report_examples
    assert summary["reviewed_reports_left_out"] == (0 if report_examples else 1)
    if report_examples:
        assert train["review-b"].labels["Fracture"] == "present"


def test_reviewer_ids_are_stable_pseudonyms() -> None:
    first = reviewer_pseudonym("http://127.0.0.1:8080/", 7)
    assert first == reviewer_pseudonym("http://127.0.0.1:8080", {"id": 7, "email": "dr.who@example.org"})
    assert first != reviewer_pseudonym("http://127.0.0.1:8080", 8)
    assert first.startswith("reviewer-") and "dr.who" not in first


def test_training_emphasises_the_examples_whose_labels_a_review_changed(tmp_path: Path) -> None:
    from deberta_rad.train import TrainConfig, reviewed_example_ids

    teacher = [
        LabelRecord(report_id="a", labels=labels(Cardiomegaly="present")),
        LabelRecord(report_id="b", labels=NORMAL),
    ]
    write_jsonl(tmp_path / "splits/train/labels.jsonl", teacher)
    reviews = [LabelRecord(report_id=rid, labels=NORMAL, teacher=REVIEW_TEACHER) for rid in ("a", "b")]
    write_jsonl(tmp_path / "splits/train/reviewed.jsonl", reviews)
    assert reviewed_example_ids(TrainConfig(unit="report"), tmp_path / "splits", None) == {"a"}  # b was confirmed
    sentence_labels = [sentence_record("s-1"), sentence_record("s-2").model_copy(update={"teacher": REVIEW_TEACHER})]
    write_jsonl(tmp_path / "sentences/train/labels.jsonl", sentence_labels)
    assert reviewed_example_ids(TrainConfig(unit="sentence"), tmp_path / "splits", tmp_path / "sentences") == {"s-2"}
    assert TrainConfig.from_params(Params()).review_repeat == ReviewParams().repeat


def test_review_repeat_confirmed_emphasises_every_reviewed_example(tmp_path: Path) -> None:
    from deberta_rad.sentences import report_sentences, sentence_id
    from deberta_rad.train import TrainConfig, reviewed_example_ids

    texts = {
        "a": "FINDINGS: The heart is enlarged.",
        "b": "FINDINGS: No pneumothorax. Lungs are clear.",
        "c": "FINDINGS: Normal.",
    }
    write_jsonl(tmp_path / "splits/train/reports.jsonl", [Report(report_id=k, text=v) for k, v in texts.items()])
    write_jsonl(tmp_path / "splits/train/labels.jsonl", [LabelRecord(report_id=k, labels=NORMAL) for k in texts])
    reviews = [LabelRecord(report_id=rid, labels=NORMAL, teacher=REVIEW_TEACHER) for rid in ("a", "b")]
    write_jsonl(tmp_path / "splits/train/reviewed.jsonl", reviews)  # both confirmed
    write_jsonl(tmp_path / "sentences/train/labels.jsonl", [sentence_record("s-1")])
    confirmed = TrainConfig(unit="report", review_repeat_confirmed=True)
    assert reviewed_example_ids(confirmed, tmp_path / "splits", None) == {"a", "b"}
    sentences = {sentence_id(s) for rid in ("a", "b") for s in report_sentences(texts[rid])}
    assert len(sentences) == 3
    by_sentence = confirmed.model_copy(update={"unit": "sentence"})
    assert reviewed_example_ids(by_sentence, tmp_path / "splits", tmp_path / "sentences") == sentences
    assert TrainConfig.from_params(Params()).review_repeat_confirmed is ReviewParams().repeat_confirmed
