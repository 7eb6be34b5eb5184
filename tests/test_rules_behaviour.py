"""Behavioural tests of the report labelers (Made-With-ML style): minimum functionality, invariance
and directional cases, all on hand-written synthetic sentences."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from deberta_rad.schema import FINDINGS, Report
from deberta_rad.teachers import get_teacher
from deberta_rad.teachers.keyword import KeywordTeacher
from deberta_rad.teachers.rules import RuleTeacher, load_vocabulary


@pytest.fixture(scope="module")
def rules() -> RuleTeacher:
    return RuleTeacher()


def statuses(teacher: RuleTeacher | KeywordTeacher, text: str) -> dict[str, str]:
    return dict(teacher.label([Report(report_id="r1", text=text)])[0].labels)


# ---------------------------------------------------------------------------------------------
# Minimum functionality
# ---------------------------------------------------------------------------------------------

MINIMUM_FUNCTIONALITY = [
    ("No pneumothorax.", "Pneumothorax", "absent"),
    ("There is no evidence of pneumothorax.", "Pneumothorax", "absent"),
    ("Cannot exclude consolidation.", "Consolidation", "uncertain"),
    ("Consolidation in the right lower lobe cannot be excluded.", "Consolidation", "uncertain"),
    ("Small left pleural effusion.", "Pleural Effusion", "present"),
    ("No pneumothorax or effusion.", "Pneumothorax", "absent"),
    ("No pneumothorax or effusion.", "Pleural Effusion", "absent"),
    ("No focal consolidation, pleural effusion, or pneumothorax.", "Consolidation", "absent"),
    ("No focal consolidation, pleural effusion, or pneumothorax.", "Pneumothorax", "absent"),
    ("INDICATION: Eval for pneumonia.\nFINDINGS: Lungs are clear.", "Consolidation", "not_mentioned"),
    ("INDICATION: R/O pneumothorax.\nIMPRESSION: Normal chest.", "Pneumothorax", "not_mentioned"),
    ("The left pleural effusion has resolved.", "Pleural Effusion", "absent"),
    ("Interval resolution of the right pleural effusion.", "Pleural Effusion", "absent"),
    ("Stable cardiomegaly.", "Cardiomegaly", "present"),
    ("The cardiac silhouette is enlarged.", "Cardiomegaly", "present"),
    ("Heart size is normal.", "Cardiomegaly", "absent"),
    ("The heart is not enlarged.", "Cardiomegaly", "absent"),
    ("Findings compatible with CHF.", "Edema", "present"),
    ("Mild interstitial pulmonary edema.", "Edema", "present"),
    ("Small right apical PTX.", "Pneumothorax", "present"),
    ("Widened mediastinum.", "Enlarged Cardiomediastinum", "present"),
    ("The mediastinum is not widened.", "Enlarged Cardiomediastinum", "absent"),
    ("Healed left rib fractures.", "Fracture", "present"),
    ("No acute displaced fracture.", "Fracture", "absent"),
    ("Patchy infiltrate in the left base.", "Infiltrate", "present"),
    ("A 1 cm nodule in the right upper lobe.", "Lung Lesion", "present"),
    ("Lytic lesion of the humerus.", "Lung Lesion", "not_mentioned"),
    ("Patchy airspace opacity at the left base.", "Lung Opacity", "present"),
    ("Mild bibasilar atelectasis.", "Atelectasis", "present"),
    ("Apical pleural thickening.", "Pleural Thickening", "present"),
    ("Small left pleural effusion.", "Pleural Thickening", "not_mentioned"),
    ("Blunting of the right costophrenic angle.", "Pleural Effusion", "uncertain"),
    ("Possible small left pleural effusion.", "Pleural Effusion", "uncertain"),
    ("Questionable right lower lobe opacity.", "Lung Opacity", "uncertain"),
    ("Opacity may represent atelectasis.", "Atelectasis", "uncertain"),
    ("Findings suggestive of pulmonary edema.", "Edema", "uncertain"),
    ("Atelectasis versus consolidation at the left base.", "Consolidation", "uncertain"),
    ("Pneumothorax is not excluded.", "Pneumothorax", "uncertain"),
    ("The lungs are clear of consolidation.", "Consolidation", "absent"),
    ("Lungs are free of focal infiltrate.", "Infiltrate", "absent"),
    ("Negative for pneumothorax.", "Pneumothorax", "absent"),
    ("Cardiomegaly without pulmonary edema.", "Edema", "absent"),
    ("No change in the small left pleural effusion.", "Pleural Effusion", "present"),
    ("Partially resolved right pleural effusion.", "Pleural Effusion", "present"),
    ("There is no focal opacity to suggest pneumonia.", "Lung Opacity", "absent"),
    ("No pleural effusion, but there is a small pneumothorax.", "Pneumothorax", "present"),
    ("Pleural effusion is present. No pneumothorax.", "Pleural Effusion", "present"),
]


@pytest.mark.parametrize(("text", "finding", "expected"), MINIMUM_FUNCTIONALITY)
def test_minimum_functionality(rules: RuleTeacher, text: str, finding: str, expected: str) -> None:
    assert statuses(rules, text)[finding] == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("No acute cardiopulmonary abnormality. Normal chest.", "present"),
        ("No pneumothorax or pleural effusion.", "present"),
        ("Possible small left pleural effusion.", "not_mentioned"),
        ("Mild cardiomegaly.", "not_mentioned"),
    ],
)
def test_no_finding_follows_the_other_findings(rules: RuleTeacher, text: str, expected: str) -> None:
    assert statuses(rules, text)["No Finding"] == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Small left pleural effusion. No pleural effusion on the right.", "present"),
        ("Possible small effusion. No large effusion.", "uncertain"),
        ("No pneumothorax. Pneumothorax cannot be excluded at the apex.", "uncertain"),
    ],
)
def test_mentions_aggregate_present_over_uncertain_over_absent(rules: RuleTeacher, text: str, expected: str) -> None:
    finding = "Pneumothorax" if "neumothorax" in text else "Pleural Effusion"
    assert statuses(rules, text)[finding] == expected


def test_mimic_style_report_uses_only_its_findings_and_impression(rules: RuleTeacher) -> None:
    report = textwrap.dedent(
        """\
        FINAL REPORT
        EXAMINATION: CHEST (PA AND LAT)
        INDICATION: Cough, fever; evaluate for pneumonia
        or pleural effusion.

        COMPARISON: None.

        FINDINGS: Heart size is normal. There is a small right pleural effusion.
        No pneumothorax.

        IMPRESSION: Small right pleural effusion. No consolidation.
        """
    )
    labels = statuses(rules, report)
    assert labels["Pleural Effusion"] == "present"
    assert labels["Consolidation"] == "absent"
    assert labels["Pneumothorax"] == "absent"
    assert labels["Cardiomegaly"] == "absent"


def test_unheaded_text_after_an_indication_paragraph_counts(rules: RuleTeacher) -> None:
    report = "REASON FOR EXAM: Rule out pneumonia.\n\nMild cardiomegaly is stable. Lungs are clear."
    labels = statuses(rules, report)
    assert labels["Cardiomegaly"] == "present"
    assert labels["Consolidation"] == "not_mentioned"


# ---------------------------------------------------------------------------------------------
# Invariance
# ---------------------------------------------------------------------------------------------

INVARIANCE_PAIRS = [
    ("Small left pleural effusion.", "Small right pleural effusion."),
    ("Left lower lobe atelectasis.", "Right lower lobe atelectasis."),
    ("Small left pleural effusion.", "Moderate left pleural effusion."),
    ("Mild cardiomegaly.", "Moderate cardiomegaly."),
    ("Mild cardiomegaly.", "The heart is enlarged."),
    ("Moderate pulmonary edema.", "Findings of CHF."),
    ("Small right pneumothorax.", "Small right PTX."),
    ("No pleural effusion.", "Negative for pleural effusion."),
    ("No pleural effusion.", "Without pleural effusion."),
    ("Cannot exclude pneumothorax.", "Pneumothorax cannot be excluded."),
    ("Possible pneumothorax.", "Questionable pneumothorax."),
    ("Small left pleural effusion.", "SMALL LEFT PLEURAL EFFUSION."),
    ("No pneumothorax.", "no pneumothorax."),
    ("Small left pleural effusion.", "Small left pleural effusion. The osseous structures are intact."),
    ("Right lower lobe consolidation.", "Right lower lobe consolidation. Heart size is normal."),
    ("Mild bibasilar atelectasis.", "Mild  bibasilar\natelectasis."),
]


@pytest.mark.parametrize(("original", "variant"), INVARIANCE_PAIRS)
def test_invariance(rules: RuleTeacher, original: str, variant: str) -> None:
    before, after = statuses(rules, original), statuses(rules, variant)
    # The added normal-heart sentence legitimately makes Cardiomegaly absent; nothing else may move.
    allowed = {"Cardiomegaly"} if "Heart size is normal" in variant else set()
    changed = {f: (before[f], after[f]) for f in FINDINGS if before[f] != after[f] and f not in allowed}
    assert changed == {}


# ---------------------------------------------------------------------------------------------
# Directional
# ---------------------------------------------------------------------------------------------

DIRECTIONAL = [
    ("Pneumothorax.", "No pneumothorax.", "Pneumothorax", "present", "absent"),
    ("Left pleural effusion.", "No left pleural effusion.", "Pleural Effusion", "present", "absent"),
    ("Focal consolidation.", "No focal consolidation.", "Consolidation", "present", "absent"),
    ("Cardiomegaly.", "No cardiomegaly.", "Cardiomegaly", "present", "absent"),
    ("Rib fracture.", "No rib fracture.", "Fracture", "present", "absent"),
    ("Pulmonary edema.", "Possible pulmonary edema.", "Edema", "present", "uncertain"),
    (
        "Left lower lobe atelectasis.",
        "Likely left lower lobe atelectasis.",
        "Atelectasis",
        "present",
        "uncertain",
    ),
    ("Pleural effusion.", "The pleural effusion has resolved.", "Pleural Effusion", "present", "absent"),
]


@pytest.mark.parametrize(("before", "after", "finding", "status_before", "status_after"), DIRECTIONAL)
def test_directional(
    rules: RuleTeacher, before: str, after: str, finding: str, status_before: str, status_after: str
) -> None:
    assert statuses(rules, before)[finding] == status_before
    assert statuses(rules, after)[finding] == status_after


# ---------------------------------------------------------------------------------------------
# Records, vocabulary and the keyword baseline
# ---------------------------------------------------------------------------------------------


def test_label_records_are_complete_and_traceable(rules: RuleTeacher) -> None:
    reports = [Report(report_id="a", text="Small left pleural effusion."), Report(report_id="b", text="")]
    records = rules.label(reports)
    assert [r.report_id for r in records] == ["a", "b"]
    assert all(list(r.labels) == list(FINDINGS) for r in records)
    assert records[0].teacher is not None and records[0].teacher.name == "rules"
    assert records[0].teacher.model == f"vocabulary-{rules.vocabulary.version}"
    assert records[0].evidence == {"Pleural Effusion": ["pleural effusion"]}
    assert records[1].labels["No Finding"] == "present"


def test_evidence_holds_short_phrases_not_sentences(rules: RuleTeacher) -> None:
    text = "There is a moderate right pleural effusion with adjacent compressive atelectasis at the base."
    evidence = rules.label([Report(report_id="a", text=text)])[0].evidence or {}
    assert all(len(span) <= 60 and span in text for spans in evidence.values() for span in spans)


def test_packaged_vocabulary_loads_with_a_version() -> None:
    vocabulary = load_vocabulary()
    assert vocabulary.version
    assert set(vocabulary.findings) == set(FINDINGS) - {"No Finding"}


def test_vocabulary_path_is_honoured_and_validated(tmp_path: Path) -> None:
    custom = tmp_path / "vocabulary.yaml"
    text = (Path(__file__).resolve().parents[1] / "src/deberta_rad/teachers/vocabulary.yaml").read_text()
    custom.write_text(text.replace('version: "', 'version: "test-', 1))
    assert RuleTeacher(custom).info.model is not None and "test-" in RuleTeacher(custom).info.model
    (tmp_path / "bad.yaml").write_text("findings: {}\n")
    with pytest.raises(ValueError, match="version"):
        RuleTeacher(tmp_path / "bad.yaml")


def test_get_teacher_builds_both_labelers() -> None:
    assert get_teacher("rules").info.name == "rules"
    assert get_teacher("keyword").info.name == "keyword"


@pytest.mark.parametrize(
    ("text", "finding", "expected"),
    [
        ("No pneumothorax or effusion.", "Pneumothorax", "absent"),
        ("Small left pleural effusion.", "Pleural Effusion", "present"),
        ("Cardiomegaly without edema.", "Edema", "absent"),
        ("Lungs are clear.", "Lung Opacity", "not_mentioned"),
    ],
)
def test_keyword_baseline(text: str, finding: str, expected: str) -> None:
    assert statuses(KeywordTeacher(), text)[finding] == expected
