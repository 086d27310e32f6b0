"""``image_rotate_tool``: DeepEyes' zero-shot extra tool (offered at inference, never trained on)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from numbers import Real
from typing import Any

from PIL import Image

from visionleaf.tools.base import Observation, ToolContext, ToolError, register_tool
from visionleaf.tools.crop import resize_to_budget

ROTATE_PARAMETERS: Mapping[str, Any] = {
    "type": "object",
    "properties": {
        "angle": {
            "type": "number",
            "description": "Counter-clockwise rotation in degrees, e.g. 90, 180, 270.",
        },
    },
    "required": ["angle"],
}


@register_tool(
    "image_rotate_tool",
    "Rotate the whole image counter-clockwise by an angle in degrees and look at it again.",
    ROTATE_PARAMETERS,
)
def rotate(arguments: Mapping[str, Any], context: ToolContext) -> Observation:
    """Rotate the original image (multiples of 90 are lossless; others expand with a white fill)."""
    angle = arguments.get("angle")
    if not isinstance(angle, Real) or isinstance(angle, bool) or not math.isfinite(angle):
        raise ToolError(f"angle must be a finite number of degrees, got {angle!r}")
    angle = float(angle) % 360
    image = context.original_image
    transposes = {
        90.0: Image.Transpose.ROTATE_90,
        180.0: Image.Transpose.ROTATE_180,
        270.0: Image.Transpose.ROTATE_270,
    }
    if angle in transposes:
        rotated = image.transpose(transposes[angle])
    elif angle == 0.0:
        rotated = image
    else:
        rotated = image.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True, fillcolor="white")
    return Observation(ok=True, images=(resize_to_budget(rotated, context.crop_min_pixels, context.crop_max_pixels),))
