"""The LLM teacher through the Batch API, against the fake server's real /v1/files and /v1/batches
(tests/fake_openai.py); that a server without them is told apart is also tested against llama-cpp-python
(test_llm_real_server.py)."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest
from conftest import FAKE_KEY, write_params
from fake_openai import COMPLETION_TOKENS, CONTEXT_MESSAGE, PROMPT_TOKENS, FakeOpenAI, expected_labels, serve
from test_llm_teacher import (
    DISTINCT_TEXTS,
    REPORTS,
    SECRET_PHRASE,
    assert_labelled_as_served,
    make_teacher,
)
from typer.testing import CliRunner

from deberta_rad.cli import app
from deberta_rad.data import read_label_records, text_hash, write_jsonl
from deberta_rad.settings import get_settings
from deberta_rad.teachers.batch import BATCH_ENDPOINT, BatchFailed, BatchUnsupported
from deberta_rad.teachers.cache import LabelCache
from deberta_rad.teachers.llm import BATCH_PRICE_FACTOR, BudgetExhausted, LabelingFailed, SystematicFailure

POLL_S = 0.02
pytestmark = pytest.mark.usefixtures("llm_env")


def batch_teacher(server: FakeOpenAI, tmp_path: Path, **options: object):
    return make_teacher(server, tmp_path, batch=True, batch_poll_s=POLL_S, **options)


def calls(server: FakeOpenAI, call: str) -> int:
    return sum(1 for made in server.batch_calls if made == call)


def test_a_batch_run_labels_every_report_at_the_batch_price_and_a_rerun_sends_nothing(
    fake: FakeOpenAI, tmp_path: Path
) -> None:
    teacher = batch_teacher(fake, tmp_path, price_per_1k_input=0.5, price_per_1k_output=2.0)
    records, summary = teacher.label_with_usage(REPORTS)

    assert_labelled_as_served(records)
    assert all(request.via_batch for request in fake.requests)
    assert (calls(fake, "POST /v1/files"), calls(fake, "POST /v1/batches")) == (1, 1)
    assert summary.batch_ids == ["batch_1"]
    assert (summary.requests_sent, summary.retries) == (DISTINCT_TEXTS, 0)
    full_price = DISTINCT_TEXTS * (PROMPT_TOKENS * 0.5 + COMPLETION_TOKENS * 2.0) / 1000
    assert summary.estimated_cost_usd == pytest.approx(full_price * BATCH_PRICE_FACTOR)
    assert "by batch batch_1" in summary.describe()
    assert not fake.files  # input, output and error files deleted from the endpoint: they hold reports
    with LabelCache(tmp_path / "cache") as cache:
        assert cache.batches_in_flight(fake.url, "fake-model", "v2", "json_schema") == []

    calls_before = list(fake.batch_calls)
    rerun, again = batch_teacher(fake, tmp_path).label_with_usage(REPORTS)
    assert [r.labels for r in rerun] == [r.labels for r in records]
    assert (again.requests_sent, again.cache_hits, fake.batch_calls) == (0, DISTINCT_TEXTS, calls_before)


def test_the_input_file_holds_one_chat_request_per_distinct_text_keyed_by_its_hash(
    fake: FakeOpenAI, tmp_path: Path
) -> None:
    uploads: list[bytes] = []
    upload = fake._upload

    def keep_upload(raw: bytes, content_type: str) -> dict:
        answer = upload(raw, content_type)
        uploads.append(fake.files[answer["id"]])
        return answer

    fake._upload = keep_upload  # type: ignore[method-assign]
    batch_teacher(fake, tmp_path).label(REPORTS)

    lines = [json.loads(line) for line in uploads[0].decode().splitlines()]
    assert sorted(line["custom_id"] for line in lines) == sorted({text_hash(r.text) for r in REPORTS})
    assert {(line["method"], line["url"]) for line in lines} == {("POST", BATCH_ENDPOINT)}
    assert all(line["body"]["temperature"] == 0 and line["body"]["model"] == "fake-model" for line in lines)
    assert not list(tmp_path.rglob("*.jsonl"))  # built in memory: no report text left on disk


def test_an_interrupted_batch_run_is_collected_by_the_next_run_without_sending_it_again(
    fake: FakeOpenAI, tmp_path: Path
) -> None:
    fake.batch_polls = 10**6  # the batch stays in progress until the test lets it finish
    with pytest.raises(TimeoutError):
        asyncio.run(asyncio.wait_for(batch_teacher(fake, tmp_path).alabel_with_usage(REPORTS), timeout=1.0))
    with LabelCache(tmp_path / "cache") as cache:
        assert cache.batches_in_flight(fake.url, "fake-model", "v2", "json_schema") == ["batch_1"]

    fake.batch_polls = 1
    records, summary = batch_teacher(fake, tmp_path).label_with_usage(REPORTS)

    assert_labelled_as_served(records)
    assert (calls(fake, "POST /v1/files"), calls(fake, "POST /v1/batches")) == (1, 1)
    assert summary.batch_ids == ["batch_1"] and summary.requests_sent == 0
    with LabelCache(tmp_path / "cache") as cache:
        assert cache.batches_in_flight(fake.url, "fake-model", "v2", "json_schema") == []
        assert len(cache) == DISTINCT_TEXTS


def test_answers_a_batch_leaves_invalid_failed_or_contradicting_go_into_a_follow_up_batch(
    fake: FakeOpenAI, tmp_path: Path
) -> None:
    fake.fault_on_report("effusion", "not_json")
    fake.fault_on_report("Cardiomegaly", "no_finding")
    fake.fault_on_report("consolidation", "500")
    fake.fault_on_report("fracture", "drop")
    records, summary = batch_teacher(fake, tmp_path).label_with_usage(REPORTS)

    assert_labelled_as_served(records)
    assert summary.batch_ids == ["batch_1", "batch_2"]
    assert (summary.requests_sent, summary.retries) == (DISTINCT_TEXTS + 4, 4)
    asked_again = fake.requests_for("Cardiomegaly")[-1].body["messages"]
    assert [m["role"] for m in asked_again] == ["system", "user", "assistant", "user"]
    assert '"No Finding" is "uncertain"' in asked_again[-1]["content"]
    assert summary.no_finding_repaired == 0


def test_a_report_the_endpoint_rejects_in_a_batch_is_named_and_the_others_are_kept(
    fake: FakeOpenAI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake.fault_on_report("effusion", "400")  # its error body quotes the report
    with pytest.raises(
        LabelingFailed, match=r"1 reports got no valid answer .*: r1 \(5 of 6 reports are labelled"
    ) as err:
        batch_teacher(fake, tmp_path).label(REPORTS)

    assert err.value.summary is not None and err.value.summary.batch_ids == ["batch_1"]
    assert SECRET_PHRASE not in str(err.value) + caplog.text
    with LabelCache(tmp_path / "cache") as cache:
        assert len(cache) == DISTINCT_TEXTS - 1


def test_the_same_failure_on_every_line_of_the_first_batch_stops_the_run(fake: FakeOpenAI, tmp_path: Path) -> None:
    for report in REPORTS:
        fake.fault_on_report(report.text, "context")
    with pytest.raises(SystematicFailure, match="--ctx-size") as err:
        batch_teacher(fake, tmp_path).label(REPORTS)

    assert CONTEXT_MESSAGE in str(err.value) and "a rerun fails alike" in str(err.value)
    assert calls(fake, "POST /v1/batches") == 1


def test_the_request_budget_bounds_the_batch(fake: FakeOpenAI, tmp_path: Path) -> None:
    with pytest.raises(BudgetExhausted):
        batch_teacher(fake, tmp_path, max_requests=3).label(REPORTS)
    assert len(fake.requests) == 3


def test_an_endpoint_without_the_batch_api_is_told_apart_from_a_failure(tmp_path: Path) -> None:
    with serve(batch_api=False) as server, pytest.raises(BatchUnsupported) as err:
        batch_teacher(server, tmp_path).label(REPORTS)
    message = str(err.value)
    assert "has no Batch API (POST /files answered HTTP 404 (not found))" in message
    assert "label without --batch (params.yaml pseudo_label.batch: false)" in message
    assert not server.requests


def test_a_batch_the_endpoint_fails_stops_the_run_with_its_reason(fake: FakeOpenAI, tmp_path: Path) -> None:
    fake.fail_batches = "The model `fake-model` does not exist or you do not have access to it."
    with pytest.raises(BatchFailed, match="batch batch_1 failed: The model `fake-model` does not exist"):
        batch_teacher(fake, tmp_path).label(REPORTS)
    with LabelCache(tmp_path / "cache") as cache:
        assert cache.batches_in_flight(fake.url, "fake-model", "v2", "json_schema") == []


def test_the_label_command_batches_when_params_say_so_and_the_option_overrides_them(
    fake: FakeOpenAI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("OPENAI_BASE_URL", fake.url)
    monkeypatch.setenv("DEBERTA_RAD_LLM_BATCH_POLL_S", str(POLL_S))
    monkeypatch.setenv("DEBERTA_RAD_LLM_RESPONSE_FORMAT", "json_schema")
    get_settings.cache_clear()
    pipeline = {"teacher": "llm", "llm_model": "fake-model", "cache": "cache", "batch": True}
    write_params(Path("params.yaml"), {"pseudo_label": pipeline})
    write_jsonl(Path("in.jsonl"), REPORTS)

    result = CliRunner().invoke(
        app, ["label", "--params", "params.yaml", "--input", "in.jsonl", "--output", "out.jsonl"]
    )
    assert result.exit_code == 0, result.output
    assert "by batch batch_1" in result.output
    assert [r.labels for r in read_label_records(Path("out.jsonl"))] == [expected_labels(r.text) for r in REPORTS]
    assert FAKE_KEY not in result.output + caplog.text and SECRET_PHRASE not in result.output + caplog.text

    fresh = ["label", "--params", "params.yaml", "--cache", "other", "--input", "in.jsonl", "--output", "o2.jsonl"]
    result = CliRunner().invoke(app, [*fresh, "--no-batch"])
    assert result.exit_code == 0, result.output
    assert "by batch" not in result.output
    assert calls(fake, "POST /v1/batches") == 1
