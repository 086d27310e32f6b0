"""Deterministic synthetic high-resolution visual-search set (like V* Bench).

Each item is a large canvas (noisy background, many large clutter shapes) holding one or two small
targets (1-3% of the short side, hard to see once the processor downsamples the image) and a
multiple-choice question about them: ``attribute/color``, ``attribute/shape``, ``attribute/text``
or ``position/relative``. Ground-truth boxes are exact: the tight box of the target pixels, then
2x and 4x enlargements around its centre, clamped to the canvas.

Small set for tests and the CPU demo (1k-2k px canvases, seconds)::

    python -m visionleaf.data.synthetic --out data/synthetic --n 64 --seed 0

V*-like difficulty (4k-8k px canvases, about 5 s per item on one core)::

    python -m visionleaf.data.synthetic --out data/synthetic_8k --n 512 --seed 0 \\
        --min-size 4096 --max-size 8192 --split test

The ``stripes`` task (:func:`generate_stripes`, the CPU main job's data) has an information gap by
construction: one coloured square whose stripes (period :data:`STRIPE_PERIOD` px) vanish in the
56 x 56 px global view of the 1.8k-2k px canvas (4 visual tokens), but survive in a crop of the quadrant
that holds it (64 tokens). The square's mean colour is the same for both orientations, so the global view
shows where to zoom but not the answer::

    python -m visionleaf.data.synthetic --task stripes --out data/stripes --n 64 --seed 0
"""

from __future__ import annotations

import argparse
import time
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from visionleaf.boxes import box_hierarchy
from visionleaf.data.schema import OPTION_LETTERS, Box, multiple_choice_text, write_parquet
from visionleaf.protocol import build_messages
from visionleaf.tools import get_tool

DATA_SOURCE = "visionleaf/synthetic"
CATEGORIES = ("attribute/color", "attribute/shape", "attribute/text", "position/relative")
"""Question types, assigned round-robin by item index."""

MIN_CANVAS, MAX_CANVAS = 256, 8192
"""Allowed canvas side lengths in pixels."""

# Every target colour has a channel outside [32, 224]; background and clutter only use values inside
# it, so target pixels are exactly identifiable (tests rely on this).
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (225, 20, 30),
    "green": (20, 170, 40),
    "blue": (30, 60, 230),
    "yellow": (250, 220, 0),
    "orange": (255, 130, 0),
    "purple": (130, 30, 190),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
_CLUTTER_RANGE = (32, 225)  # channel values of clutter colours, [low, high)
WORDS = (
    "CAT",
    "DOG",
    "SUN",
    "MAP",
    "KEY",
    "BOX",
    "CUP",
    "HAT",
    "STOP",
    "EXIT",
    "OPEN",
    "42",
    "17",
    "88",
    "305",
)

ShapeFn = Callable[[ImageDraw.ImageDraw, tuple[float, float, float, float], tuple[int, ...]], None]


def _circle(draw: ImageDraw.ImageDraw, box: tuple[float, float, float, float], fill: tuple[int, ...]) -> None:
    draw.ellipse(box, fill=fill)


def _square(draw: ImageDraw.ImageDraw, box: tuple[float, float, float, float], fill: tuple[int, ...]) -> None:
    draw.rectangle(box, fill=fill)


def _triangle(draw: ImageDraw.ImageDraw, box: tuple[float, float, float, float], fill: tuple[int, ...]) -> None:
    x1, y1, x2, y2 = box
    draw.polygon([((x1 + x2) / 2, y1), (x2, y2), (x1, y2)], fill=fill)


def _diamond(draw: ImageDraw.ImageDraw, box: tuple[float, float, float, float], fill: tuple[int, ...]) -> None:
    x1, y1, x2, y2 = box
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    draw.polygon([(cx, y1), (x2, cy), (cx, y2), (x1, cy)], fill=fill)


def _cross(draw: ImageDraw.ImageDraw, box: tuple[float, float, float, float], fill: tuple[int, ...]) -> None:
    x1, y1, x2, y2 = box
    tx, ty = (x2 - x1) / 3, (y2 - y1) / 3
    draw.rectangle((x1 + tx, y1, x2 - tx, y2), fill=fill)
    draw.rectangle((x1, y1 + ty, x2, y2 - ty), fill=fill)


SHAPES: dict[str, ShapeFn] = {
    "circle": _circle,
    "square": _square,
    "triangle": _triangle,
    "diamond": _diamond,
    "cross": _cross,
}


@dataclass(frozen=True)
class _Sprite:
    """A target drawn on a transparent tile; ``bbox`` is the tight box of its pixels inside the tile."""

    tile: Image.Image
    bbox: tuple[int, int, int, int]


@dataclass(frozen=True)
class _Question:
    stem: str
    options: list[str]
    answer: str


def _shape_sprite(shape: str, colour: str, size: int) -> _Sprite:
    tile = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    SHAPES[shape](ImageDraw.Draw(tile), (0, 0, size - 1, size - 1), (*PALETTE[colour], 255))
    return _Sprite(tile, _alpha_bbox(tile))


def _text_sprite(word: str, colour: str, font_px: int) -> _Sprite:
    font = ImageFont.load_default(size=font_px)
    left, top, right, bottom = (int(v) for v in font.getbbox(word))
    tile = Image.new("RGBA", (right - left + 2, bottom - top + 2), (0, 0, 0, 0))
    draw = ImageDraw.Draw(tile)
    draw.fontmode = "1"  # no anti-aliasing: every text pixel is exactly the palette colour
    draw.text((1 - left, 1 - top), word, font=font, fill=(*PALETTE[colour], 255))
    return _Sprite(tile, _alpha_bbox(tile))


def _alpha_bbox(tile: Image.Image) -> tuple[int, int, int, int]:
    bbox = tile.getchannel("A").getbbox()
    if bbox is None:
        raise RuntimeError("target sprite rendered no pixels; raise the target size")
    return bbox


def _pick(rng: np.random.Generator, values: Sequence[str], k: int) -> list[str]:
    return [values[i] for i in rng.choice(len(values), size=k, replace=False)]


def _shuffled_options(rng: np.random.Generator, correct: str, pool: Sequence[str]) -> tuple[list[str], str]:
    """2-4 options (``correct`` plus distractors from ``pool``) in seeded order, and the correct one."""
    k = int(rng.integers(2, 5))
    options = [correct, *_pick(rng, [v for v in pool if v != correct], k - 1)]
    return [options[i] for i in rng.permutation(k)], correct


def _background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Smooth colour blobs plus grey grain in 2x2-pixel cells; every channel value lies in [74, 206]."""
    coarse = rng.integers(90, 191, size=(max(2, height // 128), max(2, width // 128), 3), dtype=np.uint8)
    pixels = np.array(Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR))  # [H, W, 3]
    # Grain shared by the channels and 2x2 cells keeps the PNG small and fast to encode.
    grain = rng.integers(0, 33, size=((height + 1) // 2, (width + 1) // 2), dtype=np.uint8)
    pixels += grain.repeat(2, axis=0).repeat(2, axis=1)[:height, :width, None]  # [H, W, 1]; <= 190 + 32
    pixels -= 16
    return Image.fromarray(pixels)


def _draw_clutter(
    rng: np.random.Generator, canvas: Image.Image, keep_out: tuple[int, int, int, int], short: int
) -> None:
    """Large random shapes (5-15% of ``short``) anywhere but over ``keep_out`` (x1, y1, x2, y2)."""
    width, height = canvas.size
    draw = ImageDraw.Draw(canvas)
    names = list(SHAPES)
    count = min(400, int(40 * width * height / 1024**2))
    for _ in range(count):
        for _attempt in range(20):
            size = int(rng.integers(int(0.05 * short), int(0.15 * short) + 1))
            x, y = int(rng.integers(0, width - size)), int(rng.integers(0, height - size))
            if x + size < keep_out[0] or x > keep_out[2] or y + size < keep_out[1] or y > keep_out[3]:
                colour = tuple(int(c) for c in rng.integers(*_CLUTTER_RANGE, size=3))
                SHAPES[names[int(rng.integers(len(names)))]](draw, (x, y, x + size, y + size), colour)
                break


def _paste(canvas: Image.Image, placed: Sequence[tuple[_Sprite, int, int]]) -> tuple[int, int, int, int]:
    """Paste sprites at their (x, y) tile corners; return the tight box around all their pixels."""
    boxes = []
    for sprite, x, y in placed:
        canvas.paste(sprite.tile, (x, y), sprite.tile)
        bx1, by1, bx2, by2 = sprite.bbox
        boxes.append((x + bx1, y + by1, x + bx2, y + by2))
    return (
        min(b[0] for b in boxes),
        min(b[1] for b in boxes),
        max(b[2] for b in boxes),
        max(b[3] for b in boxes),
    )


def _make_item(
    rng: np.random.Generator, width: int, height: int, category: str
) -> tuple[Image.Image, _Question, tuple[int, int, int, int]]:
    """Draw one canvas for ``category``; return it, its question and the tight target box."""
    short = min(width, height)
    size = max(8, round(short * rng.uniform(0.01, 0.03)))  # target side in pixels
    colours, shapes = list(PALETTE), list(SHAPES)
    offsets = [(0, 0)]  # tile corners relative to each other, px
    if category == "attribute/color":
        colour, shape = _pick(rng, colours, 1)[0], _pick(rng, shapes, 1)[0]
        sprites = [_shape_sprite(shape, colour, size)]
        options, answer = _shuffled_options(rng, colour, colours)
        question = _Question(f"What is the colour of the small {shape}?", options, answer)
    elif category == "attribute/shape":
        colour, shape = _pick(rng, colours, 1)[0], _pick(rng, shapes, 1)[0]
        sprites = [_shape_sprite(shape, colour, size)]
        options, answer = _shuffled_options(rng, shape, shapes)
        question = _Question(f"What shape is the small {colour} object?", options, answer)
    elif category == "attribute/text":
        word, colour = _pick(rng, WORDS, 1)[0], _pick(rng, colours, 1)[0]
        sprites = [_text_sprite(word, colour, max(10, size))]
        options, answer = _shuffled_options(rng, word, WORDS)
        question = _Question("What does the small text in the image say?", options, answer)
    elif category == "position/relative":
        (colour_a, colour_b), (shape_a, shape_b) = _pick(rng, colours, 2), _pick(rng, shapes, 2)
        sprites = [_shape_sprite(shape_a, colour_a, size), _shape_sprite(shape_b, colour_b, size)]
        horizontal = bool(rng.integers(2))
        along = int(rng.choice([-1, 1]) * rng.integers(3 * size, 8 * size + 1))  # A's offset from B, px
        across = int(rng.integers(-size, size + 1))
        offsets = [(along, across) if horizontal else (across, along), (0, 0)]
        a, b = f"{colour_a} {shape_a}", f"{colour_b} {shape_b}"
        if horizontal:
            stem, relation = f"Is the small {a} to the left or the right of the small {b}?", ("left", "right")
        else:
            stem, relation = f"Is the small {a} above or below the small {b}?", ("above", "below")
        answer = relation[0] if along < 0 else relation[1]
        question = _Question(stem, [relation[i] for i in rng.permutation(2)], answer)
    else:
        raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")

    # Place the group of tiles at least one target side from the edges; clutter stays off a 3x zone.
    left, top = min(o[0] for o in offsets), min(o[1] for o in offsets)
    span_w = max(ox + s.tile.width for s, (ox, _) in zip(sprites, offsets, strict=True)) - left
    span_h = max(oy + s.tile.height for s, (_, oy) in zip(sprites, offsets, strict=True)) - top
    if span_w + 2 * size >= width or span_h + 2 * size >= height:
        raise ValueError(f"canvas {width}x{height} too small for the targets; raise min_size")
    x0 = int(rng.integers(size, width - span_w - size))  # group's top-left corner, px
    y0 = int(rng.integers(size, height - span_h - size))
    placed = [(s, x0 - left + ox, y0 - top + oy) for s, (ox, oy) in zip(sprites, offsets, strict=True)]
    keep_out = (x0 - span_w - size, y0 - span_h - size, x0 + 2 * span_w + size, y0 + 2 * span_h + size)
    canvas = _background(rng, width, height)
    _draw_clutter(rng, canvas, keep_out, short)
    return canvas, question, _paste(canvas, placed)


def _row(
    index: int,
    split: str,
    path: Path,
    question: _Question,
    tight: Box,
    size: tuple[int, int],
    category: str,
    tools: Sequence[Any],
    view: Path | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One row of a synthetic set: the image at ``path`` is the original, and the global view unless
    ``view`` is given."""
    text = multiple_choice_text(question.stem, question.options)
    return {
        "data_source": DATA_SOURCE,
        "prompt": build_messages(text, tools),
        "images": [{"image": str(view or path)}],
        "ability": "visual_search",
        "reward_model": {"style": "rule", "ground_truth": OPTION_LETTERS[question.options.index(question.answer)]},
        "extra_info": {
            "index": index,
            "split": split,
            "question": text,
            "options": question.options,
            "gt_boxes": [list(box) for box in box_hierarchy(tight, *size)],
            "original_image": str(path),
            "original_size": list(size),
            "category": category,
            **extra,
        },
    }


def generate(
    out_dir: str | Path,
    n: int,
    seed: int,
    min_size: int = 1024,
    max_size: int = 2048,
    split: str = "train",
    tool_names: Sequence[str] = ("image_zoom_in_tool",),
) -> list[dict[str, Any]]:
    """Write ``n`` items to ``out_dir/images/*.png`` and ``out_dir/<split>.parquet``; return the rows.

    Canvas width and height are drawn independently in [``min_size``, ``max_size``] pixels. The
    output depends only on (``seed``, ``split``, item index, sizes): the same arguments give
    byte-identical images and parquet. ``tool_names`` are the registered tools listed in the prompt.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not MIN_CANVAS <= min_size <= max_size <= MAX_CANVAS:
        raise ValueError(
            f"need {MIN_CANVAS} <= min_size <= max_size <= {MAX_CANVAS} (canvas sides in pixels), "
            f"got min_size={min_size}, max_size={max_size}"
        )
    tools = [get_tool(name) for name in tool_names]
    out = Path(out_dir).resolve()
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(n):
        # One stream per item: item i is the same whatever n is, and splits never share canvases.
        rng = np.random.default_rng([seed, zlib.crc32(split.encode()), index])
        width, height = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
        category = CATEGORIES[index % len(CATEGORIES)]
        canvas, question, tight = _make_item(rng, width, height, category)
        path = out / "images" / f"{split}_{index:06d}.png"
        canvas.save(path, format="PNG", compress_level=1)  # noise barely compresses; favour speed
        rows.append(_row(index, split, path, question, tight, (width, height), category, tools))
    write_parquet(rows, out / f"{split}.parquet")
    return rows


STRIPE_PERIOD = 28
"""Stripe period of the ``stripes`` task, px of the original: under one pixel in the global view (about 32-37x
smaller), 6-7 px in a quadrant crop (about 4-4.6x smaller), which the tiny vision tower reads."""
STRIPE_CANVAS = (1792, 2048)
"""Side range of the square canvases of the ``stripes`` task, px (multiples of 32)."""
STRIPE_VIEW = 56
"""Side of the ``stripes`` global view, px: 2 x 2 visual tokens, the tiny processor's smallest image (LFPC's
low-budget global view). Crops come from the original at the processor's full budget (up to 224 x 224)."""
VIEW_NOISE = 3
"""Pixel noise of the ``stripes`` global view, +- levels (see :func:`_stripes_view`)."""
STRIPE_FILL = (0.75, 0.88)
"""Side of the striped square as a share of its quadrant's side: a coloured block in the global view, and
most of a quadrant crop (the tiny model reads a whole-crop texture; a small object among background it does not)."""
STRIPE_AMPLITUDE = 80
"""Brightness swing of the stripes around the square's colour (both orientations share the mean)."""
STRIPE_COLOURS = ("red", "green", "blue", "yellow", "orange", "purple")
STRIPE_OPTIONS = ("horizontal", "vertical")
STRIPES_CATEGORY = "attribute/stripes"


def quadrant_box(quadrant: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Box (x1, y1, x2, y2) of ``quadrant`` (0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right) of an
    image of ``size`` (width, height)."""
    col, row = quadrant % 2, quadrant // 2
    half_w, half_h = size[0] // 2, size[1] // 2
    return col * half_w, row * half_h, size[0] if col else half_w, size[1] if row else half_h


def _grey_background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Smooth grey blobs with a faint tint ([H, W, 3] uint8, channels in [80, 200]): the coloured square
    stands out, and the smooth canvas encodes fast."""
    grey = rng.integers(90, 191, size=(max(2, height // 192), max(2, width // 192), 1))
    coarse = (grey + rng.integers(-10, 11, size=(*grey.shape[:2], 3))).astype(np.uint8)
    return np.array(Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR))


def stripes_colour(colour: str) -> np.ndarray:
    """Mean RGB of a ``colour`` striped square ([3]; the stripes swing :data:`STRIPE_AMPLITUDE` around it)."""
    return np.clip(np.array(PALETTE[colour]), STRIPE_AMPLITUDE, 255 - STRIPE_AMPLITUDE)


def _stripes_item(rng: np.random.Generator, width: int, height: int) -> tuple[Image.Image, _Question, Box, int]:
    """One ``stripes`` canvas: its question, the square's tight box and the quadrant that holds it."""
    quarter = min(width, height) // 2
    side = int(quarter * rng.uniform(*STRIPE_FILL))
    colour = _pick(rng, STRIPE_COLOURS, 1)[0]
    orientation = STRIPE_OPTIONS[int(rng.integers(2))]
    quadrant = int(rng.integers(4))
    qx1, qy1, qx2, qy2 = quadrant_box(quadrant, (width, height))
    # The square lies inside its quadrant, at least 5% of the quadrant's side from its edges.
    margin = quarter // 20 + side // 2 + 1
    cx = int(rng.integers(qx1 + margin, qx2 - margin))
    cy = int(rng.integers(qy1 + margin, qy2 - margin))
    x1, y1 = cx - side // 2, cy - side // 2
    phase = int(rng.integers(STRIPE_PERIOD))
    along = (np.arange(side) + phase) // (STRIPE_PERIOD // 2) % 2 * 2 - 1  # [side], +-1
    wave = along[None, :] if orientation == "vertical" else along[:, None]  # [1, side] or [side, 1]
    base = stripes_colour(colour)  # [3]
    tile = base[None, None, :] + STRIPE_AMPLITUDE * np.broadcast_to(wave, (side, side))[..., None]  # [s, s, 3]
    canvas = _grey_background(rng, width, height)  # [H, W, 3]
    canvas[y1 : y1 + side, x1 : x1 + side] = tile.astype(np.uint8)
    options = [STRIPE_OPTIONS[i] for i in rng.permutation(2)]
    question = _Question(f"Are the stripes on the small {colour} square horizontal or vertical?", options, orientation)
    return Image.fromarray(canvas), question, (float(x1), float(y1), float(x1 + side), float(y1 + side)), quadrant


def _stripes_view(canvas: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The global view: ``canvas`` resized to :data:`STRIPE_VIEW` px with +-:data:`VIEW_NOISE` levels of
    pixel noise, which buries what is left of the stripes (a fraction of a level, but all along one axis:
    a pixel-exact reader would pick that up)."""
    view = np.asarray(canvas.resize((STRIPE_VIEW, STRIPE_VIEW), Image.Resampling.BICUBIC), dtype=np.int16)
    noise = rng.integers(-VIEW_NOISE, VIEW_NOISE + 1, size=view.shape)
    return Image.fromarray(np.clip(view + noise, 0, 255).astype(np.uint8))


def generate_stripes(
    out_dir: str | Path,
    n: int,
    seed: int,
    split: str = "train",
    tool_names: Sequence[str] = ("image_zoom_in_tool",),
) -> list[dict[str, Any]]:
    """Write ``n`` ``stripes`` items (see the module docstring) like :func:`generate`; return the rows.

    Each row's image is the :data:`STRIPE_VIEW` px global view (``views/``); ``extra_info.original_image`` is
    the full canvas (``images/``) the zoom tool crops. ``extra_info.quadrant`` names the quadrant that holds
    the square (see :func:`quadrant_box`).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    tools = [get_tool(name) for name in tool_names]
    out = Path(out_dir).resolve()
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "views").mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(n):
        rng = np.random.default_rng([seed, zlib.crc32(f"stripes/{split}".encode()), index])
        width = height = 32 * int(rng.integers(STRIPE_CANVAS[0] // 32, STRIPE_CANVAS[1] // 32 + 1))
        canvas, question, tight, quadrant = _stripes_item(rng, width, height)
        name = f"{split}_{index:06d}.png"
        canvas.save(out / "images" / name, format="PNG", compress_level=1)
        _stripes_view(canvas, rng).save(out / "views" / name, format="PNG")
        tight_int = (int(tight[0]), int(tight[1]), int(tight[2]), int(tight[3]))
        rows.append(
            _row(
                index,
                split,
                out / "images" / name,
                question,
                tight_int,
                (width, height),
                STRIPES_CATEGORY,
                tools,
                view=out / "views" / name,
                quadrant=quadrant,
            )
        )
    write_parquet(rows, out / f"{split}.parquet")
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="output folder (images/ and <split>.parquet)")
    parser.add_argument("--task", choices=("search", "stripes"), default="search", help="which synthetic task")
    parser.add_argument("--n", type=int, required=True, help="number of items")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes")
    parser.add_argument("--min-size", type=int, default=1024, help=f"smallest canvas side, px (>= {MIN_CANVAS})")
    parser.add_argument("--max-size", type=int, default=2048, help=f"largest canvas side, px (<= {MAX_CANVAS})")
    parser.add_argument("--split", default="train", help="split name (file name and extra_info.split)")
    parser.add_argument(
        "--tools", default="image_zoom_in_tool", help="comma-separated registered tool names for the prompt"
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    tool_names = tuple(t for t in args.tools.split(",") if t)
    if args.task == "stripes":
        rows = generate_stripes(args.out, args.n, args.seed, split=args.split, tool_names=tool_names)
        print(f"wrote {len(rows)} stripes items to {Path(args.out).resolve() / (args.split + '.parquet')}")
        return
    rows = generate(
        args.out,
        args.n,
        args.seed,
        min_size=args.min_size,
        max_size=args.max_size,
        split=args.split,
        tool_names=tool_names,
    )
    counts = Counter(row["extra_info"]["category"] for row in rows)
    summary = ", ".join(f"{name}={counts[name]}" for name in CATEGORIES)
    print(
        f"wrote {len(rows)} items ({summary}) to {Path(args.out).resolve() / (args.split + '.parquet')} "
        f"in {time.perf_counter() - start:.1f} s"
    )


if __name__ == "__main__":
    main()
