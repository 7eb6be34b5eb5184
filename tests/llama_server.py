"""A real LLM server for the LLM teacher's tests: llama-cpp-python's OpenAI-compatible server with the
Gemma-3 270M GGUF, both prepared by `make llm-server` (its own virtual environment under .cache, built
once). The tests check the protocol against it, not label quality: the 270M model labels poorly."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import REPO, free_port, stop_server, wait_for_http

LLAMA_PYTHON = REPO / ".cache/llama-cpp/bin/python"
GGUF = REPO / ".cache/llm/gemma-3-270m-q4_k_m.gguf"
MODEL_ALIAS = "gemma-3-270m"


@contextmanager
def llama_cpp_server(log: Path) -> Iterator[str]:
    """Start `python -m llama_cpp.server` on a free loopback port and yield its base URL (…/v1)."""
    if not (LLAMA_PYTHON.exists() and GGUF.exists()):
        pytest.skip("the llama-cpp-python server is not built: run `make llm-server` (make test does)")
    port = free_port()
    command = [
        str(LLAMA_PYTHON),
        "-m",
        "llama_cpp.server",
        "--model", str(GGUF),
        "--model_alias", MODEL_ALIAS,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--n_ctx", "4096",
        "--n_threads", "2",
    ]  # fmt: skip
    with log.open("w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/v1/models", server, log, timeout_s=180)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        stop_server(server)
