"""verl's ``RLHFDataset`` with images opened by PIL alone.

verl 0.9.1 reads images through ``qwen_vl_utils``, which imports torchvision (unusable on the CPU torch
build). Here an image item (a path, ``{"image": path}`` or a PIL image) is opened with PIL and converted
to RGB; resizing is left to the model's processor, as in the tiny model's own pipeline. Videos are
refused. Select it with ``data.custom_cls.path=pkg://visionleaf.verl.dataset data.custom_cls.name=PILImageDataset``
(``configs/tiny_cpu.yaml`` does).
"""

from __future__ import annotations

import os
from typing import Any

from PIL import Image
from verl.utils.dataset.rl_dataset import RLHFDataset


def open_image(image: Any) -> Image.Image:
    """A PIL RGB image from a PIL image, a path or a ``file://`` URL."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image).removeprefix("file://")
        with Image.open(path) as opened:
            return opened.convert("RGB")
    raise TypeError(f"image must be a PIL image or a path, got {type(image).__name__}; bytes/URLs need qwen_vl_utils")


class PILImageDataset(RLHFDataset):
    """``RLHFDataset`` whose vision extraction needs only PIL (image-only; see the module docstring)."""

    @classmethod
    def _process_multi_modal_info(
        cls, messages: list[dict], image_patch_size: int, config: Any
    ) -> tuple[list[Image.Image], list[Any], list[Any]]:
        # verl's signature; like verl, None stands for "no images / no videos / no audio"
        images = []
        for message in messages:
            content = message.get("content")
            if not isinstance(content, list):
                continue
            for item in content:
                if not isinstance(item, dict):
                    continue
                if item.get("type") == "video":
                    raise ValueError("visionleaf's PIL dataset path is image-only; got a video item")
                if item.get("type") == "image":
                    images.append(open_image(item["image"]))
        return images or None, None, cls._extract_audio_info(messages)  # type: ignore[return-value]
