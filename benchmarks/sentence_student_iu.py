"""Experiment: a sentence-level student against the report-level one, on the IU locked half.

    python benchmarks/sentence_student_iu.py --splits data/splits --output models/sentence-student [--epochs 3]

Not yet a product path (README "Evaluation"). The student is trained on the distinct sentences of the
train split's reports (the rule teacher's own sentence splitter), each labelled by the rule teacher
alone; No Finding is left to the report. At inference every sentence of a report is labelled and a
finding takes its strongest status over the sentences (present > uncertain > absent > not mentioned),
then No Finding follows the CheXpert rule: the rule teacher's aggregation. Scores presence macro F1 on
both IU halves, sentence-level and, with the same model, on whole reports. Train the splits with only
the development half in ingest.sources (`iu_half.py`) for the locked half to be unseen. Prints scores only.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from collections.abc import Sequence
from pathlib import Path

from teachers_iu import DEFAULT_DATA, iu_subsets

from deberta_rad.evaluate import presence_metrics
from deberta_rad.gold import STATUS_RANK, iu_presence_gold
from deberta_rad.predict import LabelingEngine, load_engine
from deberta_rad.schema import FINDINGS, STATUSES, Report, apply_no_finding_rule
from deberta_rad.teachers.rules import RuleTeacher
from deberta_rad.train import TrainConfig, read_split, train_student

Labels = dict[str, dict[str, str]]


def sentence_examples(teacher: RuleTeacher, reports: Sequence[Report]) -> tuple[list[Report], Labels]:
    """Each distinct sentence once, as a report of its own with the teacher's labels of it alone."""
    labels: Labels = {}
    examples = []
    for report in reports:
        for sentence in teacher.sentences(report.text):
            sentence_id = hashlib.sha256(sentence.encode()).hexdigest()[:16]
            if sentence_id in labels:
                continue
            statuses = dict(teacher.label_text(sentence_id, sentence).labels)
            labels[sentence_id] = {**statuses, "No Finding": "not_mentioned"}
            examples.append(Report(report_id=sentence_id, text=sentence))
    return examples, labels


def by_sentence(engine: LabelingEngine, teacher: RuleTeacher, reports: Sequence[Report]) -> Labels:
    """Label every sentence, keep each finding's strongest status per report, then the No Finding rule."""
    owners, sentences = [], []
    for report in reports:
        for sentence in teacher.sentences(report.text):
            owners.append(report.report_id)
            sentences.append(sentence)
    statuses = engine.predict(sentences).statuses
    labels = {report.report_id: dict.fromkeys(FINDINGS, "not_mentioned") for report in reports}
    for owner, row in zip(owners, statuses, strict=True):
        for finding, index in zip(FINDINGS, row, strict=True):
            if STATUS_RANK[STATUSES[index]] > STATUS_RANK[labels[owner][finding]]:
                labels[owner][finding] = STATUSES[index]
    return {report_id: apply_no_finding_rule(statuses) for report_id, statuses in labels.items()}


def by_report(engine: LabelingEngine, reports: Sequence[Report]) -> Labels:
    statuses = engine.predict([report.text for report in reports]).statuses
    return {
        r.report_id: dict(zip(FINDINGS, map(STATUSES.__getitem__, row), strict=True))
        for r, row in zip(reports, statuses, strict=True)
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--splits", type=Path, default=Path("data/splits"), help="folder written by `split`")
    parser.add_argument("--output", type=Path, required=True, help="where to save the sentence-level student")
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="IU X-ray dev.jsonl")
    args = parser.parse_args()
    teacher = RuleTeacher()
    train, train_labels = sentence_examples(teacher, read_split(args.splits, "train")[0])
    val, val_labels = sentence_examples(teacher, read_split(args.splits, "val")[0])
    val = [sentence for sentence in val if sentence.report_id not in train_labels]
    print(f"distinct sentences: train {len(train)}, val {len(val)}")
    started = time.perf_counter()
    config = TrainConfig(max_length=64, epochs=args.epochs, repeat_threshold=0.1)
    student, _ = train_student(
        train, val, {**train_labels, **val_labels}, config, args.output.parent / f"{args.output.name}-checkpoints"
    )
    student.save(args.output)
    print(f"trained in {(time.perf_counter() - started) / 60:.1f} min")

    gold = iu_presence_gold(args.data)
    subsets, _ = iu_subsets(args.data, gold)
    engine = load_engine(args.output)
    for subset in ("development", "locked"):
        reports = subsets[subset]
        subset_gold = {r.report_id: gold[r.report_id] for r in reports}
        sentence_f1 = presence_metrics(by_sentence(engine, teacher, reports), subset_gold)["macro_f1"]
        report_f1 = presence_metrics(by_report(engine, reports), subset_gold)["macro_f1"]
        print(f"{subset:12s} presence macro F1: by sentence {sentence_f1:.3f}, on whole reports {report_f1:.3f}")


if __name__ == "__main__":
    main()
