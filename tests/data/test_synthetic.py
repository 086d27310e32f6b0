from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from visionleaf.data.images import load_image
from visionleaf.data.schema import Item, validate_row
from visionleaf.data.synthetic import CATEGORIES, PALETTE, WORDS, generate

SMALL = {"min_size": 256, "max_size": 384}


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return generate(tmp_path_factory.mktemp("syn"), n=8, seed=3)  # default 1024-2048 px canvases


@pytest.fixture(scope="module")
def masks(rows: list[dict[str, Any]]) -> list[dict[str, np.ndarray]]:
    """Per row and palette colour, the [H, W] mask of pixels of exactly that colour (targets only)."""
    out = []
    for row in rows:
        pixels = np.asarray(load_image(row["images"][0]["image"])).astype(np.int32)  # [H, W, 3]
        keys = (pixels[..., 0] << 16) | (pixels[..., 1] << 8) | pixels[..., 2]  # [H, W]
        out.append({name: keys == ((r << 16) | (g << 8) | b) for name, (r, g, b) in PALETTE.items()})
    return out


def _mask_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    ys, xs = np.nonzero(mask)
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


def test_counts_and_files(rows: list[dict[str, Any]]) -> None:
    assert len(rows) == 8
    out = Path(rows[0]["images"][0]["image"]).parent.parent
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"train_{i:06d}.png" for i in range(8)]
    assert pq.read_table(out / "train.parquet").num_rows == 8
    assert [row["extra_info"]["category"] for row in rows] == list(CATEGORIES) * 2
    assert [row["extra_info"]["index"] for row in rows] == list(range(8))


def test_rows_valid_and_consistent(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        validate_row(row)
        item = Item.from_row(row)
        assert item.data_source == "visionleaf/synthetic"
        assert Path(item.image).is_absolute() and item.original_image == item.image
        assert load_image(item.image).size == item.original_size
        assert all(1024 <= side <= 2048 for side in item.original_size)
        assert 2 <= len(item.options) <= 4 and len(set(item.options)) == len(item.options)
        letter = item.ground_truth
        assert letter in "ABCD"[: len(item.options)]
        for i, option in enumerate(item.options):
            assert f"({'ABCD'[i]}) {option}" in item.question
        assert item.messages[-1]["content"].count("<image>") == 1
        assert item.question in item.messages[-1]["content"]
        assert "image_zoom_in_tool" in item.messages[0]["content"]
        assert 2 <= len(item.gt_boxes) <= 3


def test_tight_box_is_exactly_the_target_pixels(rows: list[dict[str, Any]], masks: list[dict[str, np.ndarray]]) -> None:
    for row, row_masks in zip(rows, masks, strict=True):
        item = Item.from_row(row)
        target = np.logical_or.reduce(list(row_masks.values()))  # [H, W]
        # every target pixel is inside the smallest box, and the box touches them on all four sides
        assert _mask_box(target) == item.gt_boxes[0], item.category
        x1, y1, x2, y2 = (int(v) for v in item.gt_boxes[0])
        inside = target[y1:y2, x1:x2]
        # the box is mostly target, not background (position boxes also hold the gap between targets)
        assert inside.mean() > (0.02 if item.category == "position/relative" else 0.15), item.category
        if item.category != "position/relative":  # small: a few percent of the short side
            assert max(x2 - x1, y2 - y1) < 0.1 * min(item.original_size)


def test_boxes_enlarge_around_the_target(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        boxes = Item.from_row(row).gt_boxes
        (tx1, ty1, tx2, ty2), (bx1, by1, bx2, by2) = boxes[0], boxes[1]
        width, height = Item.from_row(row).original_size
        # 2x around the same centre, up to rounding and clamping
        assert bx2 - bx1 == pytest.approx(min(2 * (tx2 - tx1), width), abs=2) or bx1 == 0 or bx2 == width
        assert by2 - by1 == pytest.approx(min(2 * (ty2 - ty1), height), abs=2) or by1 == 0 or by2 == height


def test_answers_match_the_pixels(rows: list[dict[str, Any]], masks: list[dict[str, np.ndarray]]) -> None:
    for row, row_masks in zip(rows, masks, strict=True):
        item = Item.from_row(row)
        answer = item.options["ABCD".index(item.ground_truth)]
        present = {name for name, mask in row_masks.items() if mask.any()}
        if item.category == "attribute/color":
            assert present == {answer}
        elif item.category == "attribute/shape":
            colour = re.search(r"small (\w+) object", item.question)
            assert colour is not None and present == {colour.group(1)}
        elif item.category == "attribute/text":
            assert answer in WORDS and len(present) == 1
        else:
            found = re.search(r"small (\w+) \w+ .*small (\w+) \w+\?", item.question)
            assert found is not None
            a, b = found.groups()
            assert present == {a, b}
            (ax, ay), (bx, by) = (np.argwhere(row_masks[name]).mean(axis=0)[::-1] for name in (a, b))
            expected = {"left": ax < bx, "right": ax > bx, "above": ay < by, "below": ay > by}
            assert expected[answer], (item.question, answer)


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    first = generate(tmp_path / "a", n=4, seed=7, **SMALL)
    parquet = (tmp_path / "a" / "train.parquet").read_bytes()
    images = [Path(row["images"][0]["image"]).read_bytes() for row in first]
    again = generate(tmp_path / "a", n=4, seed=7, **SMALL)
    assert again == first
    assert (tmp_path / "a" / "train.parquet").read_bytes() == parquet
    assert [Path(row["images"][0]["image"]).read_bytes() for row in again] == images

    # another folder: same pixels and same rows up to the folder name
    elsewhere = generate(tmp_path / "b", n=4, seed=7, **SMALL)
    assert [Path(row["images"][0]["image"]).read_bytes() for row in elsewhere] == images
    assert str(elsewhere).replace(str(tmp_path / "b"), str(tmp_path / "a")) == str(first)

    # item i does not depend on n
    prefix = generate(tmp_path / "c", n=2, seed=7, **SMALL)
    assert [Path(row["images"][0]["image"]).read_bytes() for row in prefix] == images[:2]


def test_seed_and_split_change_the_data(tmp_path: Path) -> None:
    base = generate(tmp_path / "a", n=2, seed=1, **SMALL)
    other_seed = generate(tmp_path / "b", n=2, seed=2, **SMALL)
    other_split = generate(tmp_path / "c", n=2, seed=1, split="test", **SMALL)
    assert other_split[0]["images"][0]["image"].endswith("test_000000.png")
    assert other_split[0]["extra_info"]["split"] == "test"
    read = [Path(rows[0]["images"][0]["image"]).read_bytes() for rows in (base, other_seed, other_split)]
    assert read[0] != read[1] and read[0] != read[2]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 0}, "n must be >= 1"),
        ({"min_size": 100}, "min_size <= max_size"),
        ({"min_size": 2048, "max_size": 1024}, "min_size <= max_size"),
        ({"max_size": 10000}, "<= 8192"),
    ],
)
def test_bad_arguments_explain(tmp_path: Path, kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"n": 1, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=re.escape(message)):
        generate(tmp_path, **args)


def test_unknown_tool_lists_registered(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="image_zoom_in_tool"):
        generate(tmp_path, n=1, seed=0, tool_names=("no_such_tool",), **SMALL)


def test_cli(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    args = ["--out", str(out), "--n", "4", "--seed", "5", "--min-size", "256", "--max-size", "300"]
    result = subprocess.run(
        [sys.executable, "-m", "visionleaf.data.synthetic", *args, "--split", "val"],
        capture_output=True,
        text=True,
        check=True,
    )
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wrote 4 items (attribute/color=1,")
    assert str(out / "val.parquet") in lines[0]
    table = pq.read_table(out / "val.parquet").to_pylist()
    assert [row["extra_info"]["split"] for row in table] == ["val"] * 4
    library = generate(tmp_path / "lib", n=4, seed=5, min_size=256, max_size=300, split="val")
    assert str(table).replace(str(out), str(tmp_path / "lib")) == str(library)
