"""The LLM teacher against a real server: llama-cpp-python with a Gemma GGUF (tests/llama_server.py).

What a real server does on its own is tested here (its structured-output support, its answers, its
error bodies); faults it does not produce on demand stay with the fake server (test_llm_teacher.py)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from llama_server import MODEL_ALIAS, llama_cpp_server
from test_pipeline import BIN, copy_of_repo, run
from typer.testing import CliRunner

from deberta_rad.cli import app
from deberta_rad.data import read_label_records, write_jsonl
from deberta_rad.schema import FINDINGS, Report, apply_no_finding_rule
from deberta_rad.settings import get_settings

pytestmark = pytest.mark.slow

KEY = "sk-real-server-SECRET-4411"
SECRET_PHRASE = "quokka-marker-5150"  # report text that must not reach logs
REPORTS = [
    Report(report_id="a", text=f"FINDINGS: Small left pleural effusion. No pneumothorax. {SECRET_PHRASE}"),
    Report(report_id="b", text="IMPRESSION: Cardiomegaly. No acute cardiopulmonary process."),
    Report(report_id="c", text="IMPRESSION: No acute cardiopulmonary abnormality."),
]


SERVER_LOG = "server.log"


@pytest.fixture(scope="module")
def llama_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("llama") / SERVER_LOG


@pytest.fixture(scope="module")
def llama_url(llama_log: Path) -> Iterator[str]:
    with llama_cpp_server(llama_log) as url:
        yield url


def completions_served(log: Path) -> int:
    """Chat completion requests the server has answered so far (its access log)."""
    return log.read_text(errors="replace").count("POST /v1/chat/completions")


@pytest.fixture
def llm_env(llama_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OPENAI_BASE_URL", llama_url)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("DEBERTA_RAD_LLM_CONCURRENCY", "1")  # the server answers one request at a time
    monkeypatch.setenv("DEBERTA_RAD_LLM_TIMEOUT_S", "300")
    get_settings.cache_clear()
    yield tmp_path
    get_settings.cache_clear()


def label(folder: Path, *options: str) -> object:
    arguments = ["label", "--teacher", "llm", "--llm-model", MODEL_ALIAS, "--cache", str(folder / "cache")]
    return CliRunner().invoke(
        app, [*arguments, "--input", str(folder / "in.jsonl"), "--output", str(folder / "out.jsonl"), *options]
    )


def test_the_label_command_labels_every_report_through_llama_cpp_python_and_a_rerun_sends_nothing(
    llm_env: Path, llama_log: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    write_jsonl(llm_env / "in.jsonl", REPORTS)

    first = label(llm_env)
    assert first.exit_code == 0, first.output
    # llama-cpp-python refuses a json_schema response format; the probe finds its json_object + schema.
    assert "structured output json_object, probed" in first.output
    records = read_label_records(llm_env / "out.jsonl")
    assert [r.report_id for r in records] == ["a", "b", "c"]
    for record in records:
        assert list(record.labels) == list(FINDINGS)
        assert record.labels == apply_no_finding_rule(record.labels)  # asked again or repaired, never kept
        assert (record.teacher.name, record.teacher.model) == ("llm", MODEL_ALIAS)

    served = completions_served(llama_log)
    rerun = label(llm_env)
    assert rerun.exit_code == 0, rerun.output
    assert completions_served(llama_log) == served
    assert "structured output json_object, cached" in rerun.output and "0 requests" in rerun.output
    assert read_label_records(llm_env / "out.jsonl") == records

    logged = first.output + rerun.output + "\n".join(r.getMessage() for r in caplog.records)
    assert KEY not in logged and SECRET_PHRASE not in logged
    for path in (llm_env / "cache").iterdir():
        assert SECRET_PHRASE.encode() not in path.read_bytes() and KEY.encode() not in path.read_bytes()


def test_a_format_the_server_refuses_stops_the_run_with_its_message(llm_env: Path) -> None:
    """What the first user met (every report retried six times, then 'a rerun resumes'), now: a stop
    after a few reports, quoting llama-cpp-python's own error and naming the setting."""
    reports = [Report(report_id=f"r{i}", text=f"IMPRESSION: Report {i}, no effusion.") for i in range(20)]
    write_jsonl(llm_env / "in.jsonl", reports)
    result = label(llm_env, "--llm-response-format", "json_schema")
    assert result.exit_code == 2
    message = result.output
    assert "reports all failed with HTTP 500: response_format.type: Input should be 'text' or 'json_object'" in message
    assert "none was labelled" in message
    assert "--llm-response-format" in message and "resumes" not in message
    assert not (llm_env / "out.jsonl").exists()
    print(json.dumps({"message": message[-600:]}))


def test_a_batch_run_against_a_server_without_the_batch_api_says_so(llm_env: Path, llama_log: Path) -> None:
    """llama-cpp-python has no /v1/files: a --batch run is told that, not retried or reported as failing."""
    write_jsonl(llm_env / "in.jsonl", REPORTS)
    served = completions_served(llama_log)
    result = label(llm_env, "--batch", "--llm-response-format", "json_object")
    assert result.exit_code == 2
    assert "has no Batch API (POST /files answered HTTP 404 (Not Found))" in result.output
    assert "label without --batch (params.yaml pseudo_label.batch: false)" in result.output
    assert completions_served(llama_log) == served and not (llm_env / "out.jsonl").exists()
    print(json.dumps({"message": result.output[-400:]}))


def test_the_pipelines_pseudo_label_stage_runs_through_the_server(
    llama_url: str, llama_log: Path, tmp_path: Path
) -> None:
    copy = copy_of_repo(
        tmp_path,
        {
            ("ingest", "synthetic", "n_reports"): 2,  # each answer takes the 270M model about 20 s here
            ("pseudo_label", "teacher"): "llm",
            ("pseudo_label", "llm_model"): MODEL_ALIAS,
        },
    )
    env = {
        "OPENAI_BASE_URL": llama_url,
        "OPENAI_API_KEY": KEY,
        "DEBERTA_RAD_LLM_CONCURRENCY": "1",
        "DEBERTA_RAD_LLM_TIMEOUT_S": "300",
    }
    first = run([str(BIN / "dvc"), "repro", "pseudo_label"], copy, timeout=900, extra_env=env)
    assert "structured output json_object, probed" in first.stdout + first.stderr
    records = read_label_records(copy / "data/pseudo_labels.jsonl")
    assert len(records) == 2 and all(list(r.labels) == list(FINDINGS) for r in records)
    served = completions_served(llama_log)
    run([str(BIN / "dvc"), "repro", "--force", "--single-item", "pseudo_label"], copy, timeout=900, extra_env=env)
    assert completions_served(llama_log) == served
    tracked = [copy / "dvc.lock", copy / "params.yaml", *(copy / ".dvc").rglob("*")]
    assert not any(KEY in p.read_text(errors="ignore") for p in tracked if p.is_file())
