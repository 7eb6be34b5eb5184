"""Plain keyword labeler with NegEx-style negation: the baseline the rule teacher has to beat.

Deliberately simple, but not a straw man: the obvious words per finding, and a negation word
("no", "without", "negative for", "free of", "not") earlier in the same sentence makes a keyword absent
unless "but"/"however"/"although" comes in between (so lists such as "no A, B, or C" are negated).
No sections, no uncertainty, no anatomy grammar, no synonyms beyond the list.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from deberta_rad.schema import LabelRecord, Report, TeacherInfo, apply_no_finding_rule
from deberta_rad.teachers.rules import split_sentences

KEYWORDS: dict[str, tuple[str, ...]] = {
    "Atelectasis": ("atelectasis", "collapse"),
    "Cardiomegaly": ("cardiomegaly", "enlarged heart", "heart is enlarged", "cardiac enlargement"),
    "Consolidation": ("consolidation",),
    "Edema": ("edema", "chf"),
    "Enlarged Cardiomediastinum": ("enlarged cardiomediastinum", "widened mediastinum", "mediastinal widening"),
    "Fracture": ("fracture",),
    "Infiltrate": ("infiltrate", "infiltration"),
    "Lung Lesion": ("nodule", "mass", "lesion"),
    "Lung Opacity": ("opacity", "opacities", "airspace disease"),
    "Pleural Effusion": ("effusion",),
    "Pleural Thickening": ("pleural thickening",),
    "Pneumothorax": ("pneumothorax",),
}
NEGATION = re.compile(r"\b(?:no|not|without|negative for|free of)\b(?!.*\b(?:but|however|although)\b)", re.IGNORECASE)


class KeywordTeacher:
    """Keyword match per finding; negated when a negation word stands before it in its sentence."""

    def __init__(self) -> None:
        self.info = TeacherInfo(name="keyword", model="keywords-3")
        self.patterns = {
            finding: re.compile(r"\b(?:" + "|".join(map(re.escape, words)) + r")s?\b", re.IGNORECASE)
            for finding, words in KEYWORDS.items()
        }

    def label(self, reports: Sequence[Report]) -> list[LabelRecord]:
        """Label every report, in input order."""
        return [self._label_one(report) for report in reports]

    def _label_one(self, report: Report) -> LabelRecord:
        labels = {finding: self._status(pattern, report.text) for finding, pattern in self.patterns.items()}
        return LabelRecord(report_id=report.report_id, labels=apply_no_finding_rule(labels), teacher=self.info)

    @staticmethod
    def _status(pattern: re.Pattern[str], text: str) -> str:
        """Present if any match is not negated, absent if all are, not_mentioned without a match. A sentence
        is the project's (split_sentences) within one line: a negation never reaches into the next line."""
        statuses = set()
        for sentence in (s for line in text.splitlines() for s in split_sentences(line)):
            for match in pattern.finditer(sentence):
                statuses.add("absent" if NEGATION.search(sentence[: match.start()]) else "present")
        if not statuses:
            return "not_mentioned"
        return "present" if "present" in statuses else "absent"
