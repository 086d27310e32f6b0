import pytest

from visionleaf.verl.metrics import crop_metrics, leaf_metrics


def test_leaf_metrics_by_hand():
    leaves = [
        {
            "reward_extra_info": {"acc": 1.0, "format": 0.0, "tool": 1.0, "format_problems": ""},
            "tool_calls_ok": 1,
            "tool_calls_failed": 0,
            "tree_splits": 3,
            "tree_prefix_reuse": 0.9,
            "stop_reason": "answer",
        },
        {
            "reward_extra_info": {"acc": 0.0, "format": 1.0, "tool": 0.0, "format_problems": "no_action"},
            "tool_calls_ok": 0,
            "tool_calls_failed": 2,
            "tree_splits": 3,
            "tree_prefix_reuse": 0.9,
            "stop_reason": "no_action",
        },
        None,  # a padding row
    ]
    metrics = leaf_metrics(leaves)
    assert (
        metrics["reward/acc/mean"] == 0.5
        and metrics["reward/format/mean"] == 0.5
        and metrics["reward/tool/mean"] == 0.5
    )
    assert metrics["tool/calls_ok_per_leaf"] == 0.5 and metrics["tool/calls_failed_per_leaf"] == 1.0
    assert metrics["tree/splits_per_group"] == 3 and metrics[
        "tree/engine_computed_over_unique_tokens"
    ] == pytest.approx(0.9)
    assert metrics["rollout/stop_answer"] == 0.5 and metrics["rollout/stop_no_action"] == 0.5
    assert "reward/format_problems/mean" not in metrics
    assert leaf_metrics([]) == {}


def test_dynamics_metrics_average_crop_iou_over_the_leaves_that_cropped():
    # DeepEyes' training dynamics per step: zoom count, grounding IoU of the crops (response length is verl's)
    leaves = [
        {  # two crops, the scored one has IoU 0.6
            "reward_extra_info": {"crop_iou": 0.6, "crop_coverage": 1.0, "iou": 0.6},
            "pred_boxes": [[0, 0, 10, 10], [0, 0, 5, 5]],
            "tool_calls_ok": 2,
            "tool_calls_failed": 1,
        },
        {  # one crop that misses g_1: IoU 0.2 logged although the reward's gated iou is 0
            "reward_extra_info": {"crop_iou": 0.2, "crop_coverage": 0.5, "iou": 0.0},
            "pred_boxes": [[0, 0, 10, 10]],
            "tool_calls_ok": 1,
            "tool_calls_failed": 0,
        },
        {  # no crop: no IoU to average
            "reward_extra_info": {"crop_iou": None, "crop_coverage": None, "iou": 0.0},
            "pred_boxes": [],
            "tool_calls_ok": 0,
            "tool_calls_failed": 2,
        },
    ]
    metrics = leaf_metrics(leaves)
    assert metrics["reward/crop_iou/mean"] == pytest.approx(0.4)  # (0.6 + 0.2) / 2, not / 3
    assert metrics["reward/crop_coverage/mean"] == pytest.approx(0.75)
    assert metrics["reward/iou/mean"] == pytest.approx(0.2)  # the reward term: every leaf, 0 without a crop
    assert metrics["tool/zoom_crops_per_leaf"] == pytest.approx(1.0)
    assert metrics["tool/leaves_with_crop"] == pytest.approx(2 / 3)
    assert metrics["tool/calls_ok_per_leaf"] == pytest.approx(1.0)
    assert metrics["tool/calls_failed_per_leaf"] == pytest.approx(1.0)


def test_crop_iou_is_absent_from_a_step_without_crops():
    leaves = [{"reward_extra_info": {"crop_iou": None, "crop_coverage": None}, "pred_boxes": []}] * 4
    metrics = leaf_metrics(leaves)
    assert "reward/crop_iou/mean" not in metrics and "reward/crop_coverage/mean" not in metrics
    assert metrics["tool/zoom_crops_per_leaf"] == 0 and metrics["tool/leaves_with_crop"] == 0


def test_dynamics_metrics_from_the_real_reward():
    from visionleaf.reward import compute_score

    gt = {"gt_boxes": [[10, 10, 60, 60], [0, 0, 100, 100]], "original_size": [100, 100], "options": ["a", "b"]}
    answer = "<think>x</think><answer>B</answer>"
    rollouts = [{"pred_boxes": [[10, 10, 60, 60]]}, {"pred_boxes": [[10, 10, 35, 60]]}, {"pred_boxes": []}]
    leaves = [
        {**rollout, "reward_extra_info": compute_score("vstar", answer, "B", {**gt, **rollout})} for rollout in rollouts
    ]
    metrics = leaf_metrics(leaves)
    # exact crop: IoU 1; the half crop [10, 10, 35, 60] covers 0.5 of g_1 (below 0.9), IoU with g_1 0.5
    assert metrics["reward/crop_iou/mean"] == pytest.approx((1.0 + 0.5) / 2)
    assert metrics["reward/iou/mean"] == pytest.approx(1.0 / 3)  # gated reward term, 0 for the other two
    assert metrics["tool/zoom_crops_per_leaf"] == pytest.approx(2 / 3)


def test_validation_crop_metrics_average_over_every_leaf_that_cropped():
    # verl's reward_extra_infos_dict: one list entry per validation leaf, None where nothing was measured
    infos = {
        "crop_iou": [0.5, None, 0.25, None, 0.0],
        "crop_coverage": [1.0, None, 0.5, None, 0.0],
        "acc": [1, 0, 1, 0, 1],
    }
    assert crop_metrics(infos) == pytest.approx({"val/crop_iou/mean": 0.25, "val/crop_coverage/mean": 0.5})
    assert crop_metrics({"crop_iou": [None, None], "acc": [1, 0]}) == {}


def test_the_trainers_validation_logs_crop_metrics_and_verl_skips_none():
    from tests.verl.test_trainer import make_trainer

    infos = {
        "reward": [1.0, 0.0, 1.0, 1.0],
        "acc": [1.0, 0.0, 1.0, 1.0],
        "crop_iou": [0.5, None, None, 0.25],
        "crop_coverage": [1.0, None, None, 0.5],
    }
    metrics = make_trainer()._val_metrics_update(["synthetic"] * 4, ["a", "a", "b", "c"], infos, [2, 2, 2, 2])
    assert metrics["val/crop_iou/mean"] == pytest.approx(0.375)
    assert metrics["val/crop_coverage/mean"] == pytest.approx(0.75)
    # verl's per-prompt statistics leave the None out (prompt b made no crop)
    assert metrics["val-aux/synthetic/crop_iou/mean@1"] == pytest.approx(0.375)
    assert metrics["val-core/synthetic/acc/mean@2"] == 0.5
