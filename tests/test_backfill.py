"""`deberta-rad backfill` on a real Ray cluster: a head and a worker node started here (`ray start`, token
auth with this module's own token, stopped after), the CLI run against it as a user would. Its Parquet
shards hold the local engine's records, a rerun redoes only the shard that is missing, and bad input or a
dead address ends in one line."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pytest
import torch
from conftest import free_port
from tiny_backbones import tiny_deberta_backbone

from deberta_rad.backfill import (
    BackfillError,
    BackfillResult,
    Labeler,
    Shard,
    actor_resources,
    check_model_dir,
    check_reachable,
    collect_and_write,
    describe,
    find_shards,
    model_files,
    read_and_tokenize,
    read_backfill,
    read_shard,
    shard_records,
)
from deberta_rad.data import InputError, read_reports, write_jsonl
from deberta_rad.model import student_from_backbone
from deberta_rad.predict import predict_reports
from deberta_rad.schema import FINDINGS, LabelRecord, TeacherInfo
from deberta_rad.settings import get_settings
from deberta_rad.synthetic import generate_corpus

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

BIN = Path(sys.executable).parent
SHARDS, REPORTS_PER_SHARD = 3, 12
# On two cores shared with other work: `ray start` of a node 10-40 s, a backfill of 36 reports 50-200 s.
START_TIMEOUT_S = 180
RUN_TIMEOUT_S = 600
START_ATTEMPTS = 3
STOP_GRACE_S = 20
# Probabilities may differ in the last float32 bits where the local engine batches reports differently.
PROBABILITY_ATOL = 1e-5


@dataclass
class RayCluster:
    address: str
    env: dict[str, str]
    log: Path


def ray_env(temp: Path) -> dict[str, str]:
    """The environment of the cluster and of the CLI: this cluster's own token, no usage stats, fp32 (the
    local engine is held to the same precision), and no project settings from outside."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DEBERTA_RAD_", "MLFLOW_", "RAY_"))}
    token = temp / "auth_token"
    token.write_text(secrets.token_hex(32))
    return env | {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "RAY_USAGE_STATS_ENABLED": "0",
        "DEBERTA_RAD_ENGINE_PRECISION": "fp32",
        "DEBERTA_RAD_MODEL_CACHE": str(temp / "model-cache"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }


def ray_command(args: list[str], env: dict[str, str], log: Path) -> bool:
    """Run a `ray` CLI command, its output appended to the cluster log; whether it succeeded."""
    with log.open("a") as out:
        out.write(f"$ ray {' '.join(args)}\n")
        out.flush()
        done = subprocess.run(
            [str(BIN / "ray"), *args], env=env, stdout=out, stderr=subprocess.STDOUT, timeout=START_TIMEOUT_S
        )
    return done.returncode == 0


def cluster_processes(temp: Path) -> list[psutil.Process]:
    """This cluster's processes, and no other Ray's: those whose command line or environment names its
    own temp dir (`--temp-dir`, and RAY_AUTH_TOKEN_PATH, which every process `ray start` spawns inherits;
    a worker's command line is rewritten to `ray::...`, its environment is not)."""

    def ours(value: str) -> bool:
        return value.endswith(str(temp)) or f"{temp}/" in value

    found = []
    for process in psutil.process_iter():
        if process.pid == os.getpid():
            continue
        try:
            if any(ours(arg) for arg in process.cmdline()) or ours(process.environ().get("RAY_AUTH_TOKEN_PATH", "")):
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def stop_ray(temp: Path) -> None:
    """Stop this cluster's nodes (`ray stop` would stop every Ray of the machine): SIGTERM, then SIGKILL to
    what is left after STOP_GRACE_S."""
    processes = cluster_processes(temp)
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=STOP_GRACE_S)
    for process in alive + cluster_processes(temp):  # and any spawned while the nodes went down
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


def start_cluster(temp: Path, env: dict[str, str], log: Path) -> str:
    """A head and a worker node of one CPU each; returns the head's address. A node that does not register
    within Ray's fixed 30 s (seen once on two cores loaded four times over) fails `ray start`: then the
    whole cluster is stopped and started again, up to START_ATTEMPTS times."""
    # No GPU for either node: on a GPU machine both would claim the same one.
    common = ["--num-cpus", "1", "--num-gpus", "0", "--temp-dir", str(temp), "--disable-usage-stats"]
    for _ in range(START_ATTEMPTS):
        port = free_port()
        head = ["start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--include-dashboard=false"]
        worker = ["start", "--address", f"127.0.0.1:{port}", "--node-ip-address", "127.0.0.1"]
        if ray_command([*head, *common], env, log) and ray_command([*worker, *common], env, log):
            return f"127.0.0.1:{port}"
        stop_ray(temp)
    pytest.fail(f"no Ray cluster after {START_ATTEMPTS} attempts:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[RayCluster]:
    """A local cluster of two nodes, on its own token and a short temp dir (Ray's socket paths must stay
    within the 107 bytes of a Unix socket path), stopped afterwards."""
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    env, log = ray_env(temp), temp / "cluster.log"
    try:
        started = time.monotonic()
        address = start_cluster(temp, env, log)
        print(f"Ray cluster of 2 nodes up after {time.monotonic() - started:.1f} s")
        yield RayCluster(address=address, env=env, log=log)
    finally:
        stop_ray(temp)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three shards of synthetic reports, and two tiny random students (DeBERTa-v3 style): sentence-level
    (the project's default) and report-level."""
    root = tmp_path_factory.mktemp("backfill")
    reports = [report for report, _ in generate_corpus(SHARDS * REPORTS_PER_SHARD, seed=11)]
    for i in range(SHARDS):
        write_jsonl(root / "shards" / f"part-{i}.jsonl", reports[i * REPORTS_PER_SHARD : (i + 1) * REPORTS_PER_SHARD])
    backbone = tiny_deberta_backbone(root / "tiny-deberta")
    for unit in ("sentence", "report"):
        torch.manual_seed(0)
        student_from_backbone(str(backbone), max_length=64, unit=unit).save(root / f"student-{unit}")
    return root


def backfill(cluster: RayCluster, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI, as a user runs it against the cluster."""
    command = [str(BIN / "deberta-rad"), *args]
    return subprocess.run(command, cwd=cwd, env=cluster.env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


def local_engine_records(model: str, shard: Path) -> list[LabelRecord]:
    """`predict_reports` on a shard's reports, in fp32 as the cluster runs."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DEBERTA_RAD_ENGINE_PRECISION", "fp32")
        get_settings.cache_clear()
        try:
            return predict_reports(model, read_reports(shard))[0]
        finally:
            get_settings.cache_clear()


def assert_same_records(got: list[LabelRecord], expected: list[LabelRecord], model: str) -> float:
    """Ids in input order, labels, model and provenance equal; probabilities to float32 noise. Returns the
    largest probability difference."""
    assert [r.report_id for r in got] == [r.report_id for r in expected]
    largest = 0.0
    for ours, theirs in zip(got, expected, strict=True):
        assert ours.labels == theirs.labels, ours.report_id
        assert ours.teacher == theirs.teacher and ours.teacher.model == model
        assert (ours.institution, ours.timestamp) == (theirs.institution, theirs.timestamp)
        np.testing.assert_allclose(probability_matrix(ours), probability_matrix(theirs), atol=PROBABILITY_ATOL)
        largest = max(largest, float(np.abs(probability_matrix(ours) - probability_matrix(theirs)).max()))
    return largest


def probability_matrix(record: LabelRecord) -> np.ndarray:
    return np.array([list(record.probabilities[f].values()) for f in FINDINGS])


def test_backfill_gives_the_local_engines_records_and_a_rerun_redoes_only_the_missing_shard(
    ray_cluster: RayCluster, workspace: Path, tmp_path: Path
) -> None:
    model = str(workspace / "student-sentence")
    output = tmp_path / "labels"
    args = ["backfill", "--input", str(workspace / "shards"), "--output", str(output), "--model", model]
    args += ["--ray", ray_cluster.address, "--rows-per-batch", "8"]

    started = time.monotonic()
    first = backfill(ray_cluster, tmp_path, "--verbose", *args)
    print(f"first backfill: {time.monotonic() - started:.1f} s")
    assert first.returncode == 0, first.stderr[-4000:]
    assert f"labelled {SHARDS * REPORTS_PER_SHARD} reports in {SHARDS} shards" in first.stdout
    assert f"0 of {SHARDS} shards already in" in first.stdout
    # Read and tokenized by CPU tasks, labelled by an actor pool: two stages, not fused into one.
    assert "TaskPoolMapOperator[MapBatches(read_and_tokenize)] -> ActorPoolMapOperator[MapBatches(Labeler)]" in (
        first.stderr
    )
    names = [f"part-{i}" for i in range(SHARDS)]
    assert sorted(p.name for p in output.iterdir()) == [f"{name}.parquet" for name in names]  # no temporaries
    for name in names:
        expected = local_engine_records(model, workspace / "shards" / f"{name}.jsonl")
        largest = assert_same_records(read_shard(output / f"{name}.parquet"), expected, model)
        print(f"{name}: largest probability difference from the local engine {largest:.2e}")
    # Not one report's text in anything the command printed, even verbose.
    texts = [r.text for r in read_reports(workspace / "shards" / "part-0.jsonl")]
    longest_line = max((line for text in texts for line in text.splitlines()), key=len)
    assert longest_line not in first.stdout + first.stderr

    before = {p.name: p.stat().st_mtime_ns for p in output.iterdir()}
    redone = read_shard(output / "part-1.parquet")
    (output / "part-1.parquet").unlink()
    started = time.monotonic()
    second = backfill(ray_cluster, tmp_path, *args)
    print(f"resumed backfill: {time.monotonic() - started:.1f} s")
    assert second.returncode == 0, second.stderr[-4000:]
    assert f"labelled {REPORTS_PER_SHARD} reports in 1 shards" in second.stdout
    assert f"{SHARDS - 1} of {SHARDS} shards already in" in second.stdout
    after = {p.name: p.stat().st_mtime_ns for p in output.iterdir()}
    assert {n: t for n, t in after.items() if n != "part-1.parquet"} == {
        n: t for n, t in before.items() if n != "part-1.parquet"
    }
    again = read_shard(output / "part-1.parquet")
    assert [(r.report_id, r.labels) for r in again] == [(r.report_id, r.labels) for r in redone]
    assert len(read_backfill(output)) == SHARDS * REPORTS_PER_SHARD


def test_the_stages_give_a_report_level_students_records_in_process(workspace: Path) -> None:
    """The same functions the cluster runs, called here in order (the Ray plumbing around them is the
    cluster tests'): a report-level student's records equal the local engine's too."""
    model = str(workspace / "student-report")
    files, digest = model_files(Path(model))
    shard = workspace / "shards" / "part-2.jsonl"
    request = pa.table({"source": [str(shard)], "shard": ["part-2.parquet"]})
    tokenized = list(read_and_tokenize(request, files, digest, rows_per_batch=5))
    assert [t.num_rows for t in tokenized] == [5, 5, 2] and "text" not in tokenized[0].column_names
    labeler = Labeler(files, digest, {"batch_size": 4, "precision": "fp32"})
    rows = [row for table in reversed(tokenized) for row in labeler(table).to_pylist()]  # any order
    records = shard_records(rows, TeacherInfo(name="deberta-rad", model=model))
    assert_same_records(records, local_engine_records(model, shard), model)


def test_shards_are_a_folder_a_glob_or_a_file_and_one_output_each(workspace: Path, tmp_path: Path) -> None:
    shards = workspace / "shards"
    by_glob = find_shards(str(shards / "part-[02].jsonl"), tmp_path)
    assert [(s.source.name, s.output) for s in by_glob] == [
        ("part-0.jsonl", tmp_path / "part-0.parquet"),
        ("part-2.jsonl", tmp_path / "part-2.parquet"),
    ]
    assert len(find_shards(str(shards), tmp_path)) == SHARDS
    assert len(find_shards(str(shards / "part-1.jsonl"), tmp_path)) == 1
    twin = tmp_path / "twins"
    twin.mkdir()
    (twin / "a.jsonl").write_text("")
    (twin / "a.csv").write_text("report_id,text\n")
    with pytest.raises(InputError, match=r"a\.csv and .*a\.jsonl would both write"):
        find_shards(str(twin), tmp_path)
    with pytest.raises(InputError, match="folder holds no"):
        find_shards(str(workspace / "student-report"), tmp_path)


class FakeDataset:
    """What `collect_and_write` reads of a Ray dataset: its batches of labelled rows."""

    def __init__(self, *batches: list[dict]) -> None:
        self.batches = batches

    def iter_batches(self, **_: object) -> Iterator[pa.Table]:
        return (pa.Table.from_pylist(rows) for rows in self.batches)


def labelled_row(shard: str, position: int, size: int, report_id: str | None = None) -> dict:
    probabilities = np.full(len(FINDINGS) * 4, 0.25, dtype=np.float32).tolist()
    return {
        "shard": shard, "position": position, "shard_size": size, "report_id": report_id or f"{shard}-{position}",
        "institution": None, "study_date": None, "probabilities": probabilities,
    }  # fmt: skip


def test_a_row_delivered_twice_counts_once_and_temporaries_are_no_shards(tmp_path: Path) -> None:
    """A retried Ray task delivers a row again: the shard is written only once every position is in."""
    info = TeacherInfo(name="deberta-rad", model="m")
    output = tmp_path / "labels"
    shard = Shard(source=tmp_path / "a.jsonl", output=output / "a.parquet")
    first = [labelled_row("a.parquet", 0, 3), labelled_row("a.parquet", 1, 3), labelled_row("a.parquet", 1, 3)]
    reports, written = collect_and_write(FakeDataset(first, [labelled_row("a.parquet", 2, 3)]), [shard], info)
    assert (reports, written) == (3, ["a.parquet"])
    assert [r.report_id for r in read_shard(shard.output)] == ["a.parquet-0", "a.parquet-1", "a.parquet-2"]

    (output / ".a.parquet.k2j4x.parquet").write_bytes(b"torn")  # a killed run's temporary
    assert [r.report_id for r in read_backfill(output)] == ["a.parquet-0", "a.parquet-1", "a.parquet-2"]
    (tmp_path / ".b.jsonl").write_text("")
    (tmp_path / "a.jsonl").write_text("")
    assert [s.source.name for s in find_shards(str(tmp_path), output)] == ["a.jsonl"]

    other = Shard(source=tmp_path / "b.jsonl", output=output / "b.parquet")
    short = FakeDataset([labelled_row("b.parquet", 0, 2), labelled_row("b.parquet", 0, 2)])
    with pytest.raises(BackfillError, match="got 1 of 2 reports"):
        collect_and_write(short, [other], info)
    clash = FakeDataset([labelled_row("b.parquet", 0, 2), labelled_row("b.parquet", 0, 2, report_id="x")])
    with pytest.raises(BackfillError, match="report 0 twice, as different reports"):
        collect_and_write(clash, [other], info)
    assert not other.output.exists()


@pytest.mark.parametrize(
    ("resources", "actors", "gpus_per_actor", "expected"),
    [
        ({"CPU": 2.0}, None, None, (1, 0.0)),
        ({"CPU": 2.0}, 2, None, "2 actor.* need 3 CPU.*the cluster has 2"),
        ({"CPU": 16.0, "GPU": 2.0}, None, None, (2, 1.0)),
        ({"CPU": 16.0, "GPU": 2.0}, None, 0.5, (4, 0.5)),
        ({"CPU": 16.0, "GPU": 2.0}, 3, None, "3 actor.* need 3 GPU.*the cluster has 2"),
        ({"CPU": 2.0, "GPU": 2.0}, None, None, (1, 1.0)),
        ({"CPU": 4.0}, None, 1.0, "need 1 GPU.*the cluster has 0"),
    ],
)
def test_an_actor_pool_the_cluster_cannot_hold_is_refused(
    monkeypatch: pytest.MonkeyPatch, resources: dict, actors: int | None, gpus_per_actor: float | None, expected
) -> None:
    """Ray Data waits forever for a fixed pool's actors: what cannot start is refused, naming resources."""
    import ray

    monkeypatch.setattr(ray, "cluster_resources", lambda: resources)
    if isinstance(expected, str):
        with pytest.raises(BackfillError, match=expected):
            actor_resources(actors, gpus_per_actor, 1.0)
    else:
        assert actor_resources(actors, gpus_per_actor, 1.0) == expected


def test_an_unreadable_model_or_address_is_refused_on_the_driver(workspace: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        check_model_dir(workspace / "shards")
    broken = tmp_path / "broken"
    shutil.copytree(workspace / "student-report", broken)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(InputError, match=r"config.json: not a readable model config"):
        check_model_dir(broken)
    (broken / "config.json").write_text((workspace / "student-report" / "config.json").read_text())
    (broken / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no safetensors weights"):
        check_model_dir(broken)
    with pytest.raises(BackfillError, match="is not auto, local, HOST:PORT"):
        check_reachable("no-port")
    with pytest.raises(BackfillError, match="dashboard"):
        check_reachable("http://127.0.0.1:8265")
    started = time.monotonic()
    with pytest.raises(BackfillError, match="no Ray cluster answers"):
        check_reachable(f"127.0.0.1:{free_port()}")
    assert time.monotonic() - started < 10  # not ray.init's minutes of retries
    done = BackfillResult(shards=3, skipped=3)
    assert describe(done, tmp_path) == f"3 of 3 shards already in {tmp_path} (skipped): nothing to do"


def test_a_malformed_shard_is_named_with_its_line_in_one_line(
    ray_cluster: RayCluster, workspace: Path, tmp_path: Path
) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    shutil.copy(workspace / "shards" / "part-0.jsonl", shards / "good.jsonl")
    (shards / "bad.jsonl").write_text('{"report_id": "r1", "text": "No effusion."}\n{"report_id": "r2", "text": \n')
    done = backfill(
        ray_cluster, tmp_path, "backfill", "--input", str(shards), "--output", str(tmp_path / "labels"),
        "--model", str(workspace / "student-report"), "--ray", ray_cluster.address,
    )  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr[-4000:]
    assert f"error: {shards / 'bad.jsonl'}:2: not valid JSON" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "labels" / "bad.parquet").exists()


def test_without_ray_the_command_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, workspace: Path, tmp_path: Path
) -> None:
    """Ray is an extra (`deberta-rad[ray]`): where it is not installed, the command says how to get it."""
    from typer.testing import CliRunner

    from deberta_rad.cli import app

    monkeypatch.setitem(sys.modules, "ray", None)  # what find_spec reports for a package that is not there
    args = ["backfill", "--input", str(workspace / "shards"), "--output", str(tmp_path / "labels"), "--ray", "local"]
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 2, done.output
    assert done.output.strip() == "error: deberta-rad backfill needs Ray: pip install 'deberta-rad[ray]'"
    assert not (tmp_path / "labels").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--input", "{root}/missing"], "error: {root}/missing: no such file, folder or glob match"),
        (["--ray", "127.0.0.1:{dead_port}"], "error: no Ray cluster answers at 127.0.0.1:{dead_port} ("),
    ],
    ids=["missing-input", "dead-address"],
)
def test_what_cannot_run_is_said_in_one_line(workspace: Path, tmp_path: Path, args: list[str], message: str) -> None:
    """No cluster needed: each fails on the driver before any Ray work."""
    values = {"root": workspace, "dead_port": free_port()}
    defaults = {"--input": str(workspace / "shards"), "--model": str(workspace / "student-report"), "--ray": "local"}
    options = defaults | dict(zip(args[::2], (a.format(**values) for a in args[1::2]), strict=True))
    command = ["backfill", "--output", str(tmp_path / "labels"), *(x for pair in options.items() for x in pair)]
    env = ray_env(tmp_path)
    done = subprocess.run(
        [str(BIN / "deberta-rad"), *command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert message.format(**values) in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "labels").exists()
