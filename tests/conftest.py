"""Shared fixtures: paths to ../shared (tests that need it skip with a reason) and small real corpora."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest

from deberta_rad.schema import STATUSES

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


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def noisy_copy(rng: np.random.Generator, labels: dict, error_rate: float) -> dict[str, dict[str, str]]:
    """A labeler that copies ``labels`` but replaces a share of the cells with a random status."""
    return {
        rid: {f: (STATUSES[rng.integers(len(STATUSES))] if rng.random() < error_rate else s) for f, s in row.items()}
        for rid, row in labels.items()
    }
