"""Teacher-labelled augmentation for distillation: more training reports, recombined from the train
split's own sentences and labelled by the same teacher.

Why: the student fits its teacher's labels on the train split almost perfectly yet disagrees with it
on unseen reports, mostly on rare findings whose phrasings it met a handful of times. New contexts for
those sentences help, and since the teacher labels every recombined report afresh (as TinyBERT's
augmentation does), the labels stay exactly the teacher's; nothing is inferred from the source labels.

No leak: only train reports are recombined, sentences travel only between reports of the same
institution (its writing style), and a recombined text equal to a val or test text is left out (and
counted), since IU's recurring normal reports make such collisions likely.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from deberta_rad.data import (
    InputError,
    iter_reports,
    labels_by_id,
    memory_source,
    normalise_text,
    read_label_records,
    replaced_together,
    text_hash,
    write_jsonl,
)
from deberta_rad.params import AugmentParams, Params
from deberta_rad.schema import Report
from deberta_rad.teachers.rules import split_sentences

AUGMENTED_SUFFIX = "~aug"
# A section header such as "FINDINGS:" or "IMPRESSION:" at the start of a line.
_HEADER = re.compile(r"(?m)^[ \t]*([A-Z][A-Z /]{2,}:)")


def sections(text: str) -> list[tuple[str, list[str]]]:
    """A report as (header, sentences) pairs; text before the first header has the header "", and a
    header with no sentence under it is left out (a variant would render nothing there either)."""
    parts = _HEADER.split(text)
    pairs = [("", parts[0]), *zip(parts[1::2], parts[2::2], strict=True)]
    return [(header, sentences) for header, body in pairs if (sentences := split_sentences(body))]


def _render(parts: Sequence[tuple[str, list[str]]]) -> str:
    return "\n".join(" ".join([header, *sentences]).strip() for header, sentences in parts if sentences)


def recombined(
    base: Sequence[tuple[str, list[str]]],
    donors: Sequence[Sequence[tuple[str, list[str]]]],
    config: AugmentParams,
    rng: random.Random,
) -> str:
    """One variant of a report given as `sections`: each sentence dropped with probability `drop`
    (every section keeps one), then `borrow` sentences from donor reports inserted at random places
    in the section of the same header (or any section, when the base has none of that name)."""
    parts = [(header, _kept(sentences, config.drop, rng)) for header, sentences in base]
    for _ in range(config.borrow if donors else 0):
        header, sentences = rng.choice(rng.choice(donors))
        target = next((kept for name, kept in parts if name == header), None) or rng.choice(parts)[1]
        target.insert(rng.randint(0, len(target)), rng.choice(sentences))
    return normalise_text(_render(parts))


def _kept(sentences: list[str], drop: float, rng: random.Random) -> list[str]:
    kept = [s for s in sentences if rng.random() >= drop]
    return kept or [rng.choice(sentences)]


class _AllBut(Sequence):
    """An institution's reports but one, as a view: a filtered copy per report would make the stage
    quadratic in the train split (hours at 200,000 reports)."""

    def __init__(self, items: Sequence[list[tuple[str, list[str]]]], skipped: int) -> None:
        self.items, self.skipped = items, skipped

    def __len__(self) -> int:
        return len(self.items) - 1

    def __getitem__(self, index: int) -> list[tuple[str, list[str]]]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.items[index + (index >= self.skipped)]


def variant_counts(
    train: Sequence[Report], labels: Mapping[str, Mapping[str, str]], config: AugmentParams
) -> list[int]:
    """Variants per train report: `per_report` times the report's repeat factor (train.repeat_factors,
    LVIS-style) at `rare_threshold`, so a rare pair such as a present pneumothorax is met in more new
    contexts rather than in more copies of the same text."""
    from deberta_rad.train import repeat_factors, status_matrix  # lazy: train imports torch

    targets = status_matrix([r.report_id for r in train], labels)
    return [config.per_report * int(f) for f in repeat_factors(targets, config.rare_threshold, config.seed)]


def augment_reports(
    train: Sequence[Report],
    config: AugmentParams,
    held_out_texts: Iterable[str] = (),
    counts: Sequence[int] | None = None,
) -> tuple[list[Report], int]:
    """`counts[i]` (default `per_report`) recombined variants of train report i, ids `<id>~aug<k>`;
    returns them and the count left out because the text already exists (in train, among the
    variants, or held out)."""
    rng = random.Random(config.seed)
    parsed = {report.report_id: sections(report.text) for report in train}
    by_institution: dict[str | None, list[list[tuple[str, list[str]]]]] = defaultdict(list)
    position: dict[str, int] = {}
    for report in train:
        if parsed[report.report_id]:
            position[report.report_id] = len(by_institution[report.institution])
            by_institution[report.institution].append(parsed[report.report_id])
    seen = {text_hash(normalise_text(text)) for text in held_out_texts}
    seen.update(text_hash(normalise_text(report.text)) for report in train)
    variants, collisions = [], 0
    for report, count in zip(train, counts or [config.per_report] * len(train), strict=True):
        if not parsed[report.report_id]:
            continue  # an empty report has nothing to recombine
        donors = _AllBut(by_institution[report.institution], position[report.report_id])
        for k in range(count):
            digest = text_hash(text := recombined(parsed[report.report_id], donors, config, rng))
            if digest in seen:
                collisions += 1
                continue
            seen.add(digest)
            variant_id = f"{report.report_id}{AUGMENTED_SUFFIX}{k}"
            variants.append(report.model_copy(update={"report_id": variant_id, "text": text}))
    return variants, collisions


def augment_splits(splits_dir: Path, output_dir: Path, params: Params, workers: int = 1) -> dict[str, int | str | None]:
    """The augment stage: recombine the train split, label the variants with the pipeline's teacher
    (params `pseudo_label`, on `workers` processes for a local one), write `reports.jsonl` and
    `labels.jsonl` to `output_dir` (both empty when `augment.per_report` is 0: then the train split is
    only counted, as a stream). The train split is held whole (any train report may lend a sentence), the
    held-out splits only as text digests. The two files are put in place together once the variants are
    labelled (`replaced_together`): a teacher that fails leaves the old pair, never new variants beside old
    labels of the same ids. Returns the counts and, for the LLM teacher, its usage line."""
    from deberta_rad.teachers import write_labels

    config = params.augment
    train_path = splits_dir / "train" / "reports.jsonl"
    with replaced_together(output_dir / "reports.jsonl", output_dir / "labels.jsonl") as (reports_file, labels_file):
        if config.per_report == 0:
            n_train = sum(1 for _ in iter_reports(train_path, workers))
            write_jsonl(reports_file, [])
            write_jsonl(labels_file, [])
            return {"train_reports": n_train, "variants": 0, "duplicates_left_out": 0, "usage": None}
        train = list(iter_reports(train_path, workers))
        labels_path = splits_dir / "train" / "labels.jsonl"
        try:
            counts = variant_counts(train, labels_by_id(read_label_records(labels_path)), config)
        except KeyError as err:  # status_matrix names the unlabelled reports
            raise InputError(f"{labels_path}: {err.args[0]}") from None
        held_out = (
            r.text for name in ("val", "test") for r in iter_reports(splits_dir / name / "reports.jsonl", workers)
        )
        variants, collisions = augment_reports(train, config, held_out, counts)
        write_jsonl(reports_file, variants)
        teacher = params.pseudo_label
        cache = Path(teacher.cache) if teacher.cache else None
        _, usage = write_labels(
            labels_file,
            memory_source(variants),
            teacher.teacher,
            workers,
            teacher.llm_model,
            cache,
            batch=teacher.batch,
        )
    return {"train_reports": len(train), "variants": len(variants), "duplicates_left_out": collisions, "usage": usage}
