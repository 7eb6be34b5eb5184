"""DeepSpeed for real on CPU (deepspeed 0.19 runs there; its first use JIT-builds a shared-memory op with gcc):
ZeRO-2 through `train_student` in one process, and `deberta-rad train` under the `deepspeed` launcher with
two ranks, where rank 0 alone records the MLflow run and writes the model. Each run is a fresh process
(DeepSpeed sets up torch.distributed once per process), killed with its children if it overruns."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from conftest import free_port, run_bounded, write_params
from tiny_backbones import tiny_deberta_backbone

from deberta_rad.data import split_reports, write_jsonl
from deberta_rad.model import load_student
from deberta_rad.params import Fractions

BIN = Path(sys.executable).parent
FRACTIONS = Fractions(train=0.8, val=0.2, test=0.0)
RATES = {"learning_rate": 1e-3, "head_learning_rate": 1e-2}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_deberta_backbone(tmp_path_factory.mktemp("backbone") / "tiny-deberta")


def train_one_process(backbone: str, work_dir: str, output: str, summary: str) -> None:
    """The worker (a fresh process): train with `deepspeed: true`, no launcher; note what the Trainer ran."""
    from deberta_rad.data import labels_by_id
    from deberta_rad.synthetic import generate_corpus
    from deberta_rad.train import DistillationTrainer, TrainConfig, train_student

    seen: dict[str, object] = {}
    original_train = DistillationTrainer.train

    def train_and_look(self, *args, **kwargs):
        result = original_train(self, *args, **kwargs)
        optimizer = self.optimizer
        while hasattr(optimizer, "optimizer"):  # accelerate's wrapper > DeepSpeed ZeRO > torch AdamW
            optimizer = optimizer.optimizer
        seen.update(
            engine=type(self.model_wrapped).__name__,
            zero_stage=self.model_wrapped.zero_optimization_stage(),
            optimizer=type(optimizer).__name__,
            rates=sorted({group["initial_lr"] for group in optimizer.param_groups}),
            losses=[entry["loss"] for entry in self.state.log_history if "loss" in entry],
        )
        return result

    DistillationTrainer.train = train_and_look
    pairs = generate_corpus(160, seed=5)
    gold = labels_by_id(labels for _, labels in pairs)
    splits = split_reports([report for report, _ in pairs], seed=1, fractions=FRACTIONS)
    config = TrainConfig(
        backbone=backbone, max_length=48, epochs=3, batch_size=8, logging_steps=1, deepspeed=True, **RATES
    )
    student, scores = train_student(splits["train"], splits["val"], gold, config, Path(work_dir))
    student.save(Path(output))
    Path(summary).write_text(json.dumps({**seen, "scores": scores}))


def test_zero2_trains_the_student_on_cpu(backbone: Path, tmp_path: Path) -> None:
    args = [str(tmp_path / name) for name in ("checkpoints", "student", "summary.json")]
    result = run_bounded([sys.executable, __file__, str(backbone), *args], timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-4000:]
    seen = json.loads((tmp_path / "summary.json").read_text())

    assert (seen["engine"], seen["zero_stage"], seen["optimizer"]) == ("DeepSpeedEngine", 2, "AdamW")
    assert seen["rates"] == sorted(RATES.values()), "DeepSpeed lost the heads' own learning rate"
    losses = seen["losses"]
    assert len(losses) >= 20 and sum(losses[-5:]) < 0.9 * sum(losses[:5]), losses

    student = load_student(tmp_path / "student")
    assert {p.dtype for p in student.model.parameters()} == {torch.float32}
    assert student.model.encoder.config.model_type == "deberta-v2"


def write_splits(root: Path) -> None:
    from deberta_rad.synthetic import generate_corpus

    pairs = generate_corpus(160, seed=5)
    labels = {report.report_id: record for report, record in pairs}
    for name, members in split_reports([report for report, _ in pairs], seed=1, fractions=FRACTIONS).items():
        write_jsonl(root / name / "reports.jsonl", members)
        write_jsonl(root / name / "labels.jsonl", (labels[r.report_id] for r in members))


def test_launcher_with_two_ranks_records_one_run(backbone: Path, tmp_path: Path) -> None:
    """The README's multi-GPU command, with two CPU processes standing in for two GPUs."""
    write_splits(tmp_path / "splits")
    params = {
        "model": {"backbone": str(backbone), "max_length": 48, "unit": "report"},
        "train": {"epochs": 2, "batch_size": 8, "logging_steps": 2, "deepspeed": True, **RATES},
    }
    write_params(tmp_path / "params.yaml", params)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1"}
    launcher = [str(BIN / "deepspeed"), "--num_gpus", "2", "--no_local_rank", "--master_port", str(free_port())]
    train = [str(BIN / "deberta-rad"), "train", "--splits", "splits", "--output", "student", "--params", "params.yaml"]
    result = run_bounded([*launcher, *train, "--work-dir", "checkpoints"], timeout=600, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout[-4000:]
    assert "dist_world_size=2" in result.stdout

    # Both ranks held a ZeRO partition of the optimizer state; one model directory, one MLflow run.
    partitions = {p.name for p in (tmp_path / "checkpoints").glob("checkpoint-*/global_step*/*optim_states.pt")}
    assert partitions == {f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" for rank in (0, 1)}
    run_id = json.loads((tmp_path / "student" / "training_run.json").read_text())["mlflow_run_id"]
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [run.info.run_id for run in runs] == [run_id]
    assert "eval_macro_f1" in runs[0].data.metrics and runs[0].info.status == "FINISHED"
    assert load_student(tmp_path / "student").model.config.max_seq_length == 48


if __name__ == "__main__":
    train_one_process(*sys.argv[1:])
