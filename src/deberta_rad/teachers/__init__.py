"""Teachers pseudo-label reports; every teacher turns reports into label records the same way."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cache, partial
from itertools import chain
from pathlib import Path
from typing import Any, Protocol

from deberta_rad.data import ReportSource, jsonl_line, parse_units, parsed_reports, write_jsonl, write_lines
from deberta_rad.parallel import ordered_map
from deberta_rad.params import PseudoLabelParams
from deberta_rad.schema import LabelRecord, Report, TeacherInfo


class Teacher(Protocol):
    """What the pseudo_label stage needs from a labeler: provenance and a batch labelling call."""

    info: TeacherInfo

    def label(self, reports: Sequence[Report]) -> list[LabelRecord]:
        """Label every report, in input order, one record per report."""
        ...


TEACHER_NAMES = ("rules", "keyword", "llm")
# Teachers that label each report on its own, on this machine: they stream, spread over worker processes.
LOCAL_TEACHERS = ("rules", "keyword")


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
    raise unknown_teacher(name)


def unknown_teacher(name: str) -> ValueError:
    return ValueError(f"unknown teacher {name!r}; choose one of {', '.join(TEACHER_NAMES)}")


def llm_options(
    llm_model: str | None, cache: Path | None, response_format: str | None = None, batch: bool = False
) -> dict[str, object]:
    """The LLM teacher's options: model, cache, Batch API and (if given) structured-output mode from the
    caller, endpoint limits from the settings."""
    from deberta_rad.settings import get_settings

    settings = get_settings()
    return {
        "response_format": response_format or settings.llm_response_format,
        "model": llm_model,
        "cache_dir": cache,
        "batch": batch,
        "batch_poll_s": settings.llm_batch_poll_s,
        "concurrency": settings.llm_concurrency,
        "timeout_s": settings.llm_timeout_s,
        "max_retries": settings.llm_max_retries,
        "max_requests": settings.llm_max_requests,
        "max_tokens_budget": settings.llm_max_tokens,
        "price_per_1k_input": settings.llm_price_per_1k_input,
        "price_per_1k_output": settings.llm_price_per_1k_output,
    }


def label_reports(
    teacher: str,
    reports: Sequence[Report],
    llm_model: str | None = None,
    cache: Path | None = None,
    response_format: str | None = None,
    batch: bool = False,
) -> tuple[list[LabelRecord], str | None]:
    """Label with a teacher by name; returns the records and, for the LLM, its usage and cost line."""
    options = llm_options(llm_model, cache, response_format, batch) if teacher == "llm" else {}
    labeler = get_teacher(teacher, **options)
    records = labeler.label(reports)
    last_run = getattr(labeler, "last_run", None)
    return records, None if last_run is None else last_run.describe()


def label_with_pipeline_teacher(
    reports: Sequence[Report], pseudo_label: PseudoLabelParams
) -> tuple[list[LabelRecord], str | None]:
    """Label with the teacher params.yaml `pseudo_label` names (the stages that label new text)."""
    cache = Path(pseudo_label.cache) if pseudo_label.cache else None
    return label_reports(pseudo_label.teacher, reports, pseudo_label.llm_model, cache, batch=pseudo_label.batch)


@cache
def local_teacher(name: str) -> Teacher:
    """One instance per process of a local teacher (a worker builds it on its first chunk)."""
    return get_teacher(name)


def label_chunk(teacher: str, parse: Callable[[str, Any], Report], units: list[tuple[str, Any]]) -> list[str]:
    """A worker's task: parse a chunk of a source's units and label them, as label JSONL lines."""
    return [jsonl_line(record) for record in local_teacher(teacher).label(parse_units(parse, units))]


def write_labels(
    output: Path,
    source: ReportSource,
    teacher: str,
    workers: int = 1,
    llm_model: str | None = None,
    cache: Path | None = None,
    response_format: str | None = None,
    batch: bool = False,
) -> tuple[int, str | None]:
    """Label a source with a teacher by name into label JSONL (atomically, in input order); returns the
    count and, for the LLM, its usage and cost line. A local teacher streams on `workers` processes with
    the same bytes for any number; the LLM teacher streams a chunk at a time as one run (one budget, one
    answer cache, one summary: `LLMTeacher.label_stream`)."""
    if teacher in LOCAL_TEACHERS:
        lines = ordered_map(partial(label_chunk, teacher, source.parse), source.units, workers)
        return write_lines(output, lines), None
    if teacher != "llm":
        raise unknown_teacher(teacher)
    from deberta_rad.teachers.llm import LLMTeacher

    reports = parsed_reports(source, workers)
    first = next(reports, None)
    if first is None:  # nothing to send: no endpoint is needed
        return write_jsonl(output, []), None
    labeler = LLMTeacher(**llm_options(llm_model, cache, response_format, batch))
    count = write_jsonl(output, labeler.label_stream(chain([first], reports)))
    return count, labeler.last_run.describe() if labeler.last_run else None
