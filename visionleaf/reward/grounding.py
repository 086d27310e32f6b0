"""Grounding reward of a predicted crop box against hierarchical GT boxes (LFPC stage II, SPEC §4).

All boxes are :data:`visionleaf.boxes.Box` in original-image pixels (the geometry lives there).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from visionleaf.boxes import as_box, box_area, box_iou, clamp_box, intersection_area


def grounding_reward(
    pred_box: Sequence[float] | None,
    gt_boxes: Sequence[Sequence[float]],
    image_size: Sequence[float],
    coverage_threshold: float = 0.9,
) -> dict[str, float]:
    """LFPC grounding reward of ``pred_box`` against ``gt_boxes`` (g_1 smallest .. g_K), original pixels.

    LFPC stage II grounding reward: ``coverage = area(b ∩ g_1) / area(g_1)``;
    ``r_iou = max_k IoU(b, g_k)`` if ``coverage >= coverage_threshold`` else 0;
    ``r_l1 = 1 - min_k mean_i |b_i - g_k,i|`` with x corners divided by the image width and y corners by
    the height, clipped to [0, 1]; ``score = r_iou + r_l1`` in [0, 2]. ``raw_iou = max_k IoU(b, g_k)``
    whatever the coverage: the crop's grounding IoU for training-dynamics logs, not a reward term.

    ``pred_box`` is clamped to the image first (the crop tool cuts only inside it); GT boxes are used
    as given. No prediction or no GT boxes: all zeros. ``image_size`` is (width, height) in pixels.
    Returns ``{"iou": r_iou, "l1": r_l1, "coverage": coverage, "score": r_iou + r_l1, "raw_iou": raw_iou}``.
    """
    if len(image_size) != 2 or not all(math.isfinite(float(v)) and float(v) > 0 for v in image_size):
        raise ValueError(f"image_size must be (width, height) > 0 in pixels, got {image_size!r}")
    zeros = {"iou": 0.0, "l1": 0.0, "coverage": 0.0, "score": 0.0, "raw_iou": 0.0}
    if pred_box is None or len(gt_boxes) == 0:
        return zeros
    w, h = float(image_size[0]), float(image_size[1])
    b = clamp_box(as_box(pred_box), (w, h))
    gts = [as_box(g) for g in gt_boxes]

    smallest_area = box_area(gts[0])
    coverage = intersection_area(b, gts[0]) / smallest_area if smallest_area > 0 else 0.0
    raw_iou = max(box_iou(b, g) for g in gts)
    r_iou = raw_iou if coverage >= coverage_threshold else 0.0
    scale = (w, h, w, h)
    l1 = min(sum(abs(bi - gi) / s for bi, gi, s in zip(b, g, scale, strict=True)) / 4 for g in gts)
    r_l1 = min(max(1.0 - l1, 0.0), 1.0)
    return {"iou": r_iou, "l1": r_l1, "coverage": coverage, "score": r_iou + r_l1, "raw_iou": raw_iou}
