"""Distil teacher labels into the student with the Hugging Face Trainer and the paper's KD loss."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Annotated

import mlflow
import numpy as np
import torch
from pydantic import Field
from torch.utils.data import Dataset
from transformers import (
    DataCollatorWithPadding,
    EarlyStoppingCallback,
    EvalPrediction,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
)
from transformers.trainer_utils import get_last_checkpoint

from deberta_rad.data import InputError, labels_by_id, read_label_records, read_reports
from deberta_rad.kd import distillation_loss
from deberta_rad.metrics import compute_metrics
from deberta_rad.model import DebertaRadConfig, Student, load_student, student_from_backbone
from deberta_rad.params import ModelParams, Params, TrainParams
from deberta_rad.predict import weights_digest
from deberta_rad.pretrain import MARKER, adapted_location, resolve_max_length
from deberta_rad.review import REVIEW_TEACHER, read_reviewed, read_reviewed_for_training
from deberta_rad.schema import FINDINGS, STATUS_INDEX, STATUSES, LabelRecord, Report
from deberta_rad.sentences import aggregate_reports, distinct_sentences, report_sentences, reviewed_train_reports
from deberta_rad.tracking import RUN_FILE, configure_mlflow, data_version_tags

logger = logging.getLogger(__name__)

# ZeRO stage 2, bf16 where the GPU has it, batch size and clipping filled in from TrainingArguments.
DEEPSPEED_CONFIG = Path(__file__).with_name("deepspeed_zero2_bf16.json")


class TrainConfig(ModelParams, TrainParams):
    """The `model` and `train` sections of params.yaml in one place, and how often a reviewed example
    is shown (`review.repeat`, `review.repeat_confirmed`)."""

    review_repeat: Annotated[int, Field(ge=1)] = 1
    review_repeat_confirmed: bool = False

    def deepspeed_config_path(self) -> str | None:
        """The DeepSpeed config for the Trainer on this machine, or None when DeepSpeed is off."""
        enabled = torch.cuda.is_available() if self.deepspeed == "auto" else self.deepspeed
        return str(self.deepspeed_config or DEEPSPEED_CONFIG) if enabled else None

    @classmethod
    def from_params(cls, params: Params) -> TrainConfig:
        return cls(
            **params.model.model_dump(),
            **params.train.model_dump(),
            review_repeat=params.review.repeat,
            review_repeat_confirmed=params.review.repeat_confirmed,
        )


class LabelledReports(Dataset):
    """Tokenised reports with their teacher status indices as `labels` [13]."""

    def __init__(self, encodings: list[dict[str, list[int]]], targets: np.ndarray) -> None:
        self.encodings = encodings
        self.targets = targets

    def __len__(self) -> int:
        return len(self.encodings)

    def __getitem__(self, index: int) -> dict[str, object]:
        return {**self.encodings[index], "labels": self.targets[index].tolist()}


def status_matrix(report_ids: Sequence[str], labels: Mapping[str, Mapping[str, str]]) -> np.ndarray:
    """[N, 13] status indices for the given reports; a report with no label record is an error."""
    missing = [rid for rid in report_ids if rid not in labels]
    if missing:
        raise KeyError(f"{len(missing)} reports have no teacher label, e.g. {missing[:5]}")
    return np.array([[STATUS_INDEX[labels[rid][f]] for f in FINDINGS] for rid in report_ids], dtype=np.int64)


def build_dataset(
    reports: Sequence[Report],
    labels: Mapping[str, Mapping[str, str]],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
) -> LabelledReports:
    """Tokenise once up front (fast tokenizer, one batched call) so the training loop only pads."""
    encoded = tokenizer([r.text for r in reports], truncation=True, max_length=max_length)
    encodings = [{key: encoded[key][i] for key in encoded} for i in range(len(reports))]
    return LabelledReports(encodings, status_matrix([r.report_id for r in reports], labels))


def repeat_factors(targets: np.ndarray, threshold: float, seed: int) -> np.ndarray:
    """How many times each training report is shown per epoch (LVIS repeat-factor sampling).

    Most cells are not_mentioned and some (finding, status) pairs are rare. Instead of reweighting the
    loss, which must stay the paper's, a report is repeated r = max over its mentioned findings of
    max(1, sqrt(threshold / share of reports with that finding and status)) times, rounded
    stochastically with the seed. threshold 0 turns it off."""
    n_reports = len(targets)
    if threshold <= 0 or n_reports == 0:
        return np.ones(n_reports, dtype=np.int64)
    mentioned = targets != STATUS_INDEX["not_mentioned"]
    shares = np.stack([(targets == s).mean(axis=0) for s in range(len(STATUSES))])  # [statuses, findings]
    cell_share = shares[targets, np.arange(targets.shape[1])]  # [reports, findings]
    cell_factor = np.where(mentioned, np.sqrt(threshold / cell_share), 1.0)
    factor = np.maximum(1.0, cell_factor.max(axis=1))
    whole = np.floor(factor)
    return (whole + (np.random.default_rng(seed).random(n_reports) < factor - whole)).astype(np.int64)


def repeated(dataset: LabelledReports, factors: np.ndarray) -> LabelledReports:
    """The dataset with report i listed factors[i] times (length grouping still sorts the whole epoch)."""
    order = np.repeat(np.arange(len(dataset)), factors)
    return LabelledReports([dataset.encodings[i] for i in order], dataset.targets[order])


def statuses_from_indices(indices: np.ndarray, report_ids: Sequence[str]) -> dict[str, dict[str, str]]:
    """Turn an [N, 13] index matrix back into report_id -> {finding: status}."""
    return {
        rid: {f: STATUSES[int(i)] for f, i in zip(FINDINGS, row, strict=True)}
        for rid, row in zip(report_ids, indices, strict=True)
    }


class DistillationTrainer(Trainer):
    """Trainer whose loss is the DeBERTa-RAD KD objective instead of the model's own."""

    def __init__(self, *args, alpha: float, temperature: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.alpha = alpha
        self.temperature = temperature

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        targets = inputs.pop("labels")
        outputs = model(**inputs)
        loss = distillation_loss(outputs.logits, targets, self.alpha, self.temperature)
        return (loss, outputs) if return_outputs else loss


def validation_metrics(prediction: EvalPrediction) -> dict[str, float]:
    """Macro F1 of the student against the teacher on the validation split (early stopping's metric)."""
    predicted = np.asarray(prediction.predictions).argmax(-1)
    gold = np.asarray(prediction.label_ids)
    ids = [str(i) for i in range(len(gold))]
    return _selection_scores(statuses_from_indices(predicted, ids), statuses_from_indices(gold, ids))


def _selection_scores(predicted: Mapping, teacher: Mapping) -> dict[str, float]:
    metrics = compute_metrics(predicted, teacher)
    return {"macro_f1": float(metrics["macro_f1"] or 0.0), "agreement": float(metrics["agreement"])}


def report_validation(
    student: Student, val_reports: Sequence[Report], labels: Mapping[str, Mapping[str, str]]
) -> Callable[[EvalPrediction], dict[str, float]]:
    """Early stopping's metric for a sentence-level student: its predictions for the val sentences,
    aggregated into the val reports as the engine does, against the teacher's labels of those reports.

    The Trainer evaluates the sentences in length-grouped order, so each prediction is matched to its
    sentence by the sentence's token ids (`include_for_metrics=["inputs"]`); sentences that tokenise
    alike get the same prediction anyway."""
    ignored = {student.tokenizer.pad_token_id, -100}  # padding within and across evaluation batches

    def key(ids: Sequence[int]) -> tuple[int, ...]:
        return tuple(int(i) for i in ids if i not in ignored)

    sentences = [report_sentences(report.text) for report in val_reports]
    distinct = list(dict.fromkeys(s for report in sentences for s in report))
    encoded = (
        student.tokenizer(distinct, truncation=True, max_length=student.max_length)["input_ids"] if distinct else []
    )
    keys = dict(zip(distinct, map(key, encoded), strict=True))
    report_ids = [report.report_id for report in val_reports]
    teacher = {rid: labels[rid] for rid in report_ids}

    def metrics(prediction: EvalPrediction) -> dict[str, float]:
        probabilities = torch.from_numpy(np.asarray(prediction.predictions)).softmax(-1).numpy()
        by_key = {key(ids): row for ids, row in zip(np.asarray(prediction.inputs), probabilities, strict=True)}
        reports = aggregate_reports(sentences, {s: by_key[keys[s]] for s in distinct})
        return _selection_scores(statuses_from_indices(reports.argmax(-1), report_ids), teacher)

    return metrics


def _one_process_world() -> None:
    """Describe a world of one process when no launcher (`deepspeed`, `torchrun`) did, as the transformers
    docs do for DeepSpeed in a notebook; otherwise DeepSpeed looks for MPI (mpi4py) and fails."""
    if "WORLD_SIZE" in os.environ:
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    world = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
    for key, value in {**world, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        os.environ.setdefault(key, value)


def training_arguments(
    config: TrainConfig, work_dir: Path, report_to: list[str], **overrides: object
) -> TrainingArguments:
    """Cosine schedule with warm-up, length-grouped batches, per-epoch validation that keeps the best
    epoch by `train.select_on` and stops early on it (AdamW is passed in);
    DeepSpeed ZeRO-2 when `deepspeed` says so, in bf16 on a GPU that has it. ``overrides`` replace any
    of these (the training benchmark runs a fixed number of steps without validation)."""
    deepspeed = config.deepspeed_config_path()
    if deepspeed:
        _one_process_world()
    arguments = dict(
        output_dir=str(work_dir),
        num_train_epochs=config.epochs,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size * 2,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup_ratio,
        lr_scheduler_type="cosine",
        train_sampling_strategy="group_by_length",
        eval_strategy="epoch",
        save_strategy="epoch",
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model=config.select_on,
        greater_is_better=config.select_on != "loss",
        label_names=["labels"],
        logging_steps=config.logging_steps,
        seed=config.seed,
        report_to=report_to,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        deepspeed=deepspeed,
        bf16=bool(deepspeed) and torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
    )
    return TrainingArguments(**{**arguments, **overrides})


def fp32_master_weights(model: torch.nn.Module) -> None:
    """Put DeepSpeed's fp32 master weights back into the model, as an fp32 model, after training.

    DeepSpeed in bf16 turns the module itself to bf16; the fp32 weights live in its ZeRO optimizer,
    partitioned over the ranks. Gathering them is a collective: every rank calls this."""
    from deepspeed.utils import safe_get_full_fp32_param

    masters = {name: safe_get_full_fp32_param(parameter) for name, parameter in model.named_parameters()}
    model.float()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if masters[name] is not None:
                parameter.copy_(masters[name])


def adamw_with_head_rate(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with a higher rate for the freshly initialised heads than for the pretrained encoder.

    The Trainer's own optimizer has one rate for all weights; with a small encoder and a short CPU run
    the random heads then learn far too slowly, so we hand it the optimizer (it still builds the cosine
    warm-up schedule around it). Biases and LayerNorm weights get no weight decay, as in the Trainer."""
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        is_head = name.startswith("heads.")
        decays = parameter.ndim > 1
        groups.setdefault((is_head, decays), []).append(parameter)
    return torch.optim.AdamW(
        [
            {
                "params": params,
                "lr": config.head_learning_rate if is_head else config.learning_rate,
                "weight_decay": config.weight_decay if decays else 0.0,
            }
            for (is_head, decays), params in groups.items()
        ]
    )


def distillation_trainer(
    student: Student,
    config: TrainConfig,
    arguments: TrainingArguments,
    train_set: Dataset,
    padding: str = "longest",
    **trainer_options: object,
) -> DistillationTrainer:
    """The train stage's Trainer: KD loss, two-rate AdamW, each batch padded to its longest report
    (``padding="max_length"`` pads every report to the full length, the training benchmark's baseline)."""
    return DistillationTrainer(
        model=student.model,
        args=arguments,
        train_dataset=train_set,
        data_collator=DataCollatorWithPadding(student.tokenizer, padding=padding, max_length=config.max_length),
        processing_class=student.tokenizer,
        # The two-rate AdamW goes in as a factory, not as `optimizers=(AdamW, None)`: with DeepSpeed the
        # Trainer drops a ready-made optimizer and builds its own one-rate AdamW through create_optimizer(),
        # which calls this factory. For the same reason the DeepSpeed config must define no `optimizer`
        # (nor `scheduler`, so the cosine warm-up stays the Trainer's).
        optimizer_cls_and_kwargs=(lambda: adamw_with_head_rate, {"config": config}),
        alpha=config.alpha,
        temperature=config.temperature,
        **trainer_options,
    )


def run_fingerprint(
    config: TrainConfig,
    train_reports: Sequence[Report],
    val_reports: Sequence[Report],
    labels: Mapping[str, Mapping[str, str]],
    encoder_dir: Path | None = None,
    reviewed: Collection[str] = (),
    initial_weights: str | None = None,
) -> str:
    """A hash of everything that shapes a training run, so a checkpoint is resumed only by its own run
    (the knobs as resolved on this machine: `deepspeed: auto` means ZeRO-2 bf16 on a GPU, plain on a CPU;
    the pretrain stage's summary, which names the MLflow run that adapted the encoder; the digest of the
    `train.init_from` weights, which an alias or a rewritten directory can change under the same name)."""
    resolved = {**config.model_dump(), "deepspeed": config.deepspeed_config_path(), "cuda": torch.cuda.is_available()}
    resolved["init_from"] = initial_weights
    if encoder_dir is not None:
        resolved["pretrained"] = (encoder_dir / MARKER).read_text()
    resolved["reviewed"] = sorted(reviewed)
    digest = hashlib.sha256(json.dumps(resolved, sort_keys=True).encode())
    for report in [*train_reports, *val_reports]:
        digest.update(json.dumps([report.report_id, report.text, labels[report.report_id]], sort_keys=True).encode())
    return digest.hexdigest()


def checkpoint_to_resume(trainer: Trainer, work_dir: Path, fingerprint: str, resume: bool) -> str | None:
    """The last checkpoint in ``work_dir`` when resuming and it belongs to this run; otherwise start the
    folder afresh. Only the main process clears and marks it; the others wait, so every rank decides alike."""
    marker = work_dir / "run_fingerprint.txt"
    same_run = resume and marker.is_file() and marker.read_text() == fingerprint
    trainer.accelerator.wait_for_everyone()
    if same_run:
        return get_last_checkpoint(str(work_dir))
    if trainer.is_world_process_zero():
        shutil.rmtree(work_dir, ignore_errors=True)
        work_dir.mkdir(parents=True)
        marker.write_text(fingerprint)
    trainer.accelerator.wait_for_everyone()
    return None


def initial_student(config: TrainConfig, encoder_dir: Path | None) -> Student:
    """Where training starts: the backbone's encoder (or the pretrain stage's adapted copy) with fresh
    heads, or with `train.init_from` (a model directory that `resolved_init` made and checked) a trained
    student's encoder and heads, so a review round can continue the champion instead of starting over."""
    if config.init_from is None:
        encoder = str(encoder_dir) if encoder_dir else None
        return student_from_backbone(config.backbone, 512, config.head_dropout, config.pooling, encoder, config.unit)
    return load_student(config.init_from)


def resolved_init(config: TrainConfig) -> tuple[TrainConfig, str | None]:
    """The config with `train.init_from` as a local model directory (a registry reference such as
    `models:/deberta-rad@champion` downloaded, its alias pinned to a version), and the name of what it
    starts from (the registry version, or the directory) for the MLflow run; unchanged without it.
    Checked before any run starts: a student of another backbone, unit or pooling is refused, since its
    weights and its aggregation would not be what params.yaml describes."""
    if config.init_from is None:
        return config, None
    from deberta_rad.registry import resolve_model

    try:
        location, label = resolve_model(config.init_from)
    except FileNotFoundError as error:
        raise InputError(f"train.init_from: {error}") from None
    saved = DebertaRadConfig.from_pretrained(location)
    differing = [
        f"model.{key} {getattr(config, key)!r} but it has {getattr(saved, key)!r}"
        for key in ("backbone", "unit", "pooling")
        if getattr(saved, key) != getattr(config, key)
    ]
    if differing:
        raise InputError(f"train.init_from {config.init_from}: params.yaml says {'; '.join(differing)}")
    return config.model_copy(update={"init_from": str(location)}), label


def with_resolved_max_length(config: TrainConfig, train_reports: Sequence[Report], student: Student) -> TrainConfig:
    """The config with `max_length: auto` measured on the train reports, set on the student too (it is
    saved with the model, so prediction truncates where training did)."""
    texts = [report.text for report in train_reports]
    max_length = resolve_max_length(texts, student.tokenizer, config.max_length, config.max_length_percentile)
    student.model.config.max_seq_length = max_length
    return config.model_copy(update={"max_length": max_length})


def train_student(
    train_reports: Sequence[Report],
    val_reports: Sequence[Report],
    labels: Mapping[str, Mapping[str, str]],
    config: TrainConfig,
    work_dir: Path,
    report_to: Sequence[str] = ("none",),
    resume: bool = True,
    encoder_dir: Path | None = None,
    val_whole_reports: Sequence[Report] = (),
    reviewed: Collection[str] = (),
) -> tuple[Student, dict[str, float]]:
    """Train a student on teacher labels; returns the best-on-validation model and its scores.

    For a sentence-level student the train and val examples are sentences and ``val_whole_reports``
    (labelled in ``labels`` too) are the reports that choose the best epoch. ``encoder_dir`` holds the
    pretrain stage's adapted encoder, to start from instead of the backbone's own weights. With
    ``resume``, an interrupted run of the same config and data continues from its last checkpoint in
    ``work_dir``; checkpoints of any other run there are cleared first. The ``reviewed`` examples (whose
    labels a radiologist corrected) are shown at least ``config.review_repeat`` times per epoch. With
    ``config.init_from`` (a model directory) training continues that student instead."""
    torch.manual_seed(config.seed)
    student = initial_student(config, encoder_dir)
    initial_weights = weights_digest(student) if config.init_from else None
    config = with_resolved_max_length(config, train_reports, student)  # replaces the 512 placeholder
    train_set = build_dataset(train_reports, labels, student.tokenizer, config.max_length)
    factors = repeat_factors(train_set.targets, config.repeat_threshold, config.seed)
    is_reviewed = np.array([r.report_id in reviewed for r in train_reports], dtype=bool)
    train_set = repeated(train_set, np.where(is_reviewed, np.maximum(factors, config.review_repeat), factors))
    logger.info(
        "training on %d %ss, %d examples per epoch after repeats", len(train_reports), config.unit, len(train_set)
    )
    val_set = build_dataset(val_reports, labels, student.tokenizer, config.max_length)
    by_report = config.unit == "sentence"
    if by_report and not val_whole_reports:
        raise ValueError("a sentence-level student is selected on whole val reports: pass val_whole_reports")
    trainer = distillation_trainer(
        student,
        config,
        training_arguments(config, work_dir, list(report_to), include_for_metrics=["inputs"] if by_report else []),
        train_set,
        eval_dataset=val_set,
        compute_metrics=report_validation(student, val_whole_reports, labels) if by_report else validation_metrics,
        callbacks=[EarlyStoppingCallback(early_stopping_patience=config.early_stopping_patience)],
    )
    fingerprint = run_fingerprint(
        config, [*train_reports, *val_whole_reports], val_reports, labels, encoder_dir, reviewed, initial_weights
    )
    checkpoint = checkpoint_to_resume(trainer, work_dir, fingerprint, resume)
    if checkpoint:
        logger.warning("resuming the interrupted training from %s", checkpoint)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    final = trainer.evaluate()
    if trainer.is_deepspeed_enabled:
        fp32_master_weights(student.model)
    student.model.eval()
    scores = {"train_loss": float(result.training_loss), **{k: float(v) for k, v in final.items()}}
    return student, scores


def read_split(splits_dir: Path, name: str) -> tuple[list[Report], list[LabelRecord]]:
    """The reports and teacher labels of one split written by the `split` stage."""
    return read_reports(splits_dir / name / "reports.jsonl"), read_label_records(splits_dir / name / "labels.jsonl")


def reviewed_example_ids(config: TrainConfig, splits_dir: Path, sentences_dir: Path | None) -> set[str]:
    """The training examples a review weighs more: those whose labels it changed (the reviewed train
    reports whose labels differ from the teacher's, or for a sentence-level student the sentences and
    reports the `sentences` stage relabelled from reviews). With `review.repeat_confirmed` also those it
    confirmed (every reviewed train report, or every sentence of one): a verified label is worth more
    than a teacher's. Without it students with and without review differ only in the corrections."""
    if config.unit == "report" or sentences_dir is None:
        teacher = labels_by_id(read_label_records(splits_dir / "train" / "labels.jsonl"))
        reviewed = read_reviewed(splits_dir, "train")
        return {r.report_id for r in reviewed if config.review_repeat_confirmed or r.labels != teacher.get(r.report_id)}
    records = read_label_records(sentences_dir / "train" / "labels.jsonl")
    changed = {r.report_id for r in records if r.teacher is not None and r.teacher.name == REVIEW_TEACHER.name}
    if not config.review_repeat_confirmed:
        return changed
    reviewed_reports = (report for report, _ in reviewed_train_reports(splits_dir))
    return changed | {s.report_id for s in distinct_sentences(reviewed_reports)}


def read_augmented(
    augmented_dir: Path | None, train_reports: Sequence[Report]
) -> tuple[list[Report], list[LabelRecord]]:
    """The augment stage's teacher-labelled variants of the train reports (none without the folder).
    A variant without a label, or with the id of a train report (whose labels it would overwrite), is
    refused by id."""
    if augmented_dir is None:
        return [], []
    reports, records = read_split(augmented_dir.parent, augmented_dir.name)
    ids = {r.report_id for r in reports}
    unlabelled = ids - {r.report_id for r in records}
    if unlabelled:
        raise InputError(f"{augmented_dir}: {len(unlabelled)} reports have no label, e.g. {sorted(unlabelled)[:3]}")
    clashes = ids & {r.report_id for r in train_reports}
    if clashes:
        raise InputError(f"{augmented_dir}: {len(clashes)} report ids are also train ids, e.g. {sorted(clashes)[:3]}")
    return reports, records


def training_examples(
    config: TrainConfig,
    train_reports: list[Report],
    val_reports: list[Report],
    labels: dict[str, dict[str, str]],
    sentences_dir: Path | None,
) -> tuple[list[Report], list[Report], dict[str, dict[str, str]], list[Report]]:
    """What the student fits and validates on, their labels, and the whole val reports that choose the
    epoch: the reports themselves (none), or for a sentence-level student the `sentences` stage's
    teacher-labelled sentences (the val reports)."""
    if config.unit == "report":
        return train_reports, val_reports, labels, []
    if sentences_dir is None:
        raise InputError("model.unit is sentence: pass the `sentences` stage's folder (--sentences data/sentences)")
    train, train_labels = read_split(sentences_dir, "train")
    val, val_labels = read_split(sentences_dir, "val")
    if not train:
        raise InputError(
            f"{sentences_dir}/train holds no sentences: run `deberta-rad sentences` with model.unit sentence"
        )
    missing = {s.report_id for s in distinct_sentences(val_reports)} - {s.report_id for s in val}
    if missing:
        raise InputError(
            f"{sentences_dir}/val lacks {len(missing)} sentences of the val split (written for other splits?): "
            "rerun `deberta-rad sentences`"
        )
    return train, val, labels | labels_by_id([*train_labels, *val_labels]), val_reports


def train_from_splits(
    splits_dir: Path,
    output: Path,
    params: Params,
    work_dir: Path,
    resume: bool = True,
    augmented_dir: Path | None = None,
    pretrained_dir: Path | None = None,
    sentences_dir: Path | None = None,
) -> dict[str, float]:
    """The train stage: fit on the train split (and its augmented variants), select on val, save the
    model directory, and record everything in one MLflow run (params, per-step loss and learning rate,
    validation metrics, data version). A sentence-level student fits the `sentences` stage's labelled
    sentences instead and is selected on the val reports. The run id is written beside the model so
    `register` logs into the same run."""
    config = TrainConfig.from_params(params)
    start, start_label = resolved_init(config)
    encoder_dir = None if config.init_from else adapted_location(pretrained_dir, config.backbone)
    train_reports, train_labels = read_split(splits_dir, "train")
    augmented_reports, augmented_labels = read_augmented(augmented_dir, train_reports)
    val_reports, val_labels = read_split(splits_dir, "val")
    reviewed = read_reviewed_for_training(splits_dir)
    labels = labels_by_id([*train_labels, *augmented_labels, *val_labels, *reviewed])  # reviews replace the teacher's
    n_train = len(train_reports)
    train_reports = [*train_reports, *augmented_reports]
    teacher = train_labels[0].teacher if train_labels and train_labels[0].teacher else None
    train_reports, val_reports, labels, val_whole_reports = training_examples(
        config, train_reports, val_reports, labels, sentences_dir
    )
    reviewed_examples = reviewed_example_ids(config, splits_dir, sentences_dir)
    if int(os.environ.get("RANK", "0")) != 0:
        # Another process under the `deepspeed` launcher (it sets RANK for each one): it trains alongside
        # rank 0 and joins its collectives, but only rank 0 records the MLflow run and writes the model.
        _, scores = train_student(
            train_reports,
            val_reports,
            labels,
            start,
            work_dir,
            resume=resume,
            encoder_dir=encoder_dir,
            val_whole_reports=val_whole_reports,
            reviewed=reviewed_examples,
        )
        return scores
    configure_mlflow()
    with mlflow.start_run(run_name=f"train-{config.backbone.split('/')[-1]}") as run:
        mlflow.set_tags({"stage": "train", "teacher": teacher.name if teacher else "unknown", **data_version_tags()})
        mlflow.log_params(
            {
                **{f"params.{k}": v for k, v in config.model_dump().items()},
                "n_train": n_train,
                "n_train_augmented": len(augmented_reports),
                "n_val": len(val_whole_reports or val_reports),
                "n_train_examples": len(train_reports),
                "n_reviewed": len(reviewed),
                "n_reviewed_examples": len(reviewed_examples),
            }
        )
        student, scores = train_student(
            train_reports,
            val_reports,
            labels,
            start,
            work_dir,
            ("mlflow",),
            resume,
            encoder_dir,
            val_whole_reports,
            reviewed_examples,
        )
        mlflow.log_params(
            {
                "resolved.max_length": student.max_length,
                "resolved.pretrained": encoder_dir is not None,
                "resolved.init_from": start_label,
            }
        )
        student.save(output)
        (output / RUN_FILE).write_text(json.dumps({"mlflow_run_id": run.info.run_id}, indent=2))
    return scores
