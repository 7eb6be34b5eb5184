"""Optional hyper-parameter search: alpha, T_distill and the learning rate, chosen on the validation split.

Each trial trains a student on the train split with `train.train_student` (same seed, same data, the
same start: the backbone, or `train.init_from` as the train stage would; only the searched knobs
differ) and is scored by its macro F1 against the teacher on the val split.
A seeded TPE sampler (Optuna) proposes the values. MLflow gets one parent run `tune` with a nested run
per trial (its knobs and validation scores) and the best knobs and score on the parent; nothing in the
runs, the JSON or the table carries report text. Not a `dvc repro` stage: run it when you want to
retune, then copy the best values into params.yaml (README)."""

from __future__ import annotations

import logging
import random
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import mlflow
import optuna

from deberta_rad.data import InputError, labels_by_id
from deberta_rad.params import Params, TuneParams
from deberta_rad.review import read_reviewed_for_training
from deberta_rad.tracking import configure_mlflow, data_version_tags
from deberta_rad.train import (
    TrainConfig,
    read_split,
    resolved_init,
    reviewed_example_ids,
    train_student,
    training_examples,
)

logger = logging.getLogger(__name__)

# The searched TrainConfig fields (params.yaml `train.<name>`), in table order.
SEARCHED: tuple[str, ...] = ("alpha", "temperature", "learning_rate")
COLUMN_TITLES = {"alpha": "alpha", "temperature": "T_distill", "learning_rate": "learning_rate"}


def suggest(trial: optuna.Trial, config: TuneParams) -> dict[str, float]:
    """The trial's value of each searched knob, drawn from its range."""
    ranges = {name: getattr(config, name) for name in SEARCHED}
    return {name: trial.suggest_float(name, r.low, r.high, log=r.log) for name, r in ranges.items()}


def tune(
    splits_dir: Path,
    params: Params,
    work_dir: Path | None = None,
    on_trial: Callable[[dict[str, Any]], None] | None = None,
    sentences_dir: Path | None = None,
) -> dict[str, Any]:
    """Run the search on `<splits_dir>/{train,val}` (a sentence-level student: on the `sentences` stage's
    folder, selected on the val reports); returns the best trial and every trial (JSON-ready).

    `on_trial(record)` is called after each trial (the CLI prints progress with it). Trainer checkpoints
    go to a temporary folder per trial (under `work_dir` when given) and are removed after it."""
    base, _ = resolved_init(TrainConfig.from_params(params))  # trials start where the train stage would
    config = params.tune
    train_reports, train_labels = read_split(splits_dir, "train")
    val_reports, val_labels = read_split(splits_dir, "val")
    if not train_reports or not val_reports:
        raise InputError(f"{splits_dir}: the train and val splits must both hold reports")
    reviewed = read_reviewed_for_training(splits_dir)
    labels = labels_by_id([*train_labels, *val_labels, *reviewed])  # reviews replace the teacher's, as in train
    train_reports, val_reports, labels, val_whole_reports = training_examples(
        base, train_reports, val_reports, labels, sentences_dir
    )
    reviewed_examples = reviewed_example_ids(base, splits_dir, sentences_dir)
    if config.max_train_reports and len(train_reports) > config.max_train_reports:
        train_reports = random.Random(config.seed).sample(train_reports, config.max_train_reports)
    teacher = train_labels[0].teacher.name if train_labels and train_labels[0].teacher else "unknown"
    epochs = config.epochs if config.epochs is not None else base.epochs
    if work_dir is not None:
        work_dir.mkdir(parents=True, exist_ok=True)

    records: list[dict[str, Any]] = []

    def objective(trial: optuna.Trial) -> float:
        knobs = suggest(trial, config)
        trial_config = base.model_copy(update={"epochs": epochs, **knobs})
        with mlflow.start_run(run_name=f"trial-{trial.number}", nested=True) as run:
            mlflow.set_tags({"stage": "tune-trial", "trial": str(trial.number)})
            mlflow.log_params({**knobs, "epochs": epochs, "trial": trial.number})
            with tempfile.TemporaryDirectory(prefix=f"tune-trial-{trial.number}-", dir=work_dir) as checkpoints:
                _, scores = train_student(
                    train_reports,
                    val_reports,
                    labels,
                    trial_config,
                    Path(checkpoints),
                    val_whole_reports=val_whole_reports,
                    reviewed=reviewed_examples,
                )
            record = {
                "trial": trial.number,
                "params": knobs,
                "val_macro_f1": scores["eval_macro_f1"],
                "val_agreement": scores["eval_agreement"],
                "train_loss": scores["train_loss"],
                "mlflow_run_id": run.info.run_id,
            }
            mlflow.log_metrics({k: record[k] for k in ("val_macro_f1", "val_agreement", "train_loss")})
        records.append(record)
        best_so_far = max(r["val_macro_f1"] for r in records)
        mlflow.log_metrics(
            {"trial_val_macro_f1": record["val_macro_f1"], "best_val_macro_f1_so_far": best_so_far},
            step=trial.number,
        )
        logger.info("tune trial %d: val macro F1 %.4f", trial.number, record["val_macro_f1"])
        if on_trial is not None:
            on_trial(record)
        return record["val_macro_f1"]

    sampler = optuna.samplers.TPESampler(seed=config.seed, n_startup_trials=config.startup_trials)
    study = optuna.create_study(direction="maximize", sampler=sampler, study_name="deberta-rad-tune")
    configure_mlflow()
    with mlflow.start_run(run_name="tune") as parent:
        mlflow.set_tags({"stage": "tune", "teacher": teacher, **data_version_tags()})
        mlflow.log_params(
            {
                **{f"tune.{k}": v for k, v in config.model_dump(exclude=set(SEARCHED)).items()},
                **{f"tune.{name}.{k}": v for name in SEARCHED for k, v in getattr(config, name).model_dump().items()},
                **{f"params.{k}": v for k, v in base.model_dump(exclude={*SEARCHED, "epochs"}).items()},
                "epochs_per_trial": epochs,
                "n_train": len(train_reports),
                "n_val": len(val_reports),
                "n_reviewed": len(reviewed),
            }
        )
        study.optimize(objective, n_trials=config.n_trials)
        best = max(records, key=lambda r: (r["val_macro_f1"], -r["trial"]))
        mlflow.log_params({f"best.{name}": value for name, value in best["params"].items()})
        mlflow.log_params({"best.trial": best["trial"]})
        mlflow.log_metrics({"best_val_macro_f1": best["val_macro_f1"], "best_val_agreement": best["val_agreement"]})
        result = {
            "objective": "macro F1 of the student against the teacher on the val split, a radiologist's labels "
            "where reviewed (maximised)",
            "best": best,
            "dvc_exp_run": dvc_exp_command(best["params"]),
            "trials": records,
            "search": {name: getattr(config, name).model_dump() for name in SEARCHED},
            "n_trials": config.n_trials,
            "seed": config.seed,
            "epochs_per_trial": epochs,
            "n_train": len(train_reports),
            "n_val": len(val_reports),
            "n_reviewed": len(reviewed),
            "mlflow_run_id": parent.info.run_id,
        }
        mlflow.log_dict(result, "tune.json")
    return result


def dvc_exp_command(best_params: Mapping[str, float]) -> str:
    """The `dvc exp run` line that trains the full pipeline with the best knobs."""
    return "dvc exp run " + " ".join(f"-S train.{name}={value:.4g}" for name, value in best_params.items())


def _fmt(value: float) -> str:
    return f"{value:.3e}" if abs(value) < 1e-2 else f"{value:.4f}"


def format_trials_table(result: Mapping[str, Any]) -> str:
    """A fixed-width table of the trials, the best one starred, and how to apply it."""
    header = ["trial", *(COLUMN_TITLES[name] for name in SEARCHED), "val macro F1", "val agreement"]
    rows = [
        [
            f"{'*' if r['trial'] == result['best']['trial'] else ' '}{r['trial']}",
            *(_fmt(r["params"][name]) for name in SEARCHED),
            f"{r['val_macro_f1']:.4f}",
            f"{r['val_agreement']:.4f}",
        ]
        for r in result["trials"]
    ]
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True)) for line in [header, *rows]]
    best = result["best"]
    lines += [
        "",
        f"best: trial {best['trial']}, val macro F1 {best['val_macro_f1']:.4f} (* above)",
        f"apply: {result['dvc_exp_run']}  (or copy the values into params.yaml `train`)",
    ]
    return "\n".join(lines)
