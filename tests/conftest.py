"""Shared fixtures: paths to ../shared (tests that need it skip with a reason) and small real corpora."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
IU_DEV = SHARED_DATA / "iu-xray" / "dev.jsonl"
RADLABELS = SHARED_DATA / "radlabels-synthetic" / "reports.jsonl"

# No model hub here or in CI: transformers must never try the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def needs_shared(path: Path) -> pytest.MarkDecorator:
    """Skip (with the reason) when a ../shared dataset is not beside the checkout."""
    return pytest.mark.skipif(not path.is_file(), reason=f"{path} is absent (../shared is not beside the repo)")


@pytest.fixture
def isolated_mlflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh embedded SQLite MLflow store for one test (never the repo's mlflow.db)."""
    from deberta_rad.settings import get_settings

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    get_settings.cache_clear()
    yield uri
    get_settings.cache_clear()
