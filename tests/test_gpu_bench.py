"""`benchmarks/gpu.sh --dry-run` (issue 24): the prepared GPU run's every step with tiny sizes on the CPU,
through the real CLI, DeepSpeed, the Trainer and MLflow. gpu.json must hold every section with figures that
make sense; speed is never checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_bounded

REPO = Path(__file__).resolve().parents[1]
STEPS = {
    "build", "params", "generate", "bench", "token-budget", "bench-train-deepspeed", "bench-train-plain",
    "kd-generate", "kd-label", "kd-split", "kd-sentences", "kd-train",
}  # fmt: skip
TIMEOUT_S = 900

pytestmark = pytest.mark.slow


def run_dry(out: Path) -> subprocess.CompletedProcess[str]:
    """The script in its own session, killed with all its children if it overruns."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DEBERTA_RAD_", "MLFLOW_"))}
    env["PYTHON"] = sys.executable
    args = ["bash", str(REPO / "benchmarks" / "gpu.sh"), "--dry-run", "--out", str(out)]
    return run_bounded(args, TIMEOUT_S, cwd=out.parent, env=env)


@pytest.mark.timeout(TIMEOUT_S + 60)
def test_dry_run_writes_every_section_of_gpu_json(tmp_path: Path) -> None:
    out = tmp_path / "gpu-bench"
    result = run_dry(out)
    assert result.returncode == 0, result.stdout[-6000:]
    figures = json.loads((out / "gpu.json").read_text())

    assert figures["mode"] == "dry-run" and figures["errors"] == {}
    assert figures["device"].startswith("cpu") and figures["wall_s"] > 0
    steps = {step["name"]: step for step in figures["steps"]}
    assert set(steps) == STEPS
    assert all(step["exit_code"] == 0 and 0 < step["seconds"] <= step["limit_s"] for step in steps.values())

    student = figures["student"]
    assert (student["size"], student["num_hidden_layers"], student["max_length"], student["unit"]) == (
        "tiny", 2, 64, "report",
    )  # fmt: skip
    assert student["parameters"] > 0 and student["vocab_size"] > 100

    inference = figures["inference"]
    assert inference["n_reports"] == 64 and inference["engine"]["precision"] == "bf16"
    assert inference["reports_per_s"] > 0 and inference["baseline_reports_per_s"] > 0 and inference["speedup"] > 0
    assert 0.0 <= inference["report_agreement"] <= inference["label_agreement"] <= 1.0
    assert inference["flops_per_report"] > 0 and "share_of_hardware_limit" not in inference  # no CPU peak known

    budget = figures["token_budget"]
    assert budget["stopped_by"] in {"cap", "time_limit"} and "not measured" in budget["note"]
    fitted = [t["max_batch_tokens"] for t in budget["tries"]]
    assert fitted[0] == 512 and budget["largest_fitting_budget"] == fitted[-1] <= 4096
    assert all(t["fits"] and t["tokens_per_s"] > 0 for t in budget["tries"])

    training = figures["training"]
    assert set(training["reports_per_s"]) == {"deepspeed", "plain"}
    assert all(v > 0 for v in training["reports_per_s"].values())
    assert all(v >= 0 for v in training["peak_memory_mb"].values())
    assert training["runs"]["deepspeed"]["deepspeed"].endswith("deepspeed_zero2_bf16.json")
    assert training["runs"]["plain"]["deepspeed"] is None
    assert training["precision"] == {"deepspeed": "fp32", "plain": "fp32"}  # bf16 only on a GPU

    kd = figures["kd_training"]
    assert kd["backbone"] == str(out / "model" / "backbone") and kd["epochs"] == 1 and kd["train_examples"] > 0
    assert kd["unit"] == "sentence"  # the demo's knobs, the benchmark's tiny backbone
    assert kd["mlflow"]["status"] == "FINISHED" and kd["mlflow"]["experiment"] == "deberta-rad"
    assert 0.0 <= kd["mlflow"]["metrics"]["eval_macro_f1"] <= 1.0 and "train_loss" in kd["mlflow"]["metrics"]

    table = (out / "gpu_table.txt").read_text()
    for row in ("inference: engine", "largest token budget", "training: DeepSpeed ZeRO-2", "KD training (MLflow)"):
        assert row in table and row in result.stdout
