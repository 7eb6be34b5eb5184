"""Tiny randomly initialised backbones built inside the tests (no model hub here), so the DeBERTa-v3
code path and anything that trains many times can run on CPU in seconds."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import DebertaV2Config, DebertaV2Model, DebertaV2Tokenizer

from deberta_rad.synthetic import generate_corpus

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def deberta_v3_tokenizer(vocab_size: int = 400) -> DebertaV2Tokenizer:
    """A DeBERTa-v3 style (SentencePiece Unigram, ▁ word marks) tokenizer trained on synthetic reports."""
    unigram = Tokenizer(models.Unigram())
    unigram.normalizer = normalizers.Lowercase()
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, unk_token="[UNK]")
    texts = [report.text for report, _ in generate_corpus(200, seed=3)]
    unigram.train_from_iterator(texts, trainer=trainer)
    vocab = [(piece, score) for piece, score in json.loads(unigram.to_str())["model"]["vocab"]]
    return DebertaV2Tokenizer(vocab=vocab, do_lower_case=True)


def tiny_deberta_backbone(path: Path, hidden_size: int = 32, layers: int = 2) -> Path:
    """Save a small random DebertaV2 encoder (relative attention as in v3) with its tokenizer to ``path``."""
    tokenizer = deberta_v3_tokenizer()
    config = DebertaV2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=256,
        relative_attention=True,
        position_buckets=32,
        pos_att_type=["p2c", "c2p"],
        pad_token_id=tokenizer.pad_token_id,
    )
    DebertaV2Model(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
