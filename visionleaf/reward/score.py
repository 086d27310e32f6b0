"""verl reward function: ``score = w_acc*acc - w_fmt*format + w_tool*tool + w_gnd*grounding`` (SPEC §4).

Use it in verl with ``reward.custom_reward_function.name=compute_score`` (path: this file); the
``reward_kwargs`` are :class:`RewardConfig` fields, e.g. ``reward_kwargs.grounding_weight=0.5``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from visionleaf.boxes import Box, as_box
from visionleaf.protocol import observation_texts, split_assistant_turns
from visionleaf.reward.accuracy import MAX_ANSWER_CHARS, accuracy, auto_matcher_name, get_matcher
from visionleaf.reward.grounding import grounding_reward
from visionleaf.reward.judge import JudgeConfig, get_judge
from visionleaf.tools import ERROR_PREFIX, ToolCall, parse_turn

ZOOM_TOOL_NAME = "image_zoom_in_tool"
"""Calls to this tool are the predicted boxes of the grounding reward."""

VERL_PASSTHROUGH_KWARGS = frozenset({"reward_router_address", "reward_model_tokenizer"})
"""Keyword arguments verl's reward loop itself may pass to ``compute_score``; ignored."""

GROUNDING_MODES = ("last", "best")


@dataclass(frozen=True)
class RewardConfig:
    """Weights and switches of :func:`compute_score`; every field can be overridden by a kwarg."""

    acc_weight: float = 0.8
    """Weight of acc (in [0, 1])."""
    format_weight: float = 0.2
    """Weight of the format penalty (1 when the structure is broken); subtracted."""
    tool_weight: float = 1.2
    """Weight of the tool bonus (1 when a call succeeded and, with the gate, acc > 0)."""
    grounding_weight: float = 0.0
    """Weight of the LFPC grounding reward (in [0, 2]); 0 = logged only."""
    gate_tool_on_acc: bool = True
    """Give the tool bonus only to answers with acc > 0 (SPEC §4); False pays every successful call."""
    grounding_mode: str = "last"
    """Which crop is scored: ``last`` (the trajectory's last zoom) or ``best`` (highest grounding)."""
    coverage_threshold: float = 0.9
    """Minimum fraction of the smallest GT box the crop must cover to earn the IoU term."""
    matcher: str = "auto"
    """Answer matcher name (see :mod:`visionleaf.reward.accuracy`)."""
    judge: JudgeConfig | None = None
    """LLM judge for free-form answers the rule matcher rejects; None = rules only."""

    def __post_init__(self) -> None:
        for name in ("acc_weight", "format_weight", "tool_weight", "grounding_weight"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"reward.{name} must be a finite number >= 0, got {value!r}")
        if self.grounding_mode not in GROUNDING_MODES:
            raise ValueError(f"reward.grounding_mode must be one of {GROUNDING_MODES}, got {self.grounding_mode!r}")
        if not 0 < self.coverage_threshold <= 1:
            raise ValueError(f"reward.coverage_threshold must be in (0, 1], got {self.coverage_threshold}")
        try:
            get_matcher(self.matcher)
        except KeyError as exc:
            raise ValueError(f"reward.matcher: {exc.args[0]}") from None
        if self.judge is not None and not isinstance(self.judge, JudgeConfig):
            raise ValueError(f"reward.judge must be a JudgeConfig or None, got {type(self.judge).__name__}")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> RewardConfig:
        """Config from keyword overrides named like the fields; ``judge`` may be a mapping.

        Names in :data:`VERL_PASSTHROUGH_KWARGS` are ignored; any other unknown name is a ``ValueError``.
        """
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(kwargs) - set(names) - VERL_PASSTHROUGH_KWARGS)
        if unknown:
            raise ValueError(f"unknown reward kwargs {unknown}; valid names: {names}")
        overrides = {k: v for k, v in kwargs.items() if k in names}
        if isinstance(overrides.get("judge"), Mapping):
            overrides["judge"] = JudgeConfig(**overrides["judge"])
        return cls(**overrides)


@dataclass(frozen=True)
class ResponseSummary:
    """What the reward needs to know about one decoded response."""

    answer: str | None
    """``<answer>`` text of the last assistant turn; None when it has none."""
    format_problems: tuple[str, ...]
    """Parse problems of every turn, plus ``no_final_answer`` / ``answer_before_final_turn``; empty = ok."""
    tool_calls_ok: int
    """Calls that returned a non-error observation."""
    tool_calls_failed: int
    """Calls that returned an ``Error:`` observation."""
    pred_boxes: tuple[Box, ...]
    """Boxes of the successful zoom calls, original-image pixels, in call order."""


def format_problems(turn_texts: Sequence[str]) -> tuple[str, ...]:
    """Format problems of a response given its assistant turns' texts (model text only, in order): every
    turn's parse problems, plus ``answer_before_final_turn`` / ``no_final_answer``; empty = well formed."""
    turns = [parse_turn(text) for text in turn_texts] or [parse_turn("")]
    problems = [problem for turn in turns for problem in turn.problems]
    if any(turn.answer is not None for turn in turns[:-1]):
        problems.append("answer_before_final_turn")
    if turns[-1].answer is None:
        problems.append("no_final_answer")
    return tuple(dict.fromkeys(problems))


def summarize_response(solution_str: str, extra_info: Mapping[str, Any] | None = None) -> ResponseSummary:
    """Parse ``solution_str`` (decoded with or without special tokens) into a :class:`ResponseSummary`.

    ``extra_info`` keys ``tool_calls_ok``, ``tool_calls_failed``, ``pred_boxes`` and ``format_problems``
    (what the rollout recorded, from the real turn boundaries) win over parsing: the parsed turns are cut
    at ``<tool_response>`` blocks, which a turn can fake by writing one. Parsed fallback: observation ``i``
    answers assistant turn ``i``; it is a success when that turn holds a parsed call and the observation
    does not start with ``Error:``. Zoom boxes are mapped from model space with ``model_size`` ->
    ``original_size`` when both are given.
    """
    info = extra_info or {}
    turn_texts = split_assistant_turns(solution_str)
    turns = [parse_turn(text) for text in turn_texts]
    observations = [text.strip() for text in observation_texts(solution_str)]

    recorded = info.get("format_problems")
    if recorded is not None:  # a list (or the reward's own comma-joined string)
        items = recorded.split(",") if isinstance(recorded, str) else recorded
        problems = tuple(str(problem) for problem in items if str(problem))
    else:
        problems = format_problems(turn_texts)

    succeeded: list[ToolCall] = [
        turns[i].tool_calls[0]
        for i, obs in enumerate(observations)
        if turns[i].tool_calls and not obs.startswith(ERROR_PREFIX)
    ]
    ok = int(info["tool_calls_ok"]) if info.get("tool_calls_ok") is not None else len(succeeded)
    failed_default = len(observations) - len(succeeded)
    failed = int(info["tool_calls_failed"]) if info.get("tool_calls_failed") is not None else failed_default

    if info.get("pred_boxes") is not None:
        boxes = tuple(as_box(box) for box in info["pred_boxes"])
    else:
        zooms = [call for call in succeeded if call.name == ZOOM_TOOL_NAME]
        mapped = (_original_box(call.arguments.get("bbox_2d"), info) for call in zooms)
        boxes = tuple(box for box in mapped if box is not None)

    return ResponseSummary(
        answer=turns[-1].answer,
        format_problems=problems,
        tool_calls_ok=ok,
        tool_calls_failed=failed,
        pred_boxes=boxes,
    )


def _size(value: Sequence[Any]) -> tuple[int, int]:
    return int(value[0]), int(value[1])


def _original_box(bbox_2d: Any, info: Mapping[str, Any]) -> Box | None:
    """``bbox_2d`` (model space) in original pixels; None when the box is invalid."""
    model_size, original_size = info.get("model_size"), info.get("original_size")
    try:
        if model_size is None or original_size is None:
            return as_box(bbox_2d)
        from visionleaf.tools.crop import map_box  # lazy: keeps this module importable on its own

        return as_box(map_box(bbox_2d, _size(model_size), _size(original_size)))
    except ValueError:
        return None


_NO_GROUNDING = {"iou": 0.0, "l1": 0.0, "coverage": 0.0, "score": 0.0, "raw_iou": 0.0}


def _grounding(boxes: Sequence[Box], info: Mapping[str, Any], config: RewardConfig) -> dict[str, float] | None:
    """:func:`grounding_reward` of the crop ``config.grounding_mode`` picks; None when no crop is scored
    (no successful zoom, no GT boxes, or no ``original_size`` at grounding weight 0)."""
    gt_boxes = info.get("gt_boxes")
    if gt_boxes is None or len(gt_boxes) == 0:
        return None
    if info.get("original_size") is None:
        if config.grounding_weight > 0:
            raise ValueError(
                "extra_info has gt_boxes but no original_size ([width, height] in pixels), which the "
                "grounding reward needs; add it to the dataset rows or set grounding_weight=0"
            )
        return None
    size = _size(info["original_size"])
    gts = [as_box(box) for box in gt_boxes]
    candidates = boxes if config.grounding_mode == "best" else boxes[-1:]
    results = [grounding_reward(box, gts, size, config.coverage_threshold) for box in candidates]
    return max(results, key=lambda r: r["score"], default=None)


def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: Any,
    extra_info: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> dict[str, float | int | str | None]:
    """Reward of one response (verl's custom reward signature); ``kwargs`` are :class:`RewardConfig`
    overrides. Every value is a scalar or a str so that verl can log it, or None where there is nothing to
    measure (verl's validation metrics and :func:`visionleaf.verl.metrics.leaf_metrics` leave None out).

    Keys: ``score``, ``acc``, ``format`` (penalty, 1 = broken), ``tool`` (0/1), ``grounding`` (in [0, 2]),
    ``iou`` / ``coverage`` (the reward's terms of the scored crop: 0 without one), ``crop_iou`` (max IoU of the
    scored crop with the GT boxes, whatever its coverage) and ``crop_coverage`` (of the smallest GT box): None
    when no crop is scored; ``num_tool_calls``, ``num_tool_errors``, ``answer_len``
    (characters, 0 without answer), ``format_problems`` (comma-joined names, "" when none) and ``category``
    (``extra_info.category``, "" when absent; validation reports accuracy per category with it).
    """
    config = RewardConfig.from_kwargs(**kwargs)
    info = extra_info or {}
    summary = summarize_response(solution_str, info)
    options = [str(option) for option in info["options"]] if info.get("options") is not None else []
    truth = str(ground_truth)

    acc = accuracy(summary.answer, truth, options, config.matcher)
    free_form = (auto_matcher_name(truth, options) if config.matcher == "auto" else config.matcher) == "text"
    answer = summary.answer
    judge = config.judge if free_form and acc < 1 else None
    if judge is not None and answer is not None and len(answer) <= MAX_ANSWER_CHARS:
        acc = get_judge(judge).score(str(info.get("question", "")), answer, truth)

    fmt = float(bool(summary.format_problems))
    tool = float(summary.tool_calls_ok > 0 and (acc > 0 or not config.gate_tool_on_acc))
    scored = _grounding(summary.pred_boxes, info, config)
    grounding = scored or _NO_GROUNDING
    score = (
        config.acc_weight * acc
        - config.format_weight * fmt
        + config.tool_weight * tool
        + config.grounding_weight * grounding["score"]
    )
    return {
        "score": score,
        "acc": acc,
        "format": fmt,
        "tool": tool,
        "grounding": grounding["score"],
        "iou": grounding["iou"],
        "coverage": grounding["coverage"],
        "crop_iou": scored["raw_iou"] if scored else None,
        "crop_coverage": scored["coverage"] if scored else None,
        "num_tool_calls": summary.tool_calls_ok + summary.tool_calls_failed,
        "num_tool_errors": summary.tool_calls_failed,
        "answer_len": len(answer) if answer is not None else 0,
        "format_problems": ",".join(summary.format_problems),
        "category": str(info.get("category") or ""),
    }
