"""Sentence-level labelling: the student reads one sentence at a time and a report takes, for each
finding, its strongest status over the sentences (present > uncertain > absent > not mentioned), then
No Finding follows the CheXpert rule. This is the rule teacher's own aggregation.

Why: on the IU locked half a student trained on whole reports scored 0.512 presence macro F1 against
0.843 to 0.858 for the same backbone trained on the teacher's labels of single sentences (README
"Evaluation").
A report holds one finding's evidence in one short sentence among a dozen; from a thousand reports the
student cannot tell which sentence carries which label, but from the teacher's labels of each sentence
alone it can. Repeated sentences ("No pneumothorax.") are labelled once, in training and inference.

The `sentences` stage writes the distinct sentences of the train split (and of its augmented variants)
and of the val split, each labelled by the pipeline's teacher with No Finding left not_mentioned: that
finding belongs to the report and is derived after aggregation.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from deberta_rad.data import normalise_text, read_reports, text_hash, write_jsonl
from deberta_rad.gold import STATUS_RANK
from deberta_rad.params import Params, SentencesParams
from deberta_rad.schema import FINDING_INDEX, FINDINGS, STATUS_INDEX, STATUSES, LabelRecord, Report
from deberta_rad.teachers.rules import RuleTeacher

NO_FINDING = FINDING_INDEX["No Finding"]
# Rank of each status index, to pick a finding's strongest status over a report's sentences.
_RANK_OF_INDEX = np.array([STATUS_RANK[status] for status in STATUSES])


@lru_cache(maxsize=1)
def _segmenter() -> RuleTeacher:
    return RuleTeacher()


def segmenter_version() -> str:
    """Names the sentence splitter (the packaged rule vocabulary's sections and breaks); a model records
    it so that a different splitter at inference can be noticed."""
    return _segmenter().info.model or "unknown"


def report_sentences(text: str) -> list[str]:
    """The sentences of the sections that describe the study, as the rule teacher reads them."""
    return _segmenter().sentences(text)


def sentence_id(sentence: str) -> str:
    return "s-" + hashlib.sha256(sentence.encode()).hexdigest()[:16]


def distinct_sentences(reports: Iterable[Report]) -> list[Report]:
    """Each sentence of the reports once, in order of first appearance, as a report of its own."""
    seen: dict[str, Report] = {}
    for report in reports:
        for sentence in report_sentences(report.text):
            seen.setdefault(sentence, Report(report_id=sentence_id(sentence), text=sentence))
    return list(seen.values())


def aggregate(probabilities: np.ndarray) -> np.ndarray:
    """A report's [13, 4] probabilities from its sentences' [k, 13, 4]: each finding takes the row of the
    sentence with the strongest status (on a tie, the one most sure of it), so the row's argmax is the
    report's status; No Finding is set by the CheXpert rule, with certainty since it is a rule. A report
    with no sentence mentions nothing."""
    report = np.zeros(probabilities.shape[1:], dtype=np.float32)
    report[:, STATUS_INDEX["not_mentioned"]] = 1.0
    if len(probabilities):
        statuses = probabilities.argmax(-1)  # [k, 13]
        strength = _RANK_OF_INDEX[statuses] + probabilities.max(-1)  # rank first, then confidence (< 1)
        winners = strength.argmax(0)  # [13]
        report = probabilities[winners, np.arange(probabilities.shape[1])].copy()
    others = np.delete(report.argmax(-1), NO_FINDING)
    positive = np.isin(others, [STATUS_INDEX["present"], STATUS_INDEX["uncertain"]]).any()
    report[NO_FINDING] = 0.0
    report[NO_FINDING, STATUS_INDEX["not_mentioned" if positive else "present"]] = 1.0
    return report


def aggregate_reports(
    sentences_per_report: Sequence[Sequence[str]], probabilities: Mapping[str, np.ndarray]
) -> np.ndarray:
    """[N, 13, 4] report probabilities from each report's sentences and every distinct sentence's [13, 4]."""
    empty = np.zeros((0, len(FINDINGS), len(STATUSES)), dtype=np.float32)
    return (
        np.stack(
            [
                aggregate(np.stack([probabilities[s] for s in sentences]) if sentences else empty)
                for sentences in sentences_per_report
            ]
        )
        if sentences_per_report
        else empty
    )


def without_no_finding(record: LabelRecord) -> LabelRecord:
    """A sentence's teacher labels with No Finding not_mentioned (it is the report's, derived later)."""
    return record.model_copy(update={"labels": {**record.labels, "No Finding": "not_mentioned"}, "evidence": None})


def label_sentence_splits(
    splits_dir: Path, augmented_dir: Path | None, output_dir: Path, params: Params
) -> dict[str, int | str | None]:
    """The `sentences` stage: the distinct sentences of train (its augmented variants, then those of
    `sentences.synthetic_reports` generated reports that train lacks, then `sentences.mention_swaps`
    variants of each train sentence) into `output_dir/train`, of val
    into `output_dir/val`, labelled by the pipeline's teacher (params `pseudo_label`; each distinct
    sentence is sent once). With `model.unit: report` both are empty."""
    from deberta_rad.teachers import label_with_pipeline_teacher

    unit, config = params.model.unit, params.sentences
    splits: dict[str, list[Report]] = {"train": [], "val": []}
    n_synthetic = n_swaps = 0
    if unit == "sentence":
        train = read_reports(splits_dir / "train" / "reports.jsonl")
        if augmented_dir is not None:
            train += read_reports(augmented_dir / "reports.jsonl")
        val, test = (read_reports(splits_dir / name / "reports.jsonl") for name in ("val", "test"))
        own = distinct_sentences(train)
        held_out = distinct_sentences([*val, *test])
        synthetic = synthetic_sentences(config, {s.report_id for s in own}, [*val, *test])
        known = {s.report_id for s in [*own, *synthetic, *held_out]}
        swaps = mention_swaps(own, config.mention_swaps, config.swap_seed, known, config.vocabulary_phrases)
        n_synthetic, n_swaps = len(synthetic), len(swaps)
        splits = {"train": own + synthetic + swaps, "val": distinct_sentences(val)}
    everything = {s.report_id: s for sentences in splits.values() for s in sentences}
    records, usage = [], None
    if everything:
        records, usage = label_with_pipeline_teacher(list(everything.values()), params.pseudo_label)
    by_id = {record.report_id: without_no_finding(record) for record in records}
    n_reviewed = n_left_out = 0
    if unit == "sentence":
        from deberta_rad.review import reviewed_sentence_examples

        reviewed = reviewed_train_reports(splits_dir)
        sentences_of = {r.report_id: [sentence_id(s) for s in report_sentences(r.text)] for r, _ in reviewed}
        corrected, examples = reviewed_sentence_examples(reviewed, by_id, sentences_of)
        if not config.review_report_examples:  # the reviews stay in the store and in val and test as gold
            n_left_out, examples = len(examples), []
        by_id |= corrected | {record.report_id: record for _, record in examples}
        splits["train"] += [report for report, _ in examples]
        n_reviewed = len(corrected) + len(examples)
    for name, sentences in splits.items():
        write_jsonl(output_dir / name / "reports.jsonl", sentences)
        write_jsonl(output_dir / name / "labels.jsonl", [by_id[s.report_id] for s in sentences])
    return {
        "unit": unit,
        "train": len(splits["train"]),
        "synthetic": n_synthetic,
        "swaps": n_swaps,
        "val": len(splits["val"]),
        "reviewed": n_reviewed,
        "reviewed_reports_left_out": n_left_out,
        "usage": usage,
    }


def reviewed_train_reports(splits_dir: Path) -> list[tuple[Report, LabelRecord]]:
    """The train split's reports that a radiologist reviewed, with the reviewed labels (`split` wrote them)."""
    from deberta_rad.review import read_reviewed

    reviewed = {record.report_id: record for record in read_reviewed(splits_dir, "train")}
    if not reviewed:
        return []
    train = read_reports(splits_dir / "train" / "reports.jsonl")
    return [(report, reviewed[report.report_id]) for report in train if report.report_id in reviewed]


def synthetic_sentences(config: SentencesParams, known: set[str], held_out: Sequence[Report]) -> list[Report]:
    """The distinct sentences not ``known`` of `synthetic_reports` generated reports, leaving out a
    generated report whose text is a val or test report's (the demo ingests the same generator: with the
    same seed its test reports would otherwise be trained on)."""
    from deberta_rad.synthetic import generate_corpus

    held_out_texts = {text_hash(normalise_text(report.text)) for report in held_out}
    generated = (
        report
        for report, _ in generate_corpus(config.synthetic_reports, seed=config.synthetic_seed)
        if text_hash(normalise_text(report.text)) not in held_out_texts
    )
    return [s for s in distinct_sentences(generated) if s.report_id not in known]


# Phrases longer than this are clauses ("heart size and mediastinal contours are normal"), not names of
# a finding: swapping them in or out would mostly make sentences no report contains.
MAX_SWAP_WORDS = 3


def mention_swaps(
    sentences: Sequence[Report], variants: int, seed: int, known: set[str], vocabulary: bool = False
) -> list[Report]:
    """Up to `variants` new sentences per sentence, each with one short phrase that names a finding (the
    rule vocabulary's evidence) replaced by a phrase that names another finding in some other sentence,
    the finding drawn uniformly: "No pneumothorax." gives "No cardiomegaly.". With ``vocabulary`` the
    phrases drawn from also hold every name the rule vocabulary spells out for the finding
    (teachers.phrases), not only those the sentences hold. None is a ``known`` sentence id. The
    pipeline's teacher labels them like any sentence.

    Why: the student only learns the phrasings its train sentences hold, and a rare finding's names occur
    in a handful of sentences while the negation and uncertainty around them occur in hundreds. Putting
    every finding's names into the contexts of the others is the transfer-set augmentation of TinyBERT
    (Jiao et al., 2020), with the teacher's labels keeping it honest."""
    if variants <= 0:
        return []
    spans = [_short_evidence(record) for record in _segmenter().label(list(sentences))]
    phrases = _phrases_by_finding(spans)
    if vocabulary:
        phrases = _with_vocabulary_phrases(phrases, sentences)
    rng = random.Random(seed)
    new: dict[str, Report] = {}
    for sentence, own in zip(sentences, spans, strict=True):
        found = [(finding, span) for finding, span in own if span in sentence.text]
        for _ in range(variants if found else 0):
            finding, span = rng.choice(found)
            others = [f for f in phrases if f != finding]
            if not others:
                break
            text = _cased_like(sentence.text, sentence.text.replace(span, rng.choice(phrases[rng.choice(others)]), 1))
            variant = Report(report_id=sentence_id(text), text=text)
            if variant.report_id not in known:
                new.setdefault(variant.report_id, variant)
    return list(new.values())


def _short_evidence(record: LabelRecord) -> list[tuple[str, str]]:
    """(finding, phrase) for each phrase of at most MAX_SWAP_WORDS words that named a finding; No Finding's
    evidence describes the whole report and is left alone."""
    return [
        (finding, phrase)
        for finding in FINDINGS
        if finding != "No Finding"
        for phrase in (record.evidence or {}).get(finding, [])
        if len(phrase.split()) <= MAX_SWAP_WORDS
    ]


def _phrases_by_finding(spans: Iterable[list[tuple[str, str]]]) -> dict[str, list[str]]:
    """Each finding's distinct phrases, lower-cased and sorted so a seed always draws the same ones."""
    phrases: dict[str, set[str]] = {}
    for own in spans:
        for finding, phrase in own:
            phrases.setdefault(finding, set()).add(phrase.lower())
    return {finding: sorted(phrases[finding]) for finding in FINDINGS if finding in phrases}


def _with_vocabulary_phrases(phrases: dict[str, list[str]], sentences: Sequence[Report]) -> dict[str, list[str]]:
    from deberta_rad.teachers.phrases import finding_phrases

    words = {word for sentence in sentences for word in sentence.text.lower().split()}
    spelt = finding_phrases(words, _segmenter())
    return {
        finding: sorted({*phrases.get(finding, []), *spelt.get(finding, [])})
        for finding in FINDINGS
        if finding in phrases or finding in spelt
    }


def _cased_like(original: str, text: str) -> str:
    """The variant starts upper-case where the sentence did (a swapped-in phrase is lower-cased)."""
    return text[:1].upper() + text[1:] if original[:1].isupper() else text
