"""Per-step training metrics from the leaves' ``extra_fields``: reward components, tool use, tree shape.

verl logs the total reward (``critic/score``) but not its parts; the tree agent loop and the reward put
everything else into each sample's ``extra_fields`` (the reward's dict under ``reward_extra_info``).
A field that is None (e.g. ``tree_prefix_reuse`` when the rollout server does not report cached tokens)
is unknown: its metric is left out of the step, never logged as 0.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from statistics import mean
from typing import Any

ERROR_METRIC = "rollout/agent_loop_errors"
"""Agent-loop sessions that raised since the previous logged step (0 in a healthy run)."""

REWARD_KEYS = (
    "acc",
    "format",
    "tool",
    "grounding",
    "iou",
    "crop_iou",
    "crop_coverage",
    "num_tool_calls",
    "num_tool_errors",
    "answer_len",
)
"""Numeric fields of :func:`visionleaf.reward.compute_score` logged as ``reward/<key>/mean``: the mean over the
leaves where the field is a number (``crop_iou`` / ``crop_coverage`` are None on leaves without a scored crop,
so they average over the leaves that cropped, and are absent from a step where none did)."""

LEAF_KEYS = {
    "tool_calls_ok": "tool/calls_ok_per_leaf",
    "tool_calls_failed": "tool/calls_failed_per_leaf",
    "tree_splits": "tree/splits_per_group",
    "tree_splits_below_root": "tree/splits_below_root_per_group",
    "tree_prefix_reuse": "tree/engine_computed_over_unique_tokens",
    "tree_wall_time_s": "tree/wall_time_s",
}
"""Numeric ``extra_fields`` of :class:`visionleaf.verl.agent_loop.TreeAgentLoop` and their metric names."""


ZOOM_CROPS_METRIC = "tool/zoom_crops_per_leaf"
"""Successful zoom crops per leaf (the leaf's ``pred_boxes``; DeepEyes' zoom count)."""

CROPPED_SHARE_METRIC = "tool/leaves_with_crop"
"""Share of the step's leaves with at least one successful zoom crop."""


def leaf_metrics(extra_fields: Sequence[Mapping[str, Any] | None]) -> dict[str, float]:
    """Means over the step's leaves (tree-level fields repeat on each leaf of a tree, so they average
    per tree), the zoom crops per leaf, and the share of each stop reason as ``rollout/stop_<reason>``."""
    fields = [f for f in extra_fields if isinstance(f, Mapping)]
    out: dict[str, float] = {}
    rewards = [f.get("reward_extra_info") or {} for f in fields]
    for key in REWARD_KEYS:
        values = [float(r[key]) for r in rewards if isinstance(r.get(key), int | float)]
        if values:
            out[f"reward/{key}/mean"] = mean(values)
    for key, name in LEAF_KEYS.items():
        values = [float(f[key]) for f in fields if isinstance(f.get(key), int | float)]
        if values:
            out[name] = mean(values)
    crops = [len(f["pred_boxes"]) for f in fields if hasattr(f.get("pred_boxes"), "__len__")]
    if crops:
        out[ZOOM_CROPS_METRIC] = mean(crops)
        out[CROPPED_SHARE_METRIC] = mean(float(n > 0) for n in crops)
    stops = Counter(str(f["stop_reason"]) for f in fields if "stop_reason" in f)
    total = sum(stops.values())
    for reason, count in stops.items():
        out[f"rollout/stop_{reason}"] = count / total
    return out


def accuracy_by_category(infos: Mapping[str, Sequence[Any]]) -> dict[str, float]:
    """``val/acc_by_category/<category>``: mean ``acc`` of the validation samples of each category, from
    the reward's per-sample fields (``infos[key][i]``, as verl's validation collects them); samples
    without a category or an acc are left out."""
    groups: dict[str, list[float]] = {}
    for category, acc in zip(infos.get("category") or [], infos.get("acc") or [], strict=False):
        if category and isinstance(acc, int | float):
            groups.setdefault(str(category), []).append(float(acc))
    return {f"val/acc_by_category/{category}": mean(values) for category, values in sorted(groups.items())}


CROP_KEYS = ("crop_iou", "crop_coverage")
"""Reward fields that are None on leaves without a scored crop."""


def crop_metrics(infos: Mapping[str, Sequence[Any]]) -> dict[str, float]:
    """``val/<key>/mean`` for :data:`CROP_KEYS`: the mean over all validation leaves with a scored crop (verl's
    own ``val-aux/<source>/crop_iou/mean@n`` averages per prompt, grouped by how many of its leaves cropped);
    absent when no leaf cropped."""
    out: dict[str, float] = {}
    for key in CROP_KEYS:
        values = [float(v) for v in infos.get(key) or [] if isinstance(v, int | float)]
        if values:
            out[f"val/{key}/mean"] = mean(values)
    return out
