"""Does radiologist review pay, and does choosing what to review beat chance? Simulated on IU X-ray.

    python benchmarks/review_iu.py [--budgets 100 200 400] [--epochs 4] [--train-seeds 13 14 15] [--json OUT]
    python benchmarks/review_iu.py --ranker WORK/none-s13/model --budgets 400 --strategies random  # one cell
    python benchmarks/review_iu.py --combine run1.json run2.json  # one table; pairs; a correction's worth
    python benchmarks/review_iu.py --repeat-confirmed on [--reviewer confirms]  # confirmed repeated too; control
    python benchmarks/review_iu.py --hedges WORK/none-s15/model WORK/selected-400-s15/model  # hedges
    python benchmarks/review_iu.py --continue-epochs 1 --continue-rate 0.2  # continue the no-review student
    python benchmarks/review_iu.py --repeat 1 --repeat-confirmed off --report-examples off  # labels alone differ
    python benchmarks/review_iu.py --score WORK/*/model  # students of earlier runs, scored again
    python benchmarks/review_iu.py --found WORK/none-s13/model  # correctable reports each term alone finds

The pool is the development half of IU dev (DESIGN.md section 6), labelled by the rule teacher; the
locked half is only scored (no strategy picks from it). A student is trained on the pool's teacher
labels (no review), and that student ranks the pool for `review select`'s strategy (params `review`).
For each budget K, K reports chosen by the strategy and K chosen at random go to a simulated reviewer
who knows the human MeSH codes (presence only): a finding the codes mark present and the teacher did
not call present becomes present, one the teacher called present and the codes do not becomes absent,
every other status stays the teacher's (an "uncertain" too: the codes cannot say uncertain, and on the
development half they mark 24 of the 73 findings the teacher calls uncertain present, so a hedge coded
present is the coder's convention more than the teacher's error; `--uncertain correct` makes them
present), and No Finding follows the convention. A student is then
trained with those reviewed labels through the pipeline's own `sentences` and `train` steps (reviewed
labels replace the teacher's, and the examples a review changed, with `review.repeat_confirmed` also those
it confirmed, are shown `review.repeat` times), from the backbone or, with `--continue-epochs N`, for N
epochs from the no-review student (`train.init_from`, as a review round would continue the champion;
then a student that continues it as long without review is the baseline) at `--continue-rate` times the
params' learning rates, and each student is scored
on the locked half: presence macro F1 against the MeSH codes, and its presence errors (the findings
other than No Finding that it calls present where the codes do not, or not present where they do: a
count that moves by one where one flip on a rare finding moves the macro F1 by up to 0.01). Prints counts
and scores only, never report text.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import scipy.stats
from teachers_iu import DEFAULT_DATA, iu_subsets

from deberta_rad.data import labels_by_id, merge_sources, split_reports, write_split, write_text_atomically
from deberta_rad.gold import iu_presence_gold
from deberta_rad.metrics import presence_metrics
from deberta_rad.params import Fractions, Params, ReviewWeights, load_params
from deberta_rad.predict import predict_reports
from deberta_rad.registry import check_model_ref
from deberta_rad.review import REVIEW_TEACHER, select_for_review
from deberta_rad.schema import FINDINGS, LabelRecord, Report, apply_no_finding_rule
from deberta_rad.teachers import get_teacher

PresenceGold = dict[str, dict[str, bool]]
TERMS = ("uncertainty", "disagreement", "rarity")  # the terms of `review select`'s score
Scores = dict[str, float]
ROW_KEYS = {"strategy", "k", "seed", "corrected_reports", "corrected_cells", "f1"}  # a --json row ("errors": optional)


def simulated_review(
    teacher: LabelRecord, gold: dict[str, bool], correct_uncertain: bool = False
) -> tuple[LabelRecord, int]:
    """The teacher's labels with presence corrected by the MeSH codes; returns them and the number of
    findings corrected. The codes do not code uncertainty (DESIGN.md section 6), so a finding the teacher
    calls uncertain keeps that status unless ``correct_uncertain`` makes it present where they code it."""
    labels = dict(teacher.labels)
    corrected = 0
    kept = {"present"} if correct_uncertain else {"present", "uncertain"}
    for finding in FINDINGS:
        if finding == "No Finding":
            continue
        if gold[finding] and labels[finding] not in kept:
            labels[finding], corrected = "present", corrected + 1
        elif not gold[finding] and labels[finding] == "present":
            labels[finding], corrected = "absent", corrected + 1
    return LabelRecord(
        report_id=teacher.report_id, labels=apply_no_finding_rule(labels), teacher=REVIEW_TEACHER
    ), corrected


def confirmed_review(teacher: LabelRecord) -> tuple[LabelRecord, int]:
    """A review that confirms every teacher label: the control for what a review's corrections add."""
    return LabelRecord(report_id=teacher.report_id, labels=teacher.labels, teacher=REVIEW_TEACHER), 0


def train_and_score(
    name: str,
    work: Path,
    splits: dict[str, list[Report]],
    teacher: dict[str, LabelRecord],
    reviewed: dict[str, LabelRecord],
    params: Params,
    locked: list[Report],
    gold: PresenceGold,
) -> tuple[Path, Scores]:
    """Run the `sentences` and `train` steps on the pool with these reviews; the student and its
    locked-half scores."""
    from deberta_rad.sentences import label_sentence_splits
    from deberta_rad.train import train_from_splits

    folder = work / name
    for split, members in splits.items():  # what the `split` stage writes; the locked half is the test
        write_split(folder / "splits" / split, members, teacher, {}, reviewed)
    started = time.perf_counter()
    label_sentence_splits(folder / "splits", None, folder / "sentences", params)
    train_from_splits(
        folder / "splits", folder / "model", params, folder / "checkpoints", False, None, None, folder / "sentences"
    )
    minutes = (time.perf_counter() - started) / 60
    scores = locked_half_scores(folder / "model", locked, gold)
    print(f"{name}: {described(scores)} (trained in {minutes:.1f} min)", flush=True)
    return folder / "model", scores


def locked_half_scores(model: Path, locked: list[Report], gold: PresenceGold) -> Scores:
    """A student's presence macro F1 on the locked half against the MeSH codes, and its presence errors
    on the findings other than No Finding (which only restates the others)."""
    predicted = labels_by_id(predict_reports(str(model), locked)[0])
    codes = {r.report_id: gold[r.report_id] for r in locked}
    errors = sum(
        (predicted[rid][f] == "present") != coded[f]
        for rid, coded in codes.items()
        for f in FINDINGS
        if f != "No Finding"
    )
    return {"f1": presence_metrics(predicted, codes)["macro_f1"], "errors": errors}


def described(scores: Scores) -> str:
    """One student's locked-half scores in words."""
    return f"locked-half presence macro F1 {scores['f1']:.3f}, {scores['errors']} presence errors"


def pool_splits(pool: list[Report], seed: int) -> dict[str, list[Report]]:
    """Train and val of the pool, grouped by text as the split stage does (its test share joins train)."""
    parts = split_reports(pool, seed, Fractions(train=0.8, val=0.15, test=0.05))
    return {"train": parts["train"] + parts["test"], "val": parts["val"]}


def positive(text: str) -> int:
    """A count that must be at least 1 (an epoch count, a repeat), or argparse's one-line error."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


def add_switch(parser: argparse.ArgumentParser, flag: str, text: str) -> None:
    """A flag that sets one boolean of params.yaml for every student: on, off, or as params has it."""
    parser.add_argument(flag, choices=["params", "on", "off"], default="params", help=text)


def switched(choice: str, in_params: bool) -> bool:
    """The value an `add_switch` flag gives its boolean."""
    return in_params if choice == "params" else choice == "on"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="IU X-ray dev.jsonl (MeSH codes)")
    parser.add_argument("--budgets", type=int, nargs="+", default=[100, 200, 400])
    parser.add_argument(
        "--epochs", type=positive, default=None, help="train.epochs for every student (default: params)"
    )
    parser.add_argument("--seed", type=int, default=13, help="the random strategy's draw")
    parser.add_argument(
        "--train-seeds", type=int, nargs="+", default=None, help="train.seed of each row of students (params: one)"
    )
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--work", type=Path, default=None, help="keep the students here (default: a temp folder)")
    parser.add_argument(
        "--json", type=Path, default=None, help="write the rows as JSON here (rewritten after each student)"
    )
    parser.add_argument(
        "--ranker",
        type=Path,
        default=None,
        help="a no-review student an earlier run of the same seed trained (its --work folder's none-sSEED/model): "
        "it ranks the pool and is the no-review row, so budgets can run in parallel processes",
    )
    parser.add_argument(
        "--strategies",
        nargs="+",
        choices=["selected", "random", "all"],
        default=["selected", "random"],
        help="which to train (all: the whole pool reviewed, the ceiling of what review can teach here)",
    )
    add_switch(
        parser,
        "--report-examples",
        "sentences.review_report_examples for every student: a reviewed finding no sentence carries as a "
        "whole-report example (on) or not at all (off)",
    )
    add_switch(
        parser,
        "--repeat-confirmed",
        "review.repeat_confirmed for every student: the examples of a reviewed report whose labels the "
        "reviewer confirmed are repeated like the corrected ones (on) or shown as often as the teacher's (off)",
    )
    parser.add_argument(
        "--repeat",
        type=positive,
        default=None,
        help="review.repeat for every student: how often per epoch a reviewed example is shown (default: params)",
    )
    parser.add_argument(
        "--reviewer",
        choices=["codes", "confirms"],
        default="codes",
        help="codes: the simulated reviewer corrects presence by the MeSH codes; confirms: it confirms every "
        "teacher label (with --repeat-confirmed on, the control: what repeating the chosen reports does without "
        "any correction)",
    )
    parser.add_argument(
        "--uncertain",
        choices=["keep", "correct"],
        default="keep",
        help="a finding the teacher calls uncertain and the MeSH codes mark present: the reviewer keeps "
        "uncertain (the codes do not code uncertainty) or makes it present (the rounds before)",
    )
    parser.add_argument(
        "--continue-epochs",
        type=int,
        default=None,
        help="train the reviewed students for this many epochs from the no-review student (train.init_from) "
        "instead of from the backbone, beside a no-review student continued as long",
    )
    parser.add_argument(
        "--continue-rate",
        type=float,
        default=1.0,
        help="with --continue-epochs: the continued students' learning rates (encoder and heads) as a share of "
        "the params' (a trained student restarted at full rate moves far from where it was)",
    )
    parser.add_argument(
        "--combine", type=Path, nargs="+", default=None, help="print one table from the --json files of several runs"
    )
    parser.add_argument(
        "--score", type=Path, nargs="+", default=None, help="print the locked-half scores of these students"
    )
    parser.add_argument(
        "--hedges",
        type=Path,
        nargs="+",
        default=None,
        help="students to check on the findings the teacher calls uncertain (locked half): how many they call "
        "present and how many of those the MeSH codes mark present",
    )
    parser.add_argument(
        "--found",
        type=Path,
        default=None,
        help="a no-review student: how many of the pool's correctable reports the strategy, and each of its terms "
        "alone, puts among its first K (no training)",
    )
    args = parser.parse_args()
    if args.combine:
        rows = [row for path in args.combine for row in result_rows(path)]
        print(format_table(list({(r["strategy"], r["k"], r["seed"]): r for r in rows}.values())))  # one no-review row
        return
    if args.ranker and len(args.train_seeds or [None]) > 1:
        raise SystemExit("--ranker is one seed's no-review student: pass a single --train-seeds")
    if args.continue_epochs is not None and (
        args.continue_epochs < 1 or args.continue_rate <= 0 or not (args.ranker or "selected" in args.strategies)
    ):
        raise SystemExit(
            "--continue-epochs: a positive number of epochs at a positive --continue-rate, from --ranker or "
            "from the no-review student a run with `selected` among --strategies trains"
        )
    if not args.data.is_file():
        raise SystemExit(f"IU data not found at {args.data} (expected ../shared/data beside the repo)")
    if args.hedges:
        print_hedges(args.data, students("--hedges", args.hedges))
        return
    if args.score:
        print_scores(args.data, students("--score", args.score))
        return
    if args.found:
        print_found(args.data, students("--found", [args.found])[0], args.budgets, load_params(args.params))
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="review-iu-"))
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work.resolve()}/mlflow.db")

    base = load_params(args.params)
    report_examples = switched(args.report_examples, base.sentences.review_report_examples)
    repeat_confirmed = switched(args.repeat_confirmed, base.review.repeat_confirmed)
    params = base.model_copy(
        update={
            "train": base.train.model_copy(update={"epochs": args.epochs or base.train.epochs}),
            "sentences": base.sentences.model_copy(update={"review_report_examples": report_examples}),
            "review": base.review.model_copy(
                update={"repeat_confirmed": repeat_confirmed, "repeat": args.repeat or base.review.repeat}
            ),
        }
    )
    gold = iu_presence_gold(args.data)
    subsets, _ = iu_subsets(args.data, gold)
    pool = merge_sources([("development", subsets["development"])]).reports
    locked = subsets["locked"]
    teacher = {r.report_id: r for r in get_teacher("rules").label([*pool, *locked])}
    splits = pool_splits(pool, params.split.seed) | {"test": locked}
    print(
        f"pool: {len(pool)} distinct development-half reports "
        f"({len(splits['train'])} train, {len(splits['val'])} val); "
        f"scored: {len(locked)} locked-half reports; {params.train.epochs} epochs per student",
        flush=True,
    )

    results: list[dict[str, Any]] = []

    def keep(row: dict[str, Any]) -> None:
        """Add a student's row, and rewrite --json with it (whole or not at all): a run stopped midway keeps
        what it scored."""
        results.append(row)
        if args.json:
            write_text_atomically(args.json, json.dumps({"epochs": params.train.epochs, "results": results}, indent=2))

    for seed in args.train_seeds or [params.train.seed]:
        seeded = params.model_copy(update={"train": params.train.model_copy(update={"seed": seed})})
        seed_results(seed, args, work, splits, teacher, seeded, pool, locked, gold, keep)
    print(format_table(results))
    if args.json:
        print(f"wrote {args.json}")


def result_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of one run's --json file; a file that is missing or not such a file, or a row without the
    figures the table reads, ends in one line."""
    try:
        rows = json.loads(path.read_text())["results"]
        for number, row in enumerate(rows, 1):
            if missing := ROW_KEYS - row.keys():
                raise KeyError(f"row {number} lacks {', '.join(sorted(missing))}")
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
        raise SystemExit(f"--combine: {path} is not a --json file of this benchmark ({error!r})") from None
    return rows


def students(option: str, models: list[Path]) -> list[Path]:
    """The model directories an option names; one that is none ends in one line naming it."""
    for model in models:
        try:
            check_model_ref(str(model))
        except FileNotFoundError as error:
            raise SystemExit(f"{option}: {error}") from None
    return models


def print_scores(data: Path, models: list[Path]) -> None:
    """Each student's locked-half scores, one line each."""
    gold = iu_presence_gold(data)
    locked = iu_subsets(data, gold)[0]["locked"]
    for model in models:
        print(f"{model}: {described(locked_half_scores(model, locked, gold))}", flush=True)


def print_found(data: Path, ranker: Path, budgets: list[int], params: Params) -> None:
    """How many of the pool's correctable reports (those the keep-uncertain reviewer would change) the
    params' strategy puts among its first K, and each of its terms alone: whether another weighting of
    `review.weights` would find more of the teacher's errors. In-sample: it reads the pool's codes."""
    gold = iu_presence_gold(data)
    pool = merge_sources([("development", iu_subsets(data, gold)[0]["development"])]).reports
    teacher = {r.report_id: r for r in get_teacher("rules").label(pool)}
    correctable = {rid for rid, record in teacher.items() if simulated_review(record, gold[rid])[1]}
    predictions, _ = predict_reports(str(ranker), pool)
    teacher_labels = labels_by_id(teacher.values())
    weightings = {"review.weights (params)": params.review.weights.model_dump()} | {
        f"{term} alone": {name: float(name == term) for name in TERMS} for term in TERMS
    }
    print(f"{len(correctable)} of the pool's {len(pool)} reports are correctable; found among the first K:")
    print("| ranking | " + " | ".join(f"K = {k}" for k in budgets) + " |\n|---|" + "---:|" * len(budgets))
    for name, weights in weightings.items():
        config = params.review.model_copy(update={"weights": ReviewWeights(**weights)})
        chosen = select_for_review(pool, predictions, teacher_labels, [], max(budgets), config).chosen
        found = [sum(c.report.report_id in correctable for c in chosen[:k]) for k in budgets]
        print(f"| {name} | " + " | ".join(map(str, found)) + " |")


def print_hedges(data: Path, models: list[Path]) -> None:
    """How often the MeSH codes mark present a finding the rule teacher calls uncertain, on each half, and
    per student on the locked half: the hedges it calls present (and how many the codes mark present), and
    its true and false positives and misses on every other finding. Counts only."""
    gold = iu_presence_gold(data)
    subsets, _ = iu_subsets(data, gold)
    teacher = {}
    for half in ("development", "locked"):
        teacher[half] = labels_by_id(get_teacher("rules").label(subsets[half]))
        hedges = [(rid, f) for rid, labels in teacher[half].items() for f in FINDINGS if labels[f] == "uncertain"]
        coded = sum(gold[rid][f] for rid, f in hedges)
        print(f"{half} half: the teacher calls {len(hedges)} findings uncertain; the MeSH codes mark {coded} present")
    locked = subsets["locked"]
    cells = [(r.report_id, f) for r in locked for f in FINDINGS if f != "No Finding"]
    hedged = {(rid, f) for rid, f in cells if teacher["locked"][rid][f] == "uncertain"}
    other = [cell for cell in cells if cell not in hedged]
    print("| student | hedges called present | of which coded present | other: true pos. | false pos. | missed |")
    print("|---|---:|---:|---:|---:|---:|")
    for model in models:
        predicted = labels_by_id(predict_reports(str(model), locked)[0])
        present = {(rid, f) for rid, f in cells if predicted[rid][f] == "present"}
        called = present & hedged
        tp = sum(cell in present and gold[cell[0]][cell[1]] for cell in other)
        fp = sum(cell in present and not gold[cell[0]][cell[1]] for cell in other)
        missed = sum(cell not in present and gold[cell[0]][cell[1]] for cell in other)
        coded = sum(gold[rid][f] for rid, f in called)
        print(f"| {model} | {len(called)} | {coded} | {tp} | {fp} | {missed} |")


def seed_results(
    seed: int,
    args: argparse.Namespace,
    work: Path,
    splits: dict[str, list[Report]],
    teacher: dict[str, LabelRecord],
    params: Params,
    pool: list[Report],
    locked: list[Report],
    gold: PresenceGold,
    keep: Callable[[dict[str, Any]], None],
) -> None:
    """One training seed's row of students, each handed to ``keep`` once scored: no review, then selected
    and random review at each K. The no-review student of this seed ranks the pool, as the last champion
    would; without `selected` among the strategies nothing ranks, and no no-review student is trained
    (another process's row has it)."""
    predictions: list[LabelRecord] = []
    if args.ranker:
        model, scores = args.ranker, locked_half_scores(args.ranker, locked, gold)
        print(f"none-s{seed} (--ranker {model}): {described(scores)}", flush=True)
    elif "selected" in args.strategies:
        model, scores = train_and_score(f"none-s{seed}", work, splits, teacher, {}, params, locked, gold)
    if "selected" in args.strategies or args.ranker:
        keep(no_review_row("", seed, scores))
        predictions, _ = predict_reports(str(model), pool)
    teacher_labels = labels_by_id(teacher.values())
    correct_uncertain = args.uncertain == "correct"
    variant = (
        ("" if params.sentences.review_report_examples else ", sentence corrections only")
        + (", uncertain corrected" if correct_uncertain else "")
        + (", confirmed repeated" if params.review.repeat_confirmed else "")
        + (f", repeated {args.repeat}x" if args.repeat else "")
        + (", no corrections" if args.reviewer == "confirms" else "")
        + (f", continued {args.continue_epochs} epochs at {args.continue_rate:g}" if args.continue_epochs else "")
    )
    suffix = variant.replace(", ", "-").replace(" ", "-")  # the variant in the students' folder names
    if args.continue_epochs:
        params = continued(params, model, args.continue_epochs, args.continue_rate)
        if "selected" in args.strategies:
            _, scores = train_and_score(f"none-s{seed}{suffix}", work, splits, teacher, {}, params, locked, gold)
            keep(no_review_row(variant, seed, scores))
    for k in args.budgets:
        for strategy in args.strategies:
            reports = chosen_for_review(strategy, k, seed, args.seed, pool, predictions, teacher_labels, params)
            reviews = {
                r.report_id: simulated_review(teacher[r.report_id], gold[r.report_id], correct_uncertain)
                if args.reviewer == "codes"
                else confirmed_review(teacher[r.report_id])
                for r in reports
            }
            reviewed = {rid: record for rid, (record, _) in reviews.items()}
            _, scores = train_and_score(
                f"{strategy}-{k}-s{seed}{suffix}", work, splits, teacher, reviewed, params, locked, gold
            )
            row = {
                "strategy": strategy + variant,
                "k": len(reports),
                "seed": seed,
                "corrected_reports": sum(n > 0 for _, n in reviews.values()),
                "corrected_cells": sum(n for _, n in reviews.values()),
            } | scores
            keep(row)
            print(json.dumps(row), flush=True)


def no_review_row(variant: str, seed: int, scores: Scores) -> dict[str, Any]:
    """The table row of a student trained without review."""
    return {
        "strategy": "no review" + variant,
        "k": 0,
        "seed": seed,
        "corrected_reports": 0,
        "corrected_cells": 0,
    } | scores


def continued(params: Params, model: Path, epochs: int, rate: float) -> Params:
    """Params whose students start from ``model`` (`train.init_from`) and train ``epochs`` epochs at
    ``rate`` times the learning rates."""
    train = params.train
    update = {
        "init_from": str(model),
        "epochs": epochs,
        "learning_rate": train.learning_rate * rate,
        "head_learning_rate": train.head_learning_rate * rate,
    }
    return params.model_copy(update={"train": train.model_copy(update=update)})


def chosen_for_review(
    strategy: str,
    k: int,
    seed: int,
    draw_seed: int,
    pool: list[Report],
    predictions: list[LabelRecord],
    teacher_labels: dict[str, dict[str, str]],
    params: Params,
) -> list[Report]:
    """The K reports a strategy sends to the reviewer: `review select`'s ranking, a seeded random draw,
    or the whole pool (`all`, the ceiling of what review can teach here)."""
    if strategy == "selected":
        return [c.report for c in select_for_review(pool, predictions, teacher_labels, [], k, params.review).chosen]
    if strategy == "random":
        return random.Random(draw_seed + k + seed).sample(pool, k)
    return pool


def format_table(results: list[dict[str, Any]]) -> str:
    """One row per strategy and K: corrections, F1 and presence errors averaged over the training seeds, with
    the F1's range (errors: - for rows of runs that did not count them)."""
    cells: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for row in results:
        cells.setdefault((row["strategy"], row["k"]), []).append(row)
    lines = [
        "| review | K | seeds | reports corrected | findings corrected | locked-half F1 (range) | presence errors |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for (strategy, k), rows in cells.items():
        f1 = [r["f1"] for r in rows]
        spread = f" ({min(f1):.3f}-{max(f1):.3f})" if len(rows) > 1 else ""
        corrected = sum(r["corrected_reports"] for r in rows) / len(rows)
        findings = sum(r["corrected_cells"] for r in rows) / len(rows)
        errors = [r["errors"] for r in rows if "errors" in r]
        counted = f"{sum(errors) / len(errors):.1f}" if len(errors) == len(rows) else "-"
        lines.append(
            f"| {strategy} | {k} | {len(rows)} | {corrected:.0f} | {findings:.0f} | {sum(f1) / len(f1):.3f}{spread} "
            f"| {counted} |"
        )
    return "\n".join([*lines, "", *paired_differences(results), *correction_worth(results)])


def seed_gaps(scores: dict[tuple[str, int, int], float], first: str, second: str, k: int) -> list[float]:
    """``first``'s score minus ``second``'s at budget K, for each training seed that ran both."""
    return [
        scores[(first, k, seed)] - scores[(second, k, seed)]
        for strategy, budget, seed in scores
        if (strategy, budget) == (first, k) and (second, k, seed) in scores
    ]


def paired_differences(results: list[dict[str, Any]]) -> list[str]:
    """Selected minus random at each K, over the training seeds that ran both: one student's F1 moves by
    more than a few dozen corrections, so the criterion is read from the pairs, not from one run."""
    f1 = {(row["strategy"], row["k"], row["seed"]): row["f1"] for row in results}
    errors = {(row["strategy"], row["k"], row["seed"]): row["errors"] for row in results if "errors" in row}
    lines = []
    for strategy, k in sorted({(s, k) for s, k, _ in f1 if s.startswith("selected")}):
        rival = strategy.replace("selected", "random", 1)  # the same variant drawn at random
        gaps = seed_gaps(f1, strategy, rival, k)
        more = seed_gaps(errors, strategy, rival, k)  # selected's errors minus random's: below 0 is better
        if gaps:
            lines.append(
                f"{strategy}, K = {k}: minus random {sum(gaps) / len(gaps):+.3f} on average over {len(gaps)} seeds"
                f"{standard_error_text(gaps)}, ahead under {sum(g > 0 for g in gaps)}"
                + (
                    f"; errors {sum(more) / len(more):+.1f}, fewer under {sum(g < 0 for g in more)} of {len(more)}"
                    if more
                    else ""
                )
            )
    return lines


def standard_error_text(gaps: list[float]) -> str:
    """`` (standard error S)`` of the mean of the paired gaps, or nothing for a single pair."""
    return f" (standard error {statistics.stdev(gaps) / len(gaps) ** 0.5:.3f})" if len(gaps) > 1 else ""


def correction_worth(results: list[dict[str, Any]]) -> list[str]:
    """What one corrected report is worth: the least-squares slope of each reviewed student's F1 and errors
    over its seed's no-review student (of the same variant) against the reports its review corrected, with
    the slope's standard error. Times the corrections selection finds beyond random, it is the gap a perfect
    measurement would see; slope plus twice its standard error bounds what the choice can buy."""
    baseline = {(row["strategy"], row["seed"]): row for row in results if row["k"] == 0}
    pairs = [(row, base) for row in results if row["k"] > 0 and (base := no_review_of(row, baseline))]
    if not fittable(pairs):
        return []
    corrected = [row["corrected_reports"] for row, _ in pairs]
    gains = [row["f1"] - base["f1"] for row, base in pairs]
    fit = scipy.stats.linregress(corrected, gains)
    varies = len(set(gains)) > 1  # equal gains have no correlation: linregress gives nan for r and the error
    spread, r = (f"{fit.stderr:.4f}", f"{fit.rvalue:.2f}") if varies else ("n/a", "n/a")
    line = (
        f"per corrected report, over {len(pairs)} reviewed students: F1 {fit.slope:+.4f} "
        f"(standard error {spread}, r = {r})"
    )
    counted = [(row, base) for row, base in pairs if "errors" in row and "errors" in base]
    if fittable(counted):
        errors = scipy.stats.linregress(
            [row["corrected_reports"] for row, _ in counted], [row["errors"] - base["errors"] for row, base in counted]
        )
        line += f", errors {errors.slope:+.2f}"
    return [line + " (against the seed's no-review student)"]


def fittable(pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> bool:
    """Whether a line can be fitted through these students: three or more, with two correction counts at least
    (a line through a constant x has no slope)."""
    return len(pairs) >= 3 and len({row["corrected_reports"] for row, _ in pairs}) > 1


def no_review_of(row: dict[str, Any], baseline: dict[tuple[str, int], dict[str, Any]]) -> dict[str, Any] | None:
    """A reviewed row's no-review student: the one of its variant (a continued one), else its seed's."""
    _, comma, variant = row["strategy"].partition(",")
    return baseline.get(("no review" + comma + variant, row["seed"])) or baseline.get(("no review", row["seed"]))


if __name__ == "__main__":
    main()
