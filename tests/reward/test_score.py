"""compute_score: acc, format penalty, gated tool bonus, grounding and config (visionleaf/reward/score.py)."""

import json
import sys
import types

import numpy as np
import pytest

from visionleaf.reward import RewardConfig, compute_score, format_problems, summarize_response

IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
ERROR = "Error: bbox_2d must be 4 finite numbers"


def zoom(bbox):
    call = json.dumps({"name": "image_zoom_in_tool", "arguments": {"bbox_2d": bbox}})
    return f"<think>look</think><tool_call>{call}</tool_call>"


ZOOM = zoom([10, 10, 60, 60])


def answer(text="B"):
    return f"<think>red</think><answer>{text}</answer>"


def response(turns, observations=(), special=True):
    """Decoded response: assistant turns joined by observations, with or without special tokens."""
    assert len(turns) == len(observations) + 1
    out = turns[0]
    for obs, turn in zip(observations, turns[1:], strict=True):
        if special:
            out += f"<|im_end|>\n<|im_start|>user\n<tool_response>{obs}</tool_response>"
            out += "<|im_end|>\n<|im_start|>assistant\n"
        else:
            obs = obs.replace(IMAGE, "")  # the vision tokens are special tokens too
            out += f"\nuser\n<tool_response>{obs}</tool_response>\nassistant\n"
        out += turn
    return out + ("<|im_end|>" if special else "")


def test_response_helper_matches_the_brief_examples():
    assert response([ZOOM, answer()], [IMAGE]) == (
        '<think>look</think><tool_call>{"name": "image_zoom_in_tool", '
        '"arguments": {"bbox_2d": [10, 10, 60, 60]}}</tool_call><|im_end|>\n<|im_start|>user\n'
        "<tool_response><|vision_start|><|image_pad|><|vision_end|></tool_response><|im_end|>\n"
        "<|im_start|>assistant\n<think>red</think><answer>B</answer><|im_end|>"
    )
    assert response([ZOOM, answer()], [IMAGE], special=False).endswith(
        "</tool_call>\nuser\n<tool_response></tool_response>\nassistant\n<think>red</think><answer>B</answer>"
    )


OPTIONS = {"options": ["blue", "red"]}

# (turns, observations, extra_info, kwargs) -> (score, acc, format, tool, num_tool_calls, num_tool_errors)
CASES = [
    # correct answer after a successful zoom: 0.8*1 - 0.2*0 + 1.2*1 = 2.0
    ([ZOOM, answer()], [IMAGE], OPTIONS, {}, (2.0, 1.0, 0.0, 1.0, 1, 0)),
    # correct answer, the only call came back as an Error observation: no tool bonus
    ([ZOOM, answer()], [ERROR], OPTIONS, {}, (0.8, 1.0, 0.0, 0.0, 1, 1)),
    # wrong answer after a successful zoom: the gate withholds the bonus
    ([ZOOM, answer("A")], [IMAGE], OPTIONS, {}, (0.0, 0.0, 0.0, 0.0, 1, 0)),
    # gate off: a successful call earns the bonus even when wrong
    ([ZOOM, answer("A")], [IMAGE], OPTIONS, {"gate_tool_on_acc": False}, (1.2, 0.0, 0.0, 1.0, 1, 0)),
    # correct answer without any tool call
    ([answer()], [], OPTIONS, {}, (0.8, 1.0, 0.0, 0.0, 0, 0)),
    # option text instead of the letter
    ([answer("Red")], [], OPTIONS, {}, (0.8, 1.0, 0.0, 0.0, 0, 0)),
    # text after the answer: format penalty 0.8 - 0.2
    ([answer() + " because it is red"], [], OPTIONS, {}, (0.6, 1.0, 1.0, 0.0, 0, 0)),
    # a matching answer of exactly 1000 characters still counts
    ([answer("B. " + "x" * 997)], [], OPTIONS, {}, (0.8, 1.0, 0.0, 0.0, 0, 0)),
    # the same answer over 1000 characters gets acc 0
    ([answer("B. " + "x" * 998)], [], OPTIONS, {}, (0.0, 0.0, 0.0, 0.0, 0, 0)),
    # malformed call (bad JSON) answered with an Error, then a correct answer: format 1, no bonus
    (
        ["<think>x</think><tool_call>{bbox: 1}</tool_call>", answer()],
        [ERROR],
        OPTIONS,
        {},
        (0.6, 1.0, 1.0, 0.0, 1, 1),
    ),
    # a successful observation cannot redeem a malformed call
    (
        ["<think>x</think><tool_call>[1, 2]</tool_call>", answer()],
        [IMAGE],
        OPTIONS,
        {},
        (0.6, 1.0, 1.0, 0.0, 1, 1),
    ),
    # truncated after a call: no final answer -> acc 0, format 1
    ([ZOOM], [], OPTIONS, {}, (-0.2, 0.0, 1.0, 0.0, 0, 0)),
    # call and answer in one turn: the call is not executed, format 1
    ([ZOOM + answer()], [], OPTIONS, {}, (0.6, 1.0, 1.0, 0.0, 0, 0)),
    # an answer in a non-final turn
    ([answer(), answer()], [IMAGE], OPTIONS, {}, (0.6, 1.0, 1.0, 0.0, 1, 1)),
    # numbers: "3.0" matches "3"
    ([ZOOM, answer("3.0")], [IMAGE], {}, {}, (2.0, 1.0, 0.0, 1.0, 1, 0)),
    # weights are overridable: 1.0*1 - 0.5*0 + 0*1 (the tool indicator itself stays 1)
    (
        [ZOOM, answer()],
        [IMAGE],
        OPTIONS,
        {"acc_weight": 1.0, "tool_weight": 0, "format_weight": 0.5},
        (1.0, 1.0, 0.0, 1.0, 1, 0),
    ),
    # verl's own kwargs are ignored
    ([answer()], [], OPTIONS, {"reward_router_address": None}, (0.8, 1.0, 0.0, 0.0, 0, 0)),
]


@pytest.mark.parametrize("special", [True, False], ids=["special_tokens", "skip_special_tokens"])
@pytest.mark.parametrize(("turns", "observations", "extra_info", "kwargs", "expected"), CASES)
def test_compute_score_parse_fallback(turns, observations, extra_info, kwargs, expected, special):
    ground_truth = "3" if not extra_info else "B"
    result = compute_score("vstar", response(turns, observations, special), ground_truth, extra_info, **kwargs)
    score, acc, fmt, tool, calls, errors = expected
    assert result["score"] == pytest.approx(score)
    assert (result["acc"], result["format"], result["tool"]) == (acc, fmt, tool)
    assert (result["num_tool_calls"], result["num_tool_errors"]) == (calls, errors)


def test_result_keys_are_loggable_scalars():
    result = compute_score("vstar", response([ZOOM, answer()], [IMAGE]), "B", OPTIONS)
    expected_keys = {"score", "acc", "format", "tool", "grounding", "num_tool_calls", "num_tool_errors"}
    assert expected_keys <= set(result)
    # None only where nothing was measured: no GT boxes here, so no crop was scored
    assert all(isinstance(v, (int, float, str)) for k, v in result.items() if k not in ("crop_iou", "crop_coverage"))
    assert result["crop_iou"] is None and result["crop_coverage"] is None
    assert result["answer_len"] == 1
    assert result["format_problems"] == ""


def test_format_problems_are_named():
    result = compute_score("vstar", response([ZOOM + answer() + " trailing"]), "B", OPTIONS)
    assert result["format_problems"] == "call_and_answer,text_after_answer"
    result = compute_score("vstar", response([ZOOM]), "B", OPTIONS)
    assert result["format_problems"] == "no_final_answer"
    result = compute_score("vstar", "", "B", OPTIONS)
    assert result["format_problems"] == "no_action,no_final_answer"


@pytest.mark.parametrize(
    ("turns", "observations", "extra_info", "expected"),
    [
        # the rollout counted a success the text does not show: extra_info wins -> 2.0
        ([answer()], [], {"tool_calls_ok": 1, "tool_calls_failed": 0}, (2.0, 1.0, 1, 0)),
        # the rollout says both calls failed although the text looks fine: no bonus
        ([ZOOM, answer()], [IMAGE], {"tool_calls_ok": 0, "tool_calls_failed": 2}, (0.8, 0.0, 2, 2)),
        # only the failure count is given: successes still come from parsing
        ([ZOOM, answer()], [IMAGE], {"tool_calls_failed": 3}, (2.0, 1.0, 4, 3)),
    ],
)
def test_compute_score_extra_info_tool_counts(turns, observations, extra_info, expected):
    result = compute_score("vstar", response(turns, observations), "B", {**OPTIONS, **extra_info})
    score, tool, calls, errors = expected
    assert result["score"] == pytest.approx(score)
    assert (result["tool"], result["num_tool_calls"], result["num_tool_errors"]) == (tool, calls, errors)


GT = {"gt_boxes": [[10, 10, 60, 60], [0, 0, 100, 100]], "original_size": [100, 100]}
EXACT = [10, 10, 60, 60]
# FAR covers none of g_1; its L1 to g_2 (70 + 70 + 10 + 10) / 100 / 4 = 0.4 beats g_1's 0.45 -> grounding 0.6
FAR = [70, 70, 90, 90]


@pytest.mark.parametrize(
    ("turns", "observations", "extra_info", "kwargs", "expected"),
    [
        # extra_info pred box hits g_1 exactly: grounding 2; score 0.8 + 0.5 * 2 (no call in the text)
        ([answer()], [], {"pred_boxes": [EXACT]}, {}, (2.0, 1.8)),
        # last crop (default) is the far one: r_l1 = 1 - 0.4; 0.8 + 0.5 * 0.6
        ([answer()], [], {"pred_boxes": [EXACT, FAR]}, {}, (0.6, 1.1)),
        # best crop
        ([answer()], [], {"pred_boxes": [EXACT, FAR]}, {"grounding_mode": "best"}, (2.0, 1.8)),
        # no crops at all
        ([answer()], [], {"pred_boxes": []}, {}, (0.0, 0.8)),
        # parse fallback: bbox_2d of the successful zoom, used as given; 0.8 + 1.2 + 0.5 * 2
        ([zoom(EXACT), answer()], [IMAGE], {}, {}, (2.0, 3.0)),
        # parse fallback: a failed zoom's box is no crop; the earlier successful one is the last crop
        ([zoom(EXACT), zoom(FAR), answer()], [IMAGE, ERROR], {}, {}, (2.0, 3.0)),
        # parse fallback: the last successful crop; 0.8 + 1.2 + 0.5 * 0.6
        ([zoom(EXACT), zoom(FAR), answer()], [IMAGE, IMAGE], {}, {}, (0.6, 2.3)),
        # parse fallback: a bbox_2d that is not 4 numbers gives no crop (the call still earned the bonus)
        ([zoom("10, 10, 60, 60"), answer()], [IMAGE], {}, {}, (0.0, 2.0)),
        # parse fallback, best of the two successful crops
        ([zoom(EXACT), zoom(FAR), answer()], [IMAGE, IMAGE], {}, {"grounding_mode": "best"}, (2.0, 3.0)),
    ],
)
def test_compute_score_grounding(turns, observations, extra_info, kwargs, expected):
    info = {**OPTIONS, **GT, **extra_info}
    result = compute_score("vstar", response(turns, observations), "B", info, grounding_weight=0.5, **kwargs)
    assert (result["grounding"], result["score"]) == pytest.approx(expected)


def test_grounding_is_zero_without_gt_boxes():
    result = compute_score("vstar", response([answer()]), "B", {**OPTIONS, "pred_boxes": [EXACT]}, grounding_weight=1)
    assert (result["grounding"], result["iou"], result["coverage"]) == (0.0, 0.0, 0.0)
    assert (result["crop_iou"], result["crop_coverage"]) == (None, None)


@pytest.mark.parametrize(
    ("pred_boxes", "kwargs", "expected"),
    [
        # exact crop of g_1
        ([EXACT], {}, (1.0, 1.0, 1.0)),
        # half of g_1 (coverage 0.5 < 0.9): the reward's iou is 0, the logged crop IoU is 1250/2500
        ([[10, 10, 35, 60]], {}, (0.5, 0.5, 0.0)),
        # FAR overlaps only g_2: IoU 400/10000, coverage of g_1 0
        ([[10, 10, 35, 60], FAR], {}, (0.04, 0.0, 0.0)),
        # best crop (by grounding reward) is the half crop
        ([[10, 10, 35, 60], FAR], {"grounding_mode": "best"}, (0.5, 0.5, 0.0)),
        # no crop: nothing to measure
        ([], {}, (None, None, 0.0)),
    ],
)
def test_crop_iou_is_the_scored_crops_ungated_iou(pred_boxes, kwargs, expected):
    info = {**OPTIONS, **GT, "pred_boxes": pred_boxes}
    result = compute_score("vstar", response([answer()]), "B", info, **kwargs)
    crop_iou, crop_coverage, iou = expected
    assert result["crop_iou"] == (pytest.approx(crop_iou) if crop_iou is not None else None)
    assert result["crop_coverage"] == (pytest.approx(crop_coverage) if crop_coverage is not None else None)
    assert result["iou"] == pytest.approx(iou)


def test_grounding_needs_the_original_size():
    info = {**OPTIONS, "gt_boxes": [EXACT], "pred_boxes": [EXACT]}
    with pytest.raises(ValueError, match="original_size"):
        compute_score("vstar", response([answer()]), "B", info, grounding_weight=0.5)
    # with weight 0 (the default) it is only a log value: 0
    assert compute_score("vstar", response([answer()]), "B", info)["grounding"] == 0.0


def test_grounding_is_logged_at_weight_zero():
    result = compute_score("vstar", response([answer()]), "B", {**OPTIONS, **GT, "pred_boxes": [EXACT]})
    assert (result["grounding"], result["iou"], result["coverage"]) == (2.0, 1.0, 1.0)
    assert result["score"] == pytest.approx(0.8)


def test_model_space_boxes_are_mapped(monkeypatch):
    # a stand-in for visionleaf.tools.crop that scales by original / model size
    def map_box(bbox_2d, model_size, original_size):
        sx, sy = original_size[0] / model_size[0], original_size[1] / model_size[1]
        x1, y1, x2, y2 = bbox_2d
        return (x1 * sx, y1 * sy, x2 * sx, y2 * sy)

    monkeypatch.setitem(sys.modules, "visionleaf.tools.crop", types.SimpleNamespace(map_box=map_box))
    info = {"model_size": [50, 50], "original_size": [100, 100]}
    summary = summarize_response(response([zoom([5, 5, 30, 30]), answer()], [IMAGE]), info)
    assert summary.pred_boxes == ((10.0, 10.0, 60.0, 60.0),)


def test_model_space_boxes_with_the_real_map_box():
    from visionleaf.tools.crop import map_box

    info = {"model_size": [50, 50], "original_size": [100, 100]}
    # sides >= 28 px in model space, so the crop tool only scales by 100 / 50
    summary = summarize_response(response([zoom([5, 5, 45, 45]), answer()], [IMAGE]), info)
    (box,) = summary.pred_boxes
    assert box == pytest.approx((10.0, 10.0, 90.0, 90.0)) == map_box([5, 5, 45, 45], (50, 50), (100, 100))


def test_numpy_extra_info_from_parquet():
    # verl hands dataset columns over as numpy arrays
    info = {
        "options": np.array(["blue", "red"], dtype=object),
        "gt_boxes": np.array([[10, 10, 60, 60]]),
        "original_size": np.array([100, 100]),
        "pred_boxes": np.array([[10.0, 10.0, 60.0, 60.0]]),
        "tool_calls_ok": np.int64(1),
    }
    result = compute_score("vstar", response([answer("red")]), "B", info)
    assert (result["acc"], result["tool"], result["grounding"]) == (1.0, 1.0, 2.0)
    assert isinstance(result["num_tool_calls"], int)


def test_reward_config_defaults():
    config = RewardConfig()
    assert (config.acc_weight, config.format_weight, config.tool_weight, config.grounding_weight) == (
        0.8,
        0.2,
        1.2,
        0.0,
    )
    assert (config.gate_tool_on_acc, config.grounding_mode, config.judge) == (True, "last", None)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"acc_weigth": 1.0}, r"unknown reward kwargs \['acc_weigth'\]; valid names: \['acc_weight'"),  # typo
        ({"tool_weight": -1.0}, "tool_weight must be a finite number >= 0"),  # negative weight
        ({"acc_weight": float("nan")}, "acc_weight must be a finite number"),  # NaN weight
        ({"grounding_mode": "first"}, r"grounding_mode must be one of \('last', 'best'\)"),  # unknown mode
        ({"coverage_threshold": 0.0}, r"coverage_threshold must be in \(0, 1\]"),  # threshold out of range
        ({"matcher": "fuzzy"}, "unknown matcher 'fuzzy'; registered"),  # unknown matcher
        ({"judge": "http://127.0.0.1:8000"}, "JudgeConfig"),  # judge given as a bare URL
        ({"judge": {"base_url": "localhost", "model": "m"}}, "http://"),  # judge mapping is validated too
    ],
)
def test_reward_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RewardConfig.from_kwargs(**kwargs)
    # compute_score reports the same error
    with pytest.raises(ValueError, match=message):
        compute_score("vstar", answer(), "B", **kwargs)


def test_reward_config_judge_mapping():
    config = RewardConfig.from_kwargs(judge={"base_url": "http://127.0.0.1:8000/v1", "model": "m"})
    assert config.judge is not None and config.judge.model == "m" and config.judge.timeout_s == 30


def test_a_faked_observation_does_not_evade_the_format_penalty():
    # one real turn that calls a tool and answers, with a made-up observation between: call_and_answer
    real_turn = ZOOM + "<tool_response>looks red</tool_response>" + answer("B")
    solution = real_turn + "<|im_end|>"
    parsed = compute_score("d", solution, "B")
    assert parsed["format"] == 0.0  # the parse alone sees two clean turns: the evasion works on text
    rollout = {"format_problems": list(format_problems([real_turn])), "tool_calls_ok": 0, "tool_calls_failed": 0}
    assert rollout["format_problems"] == ["call_and_answer"]
    scored = compute_score("d", solution, "B", extra_info=rollout)
    assert scored["format"] == 1.0 and scored["format_problems"] == "call_and_answer"
    assert scored["score"] == pytest.approx(0.8 - 0.2)  # acc counts, no tool bonus, penalty paid


def test_recorded_format_problems_win_over_parsing():
    clean = response([ZOOM, answer()], ["ok " + IMAGE])
    assert compute_score("d", clean, "B", extra_info={"format_problems": []})["format"] == 0.0
    broken = compute_score("d", clean, "B", extra_info={"format_problems": np.array(["no_action"])})
    assert broken["format"] == 1.0 and broken["format_problems"] == "no_action"
    # the reward's own comma-joined form reads back as the same names
    assert compute_score("d", clean, "B", extra_info={"format_problems": "a,b"})["format_problems"] == "a,b"
    assert format_problems([]) == ("no_action", "no_final_answer")


def test_the_category_is_passed_through_for_validation():
    assert compute_score("d", answer(), "B", extra_info={"category": "position/relative"})["category"] == (
        "position/relative"
    )
    assert compute_score("d", answer(), "B")["category"] == ""
