import pytest

from visionleaf.verl.metrics import leaf_metrics


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
