"""Run the Qwen2.5-VL processor where torchvision is unusable (the CPU torch build has no torchvision).

transformers' ``Qwen2_5_VLProcessor`` wants a video processor, and its only video processor needs
torchvision; without it transformers exposes placeholder classes that raise on use. visionleaf is
image-only, so when torchvision cannot be imported :func:`apply_torchvision_shim` makes the processor
loader return :class:`ImageOnlyVideoProcessor`: it carries the video geometry the processor reads and
refuses actual videos with a clear error. Where torchvision works, nothing is changed. Images go through
transformers' own PIL backend (``Qwen2VLImageProcessorPil``), so image tokenisation is exactly the
processor's.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from typing import Any

import transformers
from transformers.utils import PushToHubMixin


@functools.cache
def torchvision_usable() -> bool:
    """True when torchvision and its v2 transforms import (they fail on the CPU-only torch build)."""
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        importlib.import_module("torchvision.transforms.v2.functional")
    except Exception:
        return False
    return True


class ImageOnlyVideoProcessor(transformers.BaseVideoProcessor, PushToHubMixin):
    """Stand-in video processor: Qwen2-VL's video geometry, no video support.

    It subclasses whatever ``transformers.BaseVideoProcessor`` is (the placeholder without
    torchvision) so the processor's type check accepts it, and ``PushToHubMixin`` so the processor
    serialises its fields; it never calls the base class.
    """

    _auto_class = None

    def __init__(self, patch_size: int = 14, temporal_patch_size: int = 2, merge_size: int = 2, **_: Any):
        self.patch_size = patch_size
        self.temporal_patch_size = temporal_patch_size
        self.merge_size = merge_size

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(
            "videos need torchvision, which does not work with this torch build; visionleaf is image-only"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "video_processor_type": "Qwen2VLVideoProcessor",
            "patch_size": self.patch_size,
            "temporal_patch_size": self.temporal_patch_size,
            "merge_size": self.merge_size,
        }

    def save_pretrained(self, *args: Any, **kwargs: Any) -> list[str]:
        return []  # its fields live in processor_config.json through to_dict()


class _ImageOnlyAutoVideoProcessor:
    """Replaces ``AutoVideoProcessor`` in transformers' processor loader."""

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> ImageOnlyVideoProcessor:
        return ImageOnlyVideoProcessor()


def apply_torchvision_shim() -> bool:
    """Install the stand-in where torchvision is unusable; idempotent. True when it is in force."""
    if torchvision_usable():
        return False
    auto_module = importlib.import_module("transformers.models.auto.video_processing_auto")
    auto_module.AutoVideoProcessor = _ImageOnlyAutoVideoProcessor  # type: ignore[attr-defined]
    return True
