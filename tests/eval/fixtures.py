"""Benchmark fixture files written in the public releases' layouts, and engines with scripted answers."""

from __future__ import annotations

import asyncio
import base64
import csv
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from visionleaf.engines.base import Continuation, EngineStats, Prefix, Probe, SamplingParams
from visionleaf.protocol import image_pixel_budget
from visionleaf.tools.crop import model_size

RED, BLUE = (230, 20, 20), (20, 20, 230)
RED_BOX, BLUE_BOX = (100, 100, 160, 160), (420, 240, 480, 300)
"""Where the red and the blue square of :func:`two_squares` are (x1, y1, x2, y2), original pixels."""


def two_squares(width: int = 640, height: int = 400) -> Image.Image:
    image = Image.new("RGB", (width, height), (40, 40, 40))
    image.paste(RED, RED_BOX)
    image.paste(BLUE, BLUE_BOX)
    return image


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def b64(image: Image.Image) -> str:
    return base64.b64encode(png_bytes(image)).decode()


def write_tsv(path: Path, rows: list[dict], columns: list[str]) -> Path:
    """A tsv as pandas ``to_csv(sep='\\t', index=False)`` writes it (VLMEvalKit's files)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, delimiter="\t", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_vstar_release(root: Path, n_attr: int = 2, n_spatial: int = 1) -> Path:
    """The V* release: direct_attributes/ and relative_position/ of jpg + json (correct option first)."""
    for folder, n in (("direct_attributes", n_attr), ("relative_position", n_spatial)):
        (root / folder).mkdir(parents=True)
        for i in range(n):
            two_squares().save(root / folder / f"sa_{i}.jpg")
            anno = {
                "target_object": ["red square"] if folder == "direct_attributes" else ["red square", "blue square"],
                "bbox": [[100, 100, 60, 60]]
                if folder == "direct_attributes"
                else [[100, 100, 60, 60], [420, 240, 60, 60]],
                "question": "What is the color of the square?"
                if folder == "direct_attributes"
                else "Is the red square left of the blue one?",
                "options": ["red", "blue", "green", "white"] if folder == "direct_attributes" else ["left", "right"],
            }
            (root / folder / f"sa_{i}.json").write_text(json.dumps(anno))
    return root


HR_COLUMNS = ["index", "question", "answer", "category", "image", "A", "B", "C", "D", "cycle_category"]


def hrbench_rows(n_questions: int = 2) -> list[dict]:
    """Each question under its 4 option cycles (the release's rows), half single (FSP) half cross (FCP)."""
    rows = []
    image = b64(two_squares(64, 48))
    options = ["red", "blue", "green", "white"]
    for q in range(n_questions):
        for cycle in range(4):
            shown = options[cycle:] + options[:cycle]
            rows.append(
                {
                    "index": str(len(rows)),
                    "question": f"Question {q}: what colour is the square?",
                    "answer": "ABCD"[shown.index("red")],
                    "category": "single" if q % 2 == 0 else "cross",
                    "image": image,
                    **dict(zip("ABCD", shown, strict=True)),
                    "cycle_category": f"cycle{cycle}",
                }
            )
    return rows


class ScriptedVisionEngine:
    """Answers from pixels: turn 1 zooms on ``zoom_box`` (original pixels, mapped to the model's view);
    turn 2 names the colour of the crop (red / blue, else ``green``). ``mode="always_a"`` answers A at once.
    """

    def __init__(self, processor, zoom_box=BLUE_BOX, mode: str = "zoom", delay_s: float = 0.0) -> None:
        self.tokenizer = processor.tokenizer
        self.min_pixels, self.max_pixels = image_pixel_budget(processor.image_processor)
        self.zoom_box, self.mode, self.delay_s = zoom_box, mode, delay_s
        self.stats = EngineStats()
        self.calls: list[list[Prefix]] = []

    def _turn(self, prefix: Prefix) -> str:
        if self.mode == "always_a":
            return "<think>A.</think><answer>A</answer>"
        if len(prefix.images) == 1:
            view = prefix.images[0]
            mw, mh = model_size(view.size, self.min_pixels, self.max_pixels)
            # the original is 640x400 in these tests; the box is given in its pixels
            sx, sy = mw / 640, mh / 400
            x1, y1, x2, y2 = self.zoom_box
            box = [round(x1 * sx), round(y1 * sy), round(x2 * sx), round(y2 * sy)]
            call = json.dumps({"name": "image_zoom_in_tool", "arguments": {"bbox_2d": box}})
            return f"<think>zoom</think><tool_call>{call}</tool_call>"
        r, _, b = np.asarray(prefix.images[-1], dtype=np.float64).reshape(-1, 3).mean(axis=0)
        colour = "red" if r > 2 * b and r > 100 else "blue" if b > 2 * r and b > 100 else "green"
        return f"<think>it is {colour}</think><answer>{colour}</answer>"

    async def generate(self, prefixes: list[Prefix], sampling: SamplingParams, seeds: list[int]) -> list[Continuation]:
        self.calls.append(list(prefixes))
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        out = []
        for prefix in prefixes:
            ids = self.tokenizer.encode(self._turn(prefix), add_special_tokens=False)
            out.append(Continuation(tuple(ids), tuple(-0.1 for _ in ids), "stop"))
        return out

    async def probe(self, prefixes: list[Prefix], top_k: int) -> list[Probe]:
        return [Probe((-float(len(p.token_ids) % 5) - 0.1,)) for p in prefixes]
