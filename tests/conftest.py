"""Shared fixtures: the tiny Qwen2.5-VL (built offline once per session) and its processors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visionleaf.models import tiny


@pytest.fixture(scope="session")
def bpe_processor():
    return tiny.build_processor(tiny.build_tokenizer("bpe"))


@pytest.fixture(scope="session")
def qwen_processor():
    return tiny.build_processor(tiny.build_tokenizer("qwen"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return tiny.build(tmp_path_factory.mktemp("tiny") / "tiny-bpe", vocab="bpe", seed=0)


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="session")
def warm_model_dir(tmp_path_factory) -> Path:
    """The tiny model after the format warm-up: it writes tool calls (~1 min to build on 2 cores)."""
    return tiny.build(tmp_path_factory.mktemp("tiny") / "tiny-warm", vocab="bpe", seed=0, warmup_steps=400)
