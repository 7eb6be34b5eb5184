"""Radiologist review (README "Radiologist review"): choose the reports whose review would teach the
student most, hand them to Label Studio pre-filled with the student's labels, and bring the submitted
labels back into an append-only store that DVC versions (params `review.store`, like the relabel store).

Reviewed labels then act three ways in the pipeline: the `split` stage keeps a share of them
(`review.gold_fraction`) out of training as gold in the test split, `train` (and the `sentences`
stage) learns the others in place of the teacher's, and `evaluate` scores every version against the
gold as a third reference beside teacher and ground truth.

Report text lives in the selection file, in Label Studio and in the store, never in MLflow or logs:
what is logged is ids, counts and scores. Reviewers appear as pseudonymous ids.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from deberta_rad.data import (
    AppendOnlyStore,
    InputError,
    hash_position,
    normalise_text,
    read_label_records,
    text_hash,
    validated,
    write_atomically,
)
from deberta_rad.gold import STATUS_RANK
from deberta_rad.params import ReviewParams
from deberta_rad.schema import FINDINGS, STATUS_INDEX, STATUSES, LabelRecord, Report, TeacherInfo

if TYPE_CHECKING:
    from deberta_rad.label_studio import LabelStudioClient, ProjectState

# The provenance of a reviewed label, so training and evaluation can tell it from a teacher's.
REVIEW_TEACHER = TeacherInfo(name="review", model="label-studio")
POSITIVE = ("present", "uncertain")


# ---------------------------------------------------------------------------------------------- select
@dataclass
class Candidate:
    """One report's case for review: each term in [0, 1] of the pool's largest, and their weighted sum."""

    report: Report
    prediction: LabelRecord
    uncertainty: float
    disagreement: float
    rarity: float
    score: float = 0.0

    def summary(self) -> dict[str, Any]:
        """Ids and scores only: what MLflow and the terminal may see."""
        return {
            "report_id": self.report.report_id,
            "score": round(self.score, 4),
            "uncertainty": round(self.uncertainty, 4),
            "disagreement": round(self.disagreement, 4),
            "rarity": round(self.rarity, 4),
        }


@dataclass
class Selection:
    chosen: list[Candidate]
    pool: int
    already_reviewed: int
    near_duplicates_skipped: int
    without_teacher_label: int
    pool_means: dict[str, float] = field(default_factory=dict)


def probability_matrix(records: Sequence[LabelRecord]) -> np.ndarray:
    """[N, 13, 4] status probabilities; a record without them counts as one-hot on its labels."""
    matrix = np.zeros((len(records), len(FINDINGS), len(STATUSES)))
    for i, record in enumerate(records):
        for j, finding in enumerate(FINDINGS):
            if record.probabilities and finding in record.probabilities:
                matrix[i, j] = [record.probabilities[finding].get(s, 0.0) for s in STATUSES]
            else:
                matrix[i, j, STATUS_INDEX[record.labels[finding]]] = 1.0
    return matrix


def finding_uncertainty(probabilities: np.ndarray, kind: str) -> np.ndarray:
    """[N, 13] per-finding uncertainty in [0, 1]: one minus the margin between the two likeliest
    statuses, or the entropy over the four statuses in units of its maximum."""
    if kind == "entropy":
        clipped = np.clip(probabilities, 1e-12, 1.0)
        return -(clipped * np.log(clipped)).sum(-1) / np.log(len(STATUSES))
    top_two = np.sort(probabilities, axis=-1)[..., -2:]
    return 1.0 - (top_two[..., 1] - top_two[..., 0])


def pair_rarity(labels: Sequence[Mapping[str, str]]) -> np.ndarray:
    """[N] how rare each report's rarest mentioned (finding, status) pair is in the pool: -log of its
    share, in units of -log(1 / N) so a pair seen once scores 1. No Finding and not_mentioned are
    common by design and do not count."""
    n = len(labels)
    if n < 2:
        return np.zeros(n)
    counts: dict[tuple[str, str], int] = {}
    for row in labels:
        for finding, status in row.items():
            counts[(finding, status)] = counts.get((finding, status), 0) + 1
    scale = np.log(n)
    return np.array(
        [
            max(
                (
                    -np.log(counts[(f, s)] / n) / scale
                    for f, s in row.items()
                    if s != "not_mentioned" and f != "No Finding"
                ),
                default=0.0,
            )
            for row in labels
        ]
    )


def _scaled(values: np.ndarray) -> np.ndarray:
    """Values in units of the pool's largest, so the weights in params compare like with like."""
    top = float(values.max()) if len(values) else 0.0
    return values / top if top > 0 else np.zeros_like(values)


def score_candidates(
    reports: Sequence[Report],
    predictions: Sequence[LabelRecord],
    teacher: Mapping[str, Mapping[str, str]],
    config: ReviewParams,
) -> list[Candidate]:
    """Each report's uncertainty (summed over findings), student-teacher disagreement (findings whose
    status differs; 0 without a teacher label) and rarity (of the teacher's, else the student's, labels),
    and their weighted sum."""
    uncertainty = finding_uncertainty(probability_matrix(predictions), config.uncertainty).sum(-1)
    disagreement = np.array(
        [
            sum(teacher[r.report_id][f] != p.labels[f] for f in FINDINGS) if r.report_id in teacher else 0
            for r, p in zip(reports, predictions, strict=True)
        ],
        dtype=float,
    )
    rarity = pair_rarity([teacher.get(r.report_id, p.labels) for r, p in zip(reports, predictions, strict=True)])
    terms = {"uncertainty": _scaled(uncertainty), "disagreement": _scaled(disagreement), "rarity": _scaled(rarity)}
    weights = config.weights
    total = weights.uncertainty * terms["uncertainty"] + weights.disagreement * terms["disagreement"]
    total = total + weights.rarity * terms["rarity"]
    return [
        Candidate(report, prediction, *(float(terms[name][i]) for name in terms), score=float(total[i]))
        for i, (report, prediction) in enumerate(zip(reports, predictions, strict=True))
    ]


def shingles(text: str, size: int = 3) -> frozenset[str]:
    """Word n-grams of the normalised text (the words themselves for a text shorter than n)."""
    words = re.findall(r"[a-z0-9]+", normalise_text(text).lower())
    if len(words) < size:
        return frozenset(words)
    return frozenset(" ".join(words[i : i + size]) for i in range(len(words) - size + 1))


def similarity(a: frozenset[str], b: frozenset[str]) -> float:
    """Jaccard similarity of two shingle sets."""
    union = len(a | b)
    return len(a & b) / union if union else 1.0


def diverse_top(candidates: Sequence[Candidate], budget: int, max_similarity: float) -> tuple[list[Candidate], int]:
    """The best `budget` candidates by score (ties by id, so a rerun picks the same), skipping any whose
    text is as similar as `max_similarity` to one already chosen; returns them and how many were skipped."""
    chosen: list[Candidate] = []
    chosen_shingles: list[frozenset[str]] = []
    skipped = 0
    for candidate in sorted(candidates, key=lambda c: (-c.score, c.report.report_id)):
        if len(chosen) == budget:
            break
        own = shingles(candidate.report.text)
        if any(similarity(own, other) >= max_similarity for other in chosen_shingles):
            skipped += 1
            continue
        chosen.append(candidate)
        chosen_shingles.append(own)
    return chosen, skipped


def open_for_review(reports: Sequence[Report], reviewed: Iterable[Report]) -> list[Report]:
    """The reports no one has reviewed yet, by id or by text."""
    reviewed = list(reviewed)
    done_ids = {r.report_id for r in reviewed}
    done_texts = {text_hash(r.text) for r in reviewed}
    return [r for r in reports if r.report_id not in done_ids and text_hash(r.text) not in done_texts]


def select_for_review(
    reports: Sequence[Report],
    predictions: Sequence[LabelRecord],
    teacher: Mapping[str, Mapping[str, str]],
    reviewed: Iterable[Report],
    budget: int,
    config: ReviewParams,
) -> Selection:
    """The `budget` reports a review would teach most, never one already reviewed (by id or by text).
    `predictions` need cover only the reports not reviewed yet (`open_for_review`)."""
    open_reports = open_for_review(reports, reviewed)
    by_id = {p.report_id: p for p in predictions}
    missing = [r.report_id for r in open_reports if r.report_id not in by_id]
    if missing:
        raise InputError(f"{len(missing)} reports have no student prediction, e.g. {missing[:5]}")
    candidates = score_candidates(open_reports, [by_id[r.report_id] for r in open_reports], teacher, config)
    chosen, skipped = diverse_top(candidates, budget, config.max_similarity)
    means = {
        name: float(np.mean([getattr(c, name) for c in candidates])) if candidates else 0.0
        for name in ("uncertainty", "disagreement", "rarity", "score")
    }
    return Selection(
        chosen=chosen,
        pool=len(reports),
        already_reviewed=len(reports) - len(open_reports),
        near_duplicates_skipped=skipped,
        without_teacher_label=sum(r.report_id not in teacher for r in open_reports),
        pool_means=means,
    )


def write_selection(path: Path, selection: Selection, model: str) -> None:
    """The batch for `review push`: each report with the student's labels and why it was chosen. Holds
    report text: it is a local file (data/review/ is ignored by git), never an MLflow artifact."""

    def write(temporary: Path) -> None:
        with temporary.open("w", encoding="utf-8") as handle:
            for candidate in selection.chosen:
                row = candidate.report.model_dump(exclude_none=True) | {
                    "prediction": candidate.prediction.labels,
                    "model": model,
                    **{k: v for k, v in candidate.summary().items() if k != "report_id"},
                }
                handle.write(json.dumps(row) + "\n")

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, write)


def read_selection(path: Path) -> list[dict[str, Any]]:
    """`review select`'s output, each line checked for the fields `push` needs."""
    if not path.is_file():
        raise InputError(f"{path}: no such file: `deberta-rad review select` writes it")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            Report.model_validate(row)
            LabelRecord(report_id=row["report_id"], labels=row["prediction"])
        except (ValueError, KeyError, TypeError) as err:
            problem = type(err).__name__
            raise InputError(f"{path}:{number}: not a line of `deberta-rad review select` ({problem})") from None
        rows.append(row)
    return rows


def log_selection(selection: Selection, model: str, reports_path: Path, budget: int, config: ReviewParams) -> str:
    """One MLflow run per selection: the strategy and budget as params, pool and batch figures as
    metrics, the chosen ids with their scores as an artifact (no text). Returns the run id."""
    import mlflow

    from deberta_rad.tracking import configure_mlflow

    configure_mlflow()
    with mlflow.start_run(run_name="review-select") as run:
        mlflow.set_tags({"stage": "review-select", "model": model})
        mlflow.log_params(
            {
                "budget": budget,
                "reports": str(reports_path),
                "uncertainty": config.uncertainty,
                "max_similarity": config.max_similarity,
                **{f"weight.{k}": v for k, v in config.weights.model_dump().items()},
            }
        )
        chosen = selection.chosen
        mlflow.log_metrics(
            {
                "pool": selection.pool,
                "selected": len(chosen),
                "already_reviewed": selection.already_reviewed,
                "near_duplicates_skipped": selection.near_duplicates_skipped,
                "without_teacher_label": selection.without_teacher_label,
                **{f"pool_mean.{k}": v for k, v in selection.pool_means.items()},
                **{
                    f"selected_mean.{name}": float(np.mean([getattr(c, name) for c in chosen])) if chosen else 0.0
                    for name in ("uncertainty", "disagreement", "rarity", "score")
                },
            }
        )
        mlflow.log_dict({"selected": [c.summary() for c in chosen]}, "review/selection.json")
        return run.info.run_id


# ---------------------------------------------------------------------------------------------- store
def reviewer_pseudonym(server_url: str, user: object) -> str:
    """A stable id per Label Studio user that names no one: a hash of the server and the user's id
    (Label Studio's own database maps it back, which is what pseudonymous means)."""
    user_id = user.get("id") if isinstance(user, Mapping) else user
    return "reviewer-" + hashlib.sha256(f"{server_url.rstrip('/')}#{user_id}".encode()).hexdigest()[:12]


def reviewed_records(path: Path) -> dict[str, dict[str, Any]]:
    """The store's latest review of each report (a later pull of a corrected annotation wins), each line
    checked as a report and a label record; a bad line is named by its number, never its content."""
    rows = {}
    for number, row in enumerate(AppendOnlyStore(path).records(cut_torn=False), start=1):
        where = f"{path}: record {number}"
        if not isinstance(row, dict):
            raise InputError(f"{where}: not a JSON object")
        validated(Report, row, where)
        validated(LabelRecord, row, where)
        rows[row["report_id"]] = row
    return rows


def reviewed_reports(path: Path) -> list[Report]:
    return [Report.model_validate(row) for row in reviewed_records(path).values()]


# ------------------------------------------------------------------------------------------ pull checks
@dataclass
class PullResult:
    appended: int = 0
    already_stored: int = 0
    not_annotated: int = 0
    skipped: int = 0
    refused: list[str] = field(default_factory=list)

    def describe(self, store: Path) -> str:
        return (
            f"appended {self.appended} reviewed reports to {store}; {self.already_stored} were already there; "
            f"{self.not_annotated} tasks await review, {self.skipped} skipped by all who opened them; "
            f"{len(self.refused)} refused"
        )


def convention_problems(labels: Mapping[str, str]) -> list[str]:
    """What a reviewed label set breaks: all 13 findings, and No Finding present exactly when no other
    finding is present or uncertain (CheXpert's convention, which the teachers follow)."""
    missing = [f for f in FINDINGS if f not in labels]
    if missing:
        return [f"no status for {', '.join(missing)}"]
    positive = [f for f in FINDINGS if f != "No Finding" and labels[f] in POSITIVE]
    if labels["No Finding"] == "present" and positive:
        return [f"No Finding is present beside {', '.join(positive)}"]
    if labels["No Finding"] != "present" and not positive:
        return [f"No Finding is {labels['No Finding']} but no other finding is present or uncertain"]
    return []


def normalised_no_finding(labels: Mapping[str, str]) -> dict[str, str]:
    """No Finding as the teachers write it once the convention holds: not_mentioned beside a positive
    finding (a reviewer's absent there says the same)."""
    result = {f: labels[f] for f in FINDINGS}
    if result["No Finding"] != "present":
        result["No Finding"] = "not_mentioned"
    return result


def settled_annotation(task: Mapping[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """The one annotation of a task that counts, and why: the only one, the one all agree on, or the
    one marked ground truth; None with the reason when there is none or they disagree."""
    from deberta_rad.label_studio import annotation_labels

    annotations = task.get("annotations") or []
    submitted = [a for a in annotations if not a.get("was_cancelled")]
    if not submitted:
        return None, "skipped" if annotations else "not annotated"
    if len(submitted) == 1:
        return submitted[0], "single"
    try:
        distinct = {json.dumps(annotation_labels(a.get("result") or []), sort_keys=True) for a in submitted}
    except ValueError as err:
        return None, f"an annotation cannot be read: {err}"
    if len(distinct) == 1:
        return max(submitted, key=lambda a: a.get("updated_at") or ""), "agreed"
    marked = [a for a in submitted if a.get("ground_truth")]
    if len(marked) == 1:
        return marked[0], "ground truth"
    return None, f"{len(submitted)} annotations disagree and none (or several) is marked ground truth"


def review_rows(tasks: Sequence[Mapping[str, Any]], server_url: str, project_id: int, result: PullResult) -> list[dict]:
    """Store rows for every task with a settled, valid annotation; the rest are counted or refused
    with task and report id (never text)."""
    from deberta_rad.label_studio import annotation_labels

    rows = []
    for task in tasks:
        data = task.get("data") or {}
        where = f"task {task.get('id')} (report {data.get('report_id')!r})"
        annotation, reason = settled_annotation(task)
        if annotation is None:
            if reason == "not annotated":
                result.not_annotated += 1
            elif reason == "skipped":
                result.skipped += 1
            else:
                result.refused.append(f"{where}: {reason}")
            continue
        try:
            labels = annotation_labels(annotation.get("result") or [])
        except ValueError as err:
            result.refused.append(f"{where}: {err}")
            continue
        problems = convention_problems(labels)
        if problems or not data.get("report_id") or not isinstance(data.get("text"), str):
            result.refused.append(f"{where}: {'; '.join(problems) or 'the task has no report_id or text'}")
            continue
        report = Report(report_id=str(data["report_id"]), text=data["text"], institution=data.get("institution"))
        rows.append(
            report.model_dump(exclude_none=True)
            | {
                "labels": normalised_no_finding(labels),
                "teacher": REVIEW_TEACHER.model_dump(exclude_none=True),
                "reviewer": reviewer_pseudonym(server_url, annotation.get("completed_by")),
                "settled_by": reason,
                "project": project_id,
                "task": task.get("id"),
                "annotation": annotation.get("id"),
                "reviewed_at": annotation.get("updated_at") or annotation.get("created_at"),
            }
        )
    return rows


def append_new_reviews(store: AppendOnlyStore, rows: Sequence[dict], result: PullResult) -> None:
    """Append the rows the store lacks: an annotation already stored at the same revision is skipped,
    an edited one is appended again (the latest line per report wins when read)."""
    stored = {(r.get("project"), r.get("task"), r.get("annotation"), r.get("reviewed_at")) for r in store.records()}
    new = [r for r in rows if (r["project"], r["task"], r["annotation"], r["reviewed_at"]) not in stored]
    result.already_stored += len(rows) - len(new)
    if new:
        store.append_rows(new)
    result.appended += len(new)


# ---------------------------------------------------------------------------------------- in the pipeline
def is_gold(report_id: str, seed: int, gold_fraction: float) -> bool:
    """Whether a reviewed report is held out as gold: a seeded hash of its id, so adding reviews never
    moves an earlier one between gold and training."""
    return hash_position(f"review:{seed}:{report_id}") < gold_fraction


def reviewed_for_split(
    store: Path, corpus: Iterable[Report], config: ReviewParams
) -> tuple[dict[str, LabelRecord], set[str], list[str]]:
    """For the split stage: the reviewed labels of the corpus's reports, the ids held out as gold, and
    the reviewed ids the corpus lacks. A reviewed id whose text differs from the corpus's is an error:
    its review is of another report. The corpus streams; a text digest is kept only for reviewed ids."""
    rows = reviewed_records(store) if store.is_file() else {}
    texts = {r.report_id: text_hash(r.text) for r in corpus if r.report_id in rows}
    clashes = [rid for rid, row in rows.items() if rid in texts and text_hash(row.get("text", "")) != texts[rid]]
    if clashes:
        raise InputError(
            f"{store}: {len(clashes)} reviewed report ids name another text in the corpus, e.g. {clashes[:3]}"
        )
    reviewed = {rid: LabelRecord.model_validate(row) for rid, row in rows.items() if rid in texts}
    gold = {rid for rid in reviewed if is_gold(rid, config.gold_seed, config.gold_fraction)}
    return reviewed, gold, sorted(set(rows) - set(texts))


def weaker(a: str, b: str) -> str:
    """The weaker of two statuses (present > uncertain > absent > not mentioned)."""
    return a if STATUS_RANK[a] <= STATUS_RANK[b] else b


def overruled_mentions(statuses: Mapping[str, str], reviewed: str) -> list[str]:
    """Of a report's sentences' statuses for one finding, the sentences a review rating it stronger than all
    of them overrules: those that mention it most strongly (the hedge or the negation the reviewer read
    otherwise). None when the review is no stronger, or when no sentence mentions the finding at all."""
    strongest = max(statuses.values(), key=STATUS_RANK.get, default="not_mentioned")
    if strongest == "not_mentioned" or STATUS_RANK[strongest] >= STATUS_RANK[reviewed]:
        return []
    return [sid for sid, status in statuses.items() if status == strongest]


def reviewed_sentence_examples(
    reviewed: Sequence[tuple[Report, LabelRecord]],
    sentence_labels: Mapping[str, LabelRecord],
    sentences_of: Mapping[str, Sequence[str]],
) -> tuple[dict[str, LabelRecord], list[tuple[Report, LabelRecord]]]:
    """What a sentence-level student learns from reviewed reports, whose labels belong to the report.

    No sentence of a reviewed report keeps a status stronger than the review's: a finding the reviewer
    struck out is struck out of every sentence that claimed it. A finding the reviewer rates stronger than
    every sentence does is raised in the sentences that mention it most strongly ("possible effusion" for
    an effusion marked present). A sentence shared by several reviewed reports goes no higher than the
    weakest of their reviews. Where no sentence mentions the finding (nothing says which one holds it)
    the whole report becomes one more example with the reviewer's labels. Returns the corrected sentence
    labels and those report examples, all with the `review` provenance: only what the review changed,
    since a label the reviewer confirmed is the teacher's and the examples with that provenance are the
    ones `train` shows `review.repeat` times."""
    ceiling: dict[str, dict[str, str]] = {}
    for report, review in reviewed:
        for sid in sentences_of[report.report_id]:
            ceiling[sid] = {f: weaker(ceiling.get(sid, review.labels)[f], review.labels[f]) for f in FINDINGS}
    corrected = {
        sid: {f: weaker(sentence_labels[sid].labels[f], cap[f]) for f in FINDINGS} | {"No Finding": "not_mentioned"}
        for sid, cap in ceiling.items()
    }
    for report, review in reviewed:
        for finding in FINDINGS:
            if finding == "No Finding":
                continue
            statuses = {sid: corrected[sid][finding] for sid in sentences_of[report.report_id]}
            for sid in overruled_mentions(statuses, review.labels[finding]):
                corrected[sid][finding] = ceiling[sid][finding]
    examples = []
    for report, review in reviewed:
        reached = {
            f: max((corrected[sid][f] for sid in sentences_of[report.report_id]), key=STATUS_RANK.get, default=None)
            for f in FINDINGS
            if f != "No Finding"
        }
        if any((reached[f] or "not_mentioned") != review.labels[f] for f in reached):
            labels = {**review.labels, "No Finding": "not_mentioned"}
            examples.append(
                (
                    Report(report_id=f"review-{report.report_id}", text=report.text),
                    LabelRecord(report_id=f"review-{report.report_id}", labels=labels, teacher=REVIEW_TEACHER),
                )
            )
    records = {
        sid: LabelRecord(report_id=sid, labels=labels, teacher=REVIEW_TEACHER)
        for sid, labels in corrected.items()
        if labels != sentence_labels[sid].labels
    }
    return records, examples


def read_reviewed(splits_dir: Path, name: str) -> list[LabelRecord]:
    """A split's reviewed labels (`split` writes them beside the teacher's), none when there are none."""
    path = splits_dir / name / "reviewed.jsonl"
    return read_label_records(path) if path.is_file() else []


def read_reviewed_for_training(splits_dir: Path) -> list[LabelRecord]:
    """Train's and val's reviewed labels, which replace the teacher's wherever a model is fitted and its
    epoch chosen (`train` and `tune` alike)."""
    return [*read_reviewed(splits_dir, "train"), *read_reviewed(splits_dir, "val")]


def selection_table(chosen: Sequence[Candidate], top: int = 10) -> str:
    """The first picks with their scores, for the terminal (ids only)."""
    lines = [f"{'report':24s} {'score':>6s} {'uncert.':>8s} {'disagr.':>8s} {'rarity':>7s}"]
    for c in chosen[:top]:
        lines.append(
            f"{c.report.report_id[:24]:24s} {c.score:6.3f} {c.uncertainty:8.3f} {c.disagreement:8.3f} {c.rarity:7.3f}"
        )
    if len(chosen) > top:
        lines.append(f"... and {len(chosen) - top} more")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ push and pull
@dataclass
class PushResult:
    project_id: int
    state: ProjectState
    imported: int
    already_in_project: int
    already_reviewed: int

    def describe(self, url: str) -> str:
        what = {
            "created": "created",
            "config restored": "restored the labeling interface of",
            "unchanged": "found",
        }[self.state]
        return (
            f"{what} project {self.project_id} at {url}: imported {self.imported} tasks; "
            f"{self.already_in_project} were already tasks there, {self.already_reviewed} already reviewed"
        )


def push_selection(client: LabelStudioClient, rows: Sequence[Mapping[str, Any]], title: str, store: Path) -> PushResult:
    """Create or update the project and import the selected reports it lacks, each pre-annotated with
    the student's labels, so the reviewer only corrects; a report already reviewed is not sent again."""
    from deberta_rad.label_studio import task_payload

    project_id, state = client.ensure_project(title)
    in_project = client.task_report_ids(project_id)
    done = set(reviewed_records(store)) if store.is_file() else set()
    fresh = [r for r in rows if r["report_id"] not in in_project and r["report_id"] not in done]
    tasks = [
        task_payload(r["report_id"], r["text"], r.get("institution"), r["prediction"], r.get("model"), r.get("score"))
        for r in fresh
    ]
    imported = client.import_tasks(project_id, tasks) if tasks else 0
    return PushResult(
        project_id,
        state,
        imported,
        sum(r["report_id"] in in_project for r in rows),
        sum(r["report_id"] in done and r["report_id"] not in in_project for r in rows),
    )


def pull_reviews(client: LabelStudioClient, url: str, title: str, store: Path) -> PullResult:
    """Export the project's tasks, settle and check each one's annotation, append the new ones. The
    project is only read: a title that names none is an error, not a new empty project."""
    project_id = client.find_project(title)
    if project_id is None:
        raise InputError(
            f"no Label Studio project named {title!r} at {url} (params review.project; `review push` makes it)"
        )
    result = PullResult()
    rows = review_rows(client.export_tasks(project_id), url, project_id, result)
    append_new_reviews(AppendOnlyStore(store), rows, result)
    return result
