"""Property tests of the report readers and the text normaliser: whatever bytes sit in a report field,
reading gives the record or an InputError that names the file, never a crash and never a dropped row;
and what was read can be written and read back unchanged."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deberta_rad.data import InputError, normalise_text, read_reports, write_jsonl

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# Bytes biased towards what breaks readers: quotes, backslashes, line ends, NUL, non-UTF-8, escapes.
TRICKY = st.sampled_from([b'"', b"\\", b"\n", b"\r", b"\r\n", b"\x00", b"\xff", b"\xc3", b"\\u0000", b"\\ud800", b","])
FIELD_BYTES = st.lists(st.one_of(st.binary(max_size=8), TRICKY), max_size=12).map(b"".join)


def read_or_clear_error(path: Path) -> list | None:
    """The reports, or None after an InputError that names the file (any other exception fails)."""
    try:
        return read_reports(path)
    except InputError as err:
        assert str(err).startswith(str(path)), err
        return None


def assert_round_trip(reports: list, folder: Path) -> None:
    written = folder / "written.jsonl"
    write_jsonl(written, reports)
    assert read_reports(written) == reports


@FUZZ
@given(text=FIELD_BYTES)
def test_any_bytes_in_a_jsonl_text_field_give_the_report_or_a_clear_error(tmp_path: Path, text: bytes) -> None:
    path = tmp_path / "reports.jsonl"
    path.write_bytes(b'{"report_id": "r1", "text": "' + text + b'"}\n{"report_id": "r2", "text": "Clear lungs."}\n')
    reports = read_or_clear_error(path)
    if reports is not None:
        assert [r.report_id for r in reports] == ["r1", "r2"]  # both rows, none dropped
        assert_round_trip(reports, tmp_path)


@FUZZ
@given(text=st.text(max_size=60))
def test_any_text_in_a_jsonl_record_reads_back_normalised(tmp_path: Path, text: str) -> None:
    path = tmp_path / "reports.jsonl"
    path.write_text(json.dumps({"report_id": "r1", "text": text}) + "\n", encoding="utf-8")
    reports = read_or_clear_error(path)
    if reports is None:
        assert not normalise_text(text)  # the only refusal of valid JSON text: nothing left to label
    else:
        assert reports[0].text == normalise_text(text)
        assert_round_trip(reports, tmp_path)


@FUZZ
@given(text=FIELD_BYTES)
def test_any_bytes_in_a_csv_text_field_give_the_report_or_a_clear_error(tmp_path: Path, text: bytes) -> None:
    path = tmp_path / "reports.csv"
    path.write_bytes(b'report_id,text\nr1,"' + text.replace(b'"', b'""') + b'"\nr2,Clear lungs.\n')
    reports = read_or_clear_error(path)
    if reports is not None:
        assert [r.report_id for r in reports] == ["r1", "r2"]
        assert_round_trip(reports, tmp_path)


@FUZZ
@given(text=st.text(max_size=60))
def test_csv_written_by_the_csv_module_reads_every_row(tmp_path: Path, text: str) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerows([["report_id", "text"], ["r1", text], ["r2", "Clear lungs."]])
    path = tmp_path / "reports.csv"
    path.write_text(buffer.getvalue(), encoding="utf-8", newline="")
    reports = read_or_clear_error(path)
    if reports is None:
        assert not normalise_text(text)
    else:
        assert [r.report_id for r in reports] == ["r1", "r2"]
        assert reports[0].text == normalise_text(text)


@FUZZ
@given(text=st.text())
def test_normalising_is_idempotent_and_keeps_no_carriage_returns_or_edge_space(text: str) -> None:
    once = normalise_text(text)
    assert normalise_text(once) == once
    assert "\r\n" not in once and once == once.strip()
