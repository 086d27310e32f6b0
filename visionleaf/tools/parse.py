"""Parse one assistant turn of the iMCoT protocol into a :class:`Turn` (no ``eval``, never raises).

Outcomes (each is covered by ``tests/tools/test_parse.py``):

| model output                                  | tool_calls        | answer | problems                 | call_errors |
|-----------------------------------------------|-------------------|--------|--------------------------|-------------|
| ``<think>..</think><tool_call>{json}</tool_call>`` | 1 call       | None   | -                        | -           |
| ``<think>..</think><answer>B</answer>``       | -                 | "B"    | -                        | -           |
| tool_call body is not a JSON object / no name | -                 | None   | malformed_tool_call      | 1 error     |
| several tool_call blocks                      | the first only    | None   | multiple_tool_calls      | 1 per extra |
| tool call and answer in one turn              | - (answer ends it)| "B"    | call_and_answer          | -           |
| text after ``</answer>``                      | -                 | "B"    | text_after_answer        | -           |
| several answer blocks                         | -                 | last   | multiple_answers         | -           |
| unbalanced think / answer / tool_call tags    | as found          | found  | unbalanced_<tag>         | -           |
| neither a call nor an answer                  | -                 | None   | no_action                | -           |

Argument errors (NaN, wrong arity, unknown tool) are not parse problems: the call is returned and the
tool answers with an ``Error:`` observation (see :func:`visionleaf.tools.base.run_tool`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from visionleaf.tools.base import ERROR_PREFIX, ToolCall

_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_TAGS = ("think", "answer", "tool_call")
# Chat-template residue a decoded turn may end with; not "text after the answer".
_TRAILER = re.compile(r"(<\|im_end\|>|<\|endoftext\|>|\s)*\Z")


@dataclass(frozen=True)
class Turn:
    """One parsed assistant turn."""

    thought: str | None
    """Text inside the first ``<think>`` block, stripped."""
    tool_calls: tuple[ToolCall, ...]
    """Calls to execute (at most one; empty when the turn answers)."""
    answer: str | None
    """Text inside the (last) ``<answer>`` block, stripped; None when there is none."""
    problems: tuple[str, ...]
    """Format problems (names as in the module table); any problem costs the format penalty."""
    call_errors: tuple[str, ...]
    """``Error:`` observation texts for calls that could not be parsed or were ignored."""

    @property
    def is_final(self) -> bool:
        """True when the trajectory ends with this turn (an answer, or nothing to execute)."""
        return self.answer is not None or not (self.tool_calls or self.call_errors)


def _parse_call(body: str) -> ToolCall | str:
    """A ToolCall, or the reason the block is not one."""
    try:
        obj = json.loads(body.strip())
    except (json.JSONDecodeError, RecursionError) as exc:
        return f"tool call is not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc})"
    if not isinstance(obj, dict):
        return 'tool call must be a JSON object {"name": ..., "arguments": {...}}'
    name, arguments = obj.get("name"), obj.get("arguments", {})
    if not isinstance(name, str) or not name:
        return 'tool call needs a string "name"'
    if isinstance(arguments, str):  # some models double-encode the arguments object
        try:
            arguments = json.loads(arguments)
        except (json.JSONDecodeError, RecursionError):
            return '"arguments" is a string that is not valid JSON'
    if not isinstance(arguments, dict):
        return '"arguments" must be a JSON object'
    return ToolCall(name=name, arguments=arguments)


def parse_turn(text: str) -> Turn:
    """Parse one assistant turn (model text only, without the observation)."""
    problems: list[str] = [f"unbalanced_{tag}" for tag in _TAGS if text.count(f"<{tag}>") != text.count(f"</{tag}>")]
    think = _THINK.search(text)
    answers = _ANSWER.findall(text)
    bodies = _CALL.findall(text)

    calls: list[ToolCall] = []
    call_errors: list[str] = []
    for body in bodies:
        parsed = _parse_call(body)
        if isinstance(parsed, str):
            call_errors.append(f"{ERROR_PREFIX} {parsed}")
            if "malformed_tool_call" not in problems:
                problems.append("malformed_tool_call")
        else:
            calls.append(parsed)
    if len(bodies) > 1:
        problems.append("multiple_tool_calls")
        call_errors.extend(
            f"{ERROR_PREFIX} only one tool call per turn is executed; ignored {call.name!r}" for call in calls[1:]
        )
        calls = calls[:1]

    answer = answers[-1].strip() if answers else None
    if answer is not None:
        if len(answers) > 1:
            problems.append("multiple_answers")
        if bodies:
            problems.append("call_and_answer")
            calls, call_errors = [], []
        last_close = text.rfind("</answer>") + len("</answer>")
        if not _TRAILER.fullmatch(text[last_close:]):
            problems.append("text_after_answer")
    elif not bodies:
        problems.append("no_action")

    return Turn(
        thought=think.group(1).strip() if think else None,
        tool_calls=tuple(calls),
        answer=answer,
        problems=tuple(problems),
        call_errors=tuple(call_errors),
    )
