"""Rule-based chest X-ray report labeler (CheXpert/NegBio family): the offline default teacher.

The rules are data (`vocabulary.yaml`); this module only interprets them. Steps per report:
remove de-identification placeholders, keep the sections that describe the current study, split them
into sentences, find finding mentions (terms such as "effusion", and anatomy bound to its stated
condition such as "heart size ... is enlarged"), classify each mention as present/absent/uncertain from
the negation and uncertainty cues whose scope reaches it, and aggregate the mentions of a finding the
CheXpert way (present > uncertain > absent).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from deberta_rad.schema import FINDINGS, LabelRecord, Report, TeacherInfo, apply_no_finding_rule

FLAGS = re.IGNORECASE
STATUS_RANK = {"present": 3, "uncertain": 2, "absent": 1}
MAX_EVIDENCE_CHARS = 60
MAX_EVIDENCE_SPANS = 5
NEVER = r"(?!)"
WORD = re.compile(r"\S+")
PARAGRAPH_END = re.compile(r"\S.*?\n[ \t]*\n", re.DOTALL)
# Sentences end at . ! ? ; (not after an abbreviation such as "vs." or an item number such as "1."), a
# blank line or before a numbered item.
SENTENCE_BREAK = re.compile(
    r"(?<=[.!?;])(?<!\bvs\.)(?<!\bVs\.)(?<!e\.g\.)(?<!i\.e\.)(?<!\bDr\.)(?<!\b\d\.)(?<!\b\d\d\.)\s+"
    r"|(?<=[a-z]\.)(?=[A-Z])|\n\s*\n|\s+(?=\d{1,2}[.)]\s)"
)
SPACES = re.compile(r"[ \t]{2,}")


def split_sentences(text: str) -> list[str]:
    """The project's one sentence splitter (the rule teacher's, the sentence-level student's, augmentation's
    and the keyword baseline's): line breaks within a paragraph joined, then cut at SENTENCE_BREAK;
    pieces of bare punctuation dropped."""
    flat = SPACES.sub(" ", re.sub(r"[ \t]*\n[ \t]*(?!\s*\n)", " ", text))
    return [piece.strip() for piece in SENTENCE_BREAK.split(flat) if piece and piece.strip(" .,;:")]


# The grammar of conditions ("the heart is enlarged"): a copula separates subject and predicate, words
# such as these may stand in a list of anatomy without ending it, and semicolons or brackets end a clause.
COPULA = re.compile(r"\b(?:is|are|was|were|be|been|being|appears?|remains?|seems?|looks?)\b", FLAGS)
LIST_FILLER = re.compile(
    r"(?:[\s,:/&-]|\b(?:and|or|nor|of|the|both|as well as|also|again|itself|overall|otherwise|still|now|all|each)\b)*",
    FLAGS,
)
ATTRIBUTIVE_GAP = re.compile(r"\s*-?\s*|\s+(?:of|in)\s+(?:the\s+|a\s+)?", FLAGS)
CLAUSE_BREAK = re.compile(r"[;()]")
NOT_BEFORE = re.compile(r"\bnot\s*\Z", FLAGS)
MAX_PREDICATE_WORDS = 4
FINDING_KEYS = frozenset({"mentions", "structures", "exclusions"})
CONDITION_KINDS = ("present", "uncertain", "normal")  # what a stated condition of anatomy means, checked in order
DEGREE_ADVERBS = re.compile(r"(?:\s+\w+ly)+\s*\Z", FLAGS)  # "mildly", "moderately", "stably" before a condition


def _compile(patterns: Iterable[str]) -> re.Pattern[str]:
    """One case-insensitive alternation matched on word boundaries; an empty list never matches."""
    patterns = [_checked(p) for p in patterns]
    return re.compile("|".join(f"(?<!\\w)(?:{p})(?!\\w)" for p in patterns) or NEVER, FLAGS)


def _compile_whole(patterns: Iterable[str]) -> re.Pattern[str]:
    """A case-insensitive alternation for `fullmatch` against one condition; an empty list never matches."""
    return re.compile("|".join(f"(?:{_checked(p)})" for p in patterns) or NEVER, FLAGS)


def _checked(pattern: str) -> str:
    """A vocabulary pattern that compiles on its own, or a ValueError that quotes it."""
    try:
        re.compile(pattern)
    except (re.error, TypeError) as err:
        raise ValueError(f"vocabulary pattern {pattern!r} is not a valid regular expression: {err}") from None
    return pattern


def _compile_optional(pattern: str | None) -> re.Pattern[str] | None:
    """A sentence-context condition; None means no condition."""
    return re.compile(pattern, FLAGS) if pattern else None


@dataclass(frozen=True)
class MentionRule:
    """One mention pattern with the sentence context it needs and the certainty it carries."""

    pattern: re.Pattern[str]
    context: re.Pattern[str] | None = None
    not_context: re.Pattern[str] | None = None
    uncertain: bool = False

    @classmethod
    def from_entry(cls, entry: dict[str, Any]) -> MentionRule:
        return cls(
            pattern=_compile([entry["pattern"]]),
            context=_compile_optional(entry.get("context")),
            not_context=_compile_optional(entry.get("not_context")),
            uncertain=entry.get("certainty") == "uncertain",
        )

    def applies_to(self, sentence: str) -> bool:
        if self.context is not None and not self.context.search(sentence):
            return False
        return self.not_context is None or not self.not_context.search(sentence)


@dataclass(frozen=True)
class StructureRule:
    """Anatomy whose stated condition decides a finding: which conditions make it present, uncertain, absent."""

    anatomy: re.Pattern[str]
    present: re.Pattern[str]
    uncertain: re.Pattern[str]
    normal: re.Pattern[str]

    @classmethod
    def from_entry(cls, entry: dict[str, Any], shared_normal: list[str]) -> StructureRule:
        return cls(
            anatomy=_compile([entry["anatomy"]]),
            present=_compile_whole([entry["present"]] if entry.get("present") else []),
            uncertain=_compile_whole([entry["uncertain"]] if entry.get("uncertain") else []),
            normal=_compile_whole(shared_normal + ([entry["normal"]] if entry.get("normal") else [])),
        )

    def condition(self, state: str) -> str | None:
        """present / uncertain / normal for a condition of this anatomy; None for another finding's."""
        for kind in CONDITION_KINDS:
            if getattr(self, kind).fullmatch(state):
                return kind
        return None


@dataclass(frozen=True)
class FindingRules:
    """Mention, anatomy and exclusion patterns of one finding."""

    mentions: tuple[MentionRule, ...]
    structures: tuple[StructureRule, ...]
    exclusions: re.Pattern[str]
    trigger: re.Pattern[str]  # any mention or anatomy: most sentences are skipped after one search


@dataclass(frozen=True)
class Cues:
    """Compiled global cue lists; see the comments in vocabulary.yaml for their meaning."""

    pre_negation: re.Pattern[str]
    post_negation: re.Pattern[str]
    pre_uncertainty: re.Pattern[str]
    post_uncertainty: re.Pattern[str]
    pseudo: re.Pattern[str]
    ignore: re.Pattern[str]
    terminators: re.Pattern[str]
    negation_terminators: re.Pattern[str]
    pre_max_words: int
    pre_uncertainty_max_words: int
    post_max_words: int
    list_max_words: int


@dataclass(frozen=True)
class Vocabulary:
    """The whole rule set, compiled once."""

    version: str
    findings: dict[str, FindingRules]
    cues: Cues
    ignored_sections: re.Pattern[str]
    headers: re.Pattern[str]
    normal_report: re.Pattern[str]
    placeholders: re.Pattern[str]
    states: re.Pattern[str]  # every condition any anatomy can have, longest alternatives first
    anatomy: re.Pattern[str]  # every anatomy, the findings' and the list-only `other_anatomy`


@dataclass(frozen=True)
class Cue:
    """A cue occurrence in a sentence: its kind ('absent', 'uncertain', 'ignore') and span."""

    kind: str
    start: int
    end: int
    before: bool  # True for cues that scope forward (pre-mention), False for backward ones


class ParsedSentence:
    """One sentence with its cues and conditions, found once and shared by every finding's rules."""

    def __init__(self, text: str, teacher: RuleTeacher) -> None:
        self.text = text
        self._teacher = teacher

    @cached_property
    def cues(self) -> list[Cue]:
        return self._teacher._cues_in(self.text)

    @cached_property
    def states(self) -> list[re.Match[str]]:
        return list(self._teacher.vocabulary.states.finditer(self.text))


@dataclass
class FindingVotes:
    """Mention statuses of one finding in one report, with the spans that produced them."""

    statuses: list[str] = field(default_factory=list)
    spans: dict[str, list[str]] = field(default_factory=dict)

    def add(self, status: str, span: str) -> None:
        self.statuses.append(status)
        self.spans.setdefault(status, []).append(span[:MAX_EVIDENCE_CHARS])

    def aggregate(self) -> str:
        """CheXpert aggregation: a positive mention beats an uncertain one, which beats a negative."""
        if not self.statuses:
            return "not_mentioned"
        return max(self.statuses, key=STATUS_RANK.__getitem__)


def read_vocabulary(path: str | Path | None = None) -> dict[str, Any]:
    """The vocabulary file as written (patterns uncompiled); the packaged file unless a path is given."""
    if path is None:
        text = resources.files("deberta_rad.teachers").joinpath("vocabulary.yaml").read_text("utf-8")
    else:
        text = Path(path).read_text("utf-8")
    data = yaml.safe_load(text)
    if not isinstance(data, dict) or "version" not in data:
        raise ValueError(f"vocabulary {path or 'vocabulary.yaml'} has no `version` key")
    return data


def load_vocabulary(path: str | Path | None = None) -> Vocabulary:
    """Read and compile the vocabulary; the packaged file unless a path is given."""
    data = read_vocabulary(path)
    specs = {name: spec or {} for name, spec in (data.get("findings") or {}).items()}
    unknown = [name for name in specs if name not in FINDINGS]
    if unknown:
        raise ValueError(f"vocabulary names unknown findings: {unknown}")
    for name, spec in specs.items():
        keys = sorted(set(spec) - FINDING_KEYS)
        if keys:
            raise ValueError(
                f"vocabulary finding {name!r} has unknown keys {keys}; a finding takes {sorted(FINDING_KEYS)} "
                "(`normal` phrases became `structures` in vocabulary 2)"
            )
    sections = data.get("sections", {})
    states = data.get("states", {})
    shared_normal = list(states.get("normal", []))
    structures = [entry for spec in specs.values() for entry in spec.get("structures") or []]
    for entry in structures:
        if not isinstance(entry, dict) or "anatomy" not in entry:
            raise ValueError(f"vocabulary structure {entry!r} needs an `anatomy` pattern")
    conditions = shared_normal + states.get("neutral", [])
    conditions += [entry[kind] for entry in structures for kind in CONDITION_KINDS if entry.get(kind)]
    return Vocabulary(
        version=str(data["version"]),
        findings={name: _finding_rules(spec, shared_normal) for name, spec in specs.items()},
        cues=_cues(data.get("cues", {}), data.get("scope", {})),
        ignored_sections=re.compile("(?:" + ("|".join(sections.get("ignored", [])) or NEVER) + r")\Z", FLAGS),
        headers=_header_pattern(sections.get("known", [])),
        normal_report=_compile(data.get("normal_report", [])),
        placeholders=re.compile("|".join(_checked(p) for p in data.get("placeholders", [])) or NEVER, FLAGS),
        states=_compile(sorted(conditions, key=len, reverse=True)),
        anatomy=_compile([entry["anatomy"] for entry in structures] + states.get("other_anatomy", [])),
    )


def _finding_rules(spec: dict[str, Any], shared_normal: list[str]) -> FindingRules:
    mentions = [entry if isinstance(entry, dict) else {"pattern": entry} for entry in spec.get("mentions", [])]
    structures = spec.get("structures") or []
    return FindingRules(
        mentions=tuple(MentionRule.from_entry(entry) for entry in mentions),
        structures=tuple(StructureRule.from_entry(entry, shared_normal) for entry in structures),
        exclusions=_compile(spec.get("exclusions") or []),
        trigger=_compile([entry["pattern"] for entry in mentions] + [entry["anatomy"] for entry in structures]),
    )


def _cues(spec: dict[str, list[str]], scope: dict[str, int]) -> Cues:
    return Cues(
        pre_negation=_compile(spec.get("pre_negation", [])),
        post_negation=_compile(spec.get("post_negation", [])),
        pre_uncertainty=_compile(spec.get("pre_uncertainty", [])),
        post_uncertainty=_compile(spec.get("post_uncertainty", [])),
        pseudo=_compile(spec.get("pseudo", [])),
        ignore=_compile(spec.get("ignore", [])),
        terminators=_compile(spec.get("terminators", [])),
        negation_terminators=_compile(spec.get("negation_terminators", [])),
        pre_max_words=int(scope.get("pre_max_words", 15)),
        pre_uncertainty_max_words=int(scope.get("pre_uncertainty_max_words", 10)),
        post_max_words=int(scope.get("post_max_words", 8)),
        list_max_words=int(scope.get("list_max_words", 10)),
    )


def _header_pattern(known: list[str]) -> re.Pattern[str]:
    """A header is `Name:` at a line start (up to 40 letters), or a known name in capitals anywhere.

    Known names are matched case-sensitively in capitals so that prose such as "history of" inside a
    sentence never opens a section; they must therefore be plain words without backslash escapes.
    """
    if any("\\" in name for name in known):
        raise ValueError("section names in `sections.known` must not use backslash escapes")
    caps = "|".join(f"(?:{name.upper()})" for name in known) or NEVER
    line_start = r"^[ \t]*(?P<line>[A-Za-z][A-Za-z /&()-]{0,40}?)[ \t]*:"
    return re.compile(f"{line_start}|(?<![A-Za-z])(?P<caps>{caps})(?=[ \t]*:)", re.MULTILINE)


class RuleTeacher:
    """Negation- and uncertainty-aware rule labeler driven by a versioned vocabulary file."""

    def __init__(self, vocabulary_path: str | Path | None = None) -> None:
        self.vocabulary = load_vocabulary(vocabulary_path)
        self.info = TeacherInfo(name="rules", model=f"vocabulary-{self.vocabulary.version}")

    def label(self, reports: Sequence[Report]) -> list[LabelRecord]:
        """Label every report, in input order."""
        return [self.label_text(report.report_id, report.text) for report in reports]

    def label_text(self, report_id: str, text: str) -> LabelRecord:
        """Label one report text; evidence keeps only the short matched phrases, never sentences."""
        votes = {finding: FindingVotes() for finding in self.vocabulary.findings}
        normal_phrases: list[str] = []
        for text_of_sentence in self.sentences(text):
            sentence = ParsedSentence(text_of_sentence, self)
            for finding, rules in self.vocabulary.findings.items():
                self._vote_sentence(sentence, rules, votes[finding])
            normal_phrases += [m.group(0) for m in self.vocabulary.normal_report.finditer(text_of_sentence)]
        labels = apply_no_finding_rule({finding: v.aggregate() for finding, v in votes.items()})
        evidence = {
            finding: _dedupe(votes[finding].spans.get(status, []))
            for finding, status in labels.items()
            if finding in votes and status != "not_mentioned"
        }
        if labels["No Finding"] == "present" and normal_phrases:
            evidence["No Finding"] = _dedupe(normal_phrases)
        return LabelRecord(report_id=report_id, labels=labels, teacher=self.info, evidence=evidence)

    def sentences(self, text: str) -> list[str]:
        """Sentences of the sections that describe this study (unsectioned text counts), placeholders removed."""
        sections = self._scored_sections(self.vocabulary.placeholders.sub("", text))
        return [sentence for section in sections for sentence in split_sentences(section)]

    def _scored_sections(self, text: str) -> list[str]:
        """Cut the text at section headers; of an ignored section keep only what follows its paragraph.

        A header that names anatomy ("Heart: normal size.") stays part of its section's text.
        """
        kept: list[str] = []
        start, ignored = 0, False
        for header in self.vocabulary.headers.finditer(text):
            kept.append(_after_paragraph(text[start : header.start()]) if ignored else text[start : header.start()])
            name = " ".join((header.group("line") or header.group("caps") or "").split())
            ignored = bool(self.vocabulary.ignored_sections.match(name))
            start = header.end()
            if not ignored and self.vocabulary.anatomy.fullmatch(name):
                start = header.start("line") if header.group("line") else header.start("caps")
        kept.append(_after_paragraph(text[start:]) if ignored else text[start:])
        return kept

    def _vote_sentence(self, sentence: ParsedSentence, rules: FindingRules, votes: FindingVotes) -> None:
        if not rules.trigger.search(sentence.text):
            return
        excluded = _spans(rules.exclusions, sentence.text)  # grows with each mention: one vote per phrase
        for rule in rules.mentions:
            if not rule.applies_to(sentence.text):
                continue
            for match in rule.pattern.finditer(sentence.text):
                if _overlaps(match.span(), excluded):
                    continue
                excluded.append(match.span())
                self._vote_mention(sentence, match.start(), match.end(), rule.uncertain, votes)
        for structure in rules.structures:
            for anatomy in structure.anatomy.finditer(sentence.text):
                if not _overlaps(anatomy.span(), excluded):
                    self._vote_condition(sentence, structure, anatomy, votes, excluded)

    def _vote_condition(
        self,
        sentence: ParsedSentence,
        structure: StructureRule,
        anatomy: re.Match[str],
        votes: FindingVotes,
        excluded: list[tuple[int, int]],
    ) -> None:
        """Vote for the condition bound to one anatomy mention: normal is absent, else the cues decide."""
        state = self._bound_condition(sentence, anatomy)
        kind = structure.condition(state.group(0)) if state else None
        if state is None or kind is None:
            return
        start, end = min(anatomy.start(), state.start()), max(anatomy.end(), state.end())
        excluded.append((start, end))
        if kind == "normal":
            if not NOT_BEFORE.search(sentence.text[: state.start()]):  # "not normal" says nothing
                votes.add("absent", sentence.text[start:end])
            return
        self._vote_mention(sentence, start, end, kind == "uncertain", votes)

    def _vote_mention(self, sentence: ParsedSentence, start: int, end: int, hedged: bool, votes: FindingVotes) -> None:
        """Vote the status the cues give the mention at [start, end); a phrase that is itself only a
        suggestion (`hedged`) is at most uncertain, and a finding only asked about gets no vote."""
        status = self._mention_status(sentence.text, start, end, sentence.cues)
        if status == "ignore":
            return
        votes.add("uncertain" if status == "present" and hedged else status, sentence.text[start:end])

    def _bound_condition(self, sentence: ParsedSentence, anatomy: re.Match[str]) -> re.Match[str] | None:
        """The condition stated of this anatomy: an adjective right before it ("enlarged heart"), else the
        first condition after it across a list and a copula ("heart size and X are normal"), else one that
        heads the list it is in ("normal heart size, X and Y")."""
        text = sentence.text
        before = [s for s in sentence.states if s.end() <= anatomy.start()]
        after = [s for s in sentence.states if s.start() >= anatomy.end()]
        if before and ATTRIBUTIVE_GAP.fullmatch(text[before[-1].end() : anatomy.start()]):
            return before[-1]
        if after and self._predicate_reaches(text[anatomy.end() : after[0].start()]):
            return after[0]
        if before and self._is_list(text[before[-1].end() : anatomy.start()]):
            return before[-1]
        return None

    def _predicate_reaches(self, gap: str) -> bool:
        """Is `gap` a list of anatomy, then optionally a copula and a few words ("is again mildly")?"""
        copula = COPULA.search(gap)
        if copula is None:  # telegraphic: "heart size mildly enlarged"
            return self._is_list(DEGREE_ADVERBS.sub("", gap))
        predicate = gap[copula.end() :]
        return (
            self._is_list(gap[: copula.start()])
            and "," not in predicate
            and len(WORD.findall(predicate)) <= MAX_PREDICATE_WORDS
            and not self._breaks_clause(predicate)
        )

    def _is_list(self, gap: str) -> bool:
        """Only anatomy, conjunctions and commas, within the list word limit and one clause."""
        if self._breaks_clause(gap) or len(WORD.findall(gap)) > self.vocabulary.cues.list_max_words:
            return False
        return LIST_FILLER.fullmatch(self.vocabulary.anatomy.sub(" ", gap)) is not None

    def _breaks_clause(self, gap: str) -> bool:
        return bool(CLAUSE_BREAK.search(gap) or self.vocabulary.cues.terminators.search(gap))

    def _cues_in(self, sentence: str) -> list[Cue]:
        """All cue occurrences of a sentence, minus those inside pseudo-cues or double negations."""
        c = self.vocabulary.cues
        blocked = _spans(c.pseudo, sentence)
        uncertain = [
            Cue("uncertain", *span, before=before)
            for pattern, before in ((c.pre_uncertainty, True), (c.post_uncertainty, False))
            for span in _spans(pattern, sentence)
            if not _overlaps(span, blocked)
        ]
        blocked += [(cue.start, cue.end) for cue in uncertain]
        negations = [
            Cue("absent", *span, before=before)
            for pattern, before in ((c.pre_negation, True), (c.post_negation, False))
            for span in _spans(pattern, sentence)
            if not _overlaps(span, blocked)
        ]
        ignores = [Cue("ignore", *span, before=True) for span in _spans(c.ignore, sentence)]
        return uncertain + negations + ignores

    def _mention_status(self, sentence: str, start: int, end: int, cues: list[Cue]) -> str:
        """Status of the mention at [start, end): the nearest cue whose scope reaches it decides."""
        best: tuple[int, int, str] | None = None
        for cue in cues:
            distance = self._scope_distance(sentence, start, end, cue, cues)
            if distance is None:
                continue
            # Ties go to uncertainty (double negation such as "not excluded" overlaps "not").
            candidate = (distance, 0 if cue.kind == "uncertain" else 1, cue.kind)
            if best is None or candidate < best:
                best = candidate
        return best[2] if best else "present"

    def _scope_distance(self, sentence: str, start: int, end: int, cue: Cue, cues: list[Cue]) -> int | None:
        """Characters between cue and mention when the cue's scope reaches the mention, else None.

        The scope is cut by a word limit, a terminator, or another cue lying between the two.
        """
        c = self.vocabulary.cues
        if cue.start >= start and cue.end <= end:
            return 0  # inside the mention: "heart is not enlarged"
        if cue.before and cue.end <= start:
            gap_start, gap_end = cue.end, start
            limit = c.pre_uncertainty_max_words if cue.kind == "uncertain" else c.pre_max_words
        elif not cue.before and cue.start >= end:
            gap_start, gap_end = end, cue.start
            limit = c.post_max_words
        else:
            return None
        gap = sentence[gap_start:gap_end]
        if len(WORD.findall(gap)) > limit or c.terminators.search(gap) or (not cue.before and "," in gap):
            return None
        if cue.kind == "absent" and c.negation_terminators.search(gap):
            return None
        if any(gap_start <= other.start and other.end <= gap_end for other in cues):
            return None
        return len(gap)


def _after_paragraph(section: str) -> str:
    """Text after the first blank line that follows some text (unheaded findings after an indication)."""
    end = PARAGRAPH_END.search(section)
    return section[end.end() :] if end else ""


def _spans(pattern: re.Pattern[str], text: str) -> list[tuple[int, int]]:
    return [m.span() for m in pattern.finditer(text)]


def _overlaps(span: tuple[int, int], others: list[tuple[int, int]]) -> bool:
    return any(span[0] < other_end and other_start < span[1] for other_start, other_end in others)


def _dedupe(spans: list[str]) -> list[str]:
    """Distinct spans (case-insensitively), first occurrences, at most MAX_EVIDENCE_SPANS."""
    seen: dict[str, str] = {}
    for span in spans:
        seen.setdefault(span.lower(), span)
    return list(seen.values())[:MAX_EVIDENCE_SPANS]
