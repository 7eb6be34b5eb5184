"""Backfills on Ray Data: label a sharded corpus on a Ray cluster, one Parquet shard per input shard.

The driver lists the input shards, skips those whose output shard already exists (so a killed backfill
resumes where it stopped), resolves the model once and ships its files to the cluster through the object
store. CPU tasks read each shard with the project's readers and tokenize it; an actor pool (one actor per
GPU where the cluster has GPUs) runs the same `LabelingEngine` as `deberta-rad predict` on length-sorted,
token-budgeted batches; the driver turns the probabilities into label records with `prediction_record`,
so a record here equals the local engine's, and writes each shard atomically the moment it is complete.
Report text stays inside the pipeline: nothing here logs it.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from deberta_rad.data import InputError, read_reports, write_atomically
from deberta_rad.schema import FINDINGS, STATUSES, LabelRecord, TeacherInfo

if TYPE_CHECKING:
    import ray.data

logger = logging.getLogger(__name__)

SHARD_SUFFIXES = (".jsonl", ".csv")
OUTPUT_SUFFIX = ".parquet"
CELLS = len(FINDINGS) * len(STATUSES)
# Reports per Ray Data batch handed to a labeler actor; inside it the engine cuts length-sorted batches.
DEFAULT_ROWS_PER_BATCH = 1024
CONNECT_TIMEOUT_S = 5.0
READ_TASK_BASE_MEMORY = 512 * 2**20  # a worker with transformers and the tokenizer: 260 MiB measured

# What flows from the tokenizing tasks to the labeler actors: ids, no report text.
TOKENIZED_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),
        ("position", pa.int64()),
        ("shard_size", pa.int64()),
        ("report_id", pa.string()),
        ("institution", pa.string()),
        ("study_date", pa.string()),
        # Every unit's token ids back to back (a unit is the report, or each of its sentences) ...
        ("tokens", pa.list_(pa.int32())),
        # ... and each unit's length.
        ("unit_lengths", pa.list_(pa.int32())),
    ]
)
# A labelled row's identity: the same in every copy of a report Ray delivers twice.
IDENTITY = ("shard", "position", "shard_size", "report_id", "institution", "study_date")
LABELLED_SCHEMA = pa.schema(
    [
        *(f for f in TOKENIZED_SCHEMA if f.name not in ("tokens", "unit_lengths")),
        ("probabilities", pa.list_(pa.float32())),
    ]
)
# A label record (DESIGN.md section 3) as Parquet: one column per field, findings and statuses as struct fields.
RECORD_SCHEMA = pa.schema(
    [
        ("report_id", pa.string()),
        ("labels", pa.struct([(f, pa.string()) for f in FINDINGS])),
        ("probabilities", pa.struct([(f, pa.struct([(s, pa.float64()) for s in STATUSES])) for f in FINDINGS])),
        ("teacher", pa.struct([("name", pa.string()), ("model", pa.string()), ("prompt_version", pa.string())])),
        ("institution", pa.string()),
        ("timestamp", pa.string()),
    ]
)


class BackfillError(RuntimeError):
    """The cluster cannot run the backfill as asked (unreachable, refused, too few GPUs); named in one line."""


@dataclass(frozen=True)
class Shard:
    """One input file and the Parquet shard its labels go to."""

    source: Path
    output: Path

    @property
    def name(self) -> str:
        return self.output.name


@dataclass
class BackfillResult:
    """What a run did, for the command's summary line."""

    shards: int
    skipped: int
    labelled_shards: int = 0
    reports: int = 0
    seconds: float = 0.0
    actors: int = 0
    gpus_per_actor: float = 0.0
    address: str = ""
    written: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# The driver: shards, model, cluster
# ----------------------------------------------------------------------------------------------


def is_shard_file(path: Path) -> bool:
    """A file and not hidden: a hidden name is a temporary (`write_atomically`'s `.part-1.parquet.XXXX.parquet`
    of a killed run, an editor's swap file), never a shard."""
    return path.is_file() and not path.name.startswith(".")


def find_shards(input: str, output_dir: Path) -> list[Shard]:
    """The input shards (a folder's JSONL/CSV files, a glob of them, or one file), each with its output
    shard `<output>/<stem>.parquet`. Two shards with one stem would write one output: refused."""
    path = Path(input)
    if path.is_dir():
        sources = sorted(p for p in path.iterdir() if is_shard_file(p) and p.suffix in SHARD_SUFFIXES)
        where = f"{input}: folder holds no {'/'.join(SHARD_SUFFIXES)} report shards"
    elif glob.has_magic(input):
        sources = sorted(Path(p) for p in glob.glob(input) if Path(p).is_file())
        where = f"{input}: matches no report files"
        unsupported = [p for p in sources if p.suffix not in SHARD_SUFFIXES]
        if unsupported:
            raise InputError(f"{unsupported[0]}: not a report shard (use {', '.join(SHARD_SUFFIXES)})")
    elif path.is_file():
        sources, where = [path], ""
    else:
        raise InputError(f"{input}: no such file, folder or glob match")
    if not sources:
        raise InputError(where)
    shards, by_output = [], {}
    for source in sources:
        output = output_dir / f"{source.stem}{OUTPUT_SUFFIX}"
        if output in by_output:
            raise InputError(f"{by_output[output]} and {source} would both write {output}: rename one")
        by_output[output] = source
        shards.append(Shard(source=source, output=output))
    return shards


def check_model_dir(model_dir: Path) -> dict[str, Any]:
    """The student's config, read on the driver so an unreadable model fails before any cluster work."""
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{model_dir} is not a DeBERTa-RAD model directory (no config.json)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{config_path}: not a readable model config ({err})") from None
    if not isinstance(config, dict) or "max_seq_length" not in config:
        raise InputError(f"{config_path}: not a DeBERTa-RAD model config (no max_seq_length)")
    if not any(model_dir.glob("*.safetensors")):
        raise FileNotFoundError(f"{model_dir}: no safetensors weights beside config.json")
    return config


def model_files(model_dir: Path) -> tuple[dict[str, bytes], str]:
    """Every file of the model directory by relative path, and a digest of them: what the actors rebuild
    the directory from, so workers need no shared file system or registry access."""
    files = {str(p.relative_to(model_dir)): p.read_bytes() for p in sorted(model_dir.rglob("*")) if p.is_file()}
    digest = hashlib.sha256()
    for name, content in files.items():
        digest.update(name.encode())
        digest.update(hashlib.sha256(content).digest())
    return files, digest.hexdigest()[:16]


def check_reachable(address: str) -> None:
    """Fail in seconds, with the address named, when nothing listens there: `ray.init` on a dead address
    retries for minutes and then exits the process."""
    if address.startswith(("http://", "https://")):
        raise BackfillError(
            f"{address} is a dashboard (job submission) address: give it to `ray job submit`, or --ray the "
            "cluster's HOST:PORT (GCS, 6379 by default)"
        )
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise BackfillError(f"Ray address {address!r} is not auto, local, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise BackfillError(f"no Ray cluster answers at {address} ({reason})") from None


def code_runtime_env(package: Path) -> dict[str, Any] | None:
    """This package's code for the workers (`py_modules`), unless the job submitting this driver already
    ships modules (`ray job submit --runtime-env`): Ray refuses to merge two `py_modules`."""
    job_config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}") or "{}")
    if "py_modules" in (job_config.get("runtime_env") or {}):
        return None
    return {"py_modules": [str(package)]}


def connect(address: str | None, verbose: bool = False) -> str:
    """Join the Ray cluster (`auto`: the one this machine belongs to; `local`: start one in this process;
    else HOST:PORT or ray://HOST:PORT), shipping this package's code so workers run the driver's version.
    Returns the address used."""
    import ray
    import ray.data

    import deberta_rad

    address = address or os.environ.get("RAY_ADDRESS") or "auto"
    if address not in ("auto", "local"):
        check_reachable(address)
    try:
        ray.init(
            address=address,
            runtime_env=None if address == "local" else code_runtime_env(Path(deberta_rad.__file__).parent),
            logging_level=logging.INFO if verbose else logging.ERROR,
            log_to_driver=verbose,
            configure_logging=True,
        )
    except ConnectionError as err:
        raise BackfillError(f"no Ray cluster at {address}: {err}") from None
    except ray.exceptions.AuthenticationError as err:
        raise BackfillError(
            f"the Ray cluster at {address} refused this driver's token (RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH): "
            f"{str(err).splitlines()[0]}"
        ) from None
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = verbose
    context.print_on_execution_start = verbose
    # A worker's own exception (InputError naming file and line) reaches the driver, not Ray's wrapper.
    context.raise_original_map_exception = True
    logging.getLogger("ray.data").setLevel(logging.INFO if verbose else logging.CRITICAL)
    return address


def actor_resources(actors: int | None, gpus_per_actor: float | None, cpus_per_actor: float) -> tuple[int, float]:
    """How many labeler actors and GPUs each: by default one actor per GPU where the cluster has GPUs, and
    on a CPU cluster one actor per two CPUs (the other CPU reads and tokenizes). The pool has a fixed size
    and Ray Data waits for all of its actors without end: a pool the cluster cannot hold, with one CPU
    left for the reading tasks, is refused here."""
    import ray

    resources = ray.cluster_resources()
    gpus, cpus = resources.get("GPU", 0.0), resources.get("CPU", 0.0)
    gpus_per_actor = (1.0 if gpus else 0.0) if gpus_per_actor is None else gpus_per_actor
    fit_gpus = int(gpus // gpus_per_actor) if gpus_per_actor else None
    fit_cpus = int((cpus - 1) // cpus_per_actor) if cpus_per_actor else None  # one CPU reads and tokenizes
    if actors is None:
        actors = fit_gpus if fit_gpus is not None else int(cpus // (2 * max(cpus_per_actor, 1.0)))
        actors = max(1, min(actors, fit_cpus) if fit_cpus is not None else actors)
    if fit_gpus is not None and actors > fit_gpus:
        raise BackfillError(
            f"{actors} actor(s) of {gpus_per_actor:g} GPU(s) each need {actors * gpus_per_actor:g} GPU(s); the "
            f"cluster has {gpus:g} (Ray would wait for them forever): lower --actors or --num-gpus-per-actor"
        )
    if fit_cpus is not None and actors > fit_cpus:
        raise BackfillError(
            f"{actors} actor(s) of {cpus_per_actor:g} CPU(s) each, and 1 CPU to read and tokenize, need "
            f"{actors * cpus_per_actor + 1:g} CPU(s); the cluster has {cpus:g} (Ray would wait for them "
            "forever): lower --actors or --num-cpus-per-actor"
        )
    return actors, gpus_per_actor


def original_error(err: BaseException) -> BaseException:
    """The worker's own exception inside Ray's wrappers (RayTaskError keeps it as `cause`)."""
    while getattr(err, "cause", None) is not None and err is not err.cause:
        err = err.cause
    return err


# ----------------------------------------------------------------------------------------------
# The workers: read and tokenize (CPU tasks), label (actors)
# ----------------------------------------------------------------------------------------------


def local_model_dir(model: Any, digest: str) -> Path:
    """The shipped model files (``model``: their object-store reference, or the files themselves) as a
    directory on this node, written once per node and model, atomically: the workers of a node share it."""
    folder = Path(tempfile.gettempdir()) / "deberta-rad-backfill" / digest
    if (folder / "config.json").is_file():
        return folder
    import ray

    files = ray.get(model) if isinstance(model, ray.ObjectRef) else model
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{digest}."))
    try:
        for name, content in files.items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_bytes(content)
        try:
            staging.rename(folder)
        except OSError:  # another actor of this node got there first
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


_TOKENIZERS: dict[str, tuple[Any, str, int]] = {}


def tokenizer_of(model: Any, digest: str) -> tuple[Any, str, int]:
    """The model's tokenizer, unit and max length, loaded once per worker process (Ray reuses them)."""
    if digest not in _TOKENIZERS:
        from transformers import AutoTokenizer

        folder = local_model_dir(model, digest)
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        _TOKENIZERS[digest] = (
            AutoTokenizer.from_pretrained(folder),
            str(config.get("unit", "report")),
            int(config["max_seq_length"]),
        )
    return _TOKENIZERS[digest]


def read_and_tokenize(batch: pa.Table, model: Any, digest: str, rows_per_batch: int) -> Iterator[pa.Table]:
    """Read each shard named in ``batch`` with the project's readers (an `InputError` names file and line)
    and tokenize its reports as the engine does: whole reports, or each sentence for a sentence-level
    student. Yields tables of at most ``rows_per_batch`` reports, without their text."""
    from deberta_rad.sentences import report_sentences

    tokenizer, unit, max_length = tokenizer_of(model, digest)
    for row in batch.to_pylist():
        reports = read_reports(row["source"])
        for start in range(0, len(reports), rows_per_batch):
            chunk = reports[start : start + rows_per_batch]
            units = [[r.text] if unit == "report" else report_sentences(r.text) for r in chunk]
            flat = [text for report_units in units for text in report_units]
            ids = tokenizer(flat, truncation=True, max_length=max_length)["input_ids"] if flat else []
            tokens, unit_lengths, at = [], [], 0
            for report_units in units:
                taken = ids[at : at + len(report_units)]
                at += len(report_units)
                tokens.append([token for unit_ids in taken for token in unit_ids])
                unit_lengths.append([len(unit_ids) for unit_ids in taken])
            yield pa.Table.from_pydict(
                {
                    "shard": [row["shard"]] * len(chunk),
                    "position": list(range(start, start + len(chunk))),
                    "shard_size": [len(reports)] * len(chunk),
                    "report_id": [r.report_id for r in chunk],
                    "institution": [r.institution for r in chunk],
                    "study_date": [r.study_date for r in chunk],
                    "tokens": tokens,
                    "unit_lengths": unit_lengths,
                },
                schema=TOKENIZED_SCHEMA,
            )


def split_units(tokens: pa.ChunkedArray | pa.Array, unit_lengths: pa.ChunkedArray | pa.Array) -> list[list[tuple]]:
    """Each report's units as tuples of token ids, from the flat columns the tokenizing tasks wrote."""
    reports = []
    for flat, lengths in zip(tokens.to_pylist(), unit_lengths.to_pylist(), strict=True):
        bounds = itertools.accumulate(lengths, initial=0)
        reports.append([tuple(flat[a:b]) for a, b in itertools.pairwise(bounds)])
    return reports


class Labeler:
    """A Ray Data actor holding one `LabelingEngine` (on its GPU when it has one) for its whole life."""

    def __init__(self, model: Any, digest: str, engine_options: Mapping[str, Any]) -> None:
        from deberta_rad.predict import load_engine

        self.engine = load_engine(local_model_dir(model, digest), **engine_options)
        logger.info("labeler actor ready: %s", self.engine.describe())

    def score(self, units: Sequence[tuple]) -> np.ndarray:
        """[N, 13, 4] probabilities of tokenized units: the engine's length-sorted, token-budgeted batches
        (what `LabelingEngine.predict` does after tokenizing)."""
        import torch

        from deberta_rad.predict import length_sorted_batches

        engine = self.engine
        probabilities = np.zeros((len(units), len(FINDINGS), len(STATUSES)), dtype=np.float32)
        batches = length_sorted_batches([len(u) for u in units], engine.batch_size, engine.max_batch_tokens)
        with torch.inference_mode():
            for rows in batches:
                batch = engine.student.tokenizer.pad({"input_ids": [list(units[i]) for i in rows]}, return_tensors="np")
                probabilities[rows] = torch.from_numpy(engine.run(batch)).softmax(dim=-1).numpy()
        return probabilities

    def __call__(self, batch: pa.Table) -> pa.Table:
        """The batch with each report's [13 x 4] probabilities in place of its tokens."""
        units = split_units(batch.column("tokens"), batch.column("unit_lengths"))
        probabilities = self.report_probabilities(units).reshape(len(units), CELLS)
        flat = pa.array(list(probabilities), type=pa.list_(pa.float32()))
        return batch.drop_columns(["tokens", "unit_lengths"]).append_column("probabilities", flat)

    def report_probabilities(self, units: Sequence[Sequence[tuple]]) -> np.ndarray:
        """[N, 13, 4] per report. A sentence-level student scores each distinct sentence of the batch once
        and each report aggregates its own, as `LabelingEngine.predict` does."""
        from deberta_rad.sentences import aggregate

        if self.engine.student.unit == "report":
            return self.score([report[0] for report in units])
        distinct = list(dict.fromkeys(u for report in units for u in report))
        scored = dict(zip(distinct, self.score(distinct), strict=True))
        empty = np.zeros((0, len(FINDINGS), len(STATUSES)), dtype=np.float32)
        rows = [aggregate(np.stack([scored[u] for u in report]) if report else empty) for report in units]
        return np.stack(rows) if rows else empty


# ----------------------------------------------------------------------------------------------
# Output shards
# ----------------------------------------------------------------------------------------------


def records_table(records: Sequence[LabelRecord]) -> pa.Table:
    """Label records as a Parquet-ready table with the fixed RECORD_SCHEMA (every shard alike)."""
    rows = [record.model_dump(mode="json", exclude={"evidence"}) for record in records]
    return pa.Table.from_pylist(rows, schema=RECORD_SCHEMA)


def write_shard(path: Path, records: Sequence[LabelRecord]) -> None:
    """One output shard, written under a temporary name and renamed: a killed run leaves no torn shard
    (the hidden temporary, if any, is ignored by Parquet readers and by the resume check)."""
    table = records_table(records)
    write_atomically(path, lambda temporary: pq.write_table(table, temporary), suffix=OUTPUT_SUFFIX)


def read_shard(path: str | Path) -> list[LabelRecord]:
    """One output shard's label records, in its input shard's order."""
    return [LabelRecord.model_validate(row) for row in pq.read_table(path).to_pylist()]


def read_backfill(folder: str | Path) -> list[LabelRecord]:
    """Every label record of a backfill's output folder, shard by shard in name order."""
    paths = sorted(p for p in Path(folder).glob(f"*{OUTPUT_SUFFIX}") if is_shard_file(p))
    return [record for path in paths for record in read_shard(path)]


def shard_records(rows: Sequence[Mapping[str, Any]], info: TeacherInfo) -> list[LabelRecord]:
    """A complete shard's rows (in any order) as label records in input order, made by the local
    engine's own `prediction_record`."""
    from deberta_rad.predict import prediction_record

    ordered = sorted(rows, key=lambda row: row["position"])
    return [
        prediction_record(
            row["report_id"],
            np.asarray(row["probabilities"], dtype=np.float32).reshape(len(FINDINGS), len(STATUSES)),
            info,
            row["institution"],
            row["study_date"],
        )
        for row in ordered
    ]


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


def read_memory(pending: Sequence[Shard]) -> int:
    """Bytes a read-and-tokenize task reserves: the tokenizer, and its largest shard's reports several
    times over (parsed records, then a batch of token ids as Python lists)."""
    return READ_TASK_BASE_MEMORY + 4 * max(shard.source.stat().st_size for shard in pending)


def build_dataset(
    pending: Sequence[Shard],
    model: Any,
    digest: str,
    engine_options: Mapping[str, Any],
    actors: int,
    gpus_per_actor: float,
    cpus_per_actor: float,
    rows_per_batch: int,
) -> ray.data.Dataset:
    """Shards -> read + tokenize (CPU tasks) -> label (actor pool): the labelled rows, streamed."""
    import ray.data

    items = [{"source": str(shard.source), "shard": shard.name} for shard in pending]
    return (
        ray.data.from_items(items, override_num_blocks=len(items))
        .map_batches(
            read_and_tokenize,
            batch_size=1,
            batch_format="pyarrow",
            fn_kwargs={"model": model, "digest": digest, "rows_per_batch": rows_per_batch},
            num_cpus=1,
            # A task holds a whole shard: reserving its memory keeps Ray from packing too many on a node.
            # It also keeps this stage apart: Ray Data fuses a task stage into the actor stage after it
            # when their resources agree, and on a CPU cluster the actors would then tokenize themselves.
            memory=read_memory(pending),
        )
        .map_batches(
            Labeler,
            batch_size=rows_per_batch,
            batch_format="pyarrow",
            fn_constructor_kwargs={"model": model, "digest": digest, "engine_options": dict(engine_options)},
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_gpus=gpus_per_actor or None,
            num_cpus=cpus_per_actor,
        )
    )


def collect_and_write(dataset: ray.data.Dataset, pending: Sequence[Shard], info: TeacherInfo) -> tuple[int, list[str]]:
    """Stream the labelled rows to the driver and write each shard as soon as all its reports are in,
    so a run killed midway keeps every shard it finished. Returns reports labelled and shards written."""
    outputs = {shard.name: shard.output for shard in pending}
    # Each shard's rows by position: a row Ray delivers twice (a retried task or actor) counts once.
    rows: dict[str, dict[int, dict]] = {name: {} for name in outputs}
    written: list[str] = []
    reports = 0
    for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        for row in batch.to_pylist():
            name, position, size = row["shard"], row["position"], row["shard_size"]
            if name not in rows:
                if name in written:  # a late duplicate of a shard already written
                    continue
                raise BackfillError(f"{name}: the cluster returned rows of a shard that was not asked for")
            if not 0 <= position < size:
                raise BackfillError(f"{name}: the cluster returned report {position} of a shard of {size}")
            seen = rows[name].setdefault(position, row)
            # A duplicate is the same report (its probabilities may differ in float noise, batched anew): dropped.
            if seen is not row and any(seen[key] != row[key] for key in IDENTITY):
                raise BackfillError(f"{name}: the cluster returned report {position} twice, as different reports")
            if len(rows[name]) == size:  # positions are in range(size) and distinct: every report is in
                write_shard(outputs[name], shard_records(list(rows.pop(name).values()), info))
                reports += size
                written.append(name)
                logger.info("wrote %s (%d reports)", outputs[name], size)
    for name, left in rows.items():
        if left:
            size = next(iter(left.values()))["shard_size"]
            raise BackfillError(f"{name}: got {len(left)} of {size} reports back from the cluster")
        write_shard(outputs[name], [])  # a shard that holds no reports: an empty output, so it is not redone
        written.append(name)
    return reports, written


def backfill(
    input: str,
    output_dir: Path,
    model_ref: str,
    address: str | None = None,
    actors: int | None = None,
    gpus_per_actor: float | None = None,
    cpus_per_actor: float = 1.0,
    batch_size: int = 64,
    rows_per_batch: int = DEFAULT_ROWS_PER_BATCH,
    engine_options: Mapping[str, Any] | None = None,
    verbose: bool = False,
) -> BackfillResult:
    """Label every input shard whose output shard does not exist yet, on a Ray cluster. The model is
    resolved here, once (an MLflow alias is pinned to its version), and its files go to the actors."""
    from deberta_rad.registry import resolve_model
    from deberta_rad.settings import get_settings

    shards = find_shards(input, output_dir)
    pending = [shard for shard in shards if not shard.output.exists()]
    result = BackfillResult(shards=len(shards), skipped=len(shards) - len(pending))
    if not pending:
        return result
    model_dir, model_name = resolve_model(model_ref)
    check_model_dir(Path(model_dir))
    settings = get_settings()
    options = {
        "batch_size": batch_size,
        "backend": settings.engine_backend,
        "precision": settings.engine_precision,
        "max_batch_tokens": settings.engine_max_batch_tokens,
        **(engine_options or {}),
    }
    files, digest = model_files(Path(model_dir))
    import ray

    result.address = connect(address, verbose)
    try:
        result.actors, result.gpus_per_actor = actor_resources(actors, gpus_per_actor, cpus_per_actor)
        model = ray.put(files)
        del files
        dataset = build_dataset(
            pending, model, digest, options, result.actors, result.gpus_per_actor, cpus_per_actor, rows_per_batch
        )
        started = time.perf_counter()
        try:
            result.reports, result.written = collect_and_write(
                dataset, pending, TeacherInfo(name="deberta-rad", model=model_name)
            )
        except ray.exceptions.RayTaskError as err:
            raise original_error(err) from None  # the worker's own error: an InputError names file and line
        except ray.exceptions.RayError as err:
            summary = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise BackfillError(
                f"the Ray cluster failed the backfill ({type(err).__name__}: {summary}); finished shards are "
                "kept and a rerun labels the rest"
            ) from err
        result.seconds = time.perf_counter() - started
        result.labelled_shards = len(result.written)
    finally:
        ray.shutdown()
    return result


def describe(result: BackfillResult, output_dir: Path) -> str:
    """The command's summary: counts only (ids and text stay in the shards)."""
    skipped = f"{result.skipped} of {result.shards} shards already in {output_dir} (skipped)"
    if not result.labelled_shards:
        return f"{skipped}: nothing to do"
    speed = result.reports / max(result.seconds, 1e-9)
    gpus = f", {result.gpus_per_actor:g} GPU each" if result.gpus_per_actor else " on CPU"
    return (
        f"labelled {result.reports} reports in {result.labelled_shards} shards into {output_dir}; {skipped}; "
        f"{result.actors} actors{gpus} on Ray at {result.address} ({speed:.1f} reports/s)"
    )
