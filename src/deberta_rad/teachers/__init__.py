"""Teachers pseudo-label reports; every teacher turns reports into label records the same way."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from deberta_rad.schema import LabelRecord, Report, TeacherInfo


class Teacher(Protocol):
    """What the pseudo_label stage needs from a labeler: provenance and a batch labelling call."""

    info: TeacherInfo

    def label(self, reports: Sequence[Report]) -> list[LabelRecord]:
        """Label every report, in input order, one record per report."""
        ...


TEACHER_NAMES = ("rules", "keyword", "llm")


def get_teacher(name: str, **options: object) -> Teacher:
    """Build a teacher by its CLI/params name; imports lazily so `rules` never needs the LLM stack."""
    if name == "rules":
        from deberta_rad.teachers.rules import RuleTeacher

        return RuleTeacher(**options)
    if name == "keyword":
        from deberta_rad.teachers.keyword import KeywordTeacher

        return KeywordTeacher(**options)
    if name == "llm":
        from deberta_rad.teachers.llm import LLMTeacher

        return LLMTeacher(**options)
    raise ValueError(f"unknown teacher {name!r}; choose one of {', '.join(TEACHER_NAMES)}")


def label_reports(
    teacher: str, reports: Sequence[Report], llm_model: str | None = None, cache: Path | None = None
) -> list[LabelRecord]:
    """Label with a teacher by name; the LLM options only apply to `llm`."""
    options: dict[str, object] = {"model": llm_model, "cache_dir": cache} if teacher == "llm" else {}
    return get_teacher(teacher, **options).label(reports)
