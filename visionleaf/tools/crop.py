"""``image_zoom_in_tool``: crop a region of the ORIGINAL image, given in the model's coordinates.

The model sees the global view resized by the processor (``smart_resize``: sides multiples of 28,
pixel count within [min_pixels, max_pixels]); its ``bbox_2d`` is in that space. :func:`map_box`
validates, clamps and enlarges the box in model space, then scales it to the original image, which may
be much larger than the global view (LFPC's information gap: the global view is downsampled, the crop
comes from full resolution).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from numbers import Real
from typing import Any

from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from visionleaf.boxes import Box
from visionleaf.tools.base import Observation, ToolContext, ToolError, register_tool

PATCH_FACTOR = 28
"""Qwen2.5-VL's resize factor: patch 14 x spatial merge 2."""
MIN_BOX_SIDE = 28
"""Boxes are enlarged to at least this many model-space pixels per side (one visual token)."""
MAX_ASPECT_RATIO = 100
"""Long side / short side cap; thinner boxes are widened around their centre."""


def model_size(
    image_size: tuple[int, int], min_pixels: int, max_pixels: int, factor: int = PATCH_FACTOR
) -> tuple[int, int]:
    """(width, height) the processor resizes an image of ``image_size`` (width, height) to."""
    width, height = image_size
    new_height, new_width = smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    return new_width, new_height


def _validate_box(bbox_2d: Any) -> Box:
    if isinstance(bbox_2d, str | bytes) or not isinstance(bbox_2d, Sequence):
        raise ToolError(f"bbox_2d must be a list of 4 numbers [x1, y1, x2, y2], got {bbox_2d!r}")
    if len(bbox_2d) != 4:
        raise ToolError(f"bbox_2d must have 4 numbers [x1, y1, x2, y2], got {len(bbox_2d)}")
    if not all(isinstance(v, Real) and not isinstance(v, bool) for v in bbox_2d):
        raise ToolError(f"bbox_2d must contain numbers only, got {list(bbox_2d)!r}")
    x1, y1, x2, y2 = (float(v) for v in bbox_2d)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise ToolError(f"bbox_2d must contain finite numbers, got {list(bbox_2d)!r}")
    if x1 >= x2 or y1 >= y2:
        raise ToolError(f"bbox_2d needs x1 < x2 and y1 < y2, got {[x1, y1, x2, y2]}")
    return x1, y1, x2, y2


def _grow(lo: float, hi: float, side: float, limit: float) -> tuple[float, float]:
    """Widen [lo, hi] to ``side`` around its centre, shifted back inside [0, limit]."""
    side = min(side, limit)
    if hi - lo >= side:
        return lo, hi
    centre = (lo + hi) / 2
    lo = min(max(centre - side / 2, 0.0), limit - side)
    return lo, lo + side


def map_box(bbox_2d: Sequence[float], model_size: tuple[int, int], original_size: tuple[int, int]) -> Box:
    """Map a model-space box to original-image pixels; sizes are (width, height).

    In model space: validate (4 finite numbers, x1 < x2, y1 < y2), clamp to the image, enlarge each side
    to >= 28 px from the centre (shifted back inside), cap the aspect ratio at 100. Then scale by
    original / model. Raises ``ValueError`` (a ``ToolError``) with the reason for an invalid box.
    """
    (mw, mh), (ow, oh) = model_size, original_size
    if min(mw, mh, ow, oh) <= 0:
        raise ToolError(f"image sizes must be positive, got model {model_size} and original {original_size}")
    x1, y1, x2, y2 = _validate_box(bbox_2d)
    x1, x2 = min(max(x1, 0.0), mw), min(max(x2, 0.0), mw)
    y1, y2 = min(max(y1, 0.0), mh), min(max(y2, 0.0), mh)
    if x1 >= x2 or y1 >= y2:
        raise ToolError(f"bbox_2d {list(bbox_2d)} lies outside the {mw}x{mh} image")
    x1, x2 = _grow(x1, x2, MIN_BOX_SIDE, mw)
    y1, y2 = _grow(y1, y2, MIN_BOX_SIDE, mh)
    width, height = x2 - x1, y2 - y1
    if width > MAX_ASPECT_RATIO * height:
        y1, y2 = _grow(y1, y2, width / MAX_ASPECT_RATIO, mh)
    elif height > MAX_ASPECT_RATIO * width:
        x1, x2 = _grow(x1, x2, height / MAX_ASPECT_RATIO, mw)
    sx, sy = ow / mw, oh / mh
    return x1 * sx, y1 * sy, x2 * sx, y2 * sy


def resize_to_budget(image: Image.Image, min_pixels: int, max_pixels: int) -> Image.Image:
    """Resize with the processor's smart-resize rule, so the image maps to whole visual tokens."""
    size = model_size(image.size, min_pixels, max_pixels)
    return image if size == image.size else image.resize(size, Image.Resampling.BICUBIC)


ZOOM_PARAMETERS: Mapping[str, Any] = {
    "type": "object",
    "properties": {
        "bbox_2d": {
            "type": "array",
            "items": {"type": "number"},
            "minItems": 4,
            "maxItems": 4,
            "description": "Region to zoom into as [x1, y1, x2, y2], absolute pixels in the image as you see it.",
        },
        "label": {"type": "string", "description": "Name of the object or region inside the box."},
    },
    "required": ["bbox_2d"],
}


@register_tool(
    "image_zoom_in_tool",
    "Zoom in on a region of the image: returns that region at higher resolution.",
    ZOOM_PARAMETERS,
)
def zoom_in(arguments: Mapping[str, Any], context: ToolContext) -> Observation:
    """Crop ``bbox_2d`` (model space) from the original image; the box actually cut is returned."""
    if "bbox_2d" not in arguments:
        raise ToolError("missing required argument 'bbox_2d'")
    box = map_box(arguments["bbox_2d"], context.model_size, context.original_image.size)
    # Whole pixels that cover the box; map_box keeps it inside the image.
    left, top = math.floor(box[0]), math.floor(box[1])
    right, bottom = max(math.ceil(box[2]), left + 1), max(math.ceil(box[3]), top + 1)
    crop = context.original_image.crop((left, top, right, bottom))
    crop = resize_to_budget(crop, context.crop_min_pixels, context.crop_max_pixels)
    return Observation(ok=True, images=(crop,), box=box)
