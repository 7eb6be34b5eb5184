"""Dashboard panels of the drift monitor's Evidently workspace (`evidently ui --workspace ...`).

The monitor keeps one Evidently project per institution (`deberta-rad drift: {institution}`) and adds a
snapshot per judged window: `ValueDrift` of each finding by Jensen-Shannon distance and chi-square test,
and of the confidence by energy distance and K-S test (deberta_rad.monitor.run_drift). A project starts
with an empty dashboard; these panels plot those values over the windows, so a trend shows without
opening each report. Evidently 0.7 selects a panel's series by metric type and the metric's parameters
(`metric_labels`, here `method` and `column`), and a legend may name a parameter (`{{column}}`).

Counters in Evidently 0.7 show the last, sum or mean of a metric's values; none counts snapshots. The
"Reports judged" counters read `RowCount()` (reports in the window), which the monitor's Report has to
include for them to show a number.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from deberta_rad.monitor import CHI2_HOMOGENEITY

if TYPE_CHECKING:
    from evidently.sdk.models import DashboardPanelPlot, PanelMetric
    from evidently.ui.workspace import Project

VALUE_DRIFT = "evidently:metric_v2:ValueDrift"
ROW_COUNT = "evidently:metric_v2:RowCount"


def series(metric: str, legend: str, **labels: str) -> PanelMetric:
    """One panel value: the metric's points whose parameters include `labels`."""
    from evidently.sdk.models import PanelMetric

    return PanelMetric(legend=legend, metric=metric, metric_labels=labels)


def label_drift_panels(institution: str) -> list[DashboardPanelPlot]:
    """Per finding, the two tests a finding's drift takes: a large enough distance, and a small p-value."""
    from evidently.sdk.panels import counter_panel, line_plot_panel

    return [
        counter_panel(
            "Reports judged",
            [series(ROW_COUNT, "reports, all windows shown")],
            description=f"{institution}: reports in the windows of the time range (RowCount).",
            size="half",
            aggregation="sum",
        ),
        counter_panel(
            "Reports in the last window",
            [series(ROW_COUNT, "reports")],
            description=f"{institution}: fewer than monitoring.min_window are not judged.",
            size="half",
            aggregation="last",
        ),
        line_plot_panel(
            "Jensen-Shannon distance per finding",
            [series(VALUE_DRIFT, "{{column}}", method="jensenshannon")],
            description=f"{institution}: a finding drifts at monitoring.js_threshold (0.1) or more "
            "and a chi-square p-value below monitoring.p_value / 13.",
        ),
        line_plot_panel(
            "Chi-square p-value per finding",
            [series(VALUE_DRIFT, "{{column}}", method=CHI2_HOMOGENEITY)],
            description=f"{institution}: two-sample test of homogeneity of the status counts and the "
            "reference's; drift needs p below monitoring.p_value / 13.",
        ),
    ]


def confidence_panels(institution: str) -> list[DashboardPanelPlot]:
    """The confidence tests: they catch a new report style the label mix does not show (absent from
    snapshots of label records without probabilities)."""
    from evidently.sdk.panels import line_plot_panel

    return [
        line_plot_panel(
            "Confidence: energy distance",
            [series(VALUE_DRIFT, "energy distance", column="confidence", method="ed")],
            description=f"{institution}: drift at monitoring.confidence_threshold (0.1) or more "
            "with a K-S p-value below monitoring.p_value.",
            size="half",
        ),
        line_plot_panel(
            "Confidence: K-S p-value",
            [series(VALUE_DRIFT, "K-S p-value", column="confidence", method="ks")],
            description=f"{institution}: Kolmogorov-Smirnov test of the confidence against the reference's.",
            size="half",
        ),
    ]


def ensure_drift_panels(project: Project, institution: str) -> None:
    """Add the drift panels the project's dashboard lacks; a panel already there (by title) is left as
    it is, so the monitor may call this for every snapshot it adds. No tabs: Evidently 0.7's UI shows
    the dashboard's panels, and its `add_panel` lists a panel twice in a tab that already exists."""
    present = {panel.title for panel in project.dashboard.model().panels}
    for panel in label_drift_panels(institution) + confidence_panels(institution):
        if panel.title not in present:
            project.dashboard.add_panel(panel)
