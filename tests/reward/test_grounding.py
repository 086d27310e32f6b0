"""LFPC grounding reward (visionleaf/reward/grounding.py), checked against hand-computed values."""

import math

import pytest

from visionleaf.boxes import box_iou, clamp_box
from visionleaf.reward.grounding import grounding_reward

SQUARE = (100, 100)


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ((0, 0, 20, 20), (10, 10, 30, 30), 100 / 700),  # overlap 10x10, union 400 + 400 - 100
        ((0, 0, 10, 10), (0, 0, 10, 10), 1.0),  # identical
        ((0, 0, 10, 10), (20, 20, 30, 30), 0.0),  # disjoint
        ((0, 0, 10, 10), (10, 0, 20, 10), 0.0),  # touching edges
        ((5, 5, 5, 30), (0, 0, 10, 10), 0.0),  # zero-width box
        ((5, 5, 5, 5), (5, 5, 5, 5), 0.0),  # two points: empty union
    ],
)
def test_box_iou(a, b, expected):
    assert box_iou(a, b) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("pred", "gt_boxes", "image_size", "expected"),
    [
        # exact hit on g_1: coverage 1, r_iou = max(1, 400/2500) = 1, r_l1 = 1
        ((10, 10, 30, 30), [(10, 10, 30, 30), (0, 0, 50, 50)], SQUARE, (1.0, 1.0, 1.0, 2.0)),
        # covers 100 of g_1's 400 px: coverage 0.25 < 0.9 -> r_iou 0; corner error 10 px / 100 = 0.1
        ((0, 0, 20, 20), [(10, 10, 30, 30)], SQUARE, (0.0, 0.9, 0.25, 0.9)),
        # coverage exactly 0.9 (90/100 px) passes: r_iou = max(90/100, 90/400); l1 = (1/100)/4
        ((0, 0, 10, 9), [(0, 0, 10, 10), (0, 0, 20, 20)], SQUARE, (0.9, 0.9975, 0.9, 1.8975)),
        # coverage 0.89 just below the threshold: r_iou 0
        ((0, 0, 10, 8.9), [(0, 0, 10, 10), (0, 0, 20, 20)], SQUARE, (0.0, 0.99725, 0.89, 0.99725)),
        # crop equals the larger box g_2: coverage of g_1 is 1, IoU and L1 take the best level (g_2)
        ((0, 0, 20, 20), [(0, 0, 10, 10), (0, 0, 20, 20)], SQUARE, (1.0, 1.0, 1.0, 2.0)),
        # non-square image: x errors / 200, y errors / 100 -> (20/200 + 10/100) / 4 = 0.05; IoU 3200/5000
        ((0, 0, 100, 50), [(20, 10, 100, 50)], (200, 100), (0.64, 0.95, 1.0, 1.59)),
        # no prediction
        (None, [(10, 10, 30, 30)], SQUARE, (0.0, 0.0, 0.0, 0.0)),
        # no GT boxes
        ((10, 10, 30, 30), [], SQUARE, (0.0, 0.0, 0.0, 0.0)),
        # zero-area prediction: IoU 0, L1 still measured (x2 off by 20 px -> 0.2 / 4)
        ((10, 10, 10, 30), [(10, 10, 30, 30)], SQUARE, (0.0, 0.95, 0.0, 0.95)),
        # zero-area g_1: coverage 0 (nothing to cover) -> r_iou 0; L1 (20 + 20) / 100 / 4 = 0.1
        ((10, 10, 30, 30), [(10, 10, 10, 10)], SQUARE, (0.0, 0.9, 0.0, 0.9)),
        # prediction partly outside: clamped to (0, 0, 30, 30) first, then an exact hit
        ((-20, -20, 30, 30), [(0, 0, 30, 30)], SQUARE, (1.0, 1.0, 1.0, 2.0)),
        # prediction fully outside: clamped to the corner point (100, 100, 100, 100); L1 (1 + 1) / 4
        ((150, 150, 200, 200), [(0, 0, 100, 100)], SQUARE, (0.0, 0.5, 0.0, 0.5)),
        # GT outside the image makes 1 - L1 negative (1 - 2.25): r_l1 is clipped to 0
        ((50, 50, 100, 100), [(-200, -200, -100, -100)], SQUARE, (0.0, 0.0, 0.0, 0.0)),
    ],
)
def test_grounding_reward(pred, gt_boxes, image_size, expected):
    result = grounding_reward(pred, gt_boxes, image_size)
    iou, l1, coverage, score = expected
    assert {k: v for k, v in result.items() if k != "raw_iou"} == pytest.approx(
        {"iou": iou, "l1": l1, "coverage": coverage, "score": score}
    )
    # the IoU without the coverage gate: equal to r_iou whenever the gate passes
    if coverage >= 0.9:
        assert result["raw_iou"] == pytest.approx(iou)


def test_raw_iou_ignores_the_coverage_gate():
    # covers 100 of g_1's 400 px (coverage 0.25): r_iou 0, raw IoU 100 / 700
    result = grounding_reward((0, 0, 20, 20), [(10, 10, 30, 30)], SQUARE)
    assert result["iou"] == 0.0 and result["raw_iou"] == pytest.approx(1 / 7)
    assert grounding_reward(None, [(10, 10, 30, 30)], SQUARE)["raw_iou"] == 0.0


def test_coverage_threshold_is_configurable():
    # coverage 0.25 now passes, so r_iou is the plain IoU 1/7
    result = grounding_reward((0, 0, 20, 20), [(10, 10, 30, 30)], SQUARE, coverage_threshold=0.25)
    assert result["iou"] == pytest.approx(1 / 7)
    assert result["score"] == pytest.approx(1 / 7 + 0.9)


def test_clamp_box():
    assert clamp_box((-5.0, 10.0, 120.0, 130.0), (100, 50)) == (0.0, 10.0, 100.0, 50.0)


@pytest.mark.parametrize(
    ("pred", "image_size", "message"),
    [
        ((0, 0, math.nan, 10), SQUARE, "finite"),  # NaN corner
        ((0, 0, 10), SQUARE, "4 finite numbers"),  # three corners
        (("a", 0, 10, 10), SQUARE, "4 numbers"),  # not a number
        ("1234", SQUARE, "string"),  # a string of four digits is not a box
        ((0, 0, 10, 10), (0, 100), "image_size"),  # empty image
        ((0, 0, 10, 10), (100,), "image_size"),  # one-dimensional size
    ],
)
def test_invalid_inputs_raise(pred, image_size, message):
    with pytest.raises(ValueError, match=message):
        grounding_reward(pred, [(0, 0, 10, 10)], image_size)
