"""The one box type of visionleaf: ``(x1, y1, x2, y2)`` in pixels, and the geometry the reward needs.

Dataset rows (GT boxes), the crop tool (boxes cut), the rollout (its records) and the grounding reward all
use :data:`Box`. A box with ``x2 <= x1`` or ``y2 <= y1`` has zero area: it never crashes anything and its
IoU is 0. This module imports nothing from visionleaf, so every layer can use it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Box = tuple[float, float, float, float]
"""(x1, y1, x2, y2) in pixels (original-image pixels unless a name says otherwise)."""


def as_box(values: Sequence[float]) -> Box:
    """``values`` as a :data:`Box`; ``ValueError`` unless it is 4 finite numbers."""
    if isinstance(values, (str, bytes)):
        raise ValueError(f"a box must be 4 numbers [x1, y1, x2, y2] in pixels, got the string {values!r}")
    try:
        box = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"a box must be 4 numbers [x1, y1, x2, y2] in pixels, got {values!r}") from None
    if len(box) != 4 or not all(math.isfinite(v) for v in box):
        raise ValueError(f"a box must be 4 finite numbers [x1, y1, x2, y2] in pixels, got {values!r}")
    return box[0], box[1], box[2], box[3]


def box_area(box: Box) -> float:
    """Area in pixels²; 0 for a degenerate box."""
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def intersection_area(a: Box, b: Box) -> float:
    """Area of ``a ∩ b`` in pixels²."""
    return box_area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union; 0 when the union is empty."""
    inter = intersection_area(a, b)
    union = box_area(a) + box_area(b) - inter
    return inter / union if union > 0 else 0.0


def clamp_box(box: Box, image_size: tuple[float, float]) -> Box:
    """``box`` clamped to the image ``[0, w] x [0, h]`` (a box fully outside becomes a border line)."""
    w, h = image_size
    x1, y1, x2, y2 = (min(max(v, 0.0), limit) for v, limit in zip(box, (w, h, w, h), strict=True))
    return x1, y1, x2, y2


def box_hierarchy(tight: Box, width: int, height: int) -> list[Box]:
    """visionleaf's GT boxes for a target whose tight box is ``tight``, in a ``width`` x ``height`` image:
    ``tight``, then its 2x and 4x enlargements around the same centre (outwards to whole pixels, clamped to
    the image), smallest first, duplicates dropped."""
    x1, y1, x2, y2 = tight
    cx, cy, bw, bh = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
    boxes: list[Box] = [(float(x1), float(y1), float(x2), float(y2))]
    for factor in (2, 4):
        box = (
            float(max(0, math.floor(cx - bw * factor / 2))),
            float(max(0, math.floor(cy - bh * factor / 2))),
            float(min(width, math.ceil(cx + bw * factor / 2))),
            float(min(height, math.ceil(cy + bh * factor / 2))),
        )
        if box != boxes[-1]:
            boxes.append(box)
    return boxes
