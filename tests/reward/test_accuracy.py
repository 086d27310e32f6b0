"""Answer matchers and their registry (visionleaf/reward/accuracy.py)."""

import pytest

import visionleaf.reward.accuracy as accuracy_module
from visionleaf.reward.accuracy import (
    MAX_ANSWER_CHARS,
    accuracy,
    auto_matcher_name,
    get_matcher,
    normalize_text,
    parse_number,
    register_matcher,
)

COLORS = ("blue", "red")


@pytest.mark.parametrize(
    ("answer", "ground_truth", "options", "expected"),
    [
        ("B", "B", COLORS, 1.0),  # bare letter
        ("(B)", "B", COLORS, 1.0),  # letter in parentheses
        ("B.", "B", COLORS, 1.0),  # letter with a full stop
        ("B)", "B", COLORS, 1.0),  # letter with a closing parenthesis
        ("b", "B", COLORS, 1.0),  # lowercase letter
        (" [B] ", "B", COLORS, 1.0),  # brackets and spaces
        ("The answer is B", "B", COLORS, 1.0),  # answer phrase
        ("Answer: (B)", "B", COLORS, 1.0),  # answer phrase with a colon
        ("B. red", "B", COLORS, 1.0),  # letter followed by its option text
        ("(B) red", "B", COLORS, 1.0),  # parenthesised letter followed by its option text
        ("red", "B", COLORS, 1.0),  # option text instead of the letter
        ("The Red.", "B", COLORS, 1.0),  # option text, case/article/punctuation-insensitive
        ("B", "B", (), 1.0),  # letter without options
        ("A", "B", COLORS, 0.0),  # wrong letter
        ("blue", "B", COLORS, 0.0),  # wrong option text
        ("purple", "B", COLORS, 0.0),  # names no option
        ("B", "red", COLORS, 1.0),  # ground truth given as option text
        ("answering machine", "A", ("answering machine", "fax"), 1.0),  # option starting with "answer"
        ("3", "3", (), 1.0),  # integer
        ("3.0", "3", (), 1.0),  # float form of an integer
        ("1,000", "1000", (), 1.0),  # thousands separator
        ("three", "3", (), 1.0),  # spelled-out number
        ("There are 3 cars.", "3", (), 1.0),  # one number inside a sentence
        ("50%", "50", (), 1.0),  # percent sign
        ("4", "3", (), 0.0),  # wrong number
        ("3 or 4", "3", (), 0.0),  # two different numbers: ambiguous
        ("many", "3", (), 0.0),  # no number
        ("The Eiffel Tower!", "eiffel tower", (), 1.0),  # free-form, normalised match
        ("Eiffel", "eiffel tower", (), 0.0),  # free-form, partial answer
        (None, "B", COLORS, 0.0),  # no answer
        ("", "eiffel tower", (), 0.0),  # empty answer
    ],
)
def test_accuracy_auto(answer, ground_truth, options, expected):
    assert accuracy(answer, ground_truth, options) == expected


def test_accuracy_length_limit():
    long_truth = "x" * (MAX_ANSWER_CHARS + 1)
    # exactly at the limit still counts
    assert accuracy("x" * MAX_ANSWER_CHARS, "x" * MAX_ANSWER_CHARS) == 1.0
    # one character over the limit gets 0 even though it matches
    assert accuracy(long_truth, long_truth) == 0.0


@pytest.mark.parametrize(
    ("ground_truth", "options", "expected"),
    [
        ("B", (), "choice"),  # a letter
        ("(c)", (), "choice"),  # a decorated letter
        ("red", COLORS, "choice"),  # one of the options
        ("3", (), "number"),  # a number
        ("1,000", (), "number"),  # a number with a separator
        ("3", ("3", "4"), "choice"),  # a number that is an option text
        ("eiffel tower", (), "text"),  # free-form
        ("green", COLORS, "text"),  # not among the options
    ],
)
def test_auto_matcher_name(ground_truth, options, expected):
    assert auto_matcher_name(ground_truth, options) == expected


@pytest.mark.parametrize(
    ("text", "strict", "expected"),
    [
        ("3", True, 3.0),  # integer
        ("-2.5", True, -2.5),  # signed float
        ("1,234,567", True, 1234567.0),  # separators
        ("ten", True, 10.0),  # word
        ("about 7 apples", True, None),  # strict: a sentence is not a number
        ("about 7 apples", False, 7.0),  # lenient: the one number in a sentence
        ("7 or 8", False, None),  # lenient but ambiguous
    ],
)
def test_parse_number(text, strict, expected):
    assert parse_number(text, strict=strict) == expected


def test_normalize_text():
    assert normalize_text("  The  Red, car! ") == "red car"


def test_explicit_matcher_skips_auto():
    # "text" compares strings: "3.0" != "3" although the number matcher would accept it
    assert accuracy("3.0", "3", matcher="text") == 0.0
    assert accuracy("3.0", "3", matcher="number") == 1.0


def test_registry_lists_names_on_miss():
    with pytest.raises(KeyError, match=r"unknown matcher 'nope'.*'auto'.*'choice'.*'number'.*'text'"):
        get_matcher("nope")
    # accuracy fails on a bad name even when there is no answer to match
    with pytest.raises(KeyError, match="nope"):
        accuracy(None, "B", matcher="nope")


def test_register_custom_matcher():
    @register_matcher("prefix")
    def prefix(answer, ground_truth, options):
        return float(answer.startswith(ground_truth))

    try:
        assert accuracy("redish", "red", matcher="prefix") == 1.0
        # re-registering the same function is a no-op, another one under the same name is an error
        register_matcher("prefix")(prefix)
        with pytest.raises(ValueError, match="already registered"):
            register_matcher("prefix")(lambda a, g, o: 0.0)
    finally:
        accuracy_module.MATCHER_REGISTRY.unregister("prefix")
