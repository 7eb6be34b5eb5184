"""Shared fixtures: paths to ../shared (tests that need it skip with a reason) and small real corpora."""

from __future__ import annotations

import os

# `make test` runs the suite in one pytest-xdist worker per core; each worker's torch, and the training
# processes it starts, then take one core's share of threads, since two workers' torch each spreading over
# every core slow each other down many times over. Set before numpy or torch is imported.
if workers := os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(workers))))

import json
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import requests
import yaml
from fake_openai import FakeOpenAI, serve

from deberta_rad.net import free_port as free_port  # the tests' servers take their ports here
from deberta_rad.params import Params
from deberta_rad.schema import STATUSES
from deberta_rad.settings import get_settings

if TYPE_CHECKING:
    from label_studio_server import LabelStudioServer

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
IU_DEV = SHARED_DATA / "iu-xray" / "dev.jsonl"
RADLABELS = SHARED_DATA / "radlabels-synthetic" / "reports.jsonl"

# No model hub here or in CI: transformers must never try the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# The longest files first: `make test` hands whole files to its workers (--dist loadfile, so a module's
# fixtures are built once), in collection order, and a long file picked up last would leave one worker
# running it alone at the end.
LONGEST_FILES_FIRST = ("test_pipeline.py", "test_platform.py", "test_packaging.py", "test_train.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


def needs_shared(path: Path) -> pytest.MarkDecorator:
    """Skip (with the reason) when a ../shared dataset is not beside the checkout."""
    return pytest.mark.skipif(not path.is_file(), reason=f"{path} is absent (../shared is not beside the repo)")


def run_bounded(args: list[str], timeout: int, **kwargs) -> subprocess.CompletedProcess[str]:
    """Run in a new session and, past the timeout, kill the whole group (the launcher's ranks too)."""
    with subprocess.Popen(
        args, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs
    ) as process:
        try:
            output, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
            pytest.fail(f"{' '.join(args)} still running after {timeout} s:\n{output[-4000:]}")
    return subprocess.CompletedProcess(args, process.returncode, output)


@pytest.fixture
def isolated_mlflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh embedded SQLite MLflow store for one test (never the repo's mlflow.db)."""
    import mlflow

    from deberta_rad.settings import get_settings

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # MLflow's set_tracking_uri/set_registry_uri also write these variables and module globals; restore
    # both, or later tests (and the processes they start) would register into this test's store.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    monkeypatch.chdir(tmp_path)
    get_settings.cache_clear()
    yield uri
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)
    get_settings.cache_clear()


@contextmanager
def mlflow_store(root: Path, uri: str) -> Iterator[None]:
    """MLflow pointed at ``uri`` with ``root`` as the working folder, for a module's registry fixture; on
    exit the variables, MLflow's globals and the settings are restored. Both variables are set through
    monkeypatch because mlflow.set_registry_uri(None) leaves MLFLOW_REGISTRY_URI behind."""
    import mlflow

    from deberta_rad.settings import get_settings

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.setenv("MLFLOW_REGISTRY_URI", uri)
        patch.chdir(root)
        get_settings.cache_clear()
        try:
            yield
        finally:
            mlflow.set_tracking_uri(None)
            mlflow.set_registry_uri(None)
            get_settings.cache_clear()


def project_params(overrides: dict | None = None) -> Params:
    """The repo's params.yaml with `overrides` ({section: {key: value}}, nested sections merged)."""
    return Params.model_validate(merged(yaml.safe_load((REPO / "params.yaml").read_text()), overrides or {}))


def write_params(path: Path, overrides: dict | None = None) -> Path:
    """A complete params file: the repo's params.yaml with `overrides` merged in."""
    path.write_text(yaml.safe_dump(project_params(overrides).model_dump(mode="json"), sort_keys=False))
    return path


def merged(base: dict, overrides: dict) -> dict:
    return {
        **base,
        **{
            key: merged(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
            for key, value in overrides.items()
        },
    }


def noisy_copy(rng: np.random.Generator, labels: dict, error_rate: float) -> dict[str, dict[str, str]]:
    """A labeler that copies ``labels`` but replaces a share of the cells with a random status."""
    return {
        rid: {f: (STATUSES[rng.integers(len(STATUSES))] if rng.random() < error_rate else s) for f, s in row.items()}
        for rid, row in labels.items()
    }


def wait_until(condition: Callable[[], object], timeout_s: float, what: str, interval_s: float = 0.5) -> object:
    """Poll ``condition`` until it returns something truthy, which it returns; fail naming ``what`` if not within
    ``timeout_s``. Bounded by time, not by a number of tries, since a loaded machine makes each try slower."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(interval_s)
    pytest.fail(f"not within {timeout_s} s: {what}")


def wait_for_http(url: str, server: subprocess.Popen, log: Path, timeout_s: float) -> None:
    """Poll ``url`` until it answers 200; fail with the server's log if it exits or never answers."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"server exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(url, timeout=10).status_code == 200:
                return
        except (requests.ConnectionError, requests.Timeout):  # not listening yet, or still starting
            pass
        time.sleep(0.5)
    pytest.fail(f"{url} gave no 200 within {timeout_s} s:\n{log.read_text()[-3000:]}")


def stop_server(server: subprocess.Popen) -> None:
    """Stop a server started with ``start_new_session`` and the workers it started (its process group),
    by force if it lingers."""
    for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 20)):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            return
        try:
            server.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


FAKE_KEY = "sk-test-DISTINCTIVE-key-7f3a9c"


@pytest.fixture
def llm_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """For the LLM teacher's tests: in an empty folder, the fake key, no base URL, no opt-in, no stray .env."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
    for name in ("OPENAI_BASE_URL", "DEBERTA_RAD_ALLOW_EXTERNAL_LLM", "DEBERTA_RAD_LLM_MODEL"):
        monkeypatch.delenv(name, raising=False)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    """The fault-injecting Chat Completions and Batch server (fake_openai.py)."""
    with serve(slow_s=2.0) as server:
        yield server


class AlertSink:
    """A local webhook on loopback that keeps the JSON it is POSTed: drift alerts, the promotion gate's,
    Alertmanager's notifications."""

    def __init__(self) -> None:
        received: list[dict] = []
        self.received = received

        class Keep(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                """Quiet."""

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Keep)
        self.port = self.server.server_port
        self.url = f"http://127.0.0.1:{self.port}/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def alerts() -> Iterator[AlertSink]:
    sink = AlertSink()
    yield sink
    sink.close()


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabelStudioServer]:
    """One real Label Studio for the session (`make review-tools`): its first start migrates a new SQLite
    database, 65-85 s measured on 2 busy cores, so the client tests and the review loop share it."""
    from label_studio_server import label_studio_server  # it imports this module's helpers

    with label_studio_server(tmp_path_factory.mktemp("label-studio")) as running:
        print(f"Label Studio answered after {running.startup_s:.1f} s")
        yield running
