"""Throughput benchmarks, each against its baseline in the same run on the same machine and threads:
the inference engine against a naive Hugging Face loop (`deberta-rad bench`), and the train stage's
batches against fixed-length padding (`deberta-rad bench-train`). Figures go in JSON, never in tests."""

from __future__ import annotations

import ctypes
import platform
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from transformers import PretrainedConfig, TrainerCallback

from deberta_rad.model import Student, load_student
from deberta_rad.params import Params
from deberta_rad.schema import FINDINGS, STATUSES
from deberta_rad.sentences import aggregate, report_sentences

NAIVE_BATCH_SIZE = 32
WARMUP_REPORTS = 32
# Dense bf16 tensor-core peaks (vendor datasheets, SXM parts without sparsity), by device-name substring.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}


def device_description(device: torch.device) -> str:
    """The device in words: the GPU's name or the CPU's."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {cpu_model_name()}"


def cpu_model_name() -> str:
    """The CPU's marketing name from /proc/cpuinfo where there is one (platform.processor() is often empty)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def release_free_heap() -> None:
    """Give memory freed by an earlier run back to the OS (glibc keeps it otherwise), so the next run's
    growth is its own and not hidden in what the allocator already holds. A no-op off glibc."""
    with suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextmanager
def working_memory_mb(device: torch.device) -> Iterator[dict[str, float]]:
    """The most memory the block holds on top of what was held when it started (activations, buffers,
    the tokenised batch): CUDA memory allocated on a GPU, else the resident set sampled every 5 ms (the OS
    keeps only the process's lifetime peak). Reported as `working_memory_mb` once the block ends."""
    result: dict[str, float] = {}
    if device.type == "cuda":
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield result
        result["working_memory_mb"] = (torch.cuda.max_memory_allocated(device) - start) / 2**20
        return
    release_free_heap()
    process, done = psutil.Process(), threading.Event()
    start = peak = process.memory_info().rss

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            done.wait(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield result
    finally:
        done.set()
        sampler.join()
        result["working_memory_mb"] = (peak - start) / 2**20


def model_inputs(student: Student, texts: Sequence[str]) -> list[list[str]]:
    """What the model reads of each report: the report, or for a sentence-level student its sentences."""
    if student.unit == "sentence":
        return [report_sentences(text) for text in texts]
    return [[text] for text in texts]


def naive_statuses(student: Student, texts: Sequence[str], device: torch.device) -> np.ndarray:
    """The loop most code starts with: input order, batches of 32 tokenised and padded to their longest
    input, fp32, `torch.no_grad`; a sentence-level student reads every sentence of every report (no
    de-duplication) and each report aggregates its own. Status indices [N, 13]."""
    model = student.model.to(device=device, dtype=torch.float32).eval()
    inputs = model_inputs(student, texts)
    flat = [text for report in inputs for text in report]
    probabilities = []
    with torch.no_grad():
        for start in range(0, len(flat), NAIVE_BATCH_SIZE):
            batch = student.tokenizer(
                flat[start : start + NAIVE_BATCH_SIZE],
                padding=True,
                truncation=True,
                max_length=student.max_length,
                return_tensors="pt",
            ).to(device)
            probabilities.append(model(**batch).logits.softmax(-1).cpu().numpy())
    rows = np.concatenate(probabilities) if probabilities else np.zeros((0, len(FINDINGS), len(STATUSES)))
    if student.unit == "report":
        return rows.argmax(-1)
    ends = np.cumsum([len(report) for report in inputs])
    return np.stack([aggregate(chunk) for chunk in np.split(rows, ends[:-1])]).argmax(-1)


def interleaved_runs(
    runs: Mapping[str, Callable[[], np.ndarray]], device: torch.device, repeats: int
) -> dict[str, dict[str, Any]]:
    """Run each side in turn, ``repeats`` rounds, so a noisy neighbour slows both alike; per side the
    statuses, the median seconds and the largest working memory."""
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    results: dict[str, dict[str, Any]] = {name: {"working_memory_mb": 0.0} for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            with working_memory_mb(device) as memory:
                started = time.perf_counter()
                results[name]["statuses"] = run()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds[name].append(time.perf_counter() - started)
            results[name]["working_memory_mb"] = max(results[name]["working_memory_mb"], memory["working_memory_mb"])
    for name in runs:
        results[name]["seconds"] = statistics.median(seconds[name])
    return results


def flops_per_report(config: PretrainedConfig, token_lengths: Sequence[int], n_reports: int | None = None) -> float:
    """Forward FLOPs of the encoder per report (2 per multiply-add): the Q/K/V/output and feed-forward
    matmuls, plus attention scores and weighted values, at each input's own length, summed over the
    ``n_reports`` reports' inputs (default: one input per report). DeBERTa's relative position terms,
    the tiny heads and the engine's sharing of repeated sentences are left out, so this is a lower
    bound for one report read alone."""
    hidden, inner, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    lengths = np.asarray(token_lengths, dtype=np.float64)
    per_layer = 2 * lengths * (4 * hidden * hidden + 2 * hidden * inner) + 4 * lengths**2 * hidden
    return float(layers * per_layer.sum() / (n_reports or len(lengths)))


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    """The device's dense bf16 peak: the caller's figure, else the datasheet's for a known GPU."""
    if given is not None or device.type != "cuda":
        return given
    name = torch.cuda.get_device_name(device)
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS.items() if key in name), None)


def inference_benchmark(
    model_dir: Path,
    texts: Sequence[str],
    repeats: int = 1,
    engine_options: Mapping[str, Any] | None = None,
    peak_tflops_given: float | None = None,
) -> dict[str, Any]:
    """Time the naive loop and the engine on the same texts, each on its own copy of the model and warmed
    up on a few reports first, and compare their labels cell by cell. Setup (an ONNX export, say) is
    timed apart; peak memory is each side's weights plus its working memory."""
    from deberta_rad.predict import load_engine, parameter_mb

    started = time.perf_counter()
    engine = load_engine(model_dir, **(engine_options or {}))
    engine.predict(texts[:WARMUP_REPORTS])
    setup_s = time.perf_counter() - started
    device = engine.device  # the naive loop runs where the engine does
    baseline_student = load_student(model_dir)
    naive_statuses(baseline_student, texts[:WARMUP_REPORTS], device)
    runs = interleaved_runs(
        {
            "baseline": lambda: naive_statuses(baseline_student, texts, device),
            "engine": lambda: engine.predict(texts).statuses,
        },
        device,
        repeats,
    )
    baseline, statuses = runs["baseline"].pop("statuses"), runs["engine"].pop("statuses")
    baseline_s, engine_s = runs["baseline"]["seconds"], runs["engine"]["seconds"]
    baseline_weights = parameter_mb(baseline_student.model)

    config = engine.student.model.encoder.config
    inputs = [text for report in model_inputs(engine.student, texts) for text in report]
    tokenizer = engine.student.tokenizer
    lengths = [
        len(ids) for ids in tokenizer(inputs, truncation=True, max_length=engine.student.max_length)["input_ids"]
    ]
    flops = flops_per_report(config, lengths, len(texts))
    tflops = peak_tflops(device, peak_tflops_given)
    result: dict[str, Any] = {
        "device": device_description(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "n_reports": len(texts),
        "mean_tokens": float(np.mean(lengths)),
        "max_length": engine.student.max_length,
        "baseline": {
            "method": f"input order, batch {NAIVE_BATCH_SIZE}, padded to the longest, fp32, torch.no_grad",
            "weights_mb": baseline_weights,
            **runs["baseline"],
        },
        "engine": {**engine.describe(), "setup_s": setup_s, **runs["engine"]},
        "baseline_reports_per_s": len(texts) / baseline_s,
        "reports_per_s": len(texts) / engine_s,
        "speedup": baseline_s / engine_s,
        "label_agreement": float((statuses == baseline).mean()),
        "report_agreement": float((statuses == baseline).all(axis=1).mean()),
        "peak_memory_mb": {
            "baseline": baseline_weights + runs["baseline"]["working_memory_mb"],
            "engine": engine.weights_mb + runs["engine"]["working_memory_mb"],
        },
        "flops_per_report": flops,
        "repeats": repeats,
    }
    if tflops:
        limit = tflops * 1e12 / flops
        result.update(
            peak_tflops=tflops,
            hardware_limit_reports_per_s=limit,
            share_of_hardware_limit=result["reports_per_s"] / limit,
        )
    return result


class StepTimer(TrainerCallback):
    """Times optimizer steps after the first (which pays for warm-up and allocation)."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_step_end(self, args, state, control, **kwargs) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())

    def seconds_per_step(self) -> float:
        if len(self.ends) < 2:
            raise ValueError("the training benchmark needs at least 2 steps")
        return (self.ends[-1] - self.ends[0]) / (len(self.ends) - 1)


# (sampling, padding): the baseline shuffles and pads every report to the full length; the train stage
# groups reports of similar length and pads each batch to its longest.
TRAINING_VARIANTS = {"baseline": ("random", "max_length"), "train_stage": ("group_by_length", "longest")}


def training_benchmark(split_dir: Path, params: Params, max_length: int, steps: int, work_dir: Path) -> dict[str, Any]:
    """Train-stage steps/s and reports/s at ``max_length`` (the stage's knobs from params.yaml otherwise,
    DeepSpeed included where it would run), for the baseline's batches and the stage's."""
    from deberta_rad.data import labels_by_id
    from deberta_rad.model import student_from_backbone
    from deberta_rad.train import TrainConfig, build_dataset, distillation_trainer, read_split, training_arguments

    config = TrainConfig.from_params(params).model_copy(update={"max_length": max_length})
    reports, records = read_split(split_dir.parent, split_dir.name)
    labels = labels_by_id(records)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result: dict[str, Any] = {
        "device": device_description(device),
        "threads": torch.get_num_threads(),
        "backbone": config.backbone,
        "max_length": max_length,
        "batch_size": config.batch_size,
        "steps": steps,
        "deepspeed": config.deepspeed_config_path(),
    }
    for name, (sampling, padding) in TRAINING_VARIANTS.items():
        torch.manual_seed(config.seed)
        student = student_from_backbone(config.backbone, max_length, config.head_dropout)
        dataset = build_dataset(reports, labels, student.tokenizer, max_length)
        timer = StepTimer()
        arguments = training_arguments(
            config,
            work_dir / name,
            ["none"],
            max_steps=steps,
            eval_strategy="no",
            save_strategy="no",
            load_best_model_at_end=False,
            train_sampling_strategy=sampling,
            disable_tqdm=False,
        )
        # The Trainer is built inside the measured block: the plain Trainer moves the weights to the GPU when
        # it is built, DeepSpeed only when training starts, and both sides must count them.
        with working_memory_mb(device) as memory:
            trainer = distillation_trainer(student, config, arguments, dataset, padding=padding, callbacks=[timer])
            trainer.train()
        seconds = timer.seconds_per_step()
        result[name] = {
            "sampling": sampling,
            "padding": padding,
            "precision": "bf16" if arguments.bf16 else "fp32",
            "seconds_per_step": seconds,
            "reports_per_s": config.batch_size / seconds,
            **memory,
        }
    result["baseline_reports_per_s"] = result["baseline"]["reports_per_s"]
    result["reports_per_s"] = result["train_stage"]["reports_per_s"]
    result["speedup"] = result["reports_per_s"] / result["baseline_reports_per_s"]
    return result


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Fixed-width columns, the first left-aligned."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    return ["  ".join([line[0].ljust(widths[0]), *map(str.rjust, line[1:], widths[1:])]) for line in [header, *rows]]


def format_inference_result(result: Mapping[str, Any]) -> str:
    """The naive loop and the engine side by side, then speed-up and label agreement."""
    engine, memory = result["engine"], result["peak_memory_mb"]
    method = f"{engine['backend']} {engine['precision']}, length-sorted, <= {engine['max_batch_tokens']} tokens/batch"
    baseline_speed, engine_speed = f"{result['baseline_reports_per_s']:.1f}", f"{result['reports_per_s']:.1f}"
    rows = [
        ["naive loop", result["baseline"]["method"], baseline_speed, f"{memory['baseline']:.0f}"],
        ["engine", method, engine_speed, f"{memory['engine']:.0f}"],
    ]
    lines = [
        f"{result['n_reports']} reports (mean {result['mean_tokens']:.0f} tokens, max_length {result['max_length']}) "
        f"on {result['device']}, {result['threads']} threads",
        "",
        *_table(["", "method", "reports/s", "peak MB"], rows),
        "",
        f"speed-up: {result['speedup']:.2f}x   label agreement: {100 * result['label_agreement']:.2f}% of cells, "
        f"{100 * result['report_agreement']:.1f}% of reports identical",
    ]
    if "hardware_limit_reports_per_s" in result:
        lines.append(
            f"hardware limit at {result['peak_tflops']:.0f} TFLOP/s: {result['hardware_limit_reports_per_s']:.0f} "
            f"reports/s; the engine reaches {100 * result['share_of_hardware_limit']:.1f}% of it"
        )
    return "\n".join(lines)


TRAINING_COLUMNS = (("seconds_per_step", ".3f"), ("reports_per_s", ".1f"), ("working_memory_mb", ".0f"))


def format_training_result(result: Mapping[str, Any]) -> str:
    """Reports/s of the baseline batches and the train stage's, at the benchmark's sequence length."""
    rows = [
        [name, f"{r['sampling']}, pad to {r['padding']}", *(f"{r[k]:{f}}" for k, f in TRAINING_COLUMNS)]
        for name, r in ((n, result[n]) for n in TRAINING_VARIANTS)
    ]
    deepspeed = "DeepSpeed ZeRO-2" if result["deepspeed"] else "no DeepSpeed"
    return "\n".join(
        [
            f"{result['backbone']}, max_length {result['max_length']}, batch {result['batch_size']}, "
            f"{result['steps']} steps, {deepspeed}, on {result['device']} ({result['threads']} threads)",
            "",
            *_table(["", "batches", "s/step", "reports/s", "working MB"], rows),
            "",
            f"speed-up: {result['speedup']:.2f}x",
        ]
    )
