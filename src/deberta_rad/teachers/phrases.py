r"""The rule vocabulary spelt out: the concrete phrases with which each finding's patterns name it.

Why: the sentence-level student learns only the phrasings its train sentences hold. The vocabulary names
a finding a dozen ways ("widened mediastinum", "mediastinal prominence", "thickening of the pleura"), a
corpus of a thousand reports one or two of them, so the student misses on new reports what the teacher
finds. The sentences stage swaps these phrases into train sentences (`sentences.vocabulary_phrases`).

A pattern is expanded by walking the standard library's own parse of it (`re._parser`, what
`re.compile` uses: no public API exposes a parsed pattern): every alternative and optional part is
taken, a character class gives its first character, an open word ending (`fractur\w*`) is completed
with the corpus's words that fit it, and a free word (`(?:\w+ )?`) is left out. A structure gives its
anatomy with each condition that makes the finding present or uncertain, in both word orders
("widened mediastinum", "mediastinal widening"). A phrase is kept only when the teacher itself, reading
it as a sentence, finds the finding present or uncertain: the phrases can never disagree with it.
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Iterable
from re import _constants as sre_constants
from re import _parser as sre_parser
from typing import Any

from deberta_rad.schema import FINDINGS
from deberta_rad.teachers.rules import RuleTeacher, read_vocabulary

# Longer spellings of a pattern are clauses rather than names; they would mostly make sentences no report
# contains. A structure's phrase joins two (anatomy and condition).
MAX_PHRASE_WORDS = 4
# Expansions kept per pattern part: the vocabulary's patterns stay far below it; it bounds a runaway one.
MAX_EXPANSIONS = 256
# Phrases kept per structure, a seeded sample: anatomy times conditions gives hundreds ("widening superior
# mediastinum silhouettes"), which would outnumber a finding's other names in every draw.
MAX_STRUCTURE_PHRASES = 48
_OPEN = "\x00"  # stands for an open run of word characters until the corpus's words complete it
_WORD = re.compile(r"[a-z]+")
_NAMING = ("present", "uncertain")


def finding_phrases(corpus_words: Iterable[str], teacher: RuleTeacher | None = None) -> dict[str, list[str]]:
    """Each finding's phrases (lower-case, sorted), spelt out from the packaged vocabulary with
    `corpus_words` completing open word endings, and each confirmed by `teacher` (the rule teacher)."""
    teacher = teacher or RuleTeacher()
    words = {word for word in (w.lower() for w in corpus_words) if _WORD.fullmatch(word)}
    specs = read_vocabulary().get("findings") or {}
    phrases: dict[str, list[str]] = {}
    for finding in FINDINGS:
        spec = specs.get(finding) or {}
        candidates = {p for pattern in _mention_patterns(spec) for p in spell(pattern, words)}
        candidates |= {p for structure in spec.get("structures") or [] for p in _structure_phrases(structure, words)}
        confirmed = sorted(p for p in candidates if _names(teacher, p, finding))
        if confirmed:
            phrases[finding] = confirmed
    return phrases


def spell(pattern: str, words: set[str]) -> list[str]:
    """The phrases of at most MAX_PHRASE_WORDS words that `pattern` matches, lower-case; open word endings
    completed from `words` (a phrase with a free word, or an ending no word completes, is left out)."""
    expanded = _expand(list(sre_parser.parse(pattern, re.IGNORECASE))) or []
    phrases: set[str] = set()
    for candidate in expanded:
        phrases.update(_complete(candidate.lower().split(), words))
    return sorted(p for p in phrases if 0 < len(p.split()) <= MAX_PHRASE_WORDS)


def _mention_patterns(spec: dict[str, Any]) -> list[str]:
    return [entry["pattern"] if isinstance(entry, dict) else entry for entry in spec.get("mentions") or []]


def _structure_phrases(structure: dict[str, Any], words: set[str]) -> set[str]:
    anatomy = spell(structure["anatomy"], words)
    conditions = [c for kind in _NAMING if structure.get(kind) for c in spell(structure[kind], words)]
    phrases = sorted({f"{first} {second}" for a in anatomy for c in conditions for first, second in ((c, a), (a, c))})
    return set(random.Random(structure["anatomy"]).sample(phrases, min(len(phrases), MAX_STRUCTURE_PHRASES)))


def _names(teacher: RuleTeacher, phrase: str, finding: str) -> bool:
    return teacher.label_text("phrase", phrase[:1].upper() + phrase[1:] + ".").labels[finding] in _NAMING


def _complete(parts: list[str], words: set[str]) -> list[str]:
    """The phrase with each open word ending replaced by every corpus word that fits (at most 4, in
    alphabetical order); none when a word is wholly open or no corpus word fits."""
    spelt: list[list[str]] = [[]]
    for part in parts:
        if _OPEN not in part:
            spelt = [[*done, part] for done in spelt]
            continue
        if part == _OPEN:
            return []
        fits = re.compile(re.escape(part).replace(re.escape(_OPEN), r"\w*"))
        endings = sorted(word for word in words if fits.fullmatch(word))[:4]
        spelt = [[*done, word] for done in spelt for word in endings]
    return [" ".join(done) for done in spelt]


def _expand(tokens: list[tuple[Any, Any]]) -> list[str] | None:
    """Every string a token sequence matches (with _OPEN for open word runs); None when it has a part
    that cannot be spelt out (a negated class, `.`)."""
    out = [""]
    for token in tokens:
        options = _expand_token(token)
        if options is None:
            return None
        out = list(dict.fromkeys(a + b for a in out for b in options))[:MAX_EXPANSIONS]
    return out


def _expand_token(token: tuple[Any, Any]) -> list[str] | None:
    op, value = token
    c = sre_constants
    if op == c.LITERAL:
        return [chr(value)]
    if op in (c.AT, c.ASSERT, c.ASSERT_NOT):  # boundaries and look-arounds match no text
        return [""]
    if op == c.IN:
        if _is_word_class(token):
            return [_OPEN]
        literals = [chr(v) for kind, v in value if kind == c.LITERAL]
        return literals[:1] if len(literals) == len(value) else None
    if op == c.BRANCH:
        options = [s for branch in value[1] for s in _expand(branch) or []]
        return options or None
    if op == c.SUBPATTERN:
        return _expand(value[3])
    if op in (c.MAX_REPEAT, c.MIN_REPEAT, c.POSSESSIVE_REPEAT):
        return _expand_repeat(*value)
    return None


def _expand_repeat(least: int, most: int, body: list[tuple[Any, Any]]) -> list[str] | None:
    """A repeat taken its least and one more time (an optional part: without and with); a run of word
    characters is an open ending."""
    if len(body) == 1 and _is_word_class(body[0]):
        return [_OPEN]
    inner = _expand(body)
    if inner is None:
        return [""] if least == 0 else None
    counts = range(least, min(most, least + 1) + 1)
    return list(dict.fromkeys("".join(p) for n in counts for p in itertools.product(inner, repeat=n)))


def _is_word_class(token: tuple[Any, Any]) -> bool:
    op, value = token
    return op == sre_constants.IN and any(
        kind == sre_constants.CATEGORY and v == sre_constants.CATEGORY_WORD for kind, v in value
    )
