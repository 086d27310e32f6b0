"""Dataset rows (verl RLHF parquet schema), safe image loading, and the synthetic visual-search set."""

from visionleaf.data.images import DEFAULT_MAX_PIXELS, ImageLoadError, load_image, to_rgb
from visionleaf.data.schema import Item, multiple_choice_text, validate_row, write_parquet
from visionleaf.data.synthetic import generate

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ImageLoadError",
    "Item",
    "generate",
    "load_image",
    "multiple_choice_text",
    "to_rgb",
    "validate_row",
    "write_parquet",
]
