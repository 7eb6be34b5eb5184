"""Streaming stages: readers as generators, order-keeping workers, atomic outputs (issue 24)."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from deberta_rad import parallel
from deberta_rad.cli import app
from deberta_rad.data import (
    InputError,
    LabelLookup,
    iter_reports,
    labels_by_id,
    read_label_records,
    read_reports,
    replaced_together,
    write_jsonl,
    write_lines,
    write_splits,
    write_text_atomically,
)
from deberta_rad.metrics import StatusCodes
from deberta_rad.params import Fractions
from deberta_rad.schema import FINDINGS, LabelRecord, Report
from deberta_rad.synthetic import generate_corpus


def negate(numbers: list[int]) -> list[int]:
    """A worker's task for the tests (module level, so worker processes can import it)."""
    if 13 in numbers:
        raise InputError("chunk with 13")
    return [-n for n in numbers]


def test_ordered_map_keeps_input_order_on_two_workers_and_raises_in_turn() -> None:
    assert list(parallel.ordered_map(negate, range(13), workers=2, chunk_size=3)) == [-n for n in range(13)]
    seen = []
    with pytest.raises(InputError, match="chunk with 13"):
        seen.extend(parallel.ordered_map(negate, range(30), workers=2, chunk_size=4))
    assert seen == [-n for n in range(12)]  # every chunk before the bad one, nothing after


def test_workers_zero_means_every_available_core() -> None:
    assert parallel.resolve_workers(0) == parallel.resolve_workers(None) == parallel.available_cores()
    with pytest.raises(ValueError, match="workers"):
        parallel.resolve_workers(-1)


def test_available_cores_falls_back_to_cpu_count_without_an_affinity_call(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)  # as on macOS
    assert parallel.available_cores() == (os.cpu_count() or 1)


def worker_state(numbers: list[int]) -> list[bool]:
    """Whether the process running a chunk ignores Ctrl-C (a worker's task for the tests)."""
    return [signal.getsignal(signal.SIGINT) == signal.SIG_IGN for _ in numbers]


def test_ordered_map_starts_no_more_processes_than_chunks_and_they_leave_ctrl_c_to_the_parent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    started: list[int] = []
    forkserver = multiprocessing.get_context("forkserver")

    class Spy:
        def Pool(self, processes: int, **kwargs: object) -> object:
            started.append(processes)
            return forkserver.Pool(processes, **kwargs)

    monkeypatch.setattr(parallel.multiprocessing, "get_context", lambda method: Spy())
    assert list(parallel.ordered_map(worker_state, range(6), workers=8, chunk_size=3)) == [True] * 6
    assert started == [2]


def test_predict_reads_on_one_worker_by_default() -> None:
    predict = typer.main.get_command(app).commands["predict"]
    assert next(p.default for p in predict.params if p.name == "workers") == 1


def test_iter_reports_streams_on_two_workers_and_fails_at_the_bad_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(parallel, "CHUNK_SIZE", 5)  # the bad line is in the second chunk
    path = tmp_path / "r.jsonl"
    path.write_text(
        "\n".join(json.dumps({"report_id": f"r{i}", "text": f"No effusion {i}."}) for i in range(5)) + "\n{bad\n"
    )
    stream = iter_reports(path, workers=2)
    assert [next(stream).report_id for _ in range(5)] == [f"r{i}" for i in range(5)]
    with pytest.raises(InputError, match=r"r\.jsonl:6: not valid JSON"):
        next(stream)
    with pytest.raises(InputError, match="no such file or folder"):
        iter_reports(tmp_path / "absent.jsonl")  # a missing path fails at the call, not when read


def test_csv_and_txt_sources_stream_in_order(tmp_path: Path) -> None:
    (tmp_path / "r.csv").write_text("report_id,text\na,Clear lungs.\nb,Small effusion.\n")
    assert [r.report_id for r in iter_reports(tmp_path / "r.csv")] == ["a", "b"]
    folder = tmp_path / "files" / "p1"
    folder.mkdir(parents=True)
    for name in ("s2", "s1"):
        (folder / f"{name}.txt").write_text("No pneumothorax.")
    assert [(r.report_id, r.patient_id) for r in iter_reports(tmp_path / "files")] == [("s1", "p1"), ("s2", "p1")]


def test_the_rule_teacher_writes_the_same_bytes_on_one_and_two_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(parallel, "CHUNK_SIZE", 16)  # several chunks, so two workers really share them
    write_jsonl(tmp_path / "r.jsonl", [report for report, _ in generate_corpus(120, 5, ["narrative", "templated"])])
    runner = CliRunner()
    for workers in (1, 2):
        args = ["label", "-i", str(tmp_path / "r.jsonl"), "-o", str(tmp_path / f"w{workers}.jsonl")]
        result = runner.invoke(app, [*args, "--workers", str(workers)])
        assert result.exit_code == 0, result.output
    one, two = (tmp_path / "w1.jsonl").read_bytes(), (tmp_path / "w2.jsonl").read_bytes()
    assert one == two
    assert [r.report_id for r in read_label_records(tmp_path / "w1.jsonl")] == [
        r.report_id for r in read_reports(tmp_path / "r.jsonl")
    ]


def test_a_stream_that_fails_half_way_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_text("old\n")

    def lines():
        yield "new"
        raise InputError("bad record")

    with pytest.raises(InputError):
        write_lines(path, lines())
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


def labels(report_id: str) -> LabelRecord:
    return LabelRecord(report_id=report_id, labels=dict.fromkeys(FINDINGS, "not_mentioned"))


def test_a_split_that_fails_leaves_the_previous_splits_whole(tmp_path: Path) -> None:
    reports = [Report(report_id=f"r{i}", text=f"Report {i}.") for i in range(30)]
    write_jsonl(tmp_path / "reports.jsonl", reports)
    write_jsonl(tmp_path / "labels.jsonl", [labels(r.report_id) for r in reports])
    fractions = Fractions(train=0.7, val=0.1, test=0.2)
    write_splits(tmp_path / "reports.jsonl", tmp_path / "labels.jsonl", None, tmp_path / "splits", 1, fractions)
    before = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "splits").rglob("*.jsonl")}
    write_jsonl(tmp_path / "labels.jsonl", [labels(r.report_id) for r in reports[:20]])
    with pytest.raises(InputError, match="10 reports have no teacher label"):
        write_splits(tmp_path / "reports.jsonl", tmp_path / "labels.jsonl", None, tmp_path / "splits", 1, fractions)
    assert {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "splits").rglob("*.jsonl")} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.jsonl", "reports.jsonl", "splits"]


def test_label_lookup_joins_records_in_any_order() -> None:
    lookup = LabelLookup(labels(i) for i in ["b", "a", "c"])
    assert [lookup.pop(i).report_id for i in ["a", "b", "c"]] == ["a", "b", "c"]
    assert lookup.pop("d") is None


def test_status_codes_read_as_the_label_dicts() -> None:
    records = [labels("a"), LabelRecord(report_id="b", labels={**labels("b").labels, "Edema": "present"})]
    assert dict(StatusCodes(records)) == labels_by_id(records)


def test_a_split_into_the_folder_of_its_inputs_replaces_only_the_split_folders(tmp_path: Path) -> None:
    reports = [Report(report_id=f"r{i}", text=f"Report {i}.") for i in range(30)]
    write_jsonl(tmp_path / "reports.jsonl", reports)
    write_jsonl(tmp_path / "labels.jsonl", [labels(r.report_id) for r in reports])
    fractions = Fractions(train=0.7, val=0.1, test=0.2)
    for _ in range(2):  # the second run replaces the first one's splits
        write_splits(tmp_path / "reports.jsonl", tmp_path / "labels.jsonl", None, tmp_path, 1, fractions)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.jsonl", "reports.jsonl", "test", "train", "val"]
    assert sum(len(read_reports(tmp_path / name / "reports.jsonl")) for name in ("train", "val", "test")) == 30
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "train").stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700


def test_files_replaced_together_keep_the_old_pair_when_the_body_or_the_swap_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pair = [tmp_path / "reports.jsonl", tmp_path / "out" / "labels.jsonl"]
    with replaced_together(*pair) as staged:
        for path in staged:
            path.write_text("old")
    with pytest.raises(InputError), replaced_together(*pair) as staged:
        staged[0].write_text("new")
        raise InputError("the teacher failed")
    assert [p.read_text() for p in pair] == ["old", "old"]

    rename = Path.rename

    def failing_rename(self: Path, target: Path) -> Path:
        if Path(target) == pair[1] and self.parent.name == "new":  # the second new file moving in
            raise OSError("disk gone")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", failing_rename)
    with pytest.raises(OSError, match="disk gone"), replaced_together(*pair) as staged:
        for path in staged:
            path.write_text("new")
    assert [p.read_text() for p in pair] == ["old", "old"]
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["labels.jsonl", "out", "reports.jsonl"]


def test_an_atomically_written_file_gets_the_mode_of_any_new_file(tmp_path: Path) -> None:
    """Not mkstemp's 0600: a team's shared checkout reads the pipeline's outputs under its umask."""
    umask = os.umask(0o027)
    try:
        write_text_atomically(tmp_path / "out.txt", "x")
    finally:
        os.umask(umask)
    assert (tmp_path / "out.txt").stat().st_mode & 0o777 == 0o640
