"""PILImageDataset: load_image's guards on verl's dataset path; the global view sized for the model once."""

import struct
import zlib

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf
from PIL import Image

from tests.conftest import noise_image
from visionleaf.data.images import ImageLoadError
from visionleaf.protocol import image_pixel_budget
from visionleaf.tools.crop import model_size
from visionleaf.verl.dataset import PILImageDataset


def write_rows(tmp_path, images, extra=None):
    rows = [
        {
            "data_source": "test",
            "prompt": [{"role": "user", "content": "<image>What colour is the dot?"}],
            "images": [{"image": str(path)}],
            "reward_model": {"style": "rule", "ground_truth": "A"},
            "extra_info": {"index": i, **(extra or {})},
        }
        for i, path in enumerate(images)
    ]
    path = tmp_path / "rows.parquet"
    pd.DataFrame(rows).to_parquet(path)
    return path


def dataset(tmp_path, processor, parquet):
    config = OmegaConf.create(
        {"max_prompt_length": 8192, "filter_overlong_prompts": False, "cache_dir": str(tmp_path / "cache")}
    )
    return PILImageDataset(str(parquet), processor.tokenizer, config, processor=processor)


def image_of(row):
    [item] = [
        p for m in row["raw_prompt"] if isinstance(m["content"], list) for p in m["content"] if p["type"] == "image"
    ]
    return item["image"]


def test_global_view_is_model_sized_and_the_original_stays_a_path(tmp_path, bpe_processor):
    original = tmp_path / "big.png"
    noise_image(1600, 1200, seed=1).save(original)
    row = dataset(tmp_path, bpe_processor, write_rows(tmp_path, [original]))[0]
    view = image_of(row)
    min_pixels, max_pixels = image_pixel_budget(bpe_processor.image_processor)
    assert isinstance(view, Image.Image) and view.mode == "RGB"
    assert view.size == model_size((1600, 1200), min_pixels, max_pixels) and view.width * view.height <= max_pixels
    assert row["extra_info"]["original_image"] == str(original)  # crops come from the full-resolution file
    # the processor's own resize of the model-sized view is the identity: the same visual tokens
    assert model_size(view.size, min_pixels, max_pixels) == view.size


def test_an_existing_original_is_kept(tmp_path, bpe_processor):
    view = tmp_path / "view.png"
    noise_image(800, 600, seed=2).save(view)
    row = dataset(tmp_path, bpe_processor, write_rows(tmp_path, [view], {"original_image": "/data/full.png"}))[0]
    assert row["extra_info"]["original_image"] == "/data/full.png"
    assert image_of(row).width * image_of(row).height <= image_pixel_budget(bpe_processor.image_processor)[1]


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path, bpe_processor):
    path = tmp_path / "grey16.png"
    Image.fromarray(np.full((30, 40), 32896, dtype=np.uint16)).save(path)  # mid grey in 16 bits
    row = dataset(tmp_path, bpe_processor, write_rows(tmp_path, [path]))[0]
    pixels = np.asarray(image_of(row))
    assert pixels.shape[2] == 3 and abs(int(pixels.mean()) - 128) <= 1  # a plain convert("RGB") clips to 255


def png_header(width, height):
    """A PNG whose header claims ``width`` x ``height`` pixels (no pixel data: decoding it must not start)."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_decompression_bombs_are_refused(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header(12_000, 12_000))  # 144 M pixels > the 128 M cap, below Pillow's hard limit
    messages = [{"role": "user", "content": [{"type": "image", "image": str(bomb)}]}]
    with pytest.raises(ImageLoadError, match="decompression-bomb guard"):
        PILImageDataset._process_multi_modal_info(messages, 14, None)
