"""Rule-based answer matching: multiple choice, numbers, short free-form text (SPEC §4, ``acc``).

Matchers live in a registry (``@register_matcher("name")``, :func:`get_matcher`); :func:`accuracy`
dispatches through it. ``"auto"`` picks ``choice`` / ``number`` / ``text`` from the ground truth.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Callable, Sequence

from visionleaf.registry import Registry

MAX_ANSWER_CHARS = 1000
"""Answers longer than this (characters) get acc 0, whatever they contain."""

MatcherFn = Callable[[str, str, Sequence[str]], float]
"""``fn(answer, ground_truth, options) -> score in [0, 1]``; ``options[0]`` is letter A."""

MATCHER_REGISTRY: Registry[MatcherFn] = Registry("matcher")
register_matcher = MATCHER_REGISTRY.register
"""Decorator: register ``fn(answer, ground_truth, options) -> float`` as a matcher name."""
get_matcher = MATCHER_REGISTRY.get
"""The registered matcher of a name; a ``KeyError`` lists the valid names on a miss."""


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_text(text: str) -> str:
    """Lowercase, drop punctuation and the articles a/an/the, collapse whitespace (SQuAD-style)."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCT))
    return " ".join(text.split())


_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")
_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
_WORD_NUMBERS = {word: float(i) for i, word in enumerate(_WORDS)}
"""Spelled-out numbers 0..10 that :func:`parse_number` accepts."""


def parse_number(text: str, strict: bool = True) -> float | None:
    """The number ``text`` states (``3``, ``3.0``, ``1,000``, ``50%`` -> 50, ``three``), else None.

    ``strict=False`` also accepts a sentence holding exactly one distinct number (``"I count 3 cars"``).
    """
    clean = text.strip().rstrip(".").removesuffix("%").strip()
    if _NUMBER.fullmatch(clean):
        return float(clean.replace(",", ""))
    word = normalize_text(clean)
    if word in _WORD_NUMBERS:
        return _WORD_NUMBERS[word]
    if strict:
        return None
    found = {float(m.replace(",", "")) for m in _NUMBER.findall(text)}
    return found.pop() if len(found) == 1 else None


_LETTER_ONLY = re.compile(r"[(\[]?\s*([A-Za-z])\s*[)\]]?\s*[.:]?")
# An uppercase letter with a delimiter, then the option text: "B. red", "(B) red", "B) red", "B: red".
_LETTER_THEN_TEXT = re.compile(r"(?:\(([A-Z])\)|([A-Z])[.):])\s+\S.*", re.DOTALL)
_ANSWER_PHRASE = re.compile(
    r"(?:the\s+)?(?:correct\s+|final\s+|right\s+)?(?:answer|option|choice)\b\s*(?:is\b\s*)?:?\s*",
    re.IGNORECASE,
)


def _letter_index(letter: str) -> int:
    return ord(letter.upper()) - ord("A")


def choice_index(text: str, options: Sequence[str] = ()) -> int | None:
    """Option index (A = 0) that ``text`` names, by letter or by option text; None when it names none.

    Accepts ``B``, ``(B)``, ``B.``, ``B)``, ``b``, ``B. red``, ``The answer is B``, ``Answer: (B)``, and
    the option text itself (normalised, see :func:`normalize_text`).
    """
    text = text.strip()
    phrase = _ANSWER_PHRASE.match(text)
    # "The answer is B" -> "B"; the full text is kept for an option that starts with such a word.
    candidates = (text[phrase.end() :], text) if phrase and phrase.end() < len(text) else (text,)
    for cand in candidates:
        if match := _LETTER_ONLY.fullmatch(cand):
            return _letter_index(match.group(1))
        if match := _LETTER_THEN_TEXT.fullmatch(cand):
            return _letter_index(match.group(1) or match.group(2))
    for cand in candidates:
        norm = normalize_text(cand)
        for i, option in enumerate(options):
            if norm and norm == normalize_text(option):
                return i
    return None


@register_matcher("choice")
def match_choice(answer: str, ground_truth: str, options: Sequence[str]) -> float:
    """1.0 when ``answer`` names the same option as ``ground_truth`` (letter or option text)."""
    target = choice_index(ground_truth, options)
    return float(target is not None and choice_index(answer, options) == target)


@register_matcher("number")
def match_number(answer: str, ground_truth: str, options: Sequence[str]) -> float:
    """1.0 when both state the same number (relative tolerance 1e-6)."""
    target = parse_number(ground_truth)
    pred = parse_number(answer, strict=False)
    if target is None or pred is None:
        return 0.0
    return float(math.isclose(pred, target, rel_tol=1e-6, abs_tol=1e-9))


@register_matcher("text")
def match_text(answer: str, ground_truth: str, options: Sequence[str]) -> float:
    """1.0 when the normalised texts are equal (see :func:`normalize_text`)."""
    target = normalize_text(ground_truth)
    return float(bool(target) and normalize_text(answer) == target)


def auto_matcher_name(ground_truth: str, options: Sequence[str] = ()) -> str:
    """``choice`` when the ground truth is a letter or one of ``options``; ``number`` when it is a
    number; else ``text``."""
    if _LETTER_ONLY.fullmatch(ground_truth.strip()):
        return "choice"
    if options and choice_index(ground_truth, options) is not None:
        return "choice"
    if parse_number(ground_truth) is not None:
        return "number"
    return "text"


@register_matcher("auto")
def match_auto(answer: str, ground_truth: str, options: Sequence[str]) -> float:
    """Dispatch to the matcher :func:`auto_matcher_name` picks."""
    return get_matcher(auto_matcher_name(ground_truth, options))(answer, ground_truth, options)


def accuracy(answer: str | None, ground_truth: str, options: Sequence[str] = (), matcher: str = "auto") -> float:
    """acc in [0, 1] of ``answer`` against ``ground_truth``; 0 when there is no answer or it is over
    :data:`MAX_ANSWER_CHARS` characters."""
    fn = get_matcher(matcher)
    if answer is None or len(answer) > MAX_ANSWER_CHARS:
        return 0.0
    return fn(answer, ground_truth, options)
