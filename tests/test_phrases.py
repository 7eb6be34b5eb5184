"""The rule vocabulary spelt out as phrases (teachers.phrases), and mention swaps that draw from them."""

from __future__ import annotations

import pytest

from deberta_rad.schema import Report
from deberta_rad.sentences import mention_swaps
from deberta_rad.teachers.phrases import MAX_PHRASE_WORDS, finding_phrases, spell
from deberta_rad.teachers.rules import RuleTeacher

WORDS = {"fracture", "fractures", "fractal", "thickening", "thickened", "pleural", "pleura", "rib"}


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        # an open word ending takes the corpus's words that fit it, and only those
        (r"fractur\w*", ["fracture", "fractures"]),
        # alternatives and optional parts: each taken
        (
            r"apical (?:pleural )?(?:caps?|capping)",
            [
                "apical cap",
                "apical capping",
                "apical caps",
                "apical pleural cap",
                "apical pleural capping",
                "apical pleural caps",
            ],
        ),
        # a free word is left out rather than invented; a class gives its first character
        (r"pleural (?:\w+ ){0,2}?thicken\w*", ["pleural thickened", "pleural thickening"]),
        (r"pleuro[- ]?parenchymal", ["pleuro-parenchymal", "pleuroparenchymal"]),
        # what cannot be spelt out gives nothing: a wholly open word, a negated class, an unknown ending
        (r"\w+ fracture", []),
        (r"[^a]+", []),
        (r"effusio\w*", []),
    ],
)
def test_spell_writes_out_what_a_pattern_matches(pattern: str, expected: list[str]) -> None:
    assert spell(pattern, WORDS) == expected


def test_spell_leaves_out_phrases_longer_than_a_name() -> None:
    assert spell("one two three four five|short name", set()) == ["short name"]


def test_every_spelt_phrase_names_its_finding_for_the_teacher() -> None:
    teacher = RuleTeacher()
    phrases = finding_phrases({"thickening", "thickened", "pleural", "pleura", "mediastinal", "widening"}, teacher)
    assert "No Finding" not in phrases
    assert {"pleural thickening", "thickening of the pleura", "pleural plaques"} <= set(phrases["Pleural Thickening"])
    assert any(p.startswith("widened ") for p in phrases["Enlarged Cardiomediastinum"])  # a structure, one order
    assert any(p.endswith((" widened", " widening")) for p in phrases["Enlarged Cardiomediastinum"])  # the other
    for finding, names in phrases.items():
        for phrase in names:
            assert len(phrase.split()) <= 2 * MAX_PHRASE_WORDS and phrase == phrase.lower()  # anatomy + condition
            assert teacher.label_text("p", phrase.capitalize() + ".").labels[finding] in ("present", "uncertain")


def test_swaps_with_the_vocabulary_draw_names_the_sentences_never_hold() -> None:
    sentences = [
        Report(report_id=f"s-{i}", text=text)
        for i, text in enumerate(["No pneumothorax.", "Mild cardiomegaly.", "Possible left basilar atelectasis."] * 4)
    ]
    own = {"pneumothorax", "cardiomegaly", "atelectasis"}
    plain = mention_swaps(sentences, variants=6, seed=3, known=set())
    spelt = mention_swaps(sentences, variants=6, seed=3, known=set(), vocabulary=True)
    assert all(sum(name in s.text.lower() for name in own) == 1 for s in plain)
    assert any(sum(name in s.text.lower() for name in own) == 0 for s in spelt)
    assert spelt == mention_swaps(sentences, variants=6, seed=3, known=set(), vocabulary=True)  # seeded
