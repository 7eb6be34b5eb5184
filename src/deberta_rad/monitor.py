"""Drift of the predicted label distribution, with Evidently: one reference window against a current one,
or every institution and time window of a folder of incoming batches, with alerts and a history.

The test, on purpose (DESIGN.md 7: per-column chi-square p < 0.05 over 13 findings raises chance
alarms): a finding drifts only when its statuses moved by a real amount, a Jensen-Shannon distance of at
least `js_threshold`, *and* the move is unlikely to be chance, a chi-square p-value below `p_value`
divided by the number of findings (Bonferroni). The chi-square is the two-sample test of homogeneity
(`CHI2_HOMOGENEITY`), not Evidently's `chisquare`: that one tests the current counts against the
reference's proportions as if they were exact, so a rare status a reference of a hundred reports happens
to lack gets p = 0 from two or three current reports, and a window from the reference's own
distribution alarms. The window drifts when at least `drift_share` of the
findings drift, or when the prediction confidence moved (energy distance, on the probability scale, at
least `confidence_threshold` and a K-S p-value below `p_value`; not a distance in standard deviations,
which calls a 0.998 -> 0.995 move of a very sure model a large one). Windows smaller than `min_window`
reports are not judged at all: they answer "insufficient data", never an alarm.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from deberta_rad.net import post_alert
from deberta_rad.params import MonitoringParams
from deberta_rad.schema import FINDINGS, LabelRecord

logger = logging.getLogger(__name__)

# Exit codes of `deberta-rad drift` and `deberta-rad monitor` (README "Monitoring").
EXIT_NO_DRIFT, EXIT_DRIFT, EXIT_ERROR, EXIT_TOO_SMALL, EXIT_ALERT_FAILED = 0, 1, 2, 3, 4
CONFIDENCE = "confidence"
UNKNOWN_INSTITUTION = "unknown"
ALL_TIME = "all"


def mean_confidence(record: LabelRecord) -> float | None:
    """The report's confidence: its top status probability averaged over findings (None without them)."""
    if not record.probabilities:
        return None
    return float(np.mean([max(p.values()) for p in record.probabilities.values()]))


def label_frame(records: Sequence[LabelRecord]) -> pd.DataFrame:
    """One row per report: the status of each finding, and its confidence when every record has one."""
    frame = pd.DataFrame([dict(r.labels) for r in records], columns=list(FINDINGS))
    if records and all(r.probabilities for r in records):
        frame[CONFIDENCE] = [mean_confidence(r) for r in records]
    return frame


def _metric_values(snapshot: Any) -> dict[tuple[str, str], float]:
    """(column, method) -> value from an Evidently snapshot of ValueDrift metrics."""
    values = {}
    for metric in snapshot.dict()["metrics"]:
        config = metric["config"]
        if "method" not in config:  # RowCount, for the dashboards
            continue
        value = metric["value"]
        values[(config["column"], config["method"])] = float("nan") if value is None else float(value)
    return values


def _p(value: float) -> float:
    """A p-value the test could not compute (a column with one status in both windows) is no evidence."""
    return 1.0 if math.isnan(value) else value


def _rounded(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 6)


def latest_time(records: Sequence[LabelRecord]) -> datetime | None:
    """When the window's last report was answered, as naive UTC (how Evidently orders snapshots)."""
    stamps = [pd.Timestamp(r.timestamp) for r in records if r.timestamp]
    stamps = [s.tz_convert(None) if s.tzinfo else s for s in stamps]
    return max(stamps).to_pydatetime() if stamps else None


CHI2_HOMOGENEITY = "chi2_homogeneity"


def homogeneity_p_value(
    reference: pd.Series, current: pd.Series, feature_type: Any, threshold: float
) -> tuple[float, bool]:
    """Chi-square test that both samples come from one status distribution (both counted with their
    noise); Evidently's signature for a stattest: (p-value, drifted)."""
    from scipy.stats import chi2_contingency

    table = pd.concat([reference.value_counts(), current.value_counts()], axis=1).fillna(0)
    if len(table) < 2:  # one status in both windows: nothing moved
        return 1.0, False
    p_value = float(chi2_contingency(table.to_numpy().T).pvalue)
    return p_value, p_value < threshold


@cache
def register_homogeneity_test() -> None:
    """Make `CHI2_HOMOGENEITY` a method `ValueDrift` knows, through Evidently's stattest registry."""
    from evidently.legacy.calculations.stattests.registry import StatTest, register_stattest
    from evidently.legacy.core import ColumnType

    test = StatTest(
        name=CHI2_HOMOGENEITY,
        display_name="chi-square homogeneity p_value",
        allowed_feature_types=[ColumnType.Categorical],
    )
    register_stattest(test, default_impl=homogeneity_p_value)


def run_drift(
    reference: Sequence[LabelRecord],
    current: Sequence[LabelRecord],
    settings: MonitoringParams,
    institution: str | None = None,
) -> tuple[dict, Any]:
    """The drift result (what drift.json holds) and the Evidently snapshot (None when not judged), tagged
    with the institution and stamped with the window's last answer, for the workspace's dashboards."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import RowCount, ValueDrift

    register_homogeneity_test()
    thresholds = settings.model_dump() | {"per_finding_p_value": settings.p_value / len(FINDINGS)}
    result: dict[str, Any] = {
        "checked_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "n_reference": len(reference),
        "n_current": len(current),
        "thresholds": thresholds,
    }
    if min(len(current), len(reference)) < settings.min_window:
        smaller = "current" if len(current) < settings.min_window else "reference"
        return result | {
            "status": "insufficient_data",
            "drift_detected": False,
            "reason": f"the {smaller} window has fewer than {settings.min_window} reports: not judged",
        }, None
    ref_frame, cur_frame = label_frame(reference), label_frame(current)
    with_confidence = CONFIDENCE in ref_frame and CONFIDENCE in cur_frame
    metrics = [
        ValueDrift(column=finding, method=method, threshold=threshold)
        for finding in FINDINGS
        for method, threshold in (
            ("jensenshannon", settings.js_threshold),
            (CHI2_HOMOGENEITY, thresholds["per_finding_p_value"]),
        )
    ]
    numerical = []
    if with_confidence:
        numerical = [CONFIDENCE]
        metrics += [
            ValueDrift(column=CONFIDENCE, method="ed", threshold=settings.confidence_threshold),
            ValueDrift(column=CONFIDENCE, method="ks", threshold=settings.p_value),
        ]
    else:
        ref_frame, cur_frame = ref_frame[list(FINDINGS)], cur_frame[list(FINDINGS)]
    definition = DataDefinition(categorical_columns=list(FINDINGS), numerical_columns=numerical)
    # A status one window lacks is a zero share in the JS distance's logarithms: the warning is noise.
    tags = {"tags": [institution], "metadata": {"institution": institution}} if institution else {}
    with np.errstate(divide="ignore", invalid="ignore"):
        snapshot = Report([RowCount(), *metrics], **tags).run(
            Dataset.from_pandas(cur_frame, data_definition=definition),
            Dataset.from_pandas(ref_frame, data_definition=definition),
            timestamp=latest_time(current),
        )
    values = _metric_values(snapshot)
    per_finding = finding_scores(values, ref_frame, cur_frame, settings)
    drifted_findings = [f for f, scores in per_finding.items() if scores["drifted"]]
    share = len(drifted_findings) / len(FINDINGS)
    confidence = confidence_scores(values, ref_frame, cur_frame, settings) if with_confidence else None
    detected = share >= settings.drift_share or bool(confidence and confidence["drifted"])
    return result | {
        "status": "drift" if detected else "no_drift",
        "drift_detected": detected,
        "share_drifted": round(share, 4),
        "drifted_findings": drifted_findings,
        "per_finding": per_finding,
        "confidence": confidence,
    }, snapshot


def finding_scores(
    values: Mapping[tuple[str, str], float], reference: pd.DataFrame, current: pd.DataFrame, settings: MonitoringParams
) -> dict[str, dict]:
    """Per finding: JS distance, chi-square p-value, both status distributions, and the verdict."""
    per_finding_p = settings.p_value / len(FINDINGS)
    scores = {}
    for finding in FINDINGS:
        distance, p_value = values[(finding, "jensenshannon")], _p(values[(finding, CHI2_HOMOGENEITY)])
        scores[finding] = {
            "jensen_shannon": _rounded(distance),
            "chi_square_p_value": _rounded(p_value),
            "drifted": bool(distance >= settings.js_threshold and p_value < per_finding_p),
            "reference_share": _shares(reference[finding]),
            "current_share": _shares(current[finding]),
        }
    return scores


def confidence_scores(
    values: Mapping[tuple[str, str], float], reference: pd.DataFrame, current: pd.DataFrame, settings: MonitoringParams
) -> dict:
    """The confidence comparison: energy distance, K-S p-value, both means, and the verdict."""
    distance, p_value = values[(CONFIDENCE, "ed")], _p(values[(CONFIDENCE, "ks")])
    return {
        "energy_distance": _rounded(distance),
        "ks_p_value": _rounded(p_value),
        "reference_mean": round(float(reference[CONFIDENCE].mean()), 4),
        "current_mean": round(float(current[CONFIDENCE].mean()), 4),
        "drifted": bool(distance >= settings.confidence_threshold and p_value < settings.p_value),
    }


def _shares(column: pd.Series) -> dict[str, float]:
    return {status: round(float(share), 4) for status, share in column.value_counts(normalize=True).items()}


def write_result(result: dict, snapshot: Any, output_dir: Path) -> Path:
    """drift.json, and Evidently's HTML report (a note instead when the window was not judged)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "drift.json").write_text(json.dumps(result, indent=2))
    if snapshot is not None:
        snapshot.save_html(str(output_dir / "report.html"))
    else:  # a page all the same, so the report is where people (and DVC) look for it
        (output_dir / "report.html").write_text(f"<html><body><p>Not judged: {result['reason']}.</p></body></html>")
    return output_dir / "drift.json"


def exit_code(results: Iterable[dict]) -> int:
    """1 when any window drifted, else 3 when none could be judged, else 0."""
    results = list(results)
    if any(r["drift_detected"] for r in results):
        return EXIT_DRIFT
    if results and all(r["status"] == "insufficient_data" for r in results):
        return EXIT_TOO_SMALL
    return EXIT_NO_DRIFT


def alert_payload(result: Mapping, **context: str) -> dict:
    """What a webhook receives: the verdict, counts and scores; never a report or its text."""
    keys = ("status", "drift_detected", "share_drifted", "drifted_findings", "n_reference", "n_current", "checked_at")
    return {"source": "deberta-rad", **context, **{k: result.get(k) for k in keys}}


# ----------------------------------------------------------------------------------------------
# Monitoring a folder of incoming batches, by institution and time window
# ----------------------------------------------------------------------------------------------


def read_batch(path: Path) -> list[LabelRecord]:
    """Prediction records of one batch file, with their institution and timestamp when they have them;
    a report answered twice (captured twice) may appear twice, the grouping keeps its latest answer."""
    from deberta_rad.data import read_label_records

    return read_label_records(path, unique=False)


def period_of(moment: datetime | str, frequency: str) -> pd.Period:
    """The calendar window (pandas period) a time falls in, on its own clock (the service's capture and
    `monitor --follow`'s clock are UTC)."""
    return pd.Timestamp(moment).tz_localize(None).to_period(frequency)


def window_label(timestamp: str | None, frequency: str) -> str:
    """The time window a record falls in, e.g. `2026-11-23/2026-11-29` for weekly; `all` without a time."""
    if not timestamp:
        return ALL_TIME
    return str(period_of(timestamp, frequency))


def group_batches(paths: Sequence[Path], frequency: str) -> dict[tuple[str, str], list[LabelRecord]]:
    """(institution, window) -> records; a report id seen twice in a group is counted once."""
    groups: dict[tuple[str, str], dict[str, LabelRecord]] = {}
    for path in paths:
        for record in read_batch(path):
            key = (record.institution or UNKNOWN_INSTITUTION, window_label(record.timestamp, frequency))
            groups.setdefault(key, {})[record.report_id] = record
    return {key: list(records.values()) for key, records in sorted(groups.items())}


def group_fingerprint(records: Sequence[LabelRecord]) -> str:
    """Identifies a group's content, so a rerun over the same batches adds nothing to the history."""
    digest = hashlib.sha256()
    for record in sorted(records, key=lambda r: r.report_id):
        digest.update(record.model_dump_json(include={"report_id", "labels"}).encode())
    return digest.hexdigest()[:16]


def safe_name(value: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in value)


def read_json_lines(path: Path) -> list[dict]:
    """Every whole JSON line of an append-only file. A line a crash cut short (the last one, or one that
    later appends followed, see append_lines) records a change that never happened: skipped, logged."""
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("%s:%d: a line cut short, skipped", path, number)
    return rows


def read_history(path: Path) -> list[dict]:
    """Every judged window."""
    return read_json_lines(path)


def append_lines(path: Path, lines: Sequence[str]) -> None:
    """Append whole lines in one write; after a line a crash cut short, start on a new line, so that
    line alone is lost and never glued to the next (readers skip an unterminated last line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torn = False
    if path.is_file() and path.stat().st_size:
        with path.open("rb") as existing:
            existing.seek(-1, 2)
            torn = existing.read(1) != b"\n"
    with path.open("a", encoding="utf-8") as handle:
        handle.write(("\n" if torn else "") + "".join(line + "\n" for line in lines))


def monitor_folder(
    reference: Sequence[LabelRecord],
    incoming: Path,
    output_dir: Path,
    settings: MonitoringParams,
    webhook: str | None = None,
    workspace: Path | None = None,
) -> tuple[list[dict], list[str]]:
    """Judge every (institution, window) of the incoming batches against the reference; append new
    results to `output_dir/history.jsonl`, post an alert per drifted window, add each judged snapshot to
    an Evidently workspace. Returns this run's results and the alerts that could not be delivered."""
    from tqdm.auto import tqdm

    paths = sorted(incoming.glob("*.jsonl"))
    if not paths:
        raise FileNotFoundError(f"{incoming}: no *.jsonl batches")
    history_path = output_dir / "history.jsonl"
    seen = {(h["institution"], h["window"], h["fingerprint"]) for h in read_history(history_path)}
    results, failures = [], []
    groups = group_batches(paths, settings.window)
    for (institution, window), records in tqdm(groups.items(), desc="windows", unit="window"):
        fingerprint = group_fingerprint(records)
        result, snapshot = run_drift(reference, records, settings, institution)
        result = {"institution": institution, "window": window, "fingerprint": fingerprint} | result
        results.append(result)
        if (institution, window, fingerprint) in seen:
            continue
        write_result(result, snapshot, output_dir / safe_name(institution) / safe_name(window))
        append_lines(history_path, [json.dumps({k: v for k, v in result.items() if k != "per_finding"})])
        if workspace is not None and snapshot is not None:
            add_to_workspace(workspace, institution, snapshot)
        if webhook and result["drift_detected"]:
            failure = post_alert(webhook, alert_payload(result, institution=institution, window=window))
            if failure:
                failures.append(failure)
    plot_history(read_history(history_path), output_dir / "drift_history.png")
    return results, failures


def add_to_workspace(path: Path, institution: str, snapshot: Any) -> None:
    """Keep the snapshot in an Evidently workspace, one project per institution with its drift panels
    (`evidently ui`)."""
    from evidently.ui.workspace import Workspace

    from deberta_rad.dashboards import ensure_drift_panels

    workspace = Workspace.create(str(path))
    name = f"deberta-rad drift: {institution}"
    projects = [p for p in workspace.list_projects() if p.name == name]
    project = projects[0] if projects else workspace.create_project(name, description="Predicted label drift")
    workspace.add_run(project.id, snapshot)
    ensure_drift_panels(project, institution)


def plot_history(history: Sequence[dict], path: Path) -> None:
    """Share of drifted findings per window, one line per institution; the alarm level dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    judged = [h for h in history if h.get("share_drifted") is not None]
    if not judged:
        return
    figure, axis = plt.subplots(figsize=(8, 4))
    for institution in sorted({h["institution"] for h in judged}):
        rows = [h for h in judged if h["institution"] == institution]
        axis.plot([h["window"] for h in rows], [h["share_drifted"] for h in rows], marker="o", label=institution)
    axis.axhline(judged[-1]["thresholds"]["drift_share"], linestyle="--", color="grey", label="alarm")
    axis.set_ylabel("share of findings drifted")
    axis.set_ylim(0, 1)
    axis.legend()
    axis.tick_params(axis="x", rotation=30)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def format_result(result: Mapping) -> str:
    """The verdict and, when judged, a table per finding."""
    head = f"{result['status']}: {result['n_current']} current vs {result['n_reference']} reference reports"
    if result["status"] == "insufficient_data":
        return f"{head}\n{result['reason']}"
    lines = [
        f"{head}; {len(result['drifted_findings'])} of {len(FINDINGS)} findings drifted "
        f"(share {result['share_drifted']:.2f}, alarm at {result['thresholds']['drift_share']:.2f})",
        f"{'finding':<28}{'JS distance':>12}{'chi2 p':>11}  drifted",
    ]
    for finding, scores in result["per_finding"].items():
        distance = "n/a" if scores["jensen_shannon"] is None else f"{scores['jensen_shannon']:.3f}"
        lines.append(
            f"{finding:<28}{distance:>12}{scores['chi_square_p_value']:>11.2g}  {'yes' if scores['drifted'] else ''}"
        )
    if result["confidence"]:
        c = result["confidence"]
        lines.append(
            f"confidence: mean {c['reference_mean']:.3f} -> {c['current_mean']:.3f}, "
            f"energy distance {c['energy_distance']:.3f}, K-S p {c['ks_p_value']:.2g}"
            + (", drifted" if c["drifted"] else "")
        )
    return "\n".join(lines)


def format_windows(results: Sequence[Mapping]) -> str:
    """One line per institution and window."""
    lines = [f"{'institution':<28}{'window':<24}{'reports':>8}{'share':>7}  verdict"]
    for r in results:
        share = "" if r.get("share_drifted") is None else f"{r['share_drifted']:.2f}"
        lines.append(f"{r['institution']:<28}{r['window']:<24}{r['n_current']:>8}{share:>7}  {r['status']}")
    return "\n".join(lines)
