"""The Python half of `benchmarks/gpu.sh` (issue 24): build the benchmark's student, write the params of
its training runs, search the largest token budget that fits, and combine every step's figures into one
JSON and a table. gpu.sh calls each subcommand as one bounded step; the same code runs on a GPU machine
and, with tiny sizes, in the CPU dry run.

    python benchmarks/gpu_bench.py build --size base --max-length 256 --out OUT/model --json OUT/build.json
    python benchmarks/gpu_bench.py params --out OUT --backbone OUT/model/backbone [--dry-run]
    python benchmarks/gpu_bench.py token-budget --model OUT/model/student --json OUT/token_budget.json
    python benchmarks/gpu_bench.py combine --out OUT [--dry-run]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import json
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
# The test suite's DeBERTa-v3 style SentencePiece tokenizer, trained here on generated reports (no model hub).
sys.path.insert(0, str(REPO / "tests"))

# DeBERTa-v3-base's architecture (microsoft/deberta-v3-base config.json) except its vocabulary, which is
# the locally built tokenizer's; the dry run shrinks only the sizes.
DEBERTA_V3 = {
    "max_position_embeddings": 512,
    "relative_attention": True,
    "position_buckets": 256,
    "norm_rel_ebd": "layer_norm",
    "share_att_key": True,
    "pos_att_type": ["p2c", "c2p"],
    "position_biased_input": False,
    "layer_norm_eps": 1e-7,
    "hidden_act": "gelu",
    "max_relative_positions": -1,
    "type_vocab_size": 0,
}
SIZES = {
    "base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
    "tiny": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64},
}
# Sections of gpu.json, each made by these steps of gpu.sh (a failed step leaves its section an error).
SECTIONS = {
    "student": ("build",),
    "inference": ("generate", "bench"),
    "token_budget": ("token-budget",),
    "training": ("bench-train-deepspeed", "bench-train-plain"),
    "kd_training": ("kd-generate", "kd-label", "kd-split", "kd-sentences", "kd-train"),
}
TRAIN_SIDES = ("deepspeed", "plain")
# Sections whose figures are kept for the steps that ran when another of their steps failed: one side of
# bench-train says something alone (the first GPU run stopped the plain side at its time limit).
PARTIAL_SECTIONS = {"training"}


def read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def write_json(path: Path, payload: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


# --- step 1: the student -------------------------------------------------------------------------------


def build(size: str, max_length: int, out: Path) -> dict[str, Any]:
    """A DebertaV2 encoder of ``size`` with random weights and the locally built tokenizer (``out/backbone``),
    and a report-level student on it in the project's model format (``out/student``, `load_student` reads it)."""
    import torch
    from tiny_backbones import deberta_v3_tokenizer
    from transformers import DebertaV2Config, DebertaV2Model

    from deberta_rad.model import student_from_backbone

    torch.manual_seed(0)
    tokenizer = deberta_v3_tokenizer()
    config = DebertaV2Config(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **DEBERTA_V3, **SIZES[size]
    )
    DebertaV2Model(config).save_pretrained(out / "backbone")
    tokenizer.save_pretrained(out / "backbone")
    student = student_from_backbone(str(out / "backbone"), max_length, pooling="mean", unit="report")
    student.save(out / "student")
    return {
        "size": size,
        "architecture": "DebertaV2 (DeBERTa-v3: relative attention, p2c + c2p), random weights",
        **SIZES[size],
        "vocab_size": len(tokenizer),
        "tokenizer": "SentencePiece Unigram trained on generated reports (tests/tiny_backbones.py)",
        "parameters": sum(p.numel() for p in student.model.parameters()),
        "max_length": max_length,
        "unit": student.unit,
        "backbone_dir": str(out / "backbone"),
        "student_dir": str(out / "student"),
    }


# --- the training runs' params -------------------------------------------------------------------------


def demo_backbone_loads(name: str) -> str | None:
    """None when the demo's backbone loads here, else why not (the offline MiniLM travels in a PyPI
    package of about 90 MB, more than a device machine's carried files may hold)."""
    from deberta_rad.model import BackboneUnavailableError, load_backbone

    try:
        load_backbone(name)
    except BackboneUnavailableError as err:
        return str(err).split(" (")[0]
    return None


def write_params(out: Path, backbone: Path, dry_run: bool) -> dict[str, Any]:
    """params.yaml copies: for `bench-train` with DeepSpeed ZeRO-2 and without it (the benchmark's student),
    and for the KD training: the demo's knobs (the repo's params.yaml) for one epoch, on the demo's
    backbone where it loads (on a GPU run) or else the benchmark's."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    batch = 8 if dry_run else 32
    for deepspeed in (True, False):
        bench = json.loads(json.dumps(params))
        bench["model"].update(backbone=str(backbone), unit="report")
        bench["train"].update(batch_size=batch, deepspeed=deepspeed)
        name = "deepspeed" if deepspeed else "plain"
        (out / f"params_{name}.yaml").write_text(yaml.safe_dump(bench, sort_keys=False))

    demo = params["model"]["backbone"]
    unavailable = "dry run: tiny sizes" if dry_run else demo_backbone_loads(demo)
    kd = json.loads(json.dumps(params))
    kd["train"]["epochs"] = 1
    if unavailable:
        kd["model"]["backbone"] = str(backbone)
    if dry_run:
        kd["train"]["batch_size"] = 8
    (out / "kd").mkdir(parents=True, exist_ok=True)
    (out / "kd" / "params.yaml").write_text(yaml.safe_dump(kd, sort_keys=False))
    choice = {
        "demo_backbone": demo,
        "backbone": kd["model"]["backbone"],
        "why_not_the_demo_backbone": unavailable,
        "epochs": 1,
        "unit": kd["model"]["unit"],
        "batch_size": kd["train"]["batch_size"],
        "deepspeed": kd["train"]["deepspeed"],
        "pretrain": "skipped (the demo pretrains the backbone first; here the KD stage alone is timed)",
    }
    write_json(out / "kd" / "choice.json", choice)
    return choice


# --- step 3: the largest token budget that fits --------------------------------------------------------


def token_budget(model_dir: Path, start: int, cap: int, length: int | None, time_limit_s: float) -> dict[str, Any]:
    """Double the engine's batch token budget from ``start`` until a batch of that many tokens at the
    student's full length (the worst case: attention grows with the length) no longer fits the device,
    ``cap`` is passed, or the next try would overrun ``time_limit_s``. Each try is one forward pass of the
    engine's own runner (its device and bf16) on random token ids."""
    import numpy as np
    import torch

    from deberta_rad.bench import device_description, working_memory_mb
    from deberta_rad.model import load_student
    from deberta_rad.predict import DEFAULT_BATCH_TOKENS, LabelingEngine
    from deberta_rad.settings import get_settings

    student = load_student(model_dir)
    length = length or student.max_length
    vocab = len(student.tokenizer)
    engine = LabelingEngine(student, batch_size=cap, precision="bf16", max_batch_tokens=cap)
    device = engine.device
    # What `deberta-rad predict` uses here (this engine was given the cap): the setting, else the device's default.
    default_budget = get_settings().engine_max_batch_tokens or DEFAULT_BATCH_TOKENS[device.type]
    rng = np.random.default_rng(0)

    def batch(rows: int) -> dict[str, np.ndarray]:
        ids = rng.integers(5, vocab, size=(rows, length), dtype=np.int64)  # past the special tokens
        return {"input_ids": ids, "attention_mask": np.ones_like(ids)}

    def run(rows: int) -> float:
        started = time.perf_counter()
        with torch.inference_mode():
            engine.run(batch(rows))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - started

    run(1)  # warm-up: kernels, allocator
    deadline = time.monotonic() + time_limit_s
    tries: list[dict[str, Any]] = []
    stopped_by, error, budget = "cap", None, start
    while budget <= cap:
        if tries and time.monotonic() + 2.5 * tries[-1]["seconds"] > deadline:
            stopped_by = "time_limit"
            break
        rows = max(1, budget // length)
        try:
            with working_memory_mb(device) as memory:
                seconds = run(rows)
        except torch.OutOfMemoryError as err:
            stopped_by, error = "out_of_memory", str(err).splitlines()[0][:300]
        except RuntimeError as err:  # e.g. a kernel's index range: past what fits all the same
            stopped_by, error = "error", f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
        else:
            tokens = rows * length
            tries.append(
                {
                    "max_batch_tokens": budget,
                    "fits": True,
                    "rows": rows,
                    "tokens": tokens,
                    "seconds": seconds,
                    "tokens_per_s": tokens / seconds,
                    **memory,
                }
            )
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if error:
            tries.append({"max_batch_tokens": budget, "rows": rows, "tokens": rows * length, "fits": False})
            break
        budget *= 2
    fitted = [t for t in tries if t["fits"]]
    result: dict[str, Any] = {
        "device": device_description(device),
        "precision": engine.precision,
        "length": length,
        "start": start,
        "cap": cap,
        "time_limit_s": time_limit_s,
        "largest_fitting_budget": fitted[-1]["max_batch_tokens"] if fitted else None,
        "stopped_by": stopped_by,
        "stop_error": error,
        "tries": tries,
        "default_budget": default_budget,
    }
    if device.type == "cuda":
        result["device_memory_mb"] = torch.cuda.get_device_properties(device).total_memory / 2**20
    else:
        result["note"] = (
            "no CUDA device: a bounded search on the CPU (host memory, not a GPU's); the largest budget that "
            "fits a GPU is not measured"
        )
    return result


# --- the summary ---------------------------------------------------------------------------------------


def read_steps(out: Path) -> list[dict[str, Any]]:
    """gpu.sh's record of each step: name, exit code, seconds, limit."""
    path = out / "steps.tsv"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        name, rc, seconds, limit = line.split("\t")
        steps.append({"name": name, "exit_code": int(rc), "seconds": float(seconds), "limit_s": int(limit)})
    return steps


def failure(out: Path, steps: Sequence[Mapping[str, Any]], names: Sequence[str]) -> str | None:
    """Why a section has no figures: its first failed (or never run) step and its log's last line."""
    done = {step["name"]: step for step in steps}
    for name in names:
        step = done.get(name)
        if step is None:
            return f"step {name} did not run"
        if step["exit_code"] != 0:
            timed_out = " (timed out)" if step["exit_code"] in (124, 137) else ""
            log = out / "logs" / f"{name}.log"
            lines = (
                [line for line in log.read_text(errors="replace").splitlines() if line.strip()] if log.is_file() else []
            )
            last = lines[-1][:300] if lines else ""
            return f"step {name} failed with exit code {step['exit_code']}{timed_out}: {last}"
    return None


def kd_summary(out: Path) -> dict[str, Any]:
    """The KD run: what was trained, and what MLflow recorded (status, metrics) in the run's store."""
    import mlflow

    choice = read_json(out / "kd" / "choice.json") or {}
    run_file = read_json(out / "kd" / "student" / "training_run.json")
    if run_file is None:
        raise FileNotFoundError(f"{out / 'kd' / 'student' / 'training_run.json'}: the KD training wrote no model")
    uri = f"sqlite:///{out / 'mlflow.db'}"
    run = mlflow.MlflowClient(tracking_uri=uri).get_run(run_file["mlflow_run_id"])
    metrics = run.data.metrics
    train = out / "kd" / ("sentences" if choice.get("unit") == "sentence" else "splits") / "train" / "reports.jsonl"
    examples = sum(1 for line in train.read_text().splitlines() if line.strip())
    return {
        **choice,
        "train_examples": examples,
        "mlflow": {
            "tracking_uri": uri,
            "experiment": mlflow.MlflowClient(tracking_uri=uri).get_experiment(run.info.experiment_id).name,
            "run_id": run.info.run_id,
            "status": run.info.status,
            "metrics": {key: metrics[key] for key in sorted(metrics)},
        },
    }


def training_summary(out: Path, steps: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """`bench-train` with DeepSpeed ZeRO-2 and with the plain Trainer, each side's train-stage batches. A side
    whose step failed is named under `missing` with the reason, and the side that ran keeps its figures (the
    ratios need both)."""
    missing = {name: reason for name in TRAIN_SIDES if (reason := failure(out, steps, (f"bench-train-{name}",)))}
    runs = {name: read_json(out / f"train_{name}.json") for name in TRAIN_SIDES if name not in missing}
    missing |= {name: f"{out / f'train_{name}.json'} was not written" for name, run in runs.items() if run is None}
    side = {name: run["train_stage"] for name, run in runs.items() if run is not None}
    if not side:
        raise FileNotFoundError("no bench-train figures: " + "; ".join(missing.values()))
    summary: dict[str, Any] = {
        "batches": "the train stage's (length-grouped, padded to the longest)",
        "reports_per_s": {name: s["reports_per_s"] for name, s in side.items()},
        "peak_memory_mb": {name: s["working_memory_mb"] for name, s in side.items()},
        "precision": {name: s["precision"] for name, s in side.items()},
        "peak_memory_is": "memory taken during the run on top of what was held before it (the device's on a GPU, "
        "the resident set on a CPU): weights, gradients, optimizer state, activations",
        "runs": {name: run for name, run in runs.items() if run is not None},
    }
    if missing:
        return summary | {"missing": missing}
    return summary | {
        "deepspeed_speedup": side["deepspeed"]["reports_per_s"] / side["plain"]["reports_per_s"],
        "memory_ratio": side["deepspeed"]["working_memory_mb"] / max(side["plain"]["working_memory_mb"], 1e-9),
    }


def environment() -> dict[str, Any]:
    import torch

    from deberta_rad.bench import device_description

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    versions = {}
    for package in ("torch", "transformers", "deepspeed", "mlflow-skinny", "accelerate"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "device": device_description(device),
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "device_memory_mb": torch.cuda.get_device_properties(device).total_memory / 2**20
        if device.type == "cuda"
        else None,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "versions": versions,
    }


def combine(out: Path, dry_run: bool, wall_s: float | None) -> dict[str, Any]:
    """gpu.json: every section's figures, or the reason it has none."""
    steps = read_steps(out)
    makers = {
        "student": lambda: read_json(out / "build.json"),
        "inference": lambda: read_json(out / "bench.json"),
        "token_budget": lambda: read_json(out / "token_budget.json"),
        "training": lambda: training_summary(out, steps),
        "kd_training": lambda: kd_summary(out),
    }
    result: dict[str, Any] = {
        "benchmark": "benchmarks/gpu.sh (issue 24)",
        "mode": "dry-run" if dry_run else "full",
        "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "wall_s": wall_s,
        **environment(),
    }
    errors = {}
    for section, maker in makers.items():
        try:
            reason = failure(out, steps, SECTIONS[section])
            if reason is None or section in PARTIAL_SECTIONS:
                result[section] = figures = maker()
                reason = reason or "; ".join((figures or {}).get("missing", {}).values()) or None
        except Exception as err:  # any section's failure (an MLflow error, a torn JSON) is that section's alone
            lines = str(err).strip().splitlines()
            reason = type(err).__name__ + (f": {lines[0][:300]}" if lines else "")
            result[section] = {"error": reason}
        if reason is not None:
            result.setdefault(section, {"error": reason})
            errors[section] = reason
    result["steps"] = steps
    result["errors"] = errors
    return result


def _fmt(value: Any, spec: str, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{unit}"


def table(result: Mapping[str, Any]) -> str:
    """The figures as rows of text, one per measurement."""
    rows: list[tuple[str, str]] = []
    student = result.get("student", {})
    if "error" not in student:
        rows.append(
            (
                "student",
                f"{student['size']}: {student['num_hidden_layers']} layers x {student['hidden_size']}, "
                f"{student['parameters']:,} parameters, vocab {student['vocab_size']}, "
                f"max_length {student['max_length']}",
            )
        )
    inference = result.get("inference", {})
    if "error" not in inference:
        engine = inference["engine"]
        rows += [
            (
                "inference: naive loop",
                f"{inference['baseline_reports_per_s']:.1f} reports/s (fp32, batch 32), "
                f"peak {inference['peak_memory_mb']['baseline']:.0f} MB",
            ),
            (
                "inference: engine",
                f"{inference['reports_per_s']:.1f} reports/s ({engine['precision']}, <= {engine['max_batch_tokens']} "
                f"tokens/batch), peak {inference['peak_memory_mb']['engine']:.0f} MB, "
                f"{inference['speedup']:.2f}x the naive loop",
            ),
            (
                "inference: share of FLOP limit",
                f"{100 * inference['share_of_hardware_limit']:.2f}% of {inference['hardware_limit_reports_per_s']:.0f} "
                f"reports/s at {inference['peak_tflops']:.0f} TFLOP/s"
                if "share_of_hardware_limit" in inference
                else "n/a (no datasheet peak for this device)",
            ),
            (
                "inference: labels",
                f"{100 * inference['label_agreement']:.2f}% of cells as the naive loop "
                f"({inference['n_reports']} reports, mean {inference['mean_tokens']:.0f} tokens)",
            ),
        ]
    budget = result.get("token_budget", {})
    if "error" not in budget:
        last = next((t for t in reversed(budget["tries"]) if t["fits"]), None)
        speed = f", {last['tokens_per_s']:.0f} tokens/s there" if last else ""
        rows.append(
            (
                "largest token budget",
                f"{_fmt(budget['largest_fitting_budget'], 'd')} tokens at length {budget['length']} "
                f"(stopped by {budget['stopped_by']}{speed})",
            )
        )
    training = result.get("training", {})
    if "error" not in training:
        for name, label in (("deepspeed", "DeepSpeed ZeRO-2"), ("plain", "plain Trainer")):
            if name in training["reports_per_s"]:
                rows.append(
                    (
                        f"training: {label}",
                        f"{training['reports_per_s'][name]:.1f} reports/s ({training['precision'][name]}), "
                        f"peak {training['peak_memory_mb'][name]:.0f} MB",
                    )
                )
        if "deepspeed_speedup" in training:
            rows.append(("training: ZeRO-2 / plain", f"{training['deepspeed_speedup']:.2f}x reports/s"))
    kd = result.get("kd_training", {})
    if "error" not in kd:
        metrics = kd["mlflow"]["metrics"]
        step = next((s for s in result.get("steps", []) if s["name"] == "kd-train"), {})
        kd_backbone = kd["backbone"] if kd["backbone"] == kd["demo_backbone"] else "the benchmark's own backbone"
        rows.append(
            (
                "KD training (MLflow)",
                f"{kd_backbone}, {kd['unit']} level, {kd['train_examples']} examples, 1 epoch: "
                f"{_fmt(metrics.get('train_samples_per_second'), '.1f')} examples/s, "
                f"{_fmt(step.get('seconds'), '.0f', ' s')} with start-up; run {kd['mlflow']['status']}, "
                f"val macro F1 {_fmt(metrics.get('eval_macro_f1'), '.3f')}",
            )
        )
    for section, reason in result.get("errors", {}).items():
        rows.append((section, f"ERROR {reason}"))
    width = max(len(name) for name, _ in rows) if rows else 0
    mode = "dry run: tiny sizes" if result["mode"] == "dry-run" else "full sizes"
    head = f"GPU benchmark ({mode}) on {result['device']}, wall {_fmt(result.get('wall_s'), '.0f', ' s')}"
    return "\n".join([head, "", *(f"{name.ljust(width)}  {text}" for name, text in rows)])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("build", help="the student: DebertaV2 of a size, random weights, local tokenizer")
    p.add_argument("--size", choices=sorted(SIZES), required=True)
    p.add_argument("--max-length", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--json", type=Path, required=True)
    p = commands.add_parser("params", help="params.yaml copies for bench-train and the KD training")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--backbone", type=Path, required=True)
    p.add_argument("--dry-run", action="store_true")
    p = commands.add_parser("token-budget", help="the largest batch token budget that fits")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--start", type=int, default=65536)
    p.add_argument("--cap", type=int, default=2**25)
    p.add_argument("--length", type=int, default=None, help="tokens per input (default: the student's max_length)")
    p.add_argument("--time-limit", type=float, default=60.0)
    p = commands.add_parser("combine", help="gpu.json and the table from every step's figures")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--wall-s", type=float, default=None)
    args = parser.parse_args(argv)

    if args.command == "build":
        write_json(args.json, build(args.size, args.max_length, args.out))
    elif args.command == "params":
        print(json.dumps(write_params(args.out, args.backbone.resolve(), args.dry_run), indent=2))
    elif args.command == "token-budget":
        result = token_budget(args.model, args.start, args.cap, args.length, args.time_limit)
        write_json(args.json, result)
        print(json.dumps({k: v for k, v in result.items() if k != "tries"}, indent=2))
    else:
        result = combine(args.out, args.dry_run, args.wall_s)
        write_json(args.out / "gpu.json", result)
        text = table(result)
        (args.out / "gpu_table.txt").write_text(text + "\n")
        print(text)
        return 1 if result["errors"] else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
