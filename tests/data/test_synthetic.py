from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from visionleaf.data.images import load_image
from visionleaf.data.schema import Item, validate_row
from visionleaf.data.synthetic import (
    CATEGORIES,
    PALETTE,
    STRIPE_CANVAS,
    STRIPE_VIEW,
    WORDS,
    generate,
    generate_stripes,
    quadrant_box,
    stripes_colour,
)
from visionleaf.protocol import image_pixel_budget
from visionleaf.tools import ToolCall, ToolContext, run_tool
from visionleaf.tools.crop import resize_to_budget

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


# stripes task: the information gap by construction -------------------------------------------------------


def _stripe_oracle(image: Image.Image, box: tuple[float, float, float, float]) -> str:
    """Pixel-statistics reader: ``vertical`` when brightness changes more along x than along y inside the
    middle 60% of ``box`` (x1, y1, x2, y2 in ``image`` pixels), else ``horizontal``; ties answer
    ``horizontal`` (a coin flip's worth of information)."""
    x1, y1, x2, y2 = box
    dx, dy = (x2 - x1) / 5, (y2 - y1) / 5
    region = np.asarray(image.convert("L"), dtype=np.float64)[
        round(y1 + dy) : round(y2 - dy), round(x1 + dx) : round(x2 - dx)
    ]  # [h, w]
    along_x = np.abs(np.diff(region, axis=1)).mean() if region.shape[1] > 1 else 0.0
    along_y = np.abs(np.diff(region, axis=0)).mean() if region.shape[0] > 1 else 0.0
    return "vertical" if along_x > along_y else "horizontal"


@pytest.fixture(scope="module")
def stripe_rows(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return generate_stripes(tmp_path_factory.mktemp("stripes"), n=24, seed=5)


def test_stripes_rows_are_valid_and_balanced(stripe_rows: list[dict[str, Any]]) -> None:
    answers = []
    for row in stripe_rows:
        validate_row(row)
        item = Item.from_row(row)
        assert all(STRIPE_CANVAS[0] <= side <= STRIPE_CANVAS[1] for side in item.original_size)
        answers.append(item.options["AB".index(item.ground_truth)])
        x1, y1, x2, y2 = item.gt_boxes[0]
        qx1, qy1, qx2, qy2 = quadrant_box(row["extra_info"]["quadrant"], item.original_size)
        assert qx1 <= x1 < x2 <= qx2 and qy1 <= y1 < y2 <= qy2  # the square lies inside its quadrant
    assert 6 <= answers.count("vertical") <= 18


def test_stripes_gap_global_view_at_chance_quadrant_crop_readable(stripe_rows, bpe_processor) -> None:
    """The global view (as the processor passes it to the model) keeps where the square is (its mean colour)
    but not its stripes; the real zoom tool's crop of the square's quadrant keeps them: a pixel-statistics
    oracle reads ~50% from the first and 100% from the second."""
    min_pixels, max_pixels = image_pixel_budget(bpe_processor.image_processor)
    global_right = 0
    crop_right = {"quadrant": 0, "gt": 0}
    for row in stripe_rows:
        item = Item.from_row(row)
        answer = item.options["AB".index(item.ground_truth)]
        original = load_image(item.original_image)
        view = resize_to_budget(load_image(item.image), min_pixels, max_pixels)
        assert view.size == (STRIPE_VIEW, STRIPE_VIEW)
        sx, sy = view.width / original.width, view.height / original.height
        x1, y1, x2, y2 = item.gt_boxes[0]
        global_right += _stripe_oracle(view, (x1 * sx, y1 * sy, x2 * sx, y2 * sy)) == answer
        # the square's colour still marks its place in the global view
        mean = np.asarray(view, dtype=np.float64)[round(y1 * sy) + 2 : round(y2 * sy) - 2, round(x1 * sx) + 2 :]
        assert np.abs(mean[:, : max(1, round((x2 - x1) * sx) - 4)].mean((0, 1)) - _square_colour(row)).max() < 12

        quadrant = list(quadrant_box(row["extra_info"]["quadrant"], view.size))
        for name, bbox in (("quadrant", quadrant), ("gt", [x1 * sx, y1 * sy, x2 * sx, y2 * sy])):
            call = ToolCall("image_zoom_in_tool", {"bbox_2d": bbox})
            observation = run_tool(call, ToolContext(original, view.size, min_pixels, max_pixels))
            assert observation.ok and observation.box is not None
            crop, (bx1, by1, bx2, by2) = observation.images[0], observation.box
            cx, cy = crop.width / (bx2 - bx1), crop.height / (by2 - by1)
            box_in_crop = ((x1 - bx1) * cx, (y1 - by1) * cy, (x2 - bx1) * cx, (y2 - by1) * cy)
            crop_right[name] += _stripe_oracle(crop, box_in_crop) == answer
    n = len(stripe_rows)
    print(f"oracle accuracy over {n}: global view {global_right / n:.2f}, crops {crop_right}")
    assert crop_right == {"quadrant": n, "gt": n}
    assert abs(global_right / n - 0.5) <= 0.25, f"global view read {global_right}/{n}: the stripes leak"


def _square_colour(row: dict[str, Any]) -> np.ndarray:
    colour = re.search(r"small (\w+) square", row["extra_info"]["question"])
    assert colour is not None
    return stripes_colour(colour.group(1))
