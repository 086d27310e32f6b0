import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from visionleaf.tools import parse_turn

ZOOM = '{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [1, 2, 30, 40]}}'
ROTATE = '{"name": "image_rotate_tool", "arguments": {"angle": 90}}'

# (model turn, expected tool names, expected answer, expected problems, expected number of call errors)
CASES = [
    # a well-formed zoom call
    (f"<think>look</think><tool_call>{ZOOM}</tool_call>", ["image_zoom_in_tool"], None, [], 0),
    # a well-formed answer, trailing chat-template residue is fine
    ("<think>red</think><answer> B </answer><|im_end|>", [], "B", [], 0),
    # call with surrounding whitespace/newlines inside the block
    (f"<think>x</think><tool_call>\n{ZOOM}\n</tool_call>", ["image_zoom_in_tool"], None, [], 0),
    # malformed JSON: error observation + format problem, nothing executed
    ("<think>x</think><tool_call>{name: zoom}</tool_call>", [], None, ["malformed_tool_call"], 1),
    # JSON that is not an object
    ("<think>x</think><tool_call>[1, 2]</tool_call>", [], None, ["malformed_tool_call"], 1),
    # object without a name
    ('<think>x</think><tool_call>{"arguments": {}}</tool_call>', [], None, ["malformed_tool_call"], 1),
    # arguments that are not an object
    (
        '<think>x</think><tool_call>{"name": "t", "arguments": 3}</tool_call>',
        [],
        None,
        ["malformed_tool_call"],
        1,
    ),
    # double-encoded arguments are accepted
    (
        '<think>x</think><tool_call>{"name": "t", "arguments": "{\\"angle\\": 90}"}</tool_call>',
        ["t"],
        None,
        [],
        0,
    ),
    # unknown tool name parses; the tool runner answers with an error observation
    ('<think>x</think><tool_call>{"name": "magic", "arguments": {}}</tool_call>', ["magic"], None, [], 0),
    # NaN coordinates parse; the crop tool rejects them
    (
        '<think>x</think><tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [NaN, 1, 2, 3]}}'
        "</tool_call>",
        ["image_zoom_in_tool"],
        None,
        [],
        0,
    ),
    # several calls: only the first runs, the others get an error observation
    (
        f"<think>x</think><tool_call>{ZOOM}</tool_call><tool_call>{ROTATE}</tool_call>",
        ["image_zoom_in_tool"],
        None,
        ["multiple_tool_calls"],
        1,
    ),
    # call and answer in one turn: the answer ends the trajectory, the call is not executed
    (f"<think>x</think><tool_call>{ZOOM}</tool_call><answer>A</answer>", [], "A", ["call_and_answer"], 0),
    # text after the answer
    ("<think>x</think><answer>A</answer> because reasons", [], "A", ["text_after_answer"], 0),
    # two answers: the last one counts
    ("<think>x</think><answer>A</answer><answer>C</answer>", [], "C", ["multiple_answers"], 0),
    # unbalanced think tag
    ("<think>x<answer>A</answer>", [], "A", ["unbalanced_think"], 0),
    # unclosed tool call (e.g. truncated generation)
    ("<think>x</think><tool_call>{", [], None, ["unbalanced_tool_call", "no_action"], 0),
    # neither a call nor an answer
    ("<think>just thinking</think>", [], None, ["no_action"], 0),
    # empty output
    ("", [], None, ["no_action"], 0),
]


@pytest.mark.parametrize(("text", "names", "answer", "problems", "n_errors"), CASES)
def test_parse_turn_outcomes(text, names, answer, problems, n_errors):
    turn = parse_turn(text)
    assert [c.name for c in turn.tool_calls] == names
    assert turn.answer == answer
    assert sorted(turn.problems) == sorted(problems)
    assert len(turn.call_errors) == n_errors
    assert all(e.startswith("Error:") for e in turn.call_errors)


def test_final_turns():
    assert parse_turn("<answer>A</answer>").is_final
    assert parse_turn("<think>hmm</think>").is_final  # nothing to execute ends the trajectory
    assert not parse_turn(f"<tool_call>{ZOOM}</tool_call>").is_final
    assert not parse_turn("<tool_call>{oops</tool_call>").is_final  # the model sees the error and goes on


def test_thought_and_arguments():
    turn = parse_turn(f"<think> zoom on the sign </think><tool_call>{ZOOM}</tool_call>")
    assert turn.thought == "zoom on the sign"
    assert turn.tool_calls[0].arguments == json.loads(ZOOM)["arguments"]


PIECES = [
    "<think>",
    "</think>",
    "<answer>",
    "</answer>",
    "<tool_call>",
    "</tool_call>",
    ZOOM,
    ROTATE,
    "{",
    "}",
    '"',
    "[",
    "NaN",
    "A",
    " ",
    "\n",
    "<|im_end|>",
    '{"name": ',
    '"arguments": ',
    "\\",
    "1e999",
    "[" * 50,
]


@settings(max_examples=6000, deadline=None, derandomize=True)
@given(st.lists(st.sampled_from(PIECES), max_size=30))
def test_parse_never_raises_on_mutated_turns(pieces):
    turn = parse_turn("".join(pieces))
    assert len(turn.tool_calls) <= 1
    assert not (turn.tool_calls and turn.answer is not None)


@settings(max_examples=4500, deadline=None, derandomize=True)
@given(st.text(max_size=200))
def test_parse_never_raises_on_random_text(text):
    turn = parse_turn(text)
    assert isinstance(turn.problems, tuple)
