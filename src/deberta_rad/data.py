"""Reading report corpora, normalising and de-duplicating them, and splitting them without leaks.

Every reader raises `InputError` naming the file and line of a malformed record: nothing is dropped
silently. Only exact duplicates (same normalised text) are removed, and the count is reported.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ValidationError

from deberta_rad.params import Fractions, SyntheticParams
from deberta_rad.schema import LabelRecord, Report

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


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


def json_lines(path: Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line, failing on the first bad one."""
    for number, line in enumerate(utf8_lines(path), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}:{number}: not valid JSON ({err.msg} column {err.colno})") from None
        if not isinstance(record, dict):
            raise InputError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        yield number, record


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


def read_jsonl_reports(path: Path) -> list[Report]:
    """Report JSONL (DESIGN.md), the radlabels JSONL (`text`) or the IU X-ray JSONL (`findings`, `impression`)."""
    reports = []
    for number, record in json_lines(path):
        where = f"{path}:{number}"
        if "text" not in record and ("findings" in record or "impression" in record):
            record = {**record, "text": iu_report_text(record), "institution": record.get("institution", "iu-xray")}
        if "text" not in record:
            raise InputError(f"{where}: no 'text' field (nor IU 'findings'/'impression')")
        reports.append(_checked_report(record, where))
    return reports


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


def read_csv_reports(path: Path) -> list[Report]:
    """CSV with `report_id,text` columns, or CheXbert style with a `Report Impression` column; ids as
    `csv_report_id` gives them."""
    reader = csv.DictReader(utf8_lines(path))
    columns = reader.fieldnames = [c.strip() for c in reader.fieldnames or []]
    text_column = "text" if "text" in columns else "Report Impression" if "Report Impression" in columns else None
    if text_column is None:
        raise InputError(f"{path}:1: CSV needs a 'text' or 'Report Impression' column; found {columns}")
    id_column = csv_id_column(columns)
    reports = []
    for row_number, row in enumerate(reader, start=1):
        where = f"{path}:{reader.line_num}"
        if None in row:
            raise InputError(f"{where}: more fields than the header has")
        report_id = csv_report_id(path, row_number, row, id_column, where)
        extras = {k: row[k] for k in ("institution", "patient_id", "study_date") if row.get(k)}
        reports.append(_checked_report({"report_id": report_id, "text": row[text_column] or "", **extras}, where))
    return reports


def read_txt_folder(path: Path) -> list[Report]:
    """A folder of MIMIC-CXR style reports: files/p10/p10000032/s50414267.txt -> report s50414267 of
    patient p10000032 (the parent folder names the patient when it looks like one)."""
    files = sorted(path.rglob("*.txt"))
    if not files:
        raise InputError(f"{path}: folder holds no .txt reports")
    reports = []
    for file in files:
        patient = file.parent.name if re.fullmatch(r"p\d+", file.parent.name) else None
        try:
            text = file.read_text(encoding="utf-8", errors="strict")
        except UnicodeDecodeError as err:
            raise InputError(f"{file}: not UTF-8 text ({err.reason} at byte {err.start})") from None
        reports.append(_checked_report({"report_id": file.stem, "text": text, "patient_id": patient}, str(file)))
    return reports


def read_reports(path: str | Path) -> list[Report]:
    """Read any supported report source, chosen by what the path is."""
    path = Path(path)
    if path.is_dir():
        return read_txt_folder(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file or folder")
    if path.suffix == ".csv":
        return read_csv_reports(path)
    if path.suffix in (".jsonl", ".json"):
        return read_jsonl_reports(path)
    raise InputError(f"{path}: unsupported report source (use .jsonl, .csv or a folder of .txt reports)")


def read_label_records(path: str | Path, unique: bool = True) -> list[LabelRecord]:
    """Label JSONL (DESIGN.md): all 13 findings per record, one record per report id unless `unique` is
    off (a log of answers, where a report labelled twice is two lines)."""
    path = Path(path)
    records, seen = [], set()
    for number, data in json_lines(path):
        record = validated(LabelRecord, data, f"{path}:{number}")
        if unique and record.report_id in seen:
            raise InputError(f"{path}:{number}: report {record.report_id!r} is labelled twice")
        seen.add(record.report_id)
        records.append(record)
    return records


def labels_by_id(records: Iterable[LabelRecord]) -> dict[str, dict[str, str]]:
    """report_id -> {finding: status}: the shape evaluation and training work on."""
    return {record.report_id: dict(record.labels) for record in records}


def write_atomically(path: Path, write: Callable[[Path], None], suffix: str = ".tmp") -> None:
    """Let ``write`` fill a temporary file in the same folder, then rename it into place: a failure or a
    crash leaves the old file (or none), and a concurrent reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(handle)
    try:
        write(Path(temporary))
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)


def write_jsonl(path: str | Path, records: Iterable[BaseModel]) -> int:
    """Write pydantic records one per line (atomically: a crash leaves the old file) and count them."""
    count = 0

    def write(temporary: Path) -> None:
        nonlocal count
        with temporary.open("w", encoding="utf-8") as handle:
            for record in records:
                handle.write(record.model_dump_json(exclude_none=True) + "\n")
                count += 1

    write_atomically(Path(path), write)
    return count


@dataclass
class IngestResult:
    """What ingest kept and why the rest went, so the stage can say it (ids and counts, never text)."""

    reports: list[Report]
    per_source: dict[str, int] = field(default_factory=dict)
    duplicates_dropped: int = 0


def merge_sources(sources: Sequence[tuple[str, list[Report]]]) -> IngestResult:
    """Concatenate sources, drop exact-text duplicates (first one wins), refuse id clashes."""
    result = IngestResult(reports=[])
    origin_of_id: dict[str, str] = {}
    seen_text: set[str] = set()
    for name, reports in sources:
        result.per_source[name] = len(reports)
        for report in reports:
            if report.report_id in origin_of_id:
                raise InputError(
                    f"report id {report.report_id!r} occurs in {origin_of_id[report.report_id]} and in {name}; "
                    "ids must be unique across ingest.sources"
                )
            origin_of_id[report.report_id] = name
            digest = text_hash(report.text)
            if digest in seen_text:
                result.duplicates_dropped += 1
                continue
            seen_text.add(digest)
            result.reports.append(report)
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


def split_reports(
    reports: Sequence[Report], seed: int, fractions: Fractions, to_test: Collection[str] = ()
) -> dict[str, list[Report]]:
    """Grouped split: by patient when the record names one, else by text (so identical texts stay together).
    The groups of the reports in `to_test` (reviewed gold) go to the test split whole, so no report of
    the same patient trains on them."""

    def group_of(report: Report) -> str:
        return f"patient:{report.patient_id}" if report.patient_id else f"text:{text_hash(report.text)}"

    test_groups = {group_of(r) for r in reports if r.report_id in to_test}
    splits: dict[str, list[Report]] = {name: [] for name in SPLITS}
    for report in reports:
        group = group_of(report)
        splits["test" if group in test_groups else split_of(group, seed, fractions)].append(report)
    return splits


SYNTHETIC_SOURCE = "synthetic"


def ingest_sources(
    sources: Sequence[str], synthetic: SyntheticParams, relabeled: str | None = None
) -> tuple[IngestResult, list[LabelRecord]]:
    """Read `ingest.sources` in order; `synthetic` stands for the embedded generator, whose ground
    truth comes back as gold labels (other sources carry none). Then the relabeling loop's store
    (`ingest.relabeled`), when it exists: reports a drift alarm sent to the teacher."""
    from deberta_rad.synthetic import generate_corpus

    if not sources:
        raise InputError("ingest.sources is empty: name at least one source")
    loaded, gold = [], []
    for source in sources:
        if source == SYNTHETIC_SOURCE:
            pairs = generate_corpus(synthetic.n_reports, synthetic.seed, synthetic.styles)
            loaded.append((source, [report for report, _ in pairs]))
            gold.extend(labels for _, labels in pairs)
        else:
            reports = read_reports(source)
            if not reports:
                raise InputError(f"{source}: holds no reports (listed in ingest.sources)")
            loaded.append((source, reports))
    if relabeled and Path(relabeled).is_file():
        loaded.append((relabeled, read_reports(relabeled)))
    return merge_sources(loaded), gold


def write_splits(
    reports_path: Path,
    labels_path: Path,
    gold_path: Path | None,
    out_dir: Path,
    seed: int,
    fractions: Fractions,
    reviewed: Mapping[str, LabelRecord] | None = None,
    reviewed_gold: Collection[str] = (),
) -> dict[str, int]:
    """Write `<split>/reports.jsonl`, the teacher's `labels.jsonl`, any `gold.jsonl` and any reviewed
    labels (`reviewed.jsonl`) per split; the `reviewed_gold` reports go to the test split."""
    reports = read_reports(reports_path)
    teacher = {r.report_id: r for r in read_label_records(labels_path)}
    gold = {r.report_id: r for r in read_label_records(gold_path)} if gold_path else {}
    reviewed = reviewed or {}
    unlabelled = [r.report_id for r in reports if r.report_id not in teacher]
    if unlabelled:
        raise InputError(f"{labels_path}: {len(unlabelled)} reports have no teacher label, e.g. {unlabelled[:5]}")
    counts = {}
    for name, members in split_reports(reports, seed, fractions, reviewed_gold).items():
        counts[name] = len(members)
        n_reviewed = write_split(out_dir / name, members, teacher, gold, reviewed)
        if n_reviewed:
            counts[f"{name} reviewed"] = n_reviewed
    return counts


def write_split(
    folder: Path,
    members: Sequence[Report],
    teacher: Mapping[str, LabelRecord],
    gold: Mapping[str, LabelRecord],
    reviewed: Mapping[str, LabelRecord],
) -> int:
    """One split's files: its reports, the teacher's labels, any ground truth and any reviewed labels (a
    `reviewed.jsonl` left from an earlier split goes); returns how many reviewed labels it holds."""
    write_jsonl(folder / "reports.jsonl", members)
    write_jsonl(folder / "labels.jsonl", (teacher[r.report_id] for r in members))
    write_jsonl(folder / "gold.jsonl", (gold[r.report_id] for r in members if r.report_id in gold))
    in_split = [reviewed[r.report_id] for r in members if r.report_id in reviewed]
    if in_split:
        write_jsonl(folder / "reviewed.jsonl", in_split)
    else:
        (folder / "reviewed.jsonl").unlink(missing_ok=True)
    return len(in_split)


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
