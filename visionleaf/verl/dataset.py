"""verl's ``RLHFDataset`` with images loaded by :func:`visionleaf.data.load_image` and sized for the model once.

verl 0.9.1 reads images through ``qwen_vl_utils``, which imports torchvision (unusable on the CPU torch
build) and has neither a decompression-bomb cap nor visionleaf's colour-mode conversions (16-bit, float,
transparency). Here an image item (a path, ``file://`` URL, bytes or PIL image) is loaded with those
guards. Each row's global view is then resized once, in the dataset, to the size the model's processor
would give it (its pixel budget), so that the rollout sends only model-sized images to the servers; the
full-resolution original stays on disk (``extra_info.original_image``, filled in from the image's path when
the row lacks it) and the tree agent loop loads it once per prompt to cut crops from. A row whose image has
no path and no ``original_image`` keeps its full image (crops need it). Videos are refused. Select it with
``data.custom_cls.path=pkg://visionleaf.verl.dataset data.custom_cls.name=PILImageDataset``
(``configs/tiny_cpu.yaml`` does).
"""

from __future__ import annotations

import os
from typing import Any

from PIL import Image
from verl.utils.dataset.rl_dataset import RLHFDataset

from visionleaf.data.images import DEFAULT_MAX_PIXELS, ImageLoadError, load_image, to_rgb
from visionleaf.protocol import image_pixel_budget
from visionleaf.tools.crop import model_size


def open_image(image: Any) -> Image.Image:
    """An RGB image from a PIL image, a path, a ``file://`` URL or encoded bytes, with ``load_image``'s guards."""
    if isinstance(image, Image.Image):
        width, height = image.size
        if width * height > DEFAULT_MAX_PIXELS:
            raise ImageLoadError(
                f"image is {width}x{height} = {width * height} pixels, above the cap {DEFAULT_MAX_PIXELS} "
                "(decompression-bomb guard of visionleaf.data.load_image)"
            )
        return to_rgb(image)
    if isinstance(image, (str, os.PathLike)):
        return load_image(os.fspath(image).removeprefix("file://"))
    if isinstance(image, bytes):
        return load_image(image)
    raise TypeError(f"image must be a PIL image, a path or bytes, got {type(image).__name__}; URLs need qwen_vl_utils")


def _image_items(messages: list[dict]) -> list[dict]:
    items = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            items += [item for item in content if isinstance(item, dict) and item.get("type") in ("image", "video")]
    if any(item["type"] == "video" for item in items):
        raise ValueError("visionleaf's PIL dataset path is image-only; got a video item")
    return items


class PILImageDataset(RLHFDataset):
    """``RLHFDataset`` whose images are loaded with visionleaf's guards and sized for the model (module docstring)."""

    def __getitem__(self, item: int) -> dict:
        row = super().__getitem__(item)
        items = _image_items(row["raw_prompt"])
        extra = row["extra_info"]
        if len(items) == 1 and isinstance(items[0]["image"], (str, os.PathLike)) and not extra.get("original_image"):
            extra["original_image"] = os.fspath(items[0]["image"]).removeprefix("file://")
        for image_item in items:
            image = open_image(image_item["image"])
            if self.processor is not None and extra.get("original_image"):
                size = model_size(image.size, *image_pixel_budget(self.processor.image_processor))
                if size != image.size:
                    image = image.resize(size, Image.Resampling.BICUBIC)
            image_item["image"] = image
        return row

    @classmethod
    def _process_multi_modal_info(
        cls, messages: list[dict], image_patch_size: int, config: Any
    ) -> tuple[list[Image.Image], list[Any], list[Any]]:
        # verl's signature; like verl, None stands for "no images / no videos / no audio"
        images = [open_image(item["image"]) for item in _image_items(messages)]
        return images or None, None, cls._extract_audio_info(messages)  # type: ignore[return-value]
