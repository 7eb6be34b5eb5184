"""The drift panels of the Evidently workspace (deberta_rad.dashboards): added once however often the
monitor asks, kept on disk, and each panel's query finds the values of the monitor's own snapshots."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from evidently.ui.service.base import SeriesFilter
from evidently.ui.service.storage.local.base import InMemoryDataStorage
from evidently.ui.workspace import Workspace

from deberta_rad.dashboards import ensure_drift_panels
from deberta_rad.monitor import run_drift
from deberta_rad.params import MonitoringParams
from deberta_rad.schema import FINDINGS, STATUSES, LabelRecord

INSTITUTION = "riverside"


def window(rows: int, seed: int, shifted: bool, at: datetime) -> list[LabelRecord]:
    """Predictions with probabilities, as the service captures them; `shifted` makes "present" common
    and the model less sure."""
    rng = np.random.default_rng(seed)
    weights = [0.55, 0.15, 0.1, 0.2] if shifted else [0.1, 0.4, 0.1, 0.4]
    records = []
    for i in range(rows):
        labels = {f: str(rng.choice(STATUSES, p=weights)) for f in FINDINGS}
        top = rng.uniform(0.5 if shifted else 0.8, 1.0)
        probabilities = {
            f: {s: top if s == status else (1 - top) / 3 for s in STATUSES} for f, status in labels.items()
        }
        records.append(
            LabelRecord(
                report_id=f"{seed}-{i}",
                labels=labels,
                probabilities=probabilities,
                institution=INSTITUTION,
                timestamp=(at + timedelta(minutes=i)).isoformat(),
            )
        )
    return records


@pytest.fixture(scope="module")
def workspace_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workspace with the institution's project, two judged windows, and the panels (asked for twice)."""
    path = tmp_path_factory.mktemp("workspace")
    workspace = Workspace.create(str(path))
    project = workspace.create_project(f"deberta-rad drift: {INSTITUTION}")
    start = datetime(2025, 1, 6, tzinfo=UTC)
    reference = window(200, 0, shifted=False, at=start)
    for week, shifted in enumerate((False, True)):
        current = window(200, week + 1, shifted, at=start + timedelta(weeks=week))
        _, snapshot = run_drift(reference, current, MonitoringParams(), INSTITUTION)
        workspace.add_run(project.id, snapshot)
        ensure_drift_panels(project, INSTITUTION)
    return path


def test_the_panels_are_added_once_and_kept_on_disk(workspace_path: Path) -> None:
    [project] = Workspace(str(workspace_path)).list_projects()
    dashboard = project.dashboard.model()
    titles = [panel.title for panel in dashboard.panels]
    assert titles == [
        "Reports judged",
        "Reports in the last window",
        "Jensen-Shannon distance per finding",
        "Chi-square p-value per finding",
        "Confidence: energy distance",
        "Confidence: K-S p-value",
    ]


def test_each_panel_finds_its_values(workspace_path: Path) -> None:
    """What the UI asks the workspace for each panel: one series per finding for the label tests, one
    for each confidence test, two points each (two windows)."""
    [project] = Workspace(str(workspace_path)).list_projects()
    storage = InMemoryDataStorage(str(workspace_path))
    found = {}
    for panel in project.dashboard.model().panels:
        filters = [
            SeriesFilter(tags=v.tags, metadata=v.metadata, metric=v.metric, metric_labels=v.metric_labels)
            for v in panel.values
        ]
        response = asyncio.run(storage.get_data_series(project.id, filters, None, None))
        found[panel.title] = {s.params.get("column", "rows"): s.values for s in response.series}
    assert found["Reports judged"] == {"rows": [200.0, 200.0]}
    for title in ("Jensen-Shannon distance per finding", "Chi-square p-value per finding"):
        assert set(found[title]) == set(FINDINGS)
        assert all(len(values) == 2 for values in found[title].values())
    js = found["Jensen-Shannon distance per finding"]
    assert all(js[f][0] < 0.2 < js[f][1] for f in FINDINGS)  # the second window is the shifted one
    assert list(found["Confidence: energy distance"]) == ["confidence"]
    assert list(found["Confidence: K-S p-value"]) == ["confidence"]


def test_runs_carry_the_institution(workspace_path: Path) -> None:
    workspace = Workspace(str(workspace_path))
    [project] = workspace.list_projects()
    runs = [workspace.get_run(project.id, run) for run in workspace.list_runs(project.id)]
    assert [(run.tags, run.metadata) for run in runs] == [([INSTITUTION], {"institution": INSTITUTION})] * 2
