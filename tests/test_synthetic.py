"""The embedded synthetic corpus: deterministic, complete, consistent with its labels, two institutions."""

from __future__ import annotations

import re
from collections import Counter
from itertools import pairwise

import pytest

from deberta_rad.schema import FINDINGS, LabelRecord, Report, apply_no_finding_rule
from deberta_rad.synthetic import (
    NORMAL_IMPRESSIONS,
    STYLE_SPECS,
    generate_corpus,
    write_corpus,
)

Corpus = list[tuple[Report, LabelRecord]]
LABELLED = [f for f in FINDINGS if f != "No Finding"]


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return generate_corpus(1000, seed=7)


def _style(report: Report) -> str:
    return report.report_id.split("-")[1]


def _indication(report: Report) -> str:
    return re.search(r"^(?:INDICATION|HISTORY): (.*)$", report.text, re.MULTILINE).group(1)


def _after_indication(report: Report) -> str:
    return report.text.split("\nCOMPARISON:", 1)[1]


def _status_shares(corpus: Corpus, style: str) -> dict[str, float]:
    counts = Counter(rec.labels[f] for rep, rec in corpus if _style(rep) == style for f in LABELLED)
    return {status: n / sum(counts.values()) for status, n in counts.items()}


def test_same_seed_writes_identical_files_and_another_seed_differs(tmp_path):
    first = write_corpus(tmp_path / "a", 200, seed=3)
    again = write_corpus(tmp_path / "b", 200, seed=3)
    other = write_corpus(tmp_path / "c", 200, seed=4)
    assert [p.name for p in first] == ["reports.jsonl", "labels.jsonl"]
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in again]
    assert first[0].read_bytes() != other[0].read_bytes()


def test_written_files_validate_and_align(tmp_path):
    reports_path, labels_path = write_corpus(tmp_path / "corpus", 50, seed=1)
    reports = [Report.model_validate_json(line) for line in reports_path.read_text().splitlines()]
    labels = [LabelRecord.model_validate_json(line) for line in labels_path.read_text().splitlines()]
    assert len(reports) == len(labels) == 50
    assert [r.report_id for r in reports] == [lab.report_id for lab in labels]
    assert all(r.institution and r.patient_id and r.study_date for r in reports)
    assert len({r.report_id for r in reports}) == 50


def test_every_finding_appears_present_absent_and_uncertain(corpus):
    for finding in LABELLED:
        seen = {rec.labels[finding] for _, rec in corpus}
        assert {"present", "absent", "uncertain", "not_mentioned"} <= seen, finding
    # The No Finding rule only ever yields present or not mentioned.
    assert {rec.labels["No Finding"] for _, rec in corpus} == {"present", "not_mentioned"}


def test_both_styles_present_with_their_institutions(corpus):
    institutions: dict[str, set[str | None]] = {}
    for rep, _ in corpus:
        institutions.setdefault(_style(rep), set()).add(rep.institution)
    assert institutions == {style: {spec.institution} for style, spec in STYLE_SPECS.items()}
    assert all("___" in rep.text for rep, _ in corpus if _style(rep) == "narrative")
    assert all(rep.text.startswith("EXAM: ") for rep, _ in corpus if _style(rep) == "templated")


def test_label_records_are_complete_and_follow_the_no_finding_rule(corpus):
    for _, rec in corpus:
        assert list(rec.labels) == list(FINDINGS)
        assert rec.labels == apply_no_finding_rule(rec.labels)
        assert rec.teacher.name == "synthetic-ground-truth"


def test_normal_impression_exactly_when_no_finding(corpus):
    normal = {text for texts in NORMAL_IMPRESSIONS.values() for text in texts}
    for rep, rec in corpus:
        impression = rep.text.split("IMPRESSION:", 1)[1].strip()
        assert (impression in normal) == (rec.labels["No Finding"] == "present"), rep.report_id


def test_evidence_is_in_the_text_and_only_for_mentioned_findings(corpus):
    for rep, rec in corpus:
        mentioned = {f for f in LABELLED if rec.labels[f] != "not_mentioned"}
        assert set(rec.evidence) == mentioned, rep.report_id
        for sentences in rec.evidence.values():
            assert all(sentence in _after_indication(rep) for sentence in sentences)


def test_patients_have_one_to_three_studies_at_one_institution_in_date_order(corpus):
    studies: dict[str, list[Report]] = {}
    for rep, _ in corpus:
        studies.setdefault(rep.patient_id, []).append(rep)
    sizes = Counter(len(reps) for reps in studies.values())
    assert set(sizes) <= {1, 2, 3} and sizes[2] + sizes[3] > 50
    for reps in studies.values():
        assert len({r.institution for r in reps}) == 1
        assert all(a.study_date < b.study_date for a, b in pairwise(reps))


def test_indication_questions_do_not_become_labels(corpus):
    def unlabelled_questions(word: str, finding: str) -> list[Report]:
        return [
            rep for rep, rec in corpus if word in _indication(rep).lower() and rec.labels[finding] == "not_mentioned"
        ]

    pneumonia = unlabelled_questions("pneumonia", "Consolidation")
    ptx = unlabelled_questions("ptx", "Pneumothorax") + unlabelled_questions("pneumothorax", "Pneumothorax")
    assert len(pneumonia) > 10 and len(ptx) > 10
    assert not any(re.search(r"pneumothorax|PTX", _after_indication(rep)) for rep in ptx)


def test_negation_and_hedge_phrasing_is_varied(corpus):
    text = "\n".join(rep.text for rep, _ in corpus)
    cues = [
        "No evidence of",
        "Negative for",
        "is not seen",
        "has resolved",
        "free of",
        "cannot be excluded",
        "versus",
        "Possible",
        "Questionable",
        "likely",
        "may represent",
        "suggestive of",
    ]
    assert [cue for cue in cues if cue not in text] == []
    assert re.search(r"No [a-z ]+, [a-z ]+, or [a-z ]+\.", text)  # combined negation of three findings


def test_styles_differ_in_status_distribution(corpus):
    narrative, templated = _status_shares(corpus, "narrative"), _status_shares(corpus, "templated")
    assert templated["absent"] - narrative["absent"] > 0.15
    assert narrative["uncertain"] > 1.5 * templated["uncertain"]
    assert sum(abs(narrative[s] - templated[s]) for s in narrative) / 2 > 0.15


def test_one_style_only_and_unknown_style_rejected():
    assert {_style(rep) for rep, _ in generate_corpus(30, seed=0, styles=["templated"])} == {"templated"}
    with pytest.raises(ValueError, match="unknown"):
        generate_corpus(10, seed=0, styles=["radiopaedia"])
