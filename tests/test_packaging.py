"""Packaging: what leaves this repo works without it, each in a fresh virtualenv that holds only what it
declares. The registered MLflow model loads, predicts and serves (`mlflow models serve`) in a venv made
from the requirements MLflow logged with it; a wheel of the project, installed (not editable) with its
dependencies, serves with `deberta-rad serve` from a folder outside the repo.

The venvs are built with uv from a resolution of what they must hold (torch as the CPU build that
`make install` takes) and kept in .cache/test-venvs/, one per hash of that resolution, so a rerun only
resolves again and reuses them.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import mlflow
import pytest
import requests
from conftest import REPO, free_port, mlflow_store, stop_server, wait_for_http
from tiny_backbones import tiny_deberta_backbone

from deberta_rad.model import student_from_backbone
from deberta_rad.registry import CHAMPION, register_model
from deberta_rad.schema import FINDINGS, STATUSES

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
VENVS = REPO / ".cache" / "test-venvs"
BUILT = ".built"  # written last into a cached venv: one without it was interrupted and is built again
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
TORCH = importlib.metadata.version("torch").partition("+")[0]
NAME = "deberta-rad"
# Bytecode compiled once at install: with PYTHONDONTWRITEBYTECODE set, every import of torch, transformers,
# MLflow and BentoML from source would take twice as long, in every process that a test starts.
SYNC_OPTIONS = ["--quiet", "--compile-bytecode"]
INSTALL_TIMEOUT_S = 900  # a cold build downloads about 1 GB; with uv's cache warm it takes seconds
READY_WAIT_S = 240
REPORTS = [
    "FINDINGS: Small left pleural effusion. No pneumothorax.\nIMPRESSION: Small left effusion.",
    "FINDINGS: Heart size is normal. The lungs are clear.\nIMPRESSION: No acute cardiopulmonary process.",
]

# ----------------------------------------------------------------------------------------------
# Fresh venvs, cached by what they hold
# ----------------------------------------------------------------------------------------------


def run(command: Sequence[str | Path], timeout_s: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """Run a command; fail the test with its output when it fails."""
    done = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=timeout_s, **kwargs)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(map(str, command))} exited with {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


def uv() -> str:
    found = shutil.which("uv", path=str(BIN)) or shutil.which("uv")
    if found is None:
        pytest.fail("uv is not installed: it is in the dev extra (make install)")
    return found


def pip_find_links() -> list[str]:
    """The find-links folders pip is configured with (pip.conf or PIP_FIND_LINKS); uv does not read them."""
    listed = run([sys.executable, "-m", "pip", "config", "list"]).stdout
    links = []
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        if key.endswith(".find-links"):
            links += value.strip().strip("'\"").split()
    return list(dict.fromkeys(links))


def torch_sources() -> list[str]:
    """uv options that make torch the CPU build, from where `make install` gets it: a find-links folder of
    pip's that holds the CPU wheel (this machine keeps one there), else PyTorch's CPU index."""
    for link in pip_find_links():
        folder = Path(link.removeprefix("file://"))
        if folder.is_dir() and any(folder.glob(f"torch-{TORCH}+cpu-*.whl")):
            return ["--find-links", str(folder)]
    return ["--extra-index-url", CPU_INDEX, "--index-strategy", "unsafe-best-match"]


def cached_venv(name: str, requirements: Path, constraints: Path | None = None) -> Path:
    """A venv with exactly what ``requirements`` (under ``constraints``) resolves to, reused while that
    resolution stays the same: .cache/test-venvs/<name>-<hash of the resolution>; older ones of the
    same name are removed."""
    sources = torch_sources()
    lock = requirements.with_name(f"{name}.lock")
    compile_lock = [uv(), "pip", "compile", "--quiet", "--no-header", "--no-annotate", "--python", sys.executable]
    compile_lock += [*sources, "-o", lock, requirements, *(["-c", constraints] if constraints else [])]
    run(compile_lock)
    key = hashlib.sha256(f"{sys.version}\n{SYNC_OPTIONS}\n{lock.read_text()}".encode()).hexdigest()[:16]
    venv = VENVS / f"{name}-{key}"
    if (venv / BUILT).is_file():
        return venv
    for stale in VENVS.glob(f"{name}-*"):
        shutil.rmtree(stale)
    VENVS.mkdir(parents=True, exist_ok=True)
    run([uv(), "venv", "--quiet", "--python", sys.executable, venv])
    run([uv(), "pip", "sync", *SYNC_OPTIONS, "--python", venv / "bin" / "python", *sources, lock], INSTALL_TIMEOUT_S)
    (venv / BUILT).write_text(lock.read_text())
    return venv


def venv_env(venv: Path, **extra: str) -> dict[str, str]:
    """The environment of a shell with ``venv`` activated, without this process's project settings."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("DEBERTA_RAD_", "MLFLOW_", "BENTOML_")) and key not in ("PYTHONPATH", "VIRTUAL_ENV")
    }
    return env | {
        "VIRTUAL_ENV": str(venv),
        "PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        **extra,
    }


def assert_labels(labels: dict) -> None:
    assert set(labels) == set(FINDINGS)
    assert set(labels.values()) <= set(STATUSES)


@pytest.fixture(scope="module")
def student(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random student's model directory."""
    root = tmp_path_factory.mktemp("student")
    student = student_from_backbone(str(tiny_deberta_backbone(root / "tiny-deberta")), max_length=64)
    student.save(root / "student")
    return root / "student"


# ----------------------------------------------------------------------------------------------
# The registered MLflow model, in a venv of its own logged requirements
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def registered(student: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The student registered (champion) in a SQLite store; yields the store's URI."""
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with mlflow_store(root, uri):
        assert CHAMPION in register_model(student, {})["aliases"]
        yield uri


PREDICT = """
import json, sys
import mlflow.pyfunc, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
frame = pd.DataFrame({"report_id": ["a", "b"], "text": json.loads(sys.argv[2])})
print(model.predict(frame).to_json(orient="records"))
"""


def test_the_registered_model_loads_predicts_and_serves_in_a_venv_of_its_logged_requirements(
    registered: str, tmp_path: Path
) -> None:
    model_uri = f"models:/{NAME}@{CHAMPION}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", registered)
        requirements = Path(mlflow.pyfunc.get_model_dependencies(model_uri))
    logged = requirements.read_text().split()
    assert {f"pydantic-settings=={importlib.metadata.version('pydantic-settings')}", f"torch=={TORCH}"} <= set(logged)
    assert not [r for r in logged if r.startswith("deberta-rad")]  # the package travels as the model's code
    shutil.copy(requirements, tmp_path / "requirements.txt")
    venv = cached_venv("mlflow-model", tmp_path / "requirements.txt")
    python, env = venv / "bin" / "python", venv_env(venv, MLFLOW_TRACKING_URI=registered)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    find_package = "import importlib.util; print(importlib.util.find_spec('deberta_rad'))"
    installed = run([python, "-c", find_package], env=env, cwd=outside)
    assert installed.stdout.strip() == "None"  # the model brings its code; the venv has no copy of it

    predicted = run([python, "-c", PREDICT, model_uri, json.dumps(REPORTS)], env=env, cwd=outside, timeout_s=600)
    rows = json.loads(predicted.stdout.strip().splitlines()[-1])
    assert [row.pop("report_id") for row in rows] == ["a", "b"]
    for row in rows:
        assert_labels(row)

    port, log = free_port(), tmp_path / "mlflow-serve.log"
    serve = [venv / "bin" / "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local"]
    serve += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with log.open("wb") as out:
        server = subprocess.Popen(
            [str(c) for c in serve], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=outside, start_new_session=True
        )
        try:
            url = f"http://127.0.0.1:{port}"
            wait_for_http(f"{url}/ping", server, log, READY_WAIT_S)
            body = {
                "dataframe_split": {"columns": ["report_id", "text"], "data": [["a", REPORTS[0]], ["b", REPORTS[1]]]}
            }
            answer = requests.post(f"{url}/invocations", json=body, timeout=120)
        finally:
            stop_server(server)
    assert answer.status_code == 200, answer.text
    served = answer.json()["predictions"]
    assert [row.pop("report_id") for row in served] == ["a", "b"]
    assert served == rows  # the same model and code as the in-process load


# ----------------------------------------------------------------------------------------------
# The installed wheel serves from anywhere
# ----------------------------------------------------------------------------------------------


def build_wheel(destination: Path) -> Path:
    """A wheel of the project, built from a copy of its sources (setuptools would reuse a stale build/)."""
    source = destination / "source"
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    wheels = destination / "wheels"
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", wheels, source])
    return next(wheels.glob("deberta_rad-*.whl"))


def wheel_dependencies(wheel: Path) -> list[str]:
    """The wheel's Requires-Dist, without its extras."""
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        lines = archive.read(metadata).decode().splitlines()
    requires = [line.removeprefix("Requires-Dist:").strip() for line in lines if line.startswith("Requires-Dist:")]
    return [r for r in requires if "extra ==" not in r]


def suite_versions() -> list[str]:
    """`name==version` of every distribution in this environment but the project: the versions the rest
    of the suite runs on, so the installed wheel gets those instead of whatever is newest today."""
    pins = {re.sub(r"[-_.]+", "-", d.metadata["Name"]).lower(): d.version for d in importlib.metadata.distributions()}
    return [f"{name}=={version}" for name, version in sorted(pins.items()) if name != NAME]


def test_the_installed_wheel_serves_from_a_folder_outside_the_repo(student: Path, tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path)
    (tmp_path / "requirements.txt").write_text("\n".join(wheel_dependencies(wheel)) + "\n")
    (tmp_path / "constraints.txt").write_text("\n".join(suite_versions()) + "\n")
    venv = cached_venv("installed-wheel", tmp_path / "requirements.txt", tmp_path / "constraints.txt")
    install = [uv(), "pip", "install", *SYNC_OPTIONS, "--no-deps", "--reinstall", "--python", venv / "bin" / "python"]
    run([*install, wheel])
    env = venv_env(venv, BENTOML_HOME=str(tmp_path / "bentoml"), DEBERTA_RAD_MODEL_CACHE=str(tmp_path / "cache"))
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    find_package = "import deberta_rad; print(deberta_rad.__file__)"
    located = run([venv / "bin" / "python", "-c", find_package], env=env, cwd=outside)
    assert Path(located.stdout.strip()).is_relative_to(venv)  # the installed copy, not this checkout

    port, log = free_port(), tmp_path / "serve.log"
    command = [str(venv / "bin" / "deberta-rad"), "serve", "--model", str(student), "--port", str(port)]
    with log.open("wb") as out:
        server = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=outside, start_new_session=True
        )
        try:
            url = f"http://127.0.0.1:{port}"
            wait_for_http(f"{url}/readyz", server, log, READY_WAIT_S)
            body = {"reports": [{"report_id": "r1", "text": REPORTS[0]}]}
            answer = requests.post(f"{url}/label", json=body, timeout=120)  # no API key needed on loopback
        finally:
            stop_server(server)
    assert answer.status_code == 200, answer.text
    (result,) = answer.json()["results"]
    assert result["report_id"] == "r1"
    assert_labels(result["labels"])
