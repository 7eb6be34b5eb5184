"""Promotion through the MLflow registry, against a real `mlflow server` on a SQLite store: the REST call
the UI makes moves `champion`, and `deberta-rad promote` gates it on the evaluation tagged on each version.

Two versions of a tiny random student are registered with the project's own `register_model`, each with
a synthetic evaluation shaped like metrics/evaluate.json; no training is needed for a registry test.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import requests
import yaml
from conftest import free_port, mlflow_store, noisy_copy, stop_server, wait_for_http, write_params
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from tiny_backbones import tiny_deberta_backbone
from typer.testing import CliRunner

from deberta_rad.cli import app
from deberta_rad.metrics import compute_metrics
from deberta_rad.model import student_from_backbone
from deberta_rad.params import PromoteParams
from deberta_rad.promote import (
    EVALUATION_DATA_TAG,
    champion_on_candidates_test_data,
    format_gate_table,
    gate_reference,
    promotion_gate,
)
from deberta_rad.registry import CHAMPION, finding_f1_tag, register_model, resolve_model
from deberta_rad.schema import FINDINGS, STATUSES
from deberta_rad.settings import get_settings

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
NAME = "deberta-rad"
SPLITS_MD5 = "0123456789abcdef0123456789abcdef.dir"
HEALTH_WAIT_S = 180  # about 11 s on an idle machine (DESIGN.md 7); generous for busy CI cores
DROPPED = "Pleural Effusion"  # the finding the worse version gets badly wrong


# ----------------------------------------------------------------------------------------------
# A real MLflow server
# ----------------------------------------------------------------------------------------------


@contextmanager
def mlflow_server(root: Path) -> Iterator[str]:
    """`mlflow server` on a SQLite store and a local artifact root under ``root``; yields its URL."""
    port, log = free_port(), root / "server.log"
    command = [
        str(BIN / "mlflow"),
        "server",
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--default-artifact-root",
        str(root / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",  # the default 4 workers each import MLflow: a slower start for nothing on a 2-core machine
    ]
    with log.open("wb") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_for_http(f"{url}/health", server, log, HEALTH_WAIT_S)
            yield url
        finally:
            stop_server(server)


# ----------------------------------------------------------------------------------------------
# Two registered versions
# ----------------------------------------------------------------------------------------------


def random_labels(rng: np.random.Generator, n_reports: int) -> dict[str, dict[str, str]]:
    return {f"r{i}": {f: STATUSES[rng.integers(len(STATUSES))] for f in FINDINGS} for i in range(n_reports)}


def synthetic_evaluation(seed: int, error_rate: float, dropped: str | None = None) -> dict:
    """metrics/evaluate.json's shape: a labeler with ``error_rate`` noise (and ``dropped`` mostly wrong)."""
    rng = np.random.default_rng(seed)
    gold = random_labels(np.random.default_rng(0), 300)  # the same test data for every version
    teacher = noisy_copy(np.random.default_rng(1), gold, 0.05)
    predicted = noisy_copy(rng, gold, error_rate)
    if dropped:
        for labels in predicted.values():
            labels[dropped] = STATUSES[rng.integers(len(STATUSES))]
    return {
        "inference": {"reports": len(gold), "reports_per_s": 100.0},
        "teacher": compute_metrics(predicted, teacher),
        "gold": compute_metrics(predicted, gold),
    }


@dataclass
class Registry:
    url: str
    client: MlflowClient
    better: str  # version numbers
    worse: str
    better_metrics: dict
    worse_metrics: dict

    def champion(self) -> str:
        return self.client.get_model_version_by_alias(NAME, CHAMPION).version

    def tags(self, version: str) -> dict[str, str]:
        return self.client.get_model_version(NAME, version).tags

    def set_champion_through_the_ui_api(self, version: str) -> None:
        """The request the MLflow UI sends when "Save aliases" is clicked on a version's page."""
        answer = requests.post(
            f"{self.url}/ajax-api/2.0/mlflow/registered-models/alias",
            json={"name": NAME, "alias": CHAMPION, "version": version},
            timeout=30,
        )
        assert answer.status_code == 200, answer.text


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    root = tmp_path_factory.mktemp("registry")
    # register reads ./dvc.lock for the data version; promote reads ./params.yaml. On exit nothing later in
    # the session may talk to the stopped server.
    with mlflow_server(root) as url, mlflow_store(root, url):
        lock = {"schema": "2.0", "stages": {"split": {"outs": [{"path": "data/splits", "md5": SPLITS_MD5}]}}}
        (root / "dvc.lock").write_text(yaml.safe_dump(lock))
        write_params(root / "params.yaml", {"promote": {"reference": "gold", "max_finding_drop": 0.05}})
        student = student_from_backbone(str(tiny_deberta_backbone(root / "tiny-deberta")), max_length=32)
        student.save(root / "student")
        better_metrics = synthetic_evaluation(seed=2, error_rate=0.1)
        worse_metrics = synthetic_evaluation(seed=3, error_rate=0.1, dropped=DROPPED)
        better = register_model(root / "student", better_metrics)
        worse = register_model(root / "student", worse_metrics)  # the newest: challenger
        versions = str(better["version"]), str(worse["version"])
        yield Registry(url, MlflowClient(), *versions, better_metrics, worse_metrics)


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------


def test_the_synthetic_versions_differ_as_intended(registry: Registry) -> None:
    better, worse = registry.better_metrics["gold"], registry.worse_metrics["gold"]
    assert worse["macro_f1"] < better["macro_f1"]
    assert better["per_finding"][DROPPED]["f1"] - worse["per_finding"][DROPPED]["f1"] > 0.05


def test_each_version_carries_its_per_finding_f1_and_data_version(registry: Registry) -> None:
    tags = registry.tags(registry.worse)
    assert tags[EVALUATION_DATA_TAG] == SPLITS_MD5
    for reference in ("gold", "teacher"):
        scores = registry.worse_metrics[reference]
        assert tags[f"eval.{reference}.macro_f1"] == f"{scores['macro_f1']:.4f}"
        for finding in FINDINGS:
            assert tags[finding_f1_tag(reference, finding)] == f"{scores['per_finding'][finding]['f1']:.4f}"


def test_the_ui_rest_call_moves_champion_and_the_alias_resolves_to_it(registry: Registry, tmp_path: Path) -> None:
    assert registry.champion() == registry.better  # the first version registered became champion
    registry.set_champion_through_the_ui_api(registry.worse)
    try:
        assert registry.champion() == registry.worse
        model_dir, label = resolve_model(f"models:/{NAME}@{CHAMPION}", cache_dir=tmp_path / "cache")
        assert label == f"{NAME}/{registry.worse}"
        assert (model_dir / "config.json").is_file() and (model_dir / "model.safetensors").is_file()
    finally:
        registry.set_champion_through_the_ui_api(registry.better)
    assert registry.champion() == registry.better


@pytest.mark.parametrize("ref", [f"models:/{NAME}@nobody", f"models:/{NAME}/99", "models:/no-such-model@champion"])
def test_a_reference_the_registry_lacks_is_named_with_the_registry_asked(
    registry: Registry, tmp_path: Path, ref: str
) -> None:
    with pytest.raises(MlflowException) as raised:
        resolve_model(ref, cache_dir=tmp_path)
    assert raised.value.message.startswith(f"{ref}: ")
    assert f"in the MLflow registry at {get_settings().mlflow_tracking_uri}" in raised.value.message


def test_the_gate_refuses_a_worse_challenger_until_forced_with_a_reason(registry: Registry) -> None:
    registry.set_champion_through_the_ui_api(registry.better)
    runner = CliRunner()

    refused = runner.invoke(app, ["promote"])  # the challenger: the worse version
    assert refused.exit_code == 1, refused.output
    assert registry.champion() == registry.better
    row = next(line for line in refused.stdout.splitlines() if line.startswith(DROPPED))
    assert row.split()[-1] == "FAIL"
    assert "Gate failed" in refused.stdout and "refused" in refused.stderr
    assert "promotion.gate" not in registry.tags(registry.worse)

    reason = "site B needs the new effusion wording; accepted by the radiology lead"
    forced = runner.invoke(app, ["promote", "--force", "--reason", reason])
    assert forced.exit_code == 0, forced.output
    assert registry.champion() == registry.worse
    tags = registry.tags(registry.worse)
    assert tags["promotion.forced_reason"] == reason and tags["promotion.gate"] == "forced"
    assert tags["promotion.previous_champion"] == registry.better and tags["promotion.by"]
    assert datetime.fromisoformat(tags["promotion.at"]).tzinfo is not None


def test_the_gate_promotes_a_better_version(registry: Registry) -> None:
    registry.set_champion_through_the_ui_api(registry.worse)
    promoted = CliRunner().invoke(app, ["promote", "--version", registry.better])
    assert promoted.exit_code == 0, promoted.output
    assert "Gate passed" in promoted.stdout
    assert registry.champion() == registry.better
    tags = registry.tags(registry.better)
    assert tags["promotion.gate"] == "passed" and "promotion.forced_reason" not in tags

    again = CliRunner().invoke(app, ["promote", "--version", registry.better])
    assert again.exit_code == 0 and "already champion" in again.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["promote", "--force"], "--force needs --reason"),
        (["promote", "--reason", "why"], "--reason goes with --force"),
        (["promote", "--version", "99"], "no version 99"),
    ],
)
def test_usage_errors_exit_2(registry: Registry, args: list[str], message: str) -> None:
    champion = registry.champion()
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and message in result.stderr
    assert registry.champion() == champion


# The comparability rule needs no server: it reads the tags of two versions.


def version(number: str, metrics: dict, splits_md5: str | None) -> SimpleNamespace:
    from deberta_rad.registry import evaluation_tags

    data = {EVALUATION_DATA_TAG: splits_md5} if splits_md5 else {}
    return SimpleNamespace(version=number, tags={**data, **evaluation_tags(metrics)})


def test_versions_evaluated_on_other_data_are_not_compared() -> None:
    metrics = synthetic_evaluation(seed=2, error_rate=0.1)
    gate = promotion_gate(version("1", metrics, "aaa.dir"), version("2", metrics, "bbb.dir"), "gold", 0.05)
    assert not gate.passed and not gate.failures
    assert "different test data" in gate.problems[0]
    assert "Not comparable" in format_gate_table(gate)

    unknown = promotion_gate(version("1", metrics, "aaa.dir"), version("2", metrics, None), "gold", 0.05)
    assert not unknown.passed and "version 2 (candidate) has no" in unknown.problems[0]

    no_gold = {"teacher": metrics["teacher"]}
    other_reference = promotion_gate(version("1", metrics, "a"), version("2", no_gold, "a"), "gold", 0.05)
    assert other_reference.problems == ["version 2 (candidate) has no evaluation against 'gold'"]


def test_the_champion_is_scored_again_only_when_the_candidate_was_scored_on_the_workspaces_test_split(
    tmp_path: Path,
) -> None:
    metrics = synthetic_evaluation(seed=2, error_rate=0.1)
    lock = tmp_path / "dvc.lock"
    split = tmp_path / "splits/test"

    def rescored(champion_md5: str, candidate_md5: str) -> object:
        champion, candidate = version("1", metrics, champion_md5), version("2", metrics, candidate_md5)
        return champion_on_candidates_test_data(champion, candidate, split, 8, lock_path=lock)

    assert rescored("old.dir", "new.dir") is None, "no dvc.lock: not a DVC workspace"
    lock.write_text(yaml.safe_dump({"stages": {"split": {"outs": [{"path": "data/splits", "md5": "new.dir"}]}}}))
    assert rescored("old.dir", "new.dir") is None, "the test split is not checked out"
    split.mkdir(parents=True)
    (split / "reports.jsonl").write_text("")
    assert rescored("new.dir", "new.dir") is None, "both were scored on it already"
    assert rescored("old.dir", "other.dir") is None, "the candidate was scored on another split than the workspace's"


AUTO = PromoteParams(reference="auto")


def test_auto_reference_is_gold_only_when_both_versions_have_it() -> None:
    metrics = synthetic_evaluation(seed=2, error_rate=0.1)
    with_gold, teacher_only = version("1", metrics, "a"), version("2", {"teacher": metrics["teacher"]}, "a")
    assert gate_reference(AUTO, with_gold, with_gold) == "gold"
    assert gate_reference(AUTO, with_gold, teacher_only) == "teacher"
    assert gate_reference(PromoteParams(reference="gold"), with_gold, teacher_only) == "gold"


def test_auto_reference_prefers_the_reviewed_gold_once_both_versions_were_scored_on_enough_of_it() -> None:
    metrics = synthetic_evaluation(seed=2, error_rate=0.1)  # 300 reports
    reviewed = version("1", {**metrics, "reviewed": metrics["gold"]}, "a")
    also_reviewed = version("2", {**metrics, "reviewed": metrics["gold"]}, "a")
    assert reviewed.tags["eval.reviewed.n_reports"] == "300"
    assert gate_reference(AUTO, reviewed, also_reviewed) == "reviewed"
    assert gate_reference(AUTO, reviewed, version("3", metrics, "a")) == "gold"
    # The first reviews are too few to judge two versions by: gold (or the teacher) until there are enough.
    assert gate_reference(PromoteParams(reference="auto", min_reviewed_reports=301), reviewed, also_reviewed) == "gold"
    uncounted = version("4", {**metrics, "reviewed": metrics["gold"]}, "a")
    del uncounted.tags["eval.reviewed.n_reports"]  # registered before the count was tagged
    assert gate_reference(AUTO, reviewed, uncounted) == "gold"


def test_a_drop_within_the_threshold_passes() -> None:
    champion = version("1", synthetic_evaluation(seed=2, error_rate=0.1), "a")
    candidate = version("2", synthetic_evaluation(seed=2, error_rate=0.1), "a")
    key = finding_f1_tag("gold", DROPPED)
    candidate.tags[key] = f"{float(champion.tags[key]) - 0.05:.4f}"  # exactly the allowed drop
    assert promotion_gate(champion, candidate, "gold", 0.05).passed
    candidate.tags[key] = f"{float(champion.tags[key]) - 0.0501:.4f}"
    assert promotion_gate(champion, candidate, "gold", 0.05).failures == [DROPPED]
