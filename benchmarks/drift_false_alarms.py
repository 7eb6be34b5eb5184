"""False alarms of the drift test on windows from the reference institution's own distribution, with the
two-sample chi-square of homogeneity (the monitor's test) against Evidently's goodness-of-fit `chisquare`
(the baseline: the current counts against the reference's proportions taken as exact), in one run.

    python benchmarks/drift_false_alarms.py [--windows 40] [--window 150] [--references 120 500]

Reference and windows are rule-teacher labels of synthetic narrative reports (one institution's style),
disjoint seeds; a second style (templated) gives windows that should alarm, to show the test still sees
real drift. Everything else of the verdict (JS distance >= js_threshold, p < p_value / 13, drift_share)
is the same for both. Prints counts only.
"""

from __future__ import annotations

import argparse

from scipy.stats import chisquare

from deberta_rad.monitor import run_drift
from deberta_rad.params import MonitoringParams, load_params
from deberta_rad.schema import FINDINGS, LabelRecord
from deberta_rad.synthetic import generate_corpus
from deberta_rad.teachers.rules import RuleTeacher


def labelled(style: str, n: int, seed: int) -> list[LabelRecord]:
    reports = [report for report, _ in generate_corpus(n, seed, styles=[style])]
    for report in reports:
        report.report_id = f"{seed}-{report.report_id}"
    return RuleTeacher().label(reports)


def goodness_of_fit_p(reference: list[LabelRecord], current: list[LabelRecord], finding: str) -> float:
    """Evidently's `chisquare` stattest: expected counts from the reference's proportions."""
    ref = [r.labels[finding] for r in reference]
    cur = [r.labels[finding] for r in current]
    keys = sorted(set(ref) | set(cur))
    expected = [ref.count(k) * len(cur) / len(ref) for k in keys]
    observed = [cur.count(k) for k in keys]
    with_zero_expected = any(e == 0 and o > 0 for e, o in zip(expected, observed, strict=True))
    return 0.0 if with_zero_expected else float(chisquare(observed, expected).pvalue)


def verdicts(reference: list[LabelRecord], current: list[LabelRecord], settings: MonitoringParams) -> tuple[bool, bool]:
    """(the monitor's verdict, the baseline's), from one Evidently run."""
    result, _ = run_drift(reference, current, settings)
    per_finding_p = settings.p_value / len(FINDINGS)
    baseline = [
        f
        for f, scores in result["per_finding"].items()
        if (scores["jensen_shannon"] or 0) >= settings.js_threshold
        and goodness_of_fit_p(reference, current, f) < per_finding_p
    ]
    return result["drift_detected"], len(baseline) / len(FINDINGS) >= settings.drift_share


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=40, help="windows per reference size and style")
    parser.add_argument("--window", type=int, default=150, help="reports per window")
    parser.add_argument("--references", type=int, nargs="+", default=[120, 500], help="reference sizes")
    args = parser.parse_args()
    settings = load_params("params.yaml").monitoring
    print(f"{'reference':>9}  {'windows':<22}{'homogeneity (monitor)':>22}{'goodness of fit':>17}")
    for size in args.references:
        reference = labelled("narrative", size, seed=1)
        for style, what in (("narrative", "same institution"), ("templated", "another institution")):
            counts = [0, 0]
            for index in range(args.windows):
                for slot, alarm in enumerate(verdicts(reference, labelled(style, args.window, 100 + index), settings)):
                    counts[slot] += alarm
            print(f"{size:>9}  {what:<22}{counts[0]:>16} of {args.windows:<3}{counts[1]:>11} of {args.windows}")


if __name__ == "__main__":
    main()
