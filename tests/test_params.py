"""The typed params.yaml: the repo's file is valid and complete, every knob is checked for type and bounds
with the file and dotted key named, and `deberta-rad params check` shows what the stages will use."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from conftest import REPO, merged
from typer.testing import CliRunner

from deberta_rad.cli import app
from deberta_rad.params import Params, ParamsError, load_params, validated

REPO_PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())


def test_the_repo_params_file_is_valid_and_sets_every_knob() -> None:
    params = load_params(REPO / "params.yaml")
    assert params.model.unit == "sentence" and params.sentences.mention_swaps == 2
    assert params.split.fractions.as_dict() == {"train": 0.7, "val": 0.1, "test": 0.2}


# (override, what the message must say)
BAD_VALUES = [
    (
        {"split": {"fractions": {"train": 0.0, "val": 0.5, "test": 0.5}}},
        "split.fractions.train: Input should be greater than 0",
    ),
    ({"split": {"fractions": {"val": 0.2}}}, "split.fractions: train, val and test must sum to 1; they sum to 1.1"),
    ({"train": {"alpha": -0.1}}, "train.alpha: Input should be greater than or equal to 0, not -0.1"),
    ({"train": {"temperature": 0}}, "train.temperature: Input should be greater than 0, not 0"),
    ({"train": {"epochs": "4"}}, "train.epochs: Input should be a valid number, not '4'"),
    ({"train": {"batch_size": 8.5}}, "train.batch_size: Input should be a valid integer, not 8.5"),
    ({"train": {"deepspeed": "yes"}}, "train.deepspeed: Input should be 'auto' or a valid boolean, not 'yes'"),
    ({"model": {"max_length": 4}}, "model.max_length: Input should be 'auto' or greater than or equal to 8, not 4"),
    ({"model": {"pooling": "max"}}, "model.pooling: Input should be 'mean' or 'cls', not 'max'"),
    ({"augment": {"drop": 1.0}}, "augment.drop: Input should be less than 1, not 1.0"),
    (
        {"sentences": {"synthetic_reports": -5}},
        "sentences.synthetic_reports: Input should be greater than or equal to 0",
    ),
    ({"pretrain": {"mlm_probability": 1.5}}, "pretrain.mlm_probability: Input should be less than 1, not 1.5"),
    ({"tune": {"temperature": {"low": 3.0, "high": 1.0}}}, "tune.temperature: low must be below high"),
    ({"tune": {"learning_rate": {"low": 0.0, "high": 0.1, "log": True}}}, "a log-scale range needs low > 0"),
    ({"monitoring": {"window": "fortnight"}}, "monitoring.window: must be a pandas frequency such as D, W or M"),
    ({"monitoring": {"p_value": 0}}, "monitoring.p_value: Input should be greater than 0, not 0"),
    (
        {"promote": {"reference": "llm"}},
        "promote.reference: Input should be 'auto', 'reviewed', 'gold' or 'teacher', not 'llm'",
    ),
    ({"relabel": {"budget": 0}}, "relabel.budget: Input should be greater than or equal to 1, not 0"),
    ({"ingest": {"sources": []}}, "ingest.sources: List should have at least 1 item"),
    ({"ingest": {"synthetic": {"styles": ["terse"]}}}, "ingest.synthetic.styles"),
    ({"pseudo_label": {"teacher": "gpt-4"}}, "pseudo_label.teacher: Input should be 'rules', 'keyword' or 'llm'"),
    ({"trian": {"epochs": 1}}, "unknown key 'trian' (did you mean 'train'?)"),
    ({"train": {"alpah": 0.5}}, "unknown key 'train.alpah' (did you mean 'alpha'?)"),
    ({"train": {"label_smoothing": 0.1}}, "unknown key 'train.label_smoothing'"),
]


@pytest.mark.parametrize(("override", "message"), BAD_VALUES, ids=[m.split(":")[0] for _, m in BAD_VALUES])
def test_a_bad_value_is_named_with_its_file_and_key(override: dict, message: str) -> None:
    with pytest.raises(ParamsError) as raised:
        validated(merged(REPO_PARAMS, override), Path("exp/params-7.yaml"))
    assert str(raised.value).startswith("exp/params-7.yaml: ") and message in str(raised.value)


def test_a_key_left_out_is_named_rather_than_defaulted() -> None:
    values = copy.deepcopy(REPO_PARAMS)
    del values["train"]["alpha"], values["monitoring"]
    with pytest.raises(ParamsError, match=r"missing key 'train\.alpha'; missing key 'monitoring'"):
        validated(values, Path("params.yaml"))


def test_sections_are_frozen_so_a_stage_cannot_change_a_knob_for_the_next() -> None:
    params = Params()
    with pytest.raises(ValueError, match="frozen"):
        params.train.alpha = 0.9  # type: ignore[misc]


def test_params_check_prints_the_values_or_names_the_bad_key(tmp_path: Path) -> None:
    good = CliRunner().invoke(app, ["params", "check", "--params", str(REPO / "params.yaml")])
    assert good.exit_code == 0, good.output
    shown = yaml.safe_load(good.output.rsplit("\n\n", 1)[0])
    assert shown == merged(REPO_PARAMS, {"tune": {name: {"log": False} for name in ("alpha", "temperature")}})
    assert good.output.rstrip().endswith("params.yaml: every key is valid")

    bad = tmp_path / "mine.yaml"
    bad.write_text(yaml.safe_dump(merged(REPO_PARAMS, {"train": {"alpha": 2}})))
    refused = CliRunner().invoke(app, ["params", "check", "--params", str(bad)])
    assert refused.exit_code == 2
    assert refused.output == f"error: {bad}: train.alpha: Input should be less than or equal to 1, not 2\n"
