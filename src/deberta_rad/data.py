"""Reading report corpora, normalising and de-duplicating them, and splitting them without leaks.

Every reader raises `InputError` naming the file and line of a malformed record: nothing is dropped
silently. Only exact duplicates (same normalised text) are removed, and the count is reported.
Readers stream (`iter_reports`, parsing on worker processes when asked) and writers take streams and
write atomically, so the stages hold per report at most an id or a digest, whatever the corpus size.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from deberta_rad.parallel import ordered_map
from deberta_rad.params import Fractions, SyntheticParams
from deberta_rad.schema import LabelRecord, Report

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
T = TypeVar("T")


class InputError(ValueError):
    """A malformed input record; the message names the file and line (never the report text)."""


def normalise_text(text: str) -> str:
    """Collapse runs of spaces and blank lines but keep line breaks (they carry section structure)
    and keep de-identification placeholders such as `XXXX` and `___` as they are."""
    lines = [re.sub(r"[ \t\f\v\u00a0]+", " ", line).strip() for line in text.replace("\r\n", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def text_hash(text: str) -> str:
    """Content hash used for de-duplication, leak-free splitting and caches."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def utf8_lines(path: Path) -> Iterator[str]:
    """The file's lines (line ends kept), decoded one at a time so that bytes that are not UTF-8 are
    reported with their line; a byte-order mark on the first line is dropped."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                yield raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise InputError(
                    f"{path}:{number}: not UTF-8 text ({err.reason} at byte {err.start} of the line)"
                ) from None


def json_object(line: str, where: str) -> dict:
    """One line of JSONL as an object, or an InputError naming `where`."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise InputError(f"{where}: not valid JSON ({err.msg} column {err.colno})") from None
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


def json_lines(path: Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line, failing on the first bad one."""
    for number, line in enumerate(utf8_lines(path), start=1):
        if line.strip():
            yield number, json_object(line, f"{path}:{number}")


def validated(model: type[BaseModel], data: dict, where: str) -> BaseModel:
    """Validate one record; pydantic's message is reduced to field names so no text leaks into logs."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'record'}: {e['msg']}" for e in err.errors())
        raise InputError(f"{where}: {problems}") from None


def _checked_report(data: dict, where: str) -> Report:
    report = validated(Report, data, where)
    for name, value in report.model_dump(exclude_none=True).items():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate from a JSON escape such as \ud800: not text
            raise InputError(f"{where}: field {name!r} holds an unpaired surrogate escape, not text") from None
    report.text = normalise_text(report.text)
    if not report.text:
        raise InputError(f"{where}: report {report.report_id!r} has empty text")
    return report


def iu_report_text(record: dict) -> str:
    """IU X-ray keeps FINDINGS and IMPRESSION apart; the report text is both, headed as sections."""
    sections = [(name, (record.get(name.lower()) or "").strip()) for name in ("FINDINGS", "IMPRESSION")]
    return "\n".join(f"{name}: {body}" for name, body in sections if body)


def report_from_json_line(where: str, line: str) -> Report:
    """One JSONL line as a report: report JSONL (DESIGN.md), the radlabels JSONL (`text`) or the IU X-ray
    JSONL (`findings`, `impression`)."""
    record = json_object(line, where)
    if "text" not in record and ("findings" in record or "impression" in record):
        record = {**record, "text": iu_report_text(record), "institution": record.get("institution", "iu-xray")}
    if "text" not in record:
        raise InputError(f"{where}: no 'text' field (nor IU 'findings'/'impression')")
    return _checked_report(record, where)


CSV_ID_COLUMNS = ("report_id", "study_id")


def csv_id_column(columns: Sequence[str]) -> str | None:
    """The column a CSV's report ids come from (`report_id`, else `study_id`), or None."""
    return next((c for c in CSV_ID_COLUMNS if c in columns), None)


def csv_report_id(path: Path, row_number: int, row: Mapping[str, str | None], id_column: str | None, where: str) -> str:
    """The one report-id scheme of every CSV reader (reports here, gold in deberta_rad.gold): the id
    column's value when the header has one, else `<file stem>-<data row number>` (1-based, header not
    counted), so a CheXbert CSV read as reports and read as gold gives the same ids."""
    if id_column is None:
        return f"{path.stem}-{row_number}"
    report_id = (row.get(id_column) or "").strip()
    if not report_id:
        raise InputError(f"{where}: empty {id_column}")
    return report_id


@dataclass(frozen=True)
class CsvRow:
    """One CSV data row with what it takes to make it a report (the file, and the header's columns)."""

    path: Path
    number: int
    row: dict[str | None, str | None]
    text_column: str
    id_column: str | None


def report_from_csv_row(where: str, csv_row: CsvRow) -> Report:
    """One CSV row as a report, its id as `csv_report_id` gives it."""
    row = csv_row.row
    if None in row:
        raise InputError(f"{where}: more fields than the header has")
    report_id = csv_report_id(csv_row.path, csv_row.number, row, csv_row.id_column, where)
    extras = {k: row[k] for k in ("institution", "patient_id", "study_date") if row.get(k)}
    return _checked_report({"report_id": report_id, "text": row[csv_row.text_column] or "", **extras}, where)


def report_from_txt_file(where: str, file: Path) -> Report:
    """A MIMIC-CXR style report file: files/p10/p10000032/s50414267.txt -> report s50414267 of patient
    p10000032 (the parent folder names the patient when it looks like one)."""
    patient = file.parent.name if re.fullmatch(r"p\d+", file.parent.name) else None
    try:
        text = file.read_text(encoding="utf-8", errors="strict")
    except UnicodeDecodeError as err:
        raise InputError(f"{file}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    return _checked_report({"report_id": file.stem, "text": text, "patient_id": patient}, where)


def report_as_is(where: str, report: Report) -> Report:
    """A report already read (a source of reports in memory)."""
    return report


@dataclass(frozen=True)
class ReportSource:
    """A corpus as cheap units `(where, payload)`, read in order, and the function that makes one unit a
    report (parsing and validating it): the expensive half, which `iter_reports` spreads over workers.
    `where` names the file and line for errors."""

    parse: Callable[[str, Any], Report]
    units: Iterable[tuple[str, Any]]


def jsonl_source(path: Path) -> ReportSource:
    """Every non-blank line of a JSONL file."""
    units = ((f"{path}:{number}", line) for number, line in enumerate(utf8_lines(path), start=1) if line.strip())
    return ReportSource(report_from_json_line, units)


def csv_source(path: Path) -> ReportSource:
    """CSV with `report_id,text` columns, or CheXbert style with a `Report Impression` column; the header
    is checked now."""
    reader = csv.DictReader(utf8_lines(path))
    columns = reader.fieldnames = [c.strip() for c in reader.fieldnames or []]
    text_column = "text" if "text" in columns else "Report Impression" if "Report Impression" in columns else None
    if text_column is None:
        raise InputError(f"{path}:1: CSV needs a 'text' or 'Report Impression' column; found {columns}")
    id_column = csv_id_column(columns)
    units = (
        (f"{path}:{reader.line_num}", CsvRow(path, number, row, text_column, id_column))
        for number, row in enumerate(reader, start=1)
    )
    return ReportSource(report_from_csv_row, units)


def txt_folder_source(path: Path) -> ReportSource:
    """A folder of MIMIC-CXR style `.txt` reports, in path order."""
    files = sorted(path.rglob("*.txt"))
    if not files:
        raise InputError(f"{path}: folder holds no .txt reports")
    return ReportSource(report_from_txt_file, ((str(file), file) for file in files))


def memory_source(reports: Iterable[Report]) -> ReportSource:
    """Reports already in memory, for the code that takes a source."""
    return ReportSource(report_as_is, ((report.report_id, report) for report in reports))


def report_source(path: str | Path) -> ReportSource:
    """Any supported report source, chosen by what the path is; a missing or unsupported path fails now."""
    path = Path(path)
    if path.is_dir():
        return txt_folder_source(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file or folder")
    if path.suffix == ".csv":
        return csv_source(path)
    if path.suffix in (".jsonl", ".json"):
        return jsonl_source(path)
    raise InputError(f"{path}: unsupported report source (use .jsonl, .csv or a folder of .txt reports)")


def parse_units(parse: Callable[[str, Any], Report], units: list[tuple[str, Any]]) -> list[Report]:
    """One chunk of a source's units as reports (a worker's task)."""
    return [parse(where, payload) for where, payload in units]


def parsed_reports(source: ReportSource, workers: int = 1) -> Iterator[Report]:
    """A source's reports in order, parsed on `workers` processes; the first bad unit raises."""
    return ordered_map(partial(parse_units, source.parse), source.units, workers)


def iter_reports(path: str | Path, workers: int = 1) -> Iterator[Report]:
    """Stream any supported report source (memory does not grow with the file); a missing or unsupported
    path fails at the call, a malformed record when the stream reaches it."""
    return parsed_reports(report_source(path), workers)


def read_jsonl_reports(path: Path) -> list[Report]:
    """A report JSONL, IU X-ray JSONL or radlabels JSONL file, whole (see `report_from_json_line`)."""
    return list(parsed_reports(jsonl_source(path)))


def read_reports(path: str | Path) -> list[Report]:
    """Read any supported report source whole, chosen by what the path is."""
    return list(iter_reports(path))


def iter_label_records(path: str | Path, unique: bool = True) -> Iterator[LabelRecord]:
    """Stream label JSONL (DESIGN.md): all 13 findings per record, one record per report id unless
    `unique` is off (a log of answers, where a report labelled twice is two lines)."""
    path = Path(path)
    seen: set[str] = set()
    for number, data in json_lines(path):
        record = validated(LabelRecord, data, f"{path}:{number}")
        if unique:
            if record.report_id in seen:
                raise InputError(f"{path}:{number}: report {record.report_id!r} is labelled twice")
            seen.add(record.report_id)
        yield record


def read_label_records(path: str | Path, unique: bool = True) -> list[LabelRecord]:
    """Label JSONL, whole (see `iter_label_records`)."""
    return list(iter_label_records(path, unique))


class LabelLookup:
    """Label records by report id from a stream, for a pass over reports in (mostly) the same order: a
    record read ahead of its report waits in memory, so labels written in report order cost nothing."""

    def __init__(self, records: Iterable[LabelRecord]) -> None:
        self.records = iter(records)
        self.waiting: dict[str, LabelRecord] = {}

    def pop(self, report_id: str) -> LabelRecord | None:
        """The report's record (each is given once), or None when the stream holds none."""
        if report_id in self.waiting:
            return self.waiting.pop(report_id)
        for record in self.records:
            if record.report_id == report_id:
                return record
            self.waiting[record.report_id] = record
        return None


def labels_by_id(records: Iterable[LabelRecord]) -> dict[str, dict[str, str]]:
    """report_id -> {finding: status}: the shape evaluation and training work on."""
    return {record.report_id: dict(record.labels) for record in records}


@contextmanager
def parent_folder(path: Path) -> Iterator[None]:
    """Make the folders `path` lies in; when the body fails, remove those it made, so a stage that fails
    (on bad input found half way through a stream, say) leaves nothing behind."""
    made = [folder for folder in [path.parent, *path.parent.parents] if not folder.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for folder in made:  # innermost first; each was empty before the body wrote into it
            shutil.rmtree(folder, ignore_errors=True)
        raise


def new_file_mode() -> int:
    """The mode `open` gives a new file under this process's umask (os.umask is the only portable way to
    read it, so it is set and put back)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def write_atomically(path: Path, write: Callable[[Path], None], suffix: str = ".tmp") -> None:
    """Let ``write`` fill a temporary file in the same folder, then rename it into place: a failure or a
    crash leaves the old file (or none), and a concurrent reader never sees half a file."""
    with parent_folder(path):
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
        os.close(handle)
        try:
            os.chmod(temporary, new_file_mode())  # mkstemp's 0600 would make the output private to its writer
            write(Path(temporary))
            os.replace(temporary, path)
        finally:
            Path(temporary).unlink(missing_ok=True)


def write_text_atomically(path: Path, text: str) -> None:
    """Write a text file whole or not at all (see `write_atomically`)."""
    write_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


@contextmanager
def replaced_together(*paths: Path) -> Iterator[list[Path]]:
    """Temporary paths for the body to write new versions of ``paths`` at (files or folders, which it
    makes itself, so they get the usual modes), moved into place together when it succeeds. Every old one
    is moved aside before the first new one moves in, so a reader never finds old and new side by side
    (a crash in that instant leaves some missing, which fails loudly). A failure leaves the old ones, and
    no temporaries, behind."""
    with ExitStack() as parents:
        for path in paths:
            parents.enter_context(parent_folder(path))
        staging = {
            parent: Path(tempfile.mkdtemp(dir=parent, prefix=".staging.", suffix=".tmp"))
            for parent in {path.parent for path in paths}
        }
        try:
            for folder in staging.values():
                (folder / "new").mkdir()
                (folder / "old").mkdir()
            yield [staging[path.parent] / "new" / path.name for path in paths]
            _move_in(paths, staging)
        finally:
            for folder in staging.values():
                shutil.rmtree(folder, ignore_errors=True)


def _move_in(paths: Sequence[Path], staging: Mapping[Path, Path]) -> None:
    """`replaced_together`'s swap: the old paths aside, then the new ones in; undone when a rename fails."""
    aside: list[Path] = []
    moved_in: list[Path] = []
    try:
        for path in paths:
            if path.exists() or path.is_symlink():
                path.rename(staging[path.parent] / "old" / path.name)
                aside.append(path)
        for path in paths:
            (staging[path.parent] / "new" / path.name).rename(path)
            moved_in.append(path)
    except BaseException:
        for path in moved_in:
            path.rename(staging[path.parent] / "new" / path.name)
        for path in aside:
            (staging[path.parent] / "old" / path.name).rename(path)
        raise


JSONL_BUFFER_BYTES = 1 << 20


def write_lines(path: str | Path, lines: Iterable[str]) -> int:
    """Write serialised records one per line, streaming from any iterator, atomically (a crash or an
    exception from the iterator leaves the old file) and synced to disk before the rename; returns the count."""
    count = 0

    def write(temporary: Path) -> None:
        nonlocal count
        with temporary.open("w", encoding="utf-8", buffering=JSONL_BUFFER_BYTES) as handle:
            for line in lines:
                handle.write(line + "\n")
                count += 1
            handle.flush()
            os.fsync(handle.fileno())

    write_atomically(Path(path), write)
    return count


def jsonl_line(record: BaseModel) -> str:
    """A record as one JSONL line (unset optional fields left out): the project's one serialisation."""
    return record.model_dump_json(exclude_none=True)


def write_jsonl(path: str | Path, records: Iterable[BaseModel]) -> int:
    """Write pydantic records one per line (see `write_lines`) and count them."""
    return write_lines(path, map(jsonl_line, records))


def nonempty(items: Iterable[T], message: str) -> Iterator[T]:
    """Pass a stream through, raising InputError(message) at its end when it held nothing."""
    empty = True
    for item in items:
        empty = False
        yield item
    if empty:
        raise InputError(message)


@dataclass
class IngestResult:
    """What ingest kept and why the rest went, so the stage can say it (ids and counts, never text).
    `reports` is filled only by `merge_sources`; the streaming stage counts `kept` instead."""

    reports: list[Report] = field(default_factory=list)
    per_source: dict[str, int] = field(default_factory=dict)
    duplicates_dropped: int = 0
    kept: int = 0
    dropped_ids: set[str] = field(default_factory=set)


def unique_reports(sources: Iterable[tuple[str, Iterable[Report]]], result: IngestResult) -> Iterator[Report]:
    """Stream the sources one after another, dropping exact-text duplicates (first one wins) and refusing
    id clashes; the counts go into `result` as the stream runs. What is kept per report is its id and a
    digest of its text, nothing more."""
    origin_of_id: dict[str, str] = {}
    seen_text: set[bytes] = set()
    for name, reports in sources:
        result.per_source[name] = 0
        for report in reports:
            result.per_source[name] += 1
            if report.report_id in origin_of_id:
                raise InputError(
                    f"report id {report.report_id!r} occurs in {origin_of_id[report.report_id]} and in {name}; "
                    "ids must be unique across ingest.sources"
                )
            origin_of_id[report.report_id] = name
            digest = hashlib.sha256(report.text.encode("utf-8")).digest()
            if digest in seen_text:
                result.duplicates_dropped += 1
                result.dropped_ids.add(report.report_id)
                continue
            seen_text.add(digest)
            result.kept += 1
            yield report


def merge_sources(sources: Iterable[tuple[str, Iterable[Report]]]) -> IngestResult:
    """Concatenate sources, drop exact-text duplicates (first one wins), refuse id clashes; kept whole."""
    result = IngestResult()
    result.reports = list(unique_reports(sources, result))
    return result


def hash_position(key: str) -> float:
    """The key's place in [0, 1) by SHA-256: the same on every machine and in every run."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:12], 16) / 16**12


def split_of(group_key: str, seed: int, fractions: Fractions) -> str:
    """Assign a group to a split by a seeded hash: deterministic, and a group never straddles splits.
    New reports do not move old ones between splits, which keeps the relabeling loop leak-free."""
    position = hash_position(f"{seed}:{group_key}")
    cumulative = 0.0
    for name in SPLITS:
        cumulative += getattr(fractions, name)
        if position < cumulative:
            return name
    return SPLITS[-1]


def group_of(report: Report) -> str:
    """What a split keeps together: the patient when the record names one, else the text (so identical
    texts stay together)."""
    return f"patient:{report.patient_id}" if report.patient_id else f"text:{text_hash(report.text)}"


def groups_of(reports: Iterable[Report], ids: Collection[str]) -> set[str]:
    """The groups of the reports with these ids (none read when there are none)."""
    return {group_of(r) for r in reports if r.report_id in ids} if ids else set()


def split_name(report: Report, seed: int, fractions: Fractions, test_groups: Collection[str]) -> str:
    """The split of one report: its group's seeded hash, or test when its group is held out for test."""
    group = group_of(report)
    return "test" if group in test_groups else split_of(group, seed, fractions)


def split_reports(
    reports: Sequence[Report], seed: int, fractions: Fractions, to_test: Collection[str] = ()
) -> dict[str, list[Report]]:
    """Grouped split (`group_of`). The groups of the reports in `to_test` (reviewed gold) go to the test
    split whole, so no report of the same patient trains on them."""
    test_groups = groups_of(reports, to_test)
    splits: dict[str, list[Report]] = {name: [] for name in SPLITS}
    for report in reports:
        splits[split_name(report, seed, fractions, test_groups)].append(report)
    return splits


SYNTHETIC_SOURCE = "synthetic"


def source_streams(
    sources: Sequence[str], synthetic: SyntheticParams, relabeled: str | None = None, workers: int = 1
) -> tuple[list[tuple[str, Iterable[Report]]], list[LabelRecord]]:
    """`ingest.sources` in order as named report streams (read when consumed, on `workers` processes);
    `synthetic` stands for the embedded generator, whose ground truth comes back as gold labels (other
    sources carry none). Then the relabeling loop's store (`ingest.relabeled`), when it exists: reports
    a drift alarm sent to the teacher. A missing source fails now, an empty one at its end."""
    from deberta_rad.synthetic import generate_corpus

    if not sources:
        raise InputError("ingest.sources is empty: name at least one source")
    streams: list[tuple[str, Iterable[Report]]] = []
    gold: list[LabelRecord] = []
    for source in sources:
        if source == SYNTHETIC_SOURCE:
            pairs = generate_corpus(synthetic.n_reports, synthetic.seed, synthetic.styles)
            streams.append((source, [report for report, _ in pairs]))
            gold.extend(labels for _, labels in pairs)
        else:
            reports = iter_reports(source, workers)
            streams.append((source, nonempty(reports, f"{source}: holds no reports (listed in ingest.sources)")))
    if relabeled and Path(relabeled).is_file():
        streams.append((relabeled, iter_reports(relabeled, workers)))
    return streams, gold


def ingest_sources(
    sources: Sequence[str], synthetic: SyntheticParams, relabeled: str | None = None
) -> tuple[IngestResult, list[LabelRecord]]:
    """`source_streams` merged and kept whole (`merge_sources`), with the sources' gold labels."""
    streams, gold = source_streams(sources, synthetic, relabeled)
    return merge_sources(streams), gold


def ingest_to_files(
    sources: Sequence[str],
    synthetic: SyntheticParams,
    relabeled: str | None,
    output: Path,
    gold_output: Path,
    workers: int = 1,
) -> IngestResult:
    """The ingest stage: stream every source into one de-duplicated reports file, then the gold labels of
    the reports kept; the two files are put in place together (`replaced_together`), so a failure leaves
    the old pair."""
    streams, gold = source_streams(sources, synthetic, relabeled, workers)
    result = IngestResult()
    with replaced_together(output, gold_output) as (reports_file, gold_file):
        write_jsonl(reports_file, unique_reports(streams, result))
        write_jsonl(gold_file, (g for g in gold if g.report_id not in result.dropped_ids))
    return result


def write_splits(
    reports_path: Path,
    labels_path: Path,
    gold_path: Path | None,
    out_dir: Path,
    seed: int,
    fractions: Fractions,
    reviewed: Mapping[str, LabelRecord] | None = None,
    reviewed_gold: Collection[str] = (),
    workers: int = 1,
) -> dict[str, int]:
    """Write `<split>/reports.jsonl`, the teacher's `labels.jsonl`, any `gold.jsonl` and any reviewed
    labels (`reviewed.jsonl`) per split; the `reviewed_gold` reports go to the test split. Streams the
    reports (teacher labels in report order are joined as they come) and swaps the three split folders in
    together at the end (anything else in `out_dir` is left alone). Ground truth (the synthetic
    generator's, sized by params) is held in memory."""
    gold = {r.report_id: r for r in iter_label_records(gold_path)} if gold_path else {}
    test_groups = groups_of(iter_reports(reports_path, workers), reviewed_gold)
    counts: dict[str, int] = {}
    with replaced_together(*(out_dir / name for name in SPLITS)) as folders:
        teacher = LabelLookup(iter_label_records(labels_path))
        unlabelled: list[str] = []
        n_unlabelled = 0
        writers = {name: SplitWriter(folder) for name, folder in zip(SPLITS, folders, strict=True)}
        try:
            for report in iter_reports(reports_path, workers):
                label = teacher.pop(report.report_id)
                if label is None:
                    n_unlabelled += 1
                    if len(unlabelled) < 5:
                        unlabelled.append(report.report_id)
                    continue
                writer = writers[split_name(report, seed, fractions, test_groups)]
                writer.add(report, label, gold.get(report.report_id), (reviewed or {}).get(report.report_id))
        finally:
            for writer in writers.values():
                writer.close()
        if n_unlabelled:
            raise InputError(f"{labels_path}: {n_unlabelled} reports have no teacher label, e.g. {unlabelled}")
        for name, writer in writers.items():
            counts[name] = writer.n_reports
            if writer.n_reviewed:
                counts[f"{name} reviewed"] = writer.n_reviewed
    return counts


class SplitWriter:
    """One split's files, written as its reports stream in: its reports, the teacher's labels, any ground
    truth, and any reviewed labels (`reviewed.jsonl`, only when the split holds some)."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.files = {name: self._open(name) for name in SPLIT_FILES}
        self.n_reports = self.n_reviewed = 0

    def add(self, report: Report, teacher: LabelRecord, gold: LabelRecord | None, reviewed: LabelRecord | None) -> None:
        """Append one report with its labels."""
        self.n_reports += 1
        self._write("reports", report)
        self._write("labels", teacher)
        if gold is not None:
            self._write("gold", gold)
        if reviewed is not None:
            if "reviewed" not in self.files:
                self.files["reviewed"] = self._open("reviewed")
            self.n_reviewed += 1
            self._write("reviewed", reviewed)

    def _open(self, name: str) -> io.TextIOWrapper:
        return (self.folder / f"{name}.jsonl").open("w", encoding="utf-8", buffering=JSONL_BUFFER_BYTES)

    def _write(self, name: str, record: BaseModel) -> None:
        self.files[name].write(jsonl_line(record) + "\n")

    def close(self) -> None:
        """Flush every file to disk and close it."""
        for handle in self.files.values():
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()


SPLIT_FILES = ("reports", "labels", "gold")


def write_split(
    folder: Path,
    members: Sequence[Report],
    teacher: Mapping[str, LabelRecord],
    gold: Mapping[str, LabelRecord],
    reviewed: Mapping[str, LabelRecord],
) -> int:
    """One split's files from reports in memory, written over those of an earlier split in `folder` (see
    `SplitWriter`; a `reviewed.jsonl` it leaves goes); returns how many reviewed labels it holds."""
    (folder / "reviewed.jsonl").unlink(missing_ok=True)
    writer = SplitWriter(folder)
    try:
        for report in members:
            rid = report.report_id
            writer.add(report, teacher[rid], gold.get(rid), reviewed.get(rid))
    finally:
        writer.close()
    return writer.n_reviewed


@dataclass
class AppendOnlyStore:
    """An append-only JSONL of reports with their labels: the relabel loop's pseudo-labels and the
    reviewed labels. A crash leaves whole lines; a torn last line is cut off on the next read."""

    path: Path

    def records(self, cut_torn: bool = True) -> list[dict]:
        """Every whole line; a torn last line (a crash mid-write) is cut off the file, or only skipped
        with ``cut_torn`` off (readers that must not change a DVC stage's dependency)."""
        if not self.path.is_file():
            return []
        raw = self.path.read_bytes()
        lines = raw.split(b"\n")
        whole, rows = 0, []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                whole += len(line) + 1
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if number == len(lines):  # the last line, without its newline: torn by a crash
                    logger.warning("%s: %s a torn last line", self.path, "cutting off" if cut_torn else "skipping")
                    if cut_torn:
                        with self.path.open("r+b") as handle:
                            handle.truncate(whole)
                    break
                raise InputError(f"{self.path}:{number}: not valid JSON") from None
            whole += len(line) + 1
        return rows

    def append(self, pairs: Sequence[tuple[Report, LabelRecord]]) -> None:
        """Write each report with its labels as one line."""
        self.append_rows(
            [
                report.model_dump(exclude_none=True)
                | {
                    "labels": record.labels,
                    "teacher": record.teacher.model_dump(exclude_none=True) if record.teacher else None,
                }
                for report, record in pairs
            ]
        )

    def append_rows(self, rows: Sequence[dict]) -> None:
        """Write each row as one line, then flush to disk."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
