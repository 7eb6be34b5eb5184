"""LLM teacher against a real local Chat Completions server that injects faults (tests/fake_openai.py)."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
import traceback
from pathlib import Path

import pytest
from conftest import FAKE_KEY
from fake_openai import (
    COMPLETION_TOKENS,
    CONTEXT_MESSAGE,
    FORMAT_ERROR,
    FORMAT_MESSAGE,
    PROMPT_TOKENS,
    RETRY_AFTER_S,
    FakeOpenAI,
    expected_labels,
    serve,
)
from pydantic import ValidationError
from typer.testing import CliRunner

from deberta_rad.cli import app
from deberta_rad.data import text_hash
from deberta_rad.schema import FINDINGS, Report
from deberta_rad.settings import get_settings
from deberta_rad.teachers import get_teacher
from deberta_rad.teachers.cache import CACHE_FILENAME, CachedAnswer, LabelCache
from deberta_rad.teachers.llm import (
    FAIL_FAST_REPORTS,
    BudgetExhausted,
    EndpointRejected,
    ExternalLLMNotAllowed,
    LabelingFailed,
    LLMAnswer,
    LLMTeacher,
    RetryableFailure,
    SystematicFailure,
    _validation_reason,
    backoff_delay,
    ensure_endpoint_allowed,
    load_prompt,
    no_finding_contradiction,
    response_format,
    retry_after_seconds,
    server_message,
)

pytestmark = pytest.mark.usefixtures("llm_env")
SECRET_PHRASE = "zebra-marker-9931"  # a piece of report text that must never reach logs or errors

REPORTS = [
    Report(report_id="r1", text=f"Small left pleural effusion. No pneumothorax. {SECRET_PHRASE}"),
    Report(report_id="r2", text="Cardiomegaly. Possible mild edema."),
    Report(report_id="r3", text="No acute cardiopulmonary process."),
    Report(report_id="r4", text="Right lower lobe consolidation. Cannot exclude pneumothorax."),
    Report(report_id="r5", text="Healing rib fracture. Lungs without opacity."),
    Report(report_id="r6", text="No acute cardiopulmonary process."),  # same text as r3: one request
]
DISTINCT_TEXTS = 5


def make_teacher(server: FakeOpenAI, tmp_path: Path, **options: object) -> LLMTeacher:
    """A teacher with test-sized timeouts and backoff, caching under tmp_path; its structured-output mode
    is set (the probe's own tests ask for auto), so the server sees only report requests."""
    defaults: dict[str, object] = {
        "response_format": "json_schema",
        "model": "fake-model",
        "cache_dir": tmp_path / "cache",
        "base_url": server.url,
        "timeout_s": 1.0,  # generous against a loaded CI machine; slow answers take 2 s
        "max_retries": 3,
        "concurrency": 4,
        "backoff_base_s": 0.05,
        "backoff_cap_s": 0.2,
    }
    return LLMTeacher(**{**defaults, **options})  # type: ignore[arg-type]


def assert_labelled_as_served(records: list, reports: list[Report] = REPORTS) -> None:
    """Every report, in input order, carries exactly what the server answered for its text."""
    assert [r.report_id for r in records] == [r.report_id for r in reports]
    for record, report in zip(records, reports, strict=True):
        assert record.labels == expected_labels(report.text)


# ----------------------------------------------------------------------------------------------
# Happy path, provenance, request shape
# ----------------------------------------------------------------------------------------------


def test_clean_run_labels_every_report_with_provenance_and_usage(fake: FakeOpenAI, tmp_path: Path) -> None:
    teacher = make_teacher(fake, tmp_path, price_per_1k_input=0.5, price_per_1k_output=2.0)
    records, summary = teacher.label_with_usage(REPORTS)

    assert_labelled_as_served(records)
    assert all(r.teacher == teacher.info for r in records)
    assert teacher.info.model_dump() == {"name": "llm", "model": "fake-model", "prompt_version": "v2"}
    assert len(fake.requests) == DISTINCT_TEXTS
    assert (summary.requests_sent, summary.retries, summary.cache_hits) == (DISTINCT_TEXTS, 0, 0)
    assert summary.prompt_tokens == DISTINCT_TEXTS * PROMPT_TOKENS
    assert summary.completion_tokens == DISTINCT_TEXTS * COMPLETION_TOKENS
    expected_cost = DISTINCT_TEXTS * (PROMPT_TOKENS * 0.5 + COMPLETION_TOKENS * 2.0) / 1000
    assert summary.estimated_cost_usd == pytest.approx(expected_cost)
    assert teacher.last_run is summary
    assert "estimated cost $" in summary.describe()


def test_each_request_holds_one_report_last_with_strict_schema_and_temperature_0(
    fake: FakeOpenAI, tmp_path: Path
) -> None:
    make_teacher(fake, tmp_path).label(REPORTS[:2])

    system = load_prompt("v2").system
    reports_asked = []
    for request in fake.requests:
        messages = request.body["messages"]
        assert [m["role"] for m in messages] == ["system", "user"]
        assert messages[0]["content"] == system  # identical prefix: providers' prompt caching applies
        reports_asked += [r.report_id for r in REPORTS[:2] if messages[-1]["content"].endswith(r.text)]
        assert request.body["temperature"] == 0
        assert request.body["response_format"] == response_format("json_schema")
        assert request.body["model"] == "fake-model"
    assert sorted(reports_asked) == ["r1", "r2"]  # one report per request, placed last
    schema = response_format("json_schema")["json_schema"]
    assert schema["strict"] is True
    assert schema["schema"]["properties"]["labels"]["required"] == list(FINDINGS)


def test_get_teacher_builds_the_llm_teacher(fake: FakeOpenAI, tmp_path: Path) -> None:
    teacher = get_teacher("llm", model="fake-model", base_url=fake.url, cache_dir=tmp_path / "c")
    assert isinstance(teacher, LLMTeacher)
    assert teacher.info.name == "llm"


def test_model_defaults_to_settings(fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEBERTA_RAD_LLM_MODEL", "local-llama")
    get_settings.cache_clear()
    assert LLMTeacher(base_url=fake.url).info.model == "local-llama"


def test_without_a_key_a_placeholder_is_sent(fake: FakeOpenAI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY")
    get_settings.cache_clear()
    make_teacher(fake, tmp_path).label(REPORTS[:1])
    assert fake.requests[0].authorization == "Bearer not-needed"


# ----------------------------------------------------------------------------------------------
# Faults: every one ends with the server's real answer
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["429", "500", "not_json", "missing_finding", "invalid_status", "slow", "drop"])
def test_a_fault_is_retried_until_the_real_answer(fault: str, fake: FakeOpenAI, tmp_path: Path) -> None:
    fake.fault_on_report("Cardiomegaly", fault)
    started = time.monotonic()
    records, summary = make_teacher(fake, tmp_path).label_with_usage(REPORTS)

    assert_labelled_as_served(records)
    assert summary.retries == 1
    assert summary.requests_sent == len(fake.requests) == DISTINCT_TEXTS + 1
    assert [r.fault for r in fake.requests_for("Cardiomegaly")] == [fault, None]
    if fault == "429":
        assert time.monotonic() - started >= RETRY_AFTER_S  # Retry-After honoured


def test_a_sequence_of_every_fault_on_one_report_still_ends_labelled(fake: FakeOpenAI, tmp_path: Path) -> None:
    faults = ["500", "drop", "slow", "not_json", "missing_finding", "invalid_status"]
    fake.fault_on_report("Cardiomegaly", *faults)
    fake.fault_on_report("fracture", "429")
    records, summary = make_teacher(fake, tmp_path, max_retries=len(faults)).label_with_usage(REPORTS)

    assert_labelled_as_served(records)
    assert summary.retries == len(faults) + 1
    assert [r.fault for r in fake.requests_for("Cardiomegaly")] == [*faults, None]


def test_retries_used_up_raises_naming_ids_and_keeps_the_rest(fake: FakeOpenAI, tmp_path: Path) -> None:
    fake.fault_on_report(SECRET_PHRASE, "500", "500", "500")
    with pytest.raises(LabelingFailed) as caught:
        make_teacher(fake, tmp_path, max_retries=2).label(REPORTS)

    message = str(caught.value)
    assert "r1" in message and SECRET_PHRASE not in message and "effusion" not in message
    assert caught.value.summary is not None and caught.value.summary.failed_ids == ["r1"]
    assert len(fake.requests_for(SECRET_PHRASE)) == 3

    before = len(fake.requests)
    records = make_teacher(fake, tmp_path).label(REPORTS)
    assert_labelled_as_served(records)
    assert len(fake.requests) - before == 1  # only the failed report is asked again


def test_a_rejected_request_is_not_retried(fake: FakeOpenAI, tmp_path: Path) -> None:
    fake.fault_on_report("Cardiomegaly", "400")
    with pytest.raises(LabelingFailed, match="r2"):
        make_teacher(fake, tmp_path).label(REPORTS)
    assert len(fake.requests_for("Cardiomegaly")) == 1
    assert len(fake.requests) == DISTINCT_TEXTS


def test_a_wrong_key_stops_the_run_early_without_leaking_it(
    fake: FakeOpenAI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    fake.fault_on_request(1, "401")
    with pytest.raises(EndpointRejected) as caught:
        make_teacher(fake, tmp_path, concurrency=1).label(REPORTS)

    assert "401" in str(caught.value) and "OPENAI_API_KEY" in str(caught.value)
    assert len(fake.requests) == 1  # no further requests once the endpoint refused the key
    assert_no_secret_in(caught.value, caplog)


# ----------------------------------------------------------------------------------------------
# Cache, resume, interruption, budget
# ----------------------------------------------------------------------------------------------


def test_a_cached_rerun_sends_nothing(fake: FakeOpenAI, tmp_path: Path) -> None:
    first = make_teacher(fake, tmp_path).label(REPORTS)
    sent = len(fake.requests)

    records, summary = make_teacher(fake, tmp_path).label_with_usage(REPORTS)

    assert len(fake.requests) == sent
    assert records == first
    assert (summary.requests_sent, summary.cache_hits, summary.total_tokens) == (0, DISTINCT_TEXTS, 0)


def test_the_cache_is_keyed_by_model_and_prompt_version(fake: FakeOpenAI, tmp_path: Path) -> None:
    make_teacher(fake, tmp_path).label(REPORTS[:1])
    make_teacher(fake, tmp_path, model="other-model").label(REPORTS[:1])
    assert len(fake.requests) == 2


def test_the_cache_stores_hashes_and_labels_but_never_report_text(fake: FakeOpenAI, tmp_path: Path) -> None:
    make_teacher(fake, tmp_path).label(REPORTS)
    cache_file = tmp_path / "cache" / CACHE_FILENAME

    with sqlite3.connect(cache_file) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        dumped = "\n".join(conn.iterdump())
    assert text_hash(REPORTS[0].text) in dumped
    assert SECRET_PHRASE not in dumped
    for path in cache_file.parent.iterdir():
        assert SECRET_PHRASE.encode() not in path.read_bytes()
        assert FAKE_KEY.encode() not in path.read_bytes()


def test_budget_on_requests_stops_cleanly_and_a_rerun_resumes(fake: FakeOpenAI, tmp_path: Path) -> None:
    with pytest.raises(BudgetExhausted) as caught:
        make_teacher(fake, tmp_path, concurrency=1, max_requests=2).label(REPORTS)

    summary = caught.value.summary
    assert isinstance(caught.value, RuntimeError)
    assert summary is not None and summary.stopped_by_budget and summary.requests_sent == 2
    assert len(fake.requests) == 2
    assert len(summary.unlabelled_ids) == 4  # r3 and r6 share a text
    assert "4 reports unlabelled" in str(caught.value)
    with LabelCache(tmp_path / "cache") as cache:
        assert len(cache) == 2  # what was answered before the stop is kept

    records, resumed = make_teacher(fake, tmp_path).label_with_usage(REPORTS)
    assert_labelled_as_served(records)
    assert (resumed.requests_sent, resumed.cache_hits) == (DISTINCT_TEXTS - 2, 2)
    assert len(fake.requests) == DISTINCT_TEXTS


def test_budget_on_tokens_stops_once_reached(fake: FakeOpenAI, tmp_path: Path) -> None:
    per_request = PROMPT_TOKENS + COMPLETION_TOKENS
    with pytest.raises(BudgetExhausted):
        make_teacher(fake, tmp_path, concurrency=1, max_tokens_budget=2 * per_request + 1).label(REPORTS)
    assert len(fake.requests) == 3  # 2 requests stay under the budget, the third crosses it


def test_a_streamed_run_is_one_run_over_its_chunks(tmp_path: Path) -> None:
    """Chunks of two reports: one probe, one summary, records in input order, and r6 (r3's text, in a
    later chunk) answered from the run's cache, with no cache folder."""
    with serve() as server:
        teacher = make_teacher(server, tmp_path, cache_dir=None, response_format="auto")
        records = list(teacher.label_stream(iter(REPORTS), chunk_size=2))
        assert_labelled_as_served(records)
        summary = teacher.last_run
        assert summary is not None and summary.reports == len(REPORTS)
        assert (summary.requests_sent, summary.cache_hits) == (DISTINCT_TEXTS, 1)
        assert (summary.response_mode, summary.response_mode_source) == ("json_schema", "probed")
        assert len(probes(server)) == 1


def test_a_streamed_run_spends_one_budget_and_stops_at_the_chunk_it_runs_out_in(
    fake: FakeOpenAI, tmp_path: Path
) -> None:
    teacher = make_teacher(fake, tmp_path, concurrency=1, max_requests=3)
    stream = teacher.label_stream(iter(REPORTS), chunk_size=2)
    assert [r.report_id for r in (next(stream), next(stream))] == ["r1", "r2"]
    with pytest.raises(BudgetExhausted) as caught:
        list(stream)
    summary = caught.value.summary
    assert summary is teacher.last_run and summary.requests_sent == 3 and summary.reports == 4
    assert summary.unlabelled_ids == ["r4"]
    assert len(fake.requests) == 3


def test_an_interrupted_run_loses_only_requests_in_flight(tmp_path: Path) -> None:
    with serve(slow_s=6.0) as server:
        server.fault_on_report("Cardiomegaly", "slow")
        teacher = make_teacher(server, tmp_path, timeout_s=10, concurrency=DISTINCT_TEXTS)

        async def interrupt_after_a_second() -> None:
            await asyncio.wait_for(teacher.alabel_with_usage(REPORTS), timeout=2.0)

        with pytest.raises((asyncio.TimeoutError, TimeoutError)):
            asyncio.run(interrupt_after_a_second())
        assert len(server.requests) == DISTINCT_TEXTS

        records, summary = make_teacher(server, tmp_path).label_with_usage(REPORTS)
    assert_labelled_as_served(records)
    assert summary.requests_sent == 1 and summary.cache_hits == DISTINCT_TEXTS - 1


# ----------------------------------------------------------------------------------------------
# Concurrency, opt-in, secrets
# ----------------------------------------------------------------------------------------------


def test_concurrency_is_bounded(tmp_path: Path) -> None:
    reports = [Report(report_id=f"c{i}", text=f"Report number {i}. No effusion.") for i in range(8)]
    with serve(latency_s=0.3) as server:
        make_teacher(server, tmp_path, concurrency=3).label(reports)
    assert server.max_in_flight == 3


@pytest.mark.parametrize("base_url", [None, "https://api.openai.com/v1", "http://10.0.0.5:8000/v1"])
def test_an_external_endpoint_needs_the_opt_in(base_url: str | None, tmp_path: Path) -> None:
    with pytest.raises(ExternalLLMNotAllowed) as caught:
        LLMTeacher(model="m", base_url=base_url, cache_dir=tmp_path)
    message = str(caught.value)
    assert "DEBERTA_RAD_ALLOW_EXTERNAL_LLM=true" in message and "protected health information" in message
    assert FAKE_KEY not in message


def test_the_opt_in_allows_an_external_endpoint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DEBERTA_RAD_ALLOW_EXTERNAL_LLM", "true")
    get_settings.cache_clear()
    assert LLMTeacher(model="m", cache_dir=tmp_path).base_url == "https://api.openai.com/v1"


def test_openai_base_url_from_the_environment_is_honoured(
    fake: FakeOpenAI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", fake.url.replace("127.0.0.1", "localhost"))
    get_settings.cache_clear()
    LLMTeacher(model="m", cache_dir=tmp_path, timeout_s=2).label(REPORTS[:1])
    assert len(fake.requests) == 2  # the probe of its structured output, then the report


@pytest.mark.parametrize(
    ("url", "loopback"),
    [
        ("http://localhost:8000/v1", True),
        ("http://127.0.0.1:11434/v1", True),
        ("http://127.8.9.1/v1", True),
        ("http://[::1]:8080/v1", True),
        ("https://api.openai.com/v1", False),
        ("http://localhost.example.com/v1", False),
        ("http://192.168.1.4:8000/v1", False),
    ],
)
def test_loopback_detection(url: str, loopback: bool) -> None:
    if loopback:
        ensure_endpoint_allowed(url, allow_external=False)
    else:
        with pytest.raises(ExternalLLMNotAllowed):
            ensure_endpoint_allowed(url, allow_external=False)


def assert_no_secret_in(error: BaseException, caplog: pytest.LogCaptureFixture) -> None:
    """Neither the API key nor report text appears in the error, its traceback or any log record."""
    traceback_text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    texts = [str(error), repr(error), traceback_text] + [r.getMessage() for r in caplog.records]
    for text in texts:
        assert FAKE_KEY not in text
        assert SECRET_PHRASE not in text


def test_key_and_report_text_never_reach_logs_or_errors(
    fake: FakeOpenAI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    fake.fault_on_report(SECRET_PHRASE, "429", "500", "not_json", "drop", "400")
    with pytest.raises(LabelingFailed) as caught:
        make_teacher(fake, tmp_path, max_retries=5).label(REPORTS)

    assert fake.requests[0].authorization == f"Bearer {FAKE_KEY}"  # the key is used, just never shown
    assert any("r1" in r.getMessage() for r in caplog.records)
    assert_no_secret_in(caught.value, caplog)
    assert FAKE_KEY not in repr(make_teacher(fake, tmp_path).__dict__)


# ----------------------------------------------------------------------------------------------
# Small pieces
# ----------------------------------------------------------------------------------------------


def test_answer_validation_rejects_schema_breaks() -> None:
    good = {"labels": dict.fromkeys(FINDINGS, "absent")}
    assert LLMAnswer.model_validate(good).labels["Edema"] == "absent"
    for broken in (
        {"labels": {f: "absent" for f in FINDINGS[1:]}},
        {"labels": {**good["labels"], "Edema": "maybe"}},
        {"labels": {**good["labels"], "Pneumonia": "absent"}},
        {**good, "comment": "extra"},
    ):
        with pytest.raises(ValueError):
            LLMAnswer.model_validate(broken)


def test_schema_errors_are_described_without_answer_content() -> None:
    answer = {"labels": {**dict.fromkeys(FINDINGS, "absent"), SECRET_PHRASE: "maybe"}}
    with pytest.raises(ValidationError) as caught:
        LLMAnswer.model_validate(answer)
    reason = _validation_reason(caught.value)
    assert reason.startswith("invalid answer") and SECRET_PHRASE not in reason


def test_retry_after_parsing_and_backoff_bounds() -> None:
    assert retry_after_seconds({"retry-after": "2"}) == 2.0
    assert retry_after_seconds({"retry-after-ms": "1500"}) == 1.5
    assert retry_after_seconds({}) is None
    assert 0 <= retry_after_seconds({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) <= 0  # in the past
    for attempt in range(10):
        delay = backoff_delay(attempt, base_s=1.0, cap_s=30.0)
        ceiling = min(30.0, 2.0**attempt)
        assert ceiling / 2 <= delay <= ceiling


def test_retry_after_holds_back_every_worker(tmp_path: Path) -> None:
    with serve(latency_s=0.3) as server:
        server.fault_on_request(1, "429")
        records = make_teacher(server, tmp_path, concurrency=2).label(REPORTS)
    assert_labelled_as_served(records)
    rate_limited_at = server.requests[0].received_at
    later = [r for r in server.requests if r.number > 2]  # request 2 was already in flight
    assert later and all(r.received_at - rate_limited_at >= 0.9 * RETRY_AFTER_S for r in later)


def test_retry_after_is_capped(fake: FakeOpenAI, tmp_path: Path) -> None:
    teacher = make_teacher(fake, tmp_path, retry_after_cap_s=0.1)
    assert teacher._retry_delay(RetryableFailure("429", retry_after_s=RETRY_AFTER_S), attempt=1) == 0.1
    assert teacher._retry_delay(RetryableFailure("invalid answer", back_off=False), attempt=1) == 0.0


def test_unknown_prompt_version_is_refused() -> None:
    with pytest.raises(ValueError, match="v1"):
        load_prompt("v999")
    with pytest.raises(ValueError):
        load_prompt("../settings")


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_the_prompt_puts_instructions_first_and_the_report_last(version: str) -> None:
    prompt = load_prompt(version)
    for finding in FINDINGS:
        assert finding in prompt.system
    messages = prompt.messages("Report with {braces}.")
    assert messages[-1]["content"].endswith("Report with {braces}.")


def test_the_default_prompt_states_the_rule_teachers_conventions() -> None:
    """Both teachers label by the same definitions (DESIGN.md: Enlarged Cardiomediastinum, Lung Lesion)."""
    system = load_prompt("v2").system
    assert "granuloma is not a lesion" in system and "not a nodule" in system
    assert "enlarged cardiomediastinal silhouette" in system.lower()


def test_label_cache_round_trip(tmp_path: Path) -> None:
    answer = CachedAnswer(dict.fromkeys(FINDINGS, "not_mentioned"), 10, 2)
    with LabelCache(tmp_path) as cache:
        cache.put("abc", "m", "v1", "json_schema", answer)
    with LabelCache(tmp_path) as cache:
        assert cache.get_many(["abc", "missing"], "m", "v1", "json_schema") == {"abc": answer}
        assert cache.get_many(["abc"], "m", "v2", "json_schema") == {}
        assert cache.get_many(["abc"], "m", "v1", "prompt") == {}
        assert len(cache) == 1


def test_a_cache_from_before_the_mode_keeps_its_answers_as_json_schema_ones(tmp_path: Path) -> None:
    labels = dict.fromkeys(FINDINGS, "not_mentioned")
    with sqlite3.connect(tmp_path / CACHE_FILENAME) as conn:
        conn.execute(
            "CREATE TABLE labels (text_sha256 TEXT NOT NULL, model TEXT NOT NULL, prompt_version TEXT NOT NULL, "
            "labels_json TEXT NOT NULL, prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, "
            "created_at TEXT NOT NULL, PRIMARY KEY (text_sha256, model, prompt_version))"
        )
        conn.execute("INSERT INTO labels VALUES ('abc', 'm', 'v2', ?, 10, 2, '2026-01-01')", (json.dumps(labels),))
    with LabelCache(tmp_path) as cache:
        assert cache.get_many(["abc"], "m", "v2", "json_schema") == {"abc": CachedAnswer(labels, 10, 2)}
    with sqlite3.connect(tmp_path / CACHE_FILENAME) as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "labels" not in tables


# ----------------------------------------------------------------------------------------------
# Structured-output modes: probed once, kept in the cache, part of the answer's key
# ----------------------------------------------------------------------------------------------


def probes(server: FakeOpenAI) -> list:
    return [r for r in server.requests if "Report:" not in r.report]


@pytest.mark.parametrize(
    ("refused", "mode", "request_format"),
    [
        ((), "json_schema", response_format("json_schema")),  # OpenAI, vLLM, llama-server, Ollama >= 0.5
        (("json_schema",), "json_object", response_format("json_object")),  # llama-cpp-python
        (("json_schema", "schema"), "prompt", {"type": "json_object"}),  # a plain JSON mode
    ],
)
def test_the_probe_finds_the_strictest_mode_the_server_takes(
    refused: tuple[str, ...], mode: str, request_format: dict, tmp_path: Path
) -> None:
    with serve(refuse_formats=refused) as server:
        records, summary = make_teacher(server, tmp_path, response_format="auto").label_with_usage(REPORTS)
        assert_labelled_as_served(records)
        assert (summary.response_mode, summary.response_mode_source) == (mode, "probed")
        assert f"structured output {mode}, probed" in summary.describe()
        assert len(probes(server)) == len(refused) + 1  # one cheap request per mode tried, no report in it
        asked = [r for r in server.requests if "Report:" in r.report]
        assert len(asked) == DISTINCT_TEXTS and all(r.body["response_format"] == request_format for r in asked)
        schema_in_prompt = all("JSON schema" in r.body["messages"][0]["content"] for r in asked)
        assert schema_in_prompt == (mode == "prompt")

        sent = len(server.requests)
        _, rerun = make_teacher(server, tmp_path, response_format="auto").label_with_usage(REPORTS)
        assert len(server.requests) == sent  # the mode and the answers come from the cache
        assert (rerun.response_mode, rerun.response_mode_source, rerun.cache_hits) == (mode, "cached", DISTINCT_TEXTS)


def test_the_mode_is_part_of_the_answers_key(fake: FakeOpenAI, tmp_path: Path) -> None:
    make_teacher(fake, tmp_path).label(REPORTS)
    _, summary = make_teacher(fake, tmp_path, response_format="prompt").label_with_usage(REPORTS)
    assert (summary.cache_hits, summary.requests_sent) == (0, DISTINCT_TEXTS)


def test_a_server_that_takes_no_mode_is_named_with_its_answers(tmp_path: Path) -> None:
    with serve() as server:
        for number in (1, 2, 3):
            server.fault_on_request(number, "503")
        with pytest.raises(EndpointRejected) as caught:
            make_teacher(server, tmp_path, response_format="auto").label(REPORTS)
    message = str(caught.value)
    assert "json_schema: HTTP 503 (Loading model)" in message and "prompt: HTTP 503" in message
    assert len(server.requests) == 3


def test_an_unknown_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="json_object"):
        LLMTeacher(model="m", base_url="http://127.0.0.1:9/v1", response_format="xml")  # type: ignore[arg-type]
    arguments = ["label", "--input", "x.jsonl", "--output", "y.jsonl", "--llm-response-format", "xml"]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 2 and "is not one of" in result.output


# ----------------------------------------------------------------------------------------------
# Systematic failures stop the run with the server's message and the setting to change
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("concurrency", [1, 8])
def test_a_server_that_refuses_the_format_stops_the_run_after_a_few_reports(
    concurrency: int, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    reports = [Report(report_id=f"f{i}", text=f"Report {i}: no effusion. {SECRET_PHRASE}") for i in range(20)]
    with serve(refuse_formats=("json_schema",)) as server, pytest.raises(SystematicFailure) as caught:
        make_teacher(server, tmp_path, concurrency=concurrency, max_retries=5).label(reports)
    message = str(caught.value)
    assert f"the first {FAIL_FAST_REPORTS} reports all failed with HTTP 500: {FORMAT_MESSAGE}" in message
    assert "--llm-response-format" in message and "a rerun fails alike until that is fixed" in message
    assert "resumes" not in message
    # Two attempts per report at most before the stop, not six for each of twenty.
    assert len(server.requests) <= max(concurrency, 2 * FAIL_FAST_REPORTS)
    assert_no_secret_in(caught.value, caplog)


def test_an_overflowing_context_names_the_settings(tmp_path: Path) -> None:
    with serve() as server:
        for number in range(1, 7):
            server.fault_on_request(number, "context")
        with pytest.raises(SystematicFailure) as caught:
            make_teacher(server, tmp_path, concurrency=4).label(REPORTS)
    message = str(caught.value)
    assert CONTEXT_MESSAGE in message and "DEBERTA_RAD_LLM_CONCURRENCY" in message and "--ctx-size" in message


def test_one_report_failing_alike_does_not_stop_the_others(fake: FakeOpenAI, tmp_path: Path) -> None:
    fake.fault_on_report("Cardiomegaly", "context", "context", "context")
    records = make_teacher(fake, tmp_path, concurrency=1, max_retries=3).label(REPORTS)
    assert_labelled_as_served(records)
    assert len(fake.requests_for("Cardiomegaly")) == 4  # put off after two, its other two later


def test_a_server_message_that_quotes_the_report_is_withheld() -> None:
    text = "Small left pleural effusion. No pneumothorax."
    assert server_message({"message": f"bad request: {text}"}, text) == (
        "(the server's message quotes the request; not shown)"
    )
    assert server_message({"detail": [{"msg": "Field required", "input": text}]}, text) == "Field required"
    assert server_message({"error": {"message": "Loading\n model"}}, text) == "Loading model"
    assert server_message("x" * 1000, text) == "x" * 300
    assert server_message(FORMAT_ERROR, text) == FORMAT_MESSAGE  # pydantic's error, without input or traceback
    assert server_message(f'boom\n  File "app.py", line 1, in f\n {text}', text) == "boom"
    assert server_message("Incorrect API key provided: sk-abc123def456", text) == "Incorrect API key provided: ***"
    assert server_message({"unrelated": 1}, text) is None


# ----------------------------------------------------------------------------------------------
# No Finding follows the rule teacher's convention
# ----------------------------------------------------------------------------------------------


def test_a_contradicting_no_finding_is_asked_again_with_the_contradiction_named(
    fake: FakeOpenAI, tmp_path: Path
) -> None:
    fake.fault_on_report("Healing rib fracture", "no_finding")
    records, summary = make_teacher(fake, tmp_path).label_with_usage(REPORTS)
    assert_labelled_as_served(records)
    _, second = fake.requests_for("Healing rib fracture")
    assert [m["role"] for m in second.body["messages"]] == ["system", "user", "assistant", "user"]
    correction = second.body["messages"][-1]["content"]
    assert '"No Finding" is "uncertain" while Cardiomegaly, Fracture are present or uncertain' in correction
    assert summary.retries == 1 and summary.no_finding_repaired == 0


def test_a_contradiction_asked_again_in_vain_is_repaired_by_the_rule_and_counted(
    fake: FakeOpenAI, tmp_path: Path
) -> None:
    fake.fault_on_report("Healing rib fracture", "no_finding", "no_finding")
    records, summary = make_teacher(fake, tmp_path).label_with_usage(REPORTS)
    repaired = next(r for r in records if r.report_id == "r5")
    assert repaired.labels["No Finding"] == "not_mentioned" and repaired.labels["Cardiomegaly"] == "present"
    assert summary.no_finding_repaired == 1 and "No Finding set by the rule in 1 answers" in summary.describe()
    assert len(fake.requests_for("Healing rib fracture")) == 2


def test_no_finding_contradictions() -> None:
    labels = dict.fromkeys(FINDINGS, "absent")
    assert no_finding_contradiction({**labels, "No Finding": "present"}) is None
    assert 'must then be "present"' in no_finding_contradiction({**labels, "No Finding": "not_mentioned"})
    edema = {**labels, "Edema": "uncertain", "No Finding": "present"}
    assert "Edema is present or uncertain" in no_finding_contradiction(edema)
