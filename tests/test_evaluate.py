"""Section-5 metrics checked against scikit-learn/scipy (independent implementations) and hand cases."""

from __future__ import annotations

import json
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest
from conftest import noisy_copy
from scipy import stats
from sklearn.metrics import (
    accuracy_score,
    cohen_kappa_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)
from typer.testing import CliRunner

from deberta_rad.cli import app
from deberta_rad.comparison import (
    _cell_status_indicators,
    _resampled_macro_f1,
    compare_labelers,
    format_comparison_table,
)
from deberta_rad.evaluate import NO_EVIDENCE, disagreement_counts, format_disagreements, teacher_disagreements
from deberta_rad.metrics import _encode_statuses, compute_metrics, format_metrics_table, presence_metrics
from deberta_rad.plots import confusion_matrices, plot_confusion_matrices, write_confusion_plots
from deberta_rad.schema import FINDINGS, SCORED_STATUSES, STATUSES, LabelRecord, apply_no_finding_rule

ALL_NOT_MENTIONED = dict.fromkeys(FINDINGS, "not_mentioned")


def random_gold(rng: np.random.Generator, n_reports: int) -> dict[str, dict[str, str]]:
    """Gold with skewed statuses, like real reports (not_mentioned most common, uncertain rare)."""
    draws = rng.choice(len(STATUSES), size=(n_reports, len(FINDINGS)), p=[0.2, 0.3, 0.1, 0.4])
    return {f"r{i}": {f: STATUSES[s] for f, s in zip(FINDINGS, row, strict=True)} for i, row in enumerate(draws)}


def column(labels: dict, finding: str) -> list[str]:
    return [labels[rid][finding] for rid in sorted(labels)]


def flat(labels: dict) -> list[str]:
    return [labels[rid][f] for rid in sorted(labels) for f in FINDINGS]


def report(**statuses: str) -> dict[str, str]:
    """A report with the given statuses (keyword = finding with spaces as underscores), rest not mentioned."""
    return {**ALL_NOT_MENTIONED, **{k.replace("_", " "): v for k, v in statuses.items()}}


@pytest.fixture(scope="module")
def random_case() -> tuple[dict, dict]:
    rng = np.random.default_rng(7)
    gold = random_gold(rng, 400)
    for labels in gold.values():  # one finding without uncertain gold: a status left out of the mean
        if labels["Edema"] == "uncertain":
            labels["Edema"] = "absent"
    return noisy_copy(rng, gold, 0.35), gold


# --- compute_metrics against scikit-learn ------------------------------------------------------


def test_per_status_scores_match_sklearn(random_case: tuple[dict, dict]) -> None:
    pred, gold = random_case
    metrics = compute_metrics(pred, gold)
    for finding in FINDINGS:
        p, r, f, support = precision_recall_fscore_support(
            column(gold, finding),
            column(pred, finding),
            labels=list(SCORED_STATUSES),
            average=None,
            zero_division=0,
        )
        for k, status in enumerate(SCORED_STATUSES):
            ours = metrics["per_finding"][finding]["per_status"][status]
            assert ours["support"] == support[k]
            assert ours["precision"] == pytest.approx(p[k], abs=1e-9)
            if support[k]:
                assert ours["recall"] == pytest.approx(r[k], abs=1e-9)
                assert ours["f1"] == pytest.approx(f[k], abs=1e-9)
            else:
                assert ours["recall"] is None and ours["f1"] is None
    assert metrics["per_finding"]["Edema"]["per_status"]["uncertain"]["support"] == 0


def test_finding_scores_and_macro_match_sklearn_weighted(random_case: tuple[dict, dict]) -> None:
    pred, gold = random_case
    metrics = compute_metrics(pred, gold)
    finding_f1s = []
    for finding in FINDINGS:
        p, r, f, _ = precision_recall_fscore_support(
            column(gold, finding),
            column(pred, finding),
            labels=list(SCORED_STATUSES),
            average="weighted",
            zero_division=0,
        )
        ours = metrics["per_finding"][finding]
        assert (ours["precision"], ours["recall"], ours["f1"]) == pytest.approx((p, r, f), abs=1e-9)
        finding_f1s.append(f)
    assert metrics["macro_f1"] == pytest.approx(np.mean(finding_f1s), abs=1e-9)
    assert metrics["findings_left_out"] == []


def test_pooled_status_f1_agreement_and_kappa_match_sklearn(random_case: tuple[dict, dict]) -> None:
    pred, gold = random_case
    metrics = compute_metrics(pred, gold)
    gold_cells, pred_cells = np.array(flat(gold)), np.array(flat(pred))
    for status in SCORED_STATUSES:
        expected = f1_score(gold_cells == status, pred_cells == status)
        assert metrics["status_f1"][status] == pytest.approx(expected, abs=1e-9)
        assert metrics["status_scores"][status]["f1"] == metrics["status_f1"][status]
    assert metrics["agreement"] == pytest.approx(accuracy_score(gold_cells, pred_cells), abs=1e-9)
    kappa = cohen_kappa_score(gold_cells, pred_cells, labels=list(STATUSES))
    assert metrics["kappa"] == pytest.approx(kappa, abs=1e-9)
    assert (metrics["n_reports"], metrics["n_cells"]) == (400, 400 * len(FINDINGS))


# --- compute_metrics on a hand-computed case ----------------------------------------------------


@pytest.fixture()
def hand_case() -> tuple[dict, dict]:
    """Atelectasis has no uncertain support, Cardiomegaly no present support, all else is unsupported."""
    gold = {
        "a": report(Atelectasis="present", Cardiomegaly="uncertain"),
        "b": report(Atelectasis="present", Cardiomegaly="absent"),
        "c": report(Atelectasis="absent", Cardiomegaly="absent"),
        "d": report(Cardiomegaly="absent"),
    }
    pred = {
        "a": report(Atelectasis="present", Cardiomegaly="uncertain", Fracture="present"),
        "b": report(Atelectasis="absent", Cardiomegaly="uncertain"),
        "c": report(Atelectasis="absent", Cardiomegaly="absent"),
        "d": report(Atelectasis="absent", Cardiomegaly="absent"),
        "extra": report(),
    }
    return pred, gold


def test_hand_case_finding_scores(hand_case: tuple[dict, dict]) -> None:
    metrics = compute_metrics(*hand_case)
    atelectasis = metrics["per_finding"]["Atelectasis"]
    # present: P 1/1, R 1/2, F1 2/3 (support 2); absent: P 1/3, R 1/1, F1 1/2 (support 1);
    # uncertain has no support and drops out of the weighted mean
    assert atelectasis["f1"] == pytest.approx(float(Fraction(11, 18)))
    assert atelectasis["precision"] == pytest.approx(float(Fraction(7, 9)))
    assert atelectasis["recall"] == pytest.approx(float(Fraction(2, 3)))
    assert atelectasis["support"] == 3
    assert atelectasis["per_status"]["uncertain"] == {
        "precision": 0.0,
        "recall": None,
        "f1": None,
        "support": 0,
    }
    # uncertain F1 2/3 (support 1), absent F1 4/5 (support 3)
    assert metrics["per_finding"]["Cardiomegaly"]["f1"] == pytest.approx(float(Fraction(23, 30)))
    fracture = metrics["per_finding"]["Fracture"]
    assert (fracture["f1"], fracture["precision"], fracture["recall"], fracture["support"]) == (
        None,
        None,
        None,
        0,
    )
    assert fracture["per_status"]["present"]["precision"] == 0.0


def test_hand_case_macro_pooled_and_agreement(hand_case: tuple[dict, dict]) -> None:
    metrics = compute_metrics(*hand_case)
    assert metrics["macro_f1"] == pytest.approx(float(Fraction(31, 45)))  # mean of 11/18 and 23/30
    assert metrics["findings_left_out"] == [f for f in FINDINGS if f not in ("Atelectasis", "Cardiomegaly")]
    assert metrics["status_f1"] == pytest.approx({"present": 0.5, "absent": 2 / 3, "uncertain": 2 / 3})
    assert metrics["agreement"] == pytest.approx(48 / 52)
    assert (metrics["n_reports"], metrics["n_cells"], metrics["n_unscored_predictions"]) == (4, 52, 1)


def test_kappa_undefined_when_everything_is_one_status() -> None:
    labels = {"a": report(), "b": report()}
    metrics = compute_metrics(labels, labels)
    assert metrics["kappa"] is None and metrics["agreement"] == 1.0 and metrics["macro_f1"] is None


def test_missing_predictions_name_the_ids() -> None:
    gold = {f"id{i}": report() for i in range(8)}
    pred = {"id0": report()}
    with pytest.raises(ValueError, match=r"7 gold report\(s\) have no prediction: id1, id2, id3, id4, id5 and 2 more"):
        compute_metrics(pred, gold)


def test_empty_gold_is_an_error() -> None:
    with pytest.raises(ValueError, match="gold is empty"):
        compute_metrics({"a": report()}, {})


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ({"Atelectasis": "present"}, "missing"),
        ({**ALL_NOT_MENTIONED, "Pneumonia": "present"}, "unknown"),
        ({**ALL_NOT_MENTIONED, "Edema": "1.0"}, "predicted report 'a': invalid label value '1.0'"),
    ],
)
def test_malformed_labels_are_errors(labels: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        compute_metrics({"a": labels}, {"a": report()})


# --- presence_metrics ---------------------------------------------------------------------------


def test_presence_metrics_hand_case() -> None:
    no_presence = dict.fromkeys(FINDINGS, False)
    gold = {
        "a": {**no_presence, "Cardiomegaly": True},
        "b": {**no_presence, "Cardiomegaly": True},
        "c": {**no_presence, "Edema": True},
    }
    pred = {
        "a": report(Cardiomegaly="present"),
        "b": report(Cardiomegaly="uncertain"),
        "c": report(Cardiomegaly="present", Edema="absent"),
    }
    strict = presence_metrics(pred, gold)
    assert strict["per_finding"]["Cardiomegaly"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert strict["per_finding"]["Edema"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert strict["macro_f1"] == pytest.approx(0.25)
    assert len(strict["findings_left_out"]) == len(FINDINGS) - 2
    assert "absent" in strict["limitation"] and "uncertain" in strict["limitation"]

    lenient = presence_metrics(pred, gold, count_uncertain=True)
    assert lenient["per_finding"]["Cardiomegaly"]["f1"] == pytest.approx(0.8)
    assert lenient["macro_f1"] == pytest.approx(0.4)


# --- compare_labelers ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_labelers() -> tuple[dict, dict, dict]:
    rng = np.random.default_rng(11)
    gold = random_gold(rng, 300)
    return gold, noisy_copy(rng, gold, 0.1), noisy_copy(rng, gold, 0.3)


def test_compare_statistics_match_scipy(two_labelers: tuple[dict, dict, dict]) -> None:
    gold, good, bad = two_labelers
    comparison = compare_labelers(gold, {"good": good, "bad": bad}, n_bootstrap=300)
    f1_good = [compute_metrics(good, gold)["per_finding"][f]["f1"] for f in FINDINGS]
    f1_bad = [compute_metrics(bad, gold)["per_finding"][f]["f1"] for f in FINDINGS]
    pair = comparison["pairs"][0]
    assert (pair["a"], pair["b"], pair["n_findings"]) == ("good", "bad", len(FINDINGS))
    t = stats.ttest_rel(f1_good, f1_bad)
    w = stats.wilcoxon(f1_good, f1_bad)
    assert pair["t_test"] == pytest.approx({"statistic": t.statistic, "p_value": t.pvalue}, abs=1e-9)
    assert pair["wilcoxon"] == pytest.approx({"statistic": w.statistic, "p_value": w.pvalue}, abs=1e-9)
    assert comparison["labelers"]["good"]["macro_f1"] == pytest.approx(np.mean(f1_good), abs=1e-9)
    assert pair["difference"] == pytest.approx(np.mean(f1_good) - np.mean(f1_bad), abs=1e-9)


def test_bootstrap_ci_contains_difference_and_is_deterministic(two_labelers: tuple[dict, dict, dict]) -> None:
    gold, good, bad = two_labelers
    labelers = {"good": good, "bad": bad}
    first = compare_labelers(gold, labelers, n_bootstrap=500, seed=3)["pairs"][0]
    again = compare_labelers(gold, labelers, n_bootstrap=500, seed=3)["pairs"][0]
    other_seed = compare_labelers(gold, labelers, n_bootstrap=500, seed=4)["pairs"][0]
    boot = first["bootstrap"]
    assert boot["ci_low"] < first["difference"] < boot["ci_high"]
    assert boot["ci_low"] > 0  # the 10%-noise labeler is clearly better
    assert again["bootstrap"] == boot
    assert other_seed["bootstrap"] != boot


def test_resampled_macro_f1_equals_scoring_the_resampled_reports(
    two_labelers: tuple[dict, dict, dict],
) -> None:
    """The vectorised bootstrap statistic must equal compute_metrics on an explicitly resampled gold set."""
    gold, good, _ = two_labelers
    ids = list(gold)
    rng = np.random.default_rng(5)
    weights = np.stack([np.bincount(rng.integers(0, len(ids), len(ids)), minlength=len(ids)) for _ in range(3)])
    indicators = _cell_status_indicators(_encode_statuses("predicted", good, ids), _encode_statuses("gold", gold, ids))
    vectorised = _resampled_macro_f1(weights.astype(float), indicators)
    for row, expected in zip(weights, vectorised, strict=True):
        copies = [(f"{rid}#{k}", rid) for rid, n in zip(ids, row, strict=True) for k in range(n)]
        resampled_gold = {new: gold[rid] for new, rid in copies}
        resampled_pred = {new: good[rid] for new, rid in copies}
        assert compute_metrics(resampled_pred, resampled_gold)["macro_f1"] == pytest.approx(expected, abs=1e-9)


def test_identical_labelers_have_no_difference(two_labelers: tuple[dict, dict, dict]) -> None:
    gold, good, _ = two_labelers
    pair = compare_labelers(gold, {"a": good, "b": dict(good)}, n_bootstrap=100)["pairs"][0]
    assert pair["difference"] == 0.0
    assert (pair["bootstrap"]["ci_low"], pair["bootstrap"]["ci_high"]) == (0.0, 0.0)
    assert pair["disagreements"]["n_total"] == 0 and pair["disagreements"]["first"] == []
    assert pair["t_test"] == {"statistic": None, "p_value": None}


def test_disagreements_list_ids_and_statuses_capped() -> None:
    gold = {"a": report(Edema="present"), "b": report(), "c": report()}
    one = {"a": report(Edema="present"), "b": report(Fracture="absent"), "c": report(Edema="absent")}
    other = {"a": report(Edema="uncertain"), "b": report(), "c": report()}
    pair = compare_labelers(gold, {"one": one, "other": other}, n_bootstrap=10, max_disagreements=2)["pairs"][0]
    dis = pair["disagreements"]
    assert dis["n_total"] == 3
    assert dis["by_finding"]["Edema"] == 2 and dis["by_finding"]["Fracture"] == 1
    assert dis["first"] == [
        {
            "report_id": "a",
            "finding": "Edema",
            "status_a": "present",
            "status_b": "uncertain",
            "gold": "present",
        },
        {
            "report_id": "b",
            "finding": "Fracture",
            "status_a": "absent",
            "status_b": "not_mentioned",
            "gold": "not_mentioned",
        },
    ]


def test_compare_pairs_and_errors(two_labelers: tuple[dict, dict, dict]) -> None:
    gold, good, bad = two_labelers
    three = {"x": good, "y": bad, "z": good}
    first_vs_rest = compare_labelers(gold, three, n_bootstrap=10)["pairs"]
    every_pair = compare_labelers(gold, three, n_bootstrap=10, all_pairs=True)["pairs"]
    assert [(p["a"], p["b"]) for p in first_vs_rest] == [("x", "y"), ("x", "z")]
    assert [(p["a"], p["b"]) for p in every_pair] == [("x", "y"), ("x", "z"), ("y", "z")]
    with pytest.raises(ValueError, match="labeler 'partial': 299 gold report"):
        compare_labelers(gold, {"good": good, "partial": {"r0": good["r0"]}})
    with pytest.raises(ValueError, match="at least two"):
        compare_labelers(gold, {"good": good})
    with pytest.raises(ValueError, match="n_bootstrap"):
        compare_labelers(gold, {"good": good, "bad": bad}, n_bootstrap=0)


# --- tables, confusion matrices, plot -----------------------------------------------------------


def test_metrics_table_shows_findings_and_na(hand_case: tuple[dict, dict]) -> None:
    table = format_metrics_table(compute_metrics(*hand_case))
    assert all(f in table for f in FINDINGS)
    assert "n/a" in table
    assert "Macro F1: 0.689" in table
    assert "11 of 13 findings left out" in table
    assert "Cohen's kappa" in table and "uncertain" in table


def test_comparison_table_shows_labelers_and_tests(two_labelers: tuple[dict, dict, dict]) -> None:
    gold, good, bad = two_labelers
    table = format_comparison_table(compare_labelers(gold, {"good": good, "bad": bad}, n_bootstrap=50))
    assert all(f in table for f in FINDINGS)
    for text in ("good", "bad", "Macro F1", "t-test", "Wilcoxon", "95% CI", "disagreeing cells", "more"):
        assert text in table


def test_confusion_matrices_match_sklearn(random_case: tuple[dict, dict]) -> None:
    pred, gold = random_case
    cms = confusion_matrices(pred, gold)
    for finding in FINDINGS:
        expected = confusion_matrix(column(gold, finding), column(pred, finding), labels=list(STATUSES))
        assert cms[finding] == expected.tolist()


def test_confusion_plot_files_hold_one_cell_per_report_as_dvc_json(tmp_path, hand_case: tuple[dict, dict]) -> None:
    pred, gold = hand_case
    write_confusion_plots(pred, gold, tmp_path)
    cms = confusion_matrices(pred, gold)
    for finding, cm in cms.items():
        text = (tmp_path / f"{finding.lower().replace(' ', '_')}.json").read_text()
        cells = json.loads(text)
        assert text == json.dumps(cells)  # the bytes json.dumps gives the whole list, as DVC reads them
        assert len(cells) == len(gold)
        counts = Counter((c["actual"], c["predicted"]) for c in cells)
        for (i, j), n in np.ndenumerate(np.array(cm)):
            assert counts[(STATUSES[i], STATUSES[j])] == n


def test_plot_confusion_matrices_writes_png(tmp_path, hand_case: tuple[dict, dict]) -> None:
    out = plot_confusion_matrices(confusion_matrices(*hand_case), tmp_path / "plots" / "confusion.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def write_labels(path, labels: dict) -> None:
    path.write_text("".join(json.dumps({"report_id": rid, "labels": row}) + "\n" for rid, row in labels.items()))


def test_compare_command_prints_both_labelers_tests_and_ids(tmp_path, two_labelers: tuple[dict, dict, dict]) -> None:
    gold, good, bad = two_labelers
    for name, labels in (("gold", gold), ("good", good), ("bad", bad)):
        write_labels(tmp_path / f"{name}.jsonl", labels)
    files = [str(tmp_path / f"{name}.jsonl") for name in ("good", "bad", "gold")]
    args = ["compare", *files[:2], "--gold", files[2], "--n-bootstrap", "200", "--json", str(tmp_path / "c.json")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "good vs bad" in result.output and "Wilcoxon" in result.output and "95% CI" in result.output
    written = json.loads((tmp_path / "c.json").read_text())
    assert written["pairs"][0]["bootstrap"]["n_resamples"] == 200
    expected = compare_labelers(gold, {"good": good, "bad": bad}, n_bootstrap=200)
    assert written["pairs"][0]["difference"] == pytest.approx(expected["pairs"][0]["difference"])


def test_compare_command_refuses_presence_only_gold(tmp_path) -> None:
    iu = tmp_path / "iu.jsonl"
    iu.write_text(json.dumps({"report_id": "a", "findings": "Normal.", "impression": "", "mesh": ["normal"]}) + "\n")
    write_labels(tmp_path / "a.jsonl", {"a": ALL_NOT_MENTIONED})
    args = ["compare", str(tmp_path / "a.jsonl"), str(tmp_path / "a.jsonl"), "--gold", str(iu), "--gold-format", "iu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "presence-only gold" in result.output


def test_teacher_disagreements_group_by_finding_statuses_and_phrase_and_count_without_text() -> None:
    def record(rid: str, labels: dict[str, str], evidence: dict[str, list[str]]) -> LabelRecord:
        return LabelRecord(report_id=rid, labels=apply_no_finding_rule(labels), evidence=evidence)

    teacher = [
        record("r1", {"Pleural Effusion": "present"}, {"Pleural Effusion": ["small effusion"]}),
        record("r2", {"Pleural Effusion": "present"}, {"Pleural Effusion": ["small effusion"]}),
        record("r3", {"Pneumothorax": "absent"}, {"Pneumothorax": ["no pneumothorax"]}),
    ]
    student = {r.report_id: dict(r.labels) for r in teacher}
    student["r1"]["Pleural Effusion"] = student["r2"]["Pleural Effusion"] = "absent"
    student["r3"]["Cardiomegaly"] = "present"
    cells = teacher_disagreements(student, teacher)
    assert [(c["finding"], c["teacher"], c["student"], c["phrase"], c["count"]) for c in cells] == [
        ("Cardiomegaly", "not_mentioned", "present", NO_EVIDENCE, 1),
        ("Pleural Effusion", "present", "absent", "small effusion", 2),
    ]
    counts = disagreement_counts(cells)
    assert counts == {
        "n_cells": 3,
        "by_finding": {
            "Cardiomegaly": {"n_cells": 1, "not_mentioned_to_present": 1},
            "Pleural Effusion": {"n_cells": 2, "present_to_absent": 2},
        },
    }
    assert "small effusion" not in json.dumps(counts)  # the metrics (and MLflow) hold no report text
    report = format_disagreements(cells)
    assert "## Pleural Effusion: 2 cells" in report and "| 2 | present | absent | small effusion | r1, r2 |" in report
    assert "None: the student gives" in format_disagreements([])
