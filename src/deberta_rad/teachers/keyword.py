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
SENTENCE_END = re.compile(r"[.!?;\n]")


class KeywordTeacher:
    """Keyword match per finding; negated when a negation word stands before it in its sentence."""

    def __init__(self) -> None:
        self.info = TeacherInfo(name="keyword", model="keywords-2")
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
        """Present if any match is not negated, absent if all are, not_mentioned without a match."""
        statuses = set()
        for match in pattern.finditer(text):
            sentence_start = max((m.end() for m in SENTENCE_END.finditer(text, 0, match.start())), default=0)
            negated = NEGATION.search(text[sentence_start : match.start()])
            statuses.add("absent" if negated else "present")
        if not statuses:
            return "not_mentioned"
        return "present" if "present" in statuses else "absent"
