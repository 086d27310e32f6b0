"""What the model-driven data tools (:mod:`~visionleaf.data.curate`, :mod:`~visionleaf.data.info_gap`) share:
rows in, the engine from the command line, one-turn answers, and the resumable record log.

A run folder holds ``config.json`` (what changes results; a rerun must match it) and ``records.jsonl``
(one line per finished (item, stage), appended and fsynced; a rerun skips them). Everything else in the
folder is rebuilt from those two at the end of each run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from PIL import Image

from visionleaf.boxes import Box
from visionleaf.engines.base import Engine, Prefix, SamplingParams, image_key
from visionleaf.eval.protocol import predicted_letter
from visionleaf.eval.runner import CropSwapImage, RecordWriter, read_records
from visionleaf.protocol import (
    IM_END,
    IMAGE_PLACEHOLDER,
    image_pixel_budget,
    render_prompt,
    tokenize_trajectory,
)
from visionleaf.reward.accuracy import accuracy, normalize_text
from visionleaf.tools import ToolCall, ToolContext, parse_turn, run_tool
from visionleaf.tools.crop import model_size

ZOOM_TOOL = "image_zoom_in_tool"
DIRECT_INSTRUCTION = "Think first inside <think></think>, then give the final answer inside <answer></answer>."
"""The answer instruction of the global-view-alone prompt (the tool prompt's, without the tool)."""
GT_CROP_THOUGHT = "<think>Let me zoom in on the region the question is about.</think>\n"


@dataclass(frozen=True)
class InputRow:
    """One input row and where it came from."""

    uid: str
    """``<file name>:<position>``: the row's identity in the records (stable while the input is)."""
    file: str
    """Input file name; the output file of the same name holds the row's result."""
    row: dict[str, Any]


def read_rows(path: str | Path, limit: int | None = None) -> list[InputRow]:
    """Rows of a parquet or JSONL file, or of every ``*.parquet`` in a folder (sorted by name)."""
    path = Path(path)
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"--in {path}: no *.parquet files in the folder")
    out = []
    for file in files:
        if file.suffix == ".jsonl":
            rows = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
        else:
            rows = pq.read_table(file).to_pylist()
        out += [InputRow(f"{file.name}:{i}", file.name, row) for i, row in enumerate(rows)]
    return out[:limit] if limit is not None else out


def fingerprint(path: str | Path) -> str:
    """Content hash of the input file(s): a resumed run must read the same rows."""
    path = Path(path)
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    digest = hashlib.sha1()
    for file in files:
        digest.update(file.name.encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


class RecordLog:
    """``out/records.jsonl`` keyed by (uid, stage), after checking ``out/config.json`` against ``config``."""

    def __init__(self, out: Path, config: Mapping[str, Any]) -> None:
        out.mkdir(parents=True, exist_ok=True)
        saved_path = out / "config.json"
        if saved_path.exists():
            saved = json.loads(saved_path.read_text())
            diff = {k: (saved.get(k), v) for k, v in config.items() if saved.get(k) != v}
            if diff:
                raise ValueError(
                    f"{out} holds a run with different settings {diff} (saved, now); "
                    "pass a new --out to start afresh, or the same settings to resume"
                )
        saved_path.write_text(json.dumps(dict(config), indent=2))
        path = out / "records.jsonl"
        self.records: dict[tuple[str, str], dict[str, Any]] = {(r["uid"], r["stage"]): r for r in read_records(path)}
        self.resumed = len(self.records)
        self._writer = RecordWriter(path)

    def get(self, uid: str, stage: str) -> dict[str, Any] | None:
        return self.records.get((uid, stage))

    def write(self, record: dict[str, Any]) -> None:
        self._writer.write(record)
        self.records[(record["uid"], record["stage"])] = record

    def close(self) -> None:
        self._writer.close()


def write_jsonl(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    """Write ``records`` as JSON lines, atomically (a kill leaves the old file or the new one)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(path)


def write_json(path: Path, value: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value, indent=2))
    tmp.replace(path)


def is_correct(answer: str | None, ground_truth: str, options: Sequence[str]) -> bool:
    """The training reward's accuracy rule (letter or option text for multiple choice)."""
    return accuracy(answer, ground_truth, options) > 0.5


def canonical_answer(answer: str | None, options: Sequence[str]) -> str | None:
    """What an answer says, comparable across images: the option letter, or the normalised free text."""
    if answer is None:
        return None
    if options:
        return predicted_letter(answer, options)
    return normalize_text(answer) or None


def encode_prefix(
    processor: Any,
    messages: Sequence[dict[str, Any]],
    view: Image.Image,
    route: str,
    turns: Sequence[tuple[str, Sequence[Image.Image] | None, str]] = (),
) -> Prefix:
    """The token prefix of ``messages`` on the global ``view``, followed by forced ``turns`` (see
    :func:`~visionleaf.protocol.tokenize_trajectory`), ready for the model's next turn."""
    trajectory = tokenize_trajectory(processor, render_prompt(processor, list(messages)), [view], turns)
    ids = tuple(trajectory.prompt_ids + trajectory.response_ids)
    images = tuple(trajectory.images)
    return Prefix(ids, images, tuple(image_key(im) for im in images), route)


def direct_messages(question: str) -> list[dict[str, Any]]:
    """The question on the image with no tools mentioned: the model answers from what it sees."""
    return [{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{question}\n{DIRECT_INSTRUCTION}"}]


def direct_prefix(processor: Any, question: str, view: Image.Image, route: str) -> Prefix:
    """The prefix of :func:`direct_messages` on the global ``view``."""
    return encode_prefix(processor, direct_messages(question), view, route)


def gt_crop_prefix(
    processor: Any,
    messages: Sequence[dict[str, Any]],
    view: Image.Image,
    original: Image.Image,
    gt_box: Box,
    route: str,
) -> Prefix:
    """``messages`` on ``view``, then a zoom call on the GT box and its observation: the GT crop from
    ``original``, cut by :class:`~visionleaf.eval.runner.CropSwapImage` and resized by the crop tool
    exactly as a real crop is. The model's next turn answers with the crop in view."""
    min_pixels, max_pixels = image_pixel_budget(processor.image_processor)
    seen = model_size(view.size, min_pixels, max_pixels)
    sx, sy = seen[0] / original.width, seen[1] / original.height
    x1, y1 = math.floor(gt_box[0] * sx), math.floor(gt_box[1] * sy)
    bbox = [x1, y1, max(math.ceil(gt_box[2] * sx), x1 + 1), max(math.ceil(gt_box[3] * sy), y1 + 1)]
    context = ToolContext(CropSwapImage(original, "gt", gt_box, 0), seen, min_pixels, max_pixels)
    observation = run_tool(ToolCall(ZOOM_TOOL, {"bbox_2d": bbox}), context)
    if not observation.ok:
        raise ValueError(f"GT crop {gt_box} failed: {observation.text}")
    call = json.dumps({"name": ZOOM_TOOL, "arguments": {"bbox_2d": bbox}})
    turn = f"{GT_CROP_THOUGHT}<tool_call>\n{call}\n</tool_call>{IM_END}"
    return encode_prefix(processor, messages, view, route, [(turn, list(observation.images), observation.text)])


async def answers(
    engine: Engine, processor: Any, prefix: Prefix, sampling: SamplingParams, seeds: Sequence[int]
) -> list[str | None]:
    """One turn per seed from ``prefix``; the ``<answer>`` of each (None when the turn gives none)."""
    continuations = await engine.generate([prefix] * len(seeds), sampling, list(seeds))
    texts = [processor.tokenizer.decode(c.token_ids, skip_special_tokens=False) for c in continuations]
    return [parse_turn(text).answer for text in texts]


def add_engine_args(p: argparse.ArgumentParser) -> None:
    engine = p.add_mutually_exclusive_group(required=True)
    engine.add_argument("--model", help="checkpoint folder for the in-process HF engine")
    engine.add_argument("--server", action="append", help="running vLLM/SGLang server URL (repeat for several)")
    p.add_argument("--processor", help="processor/tokenizer folder (needed with --server)")
    p.add_argument("--backend", choices=("vllm", "sglang"), default="vllm", help="server API")
    p.add_argument("--device", default="cpu", help="HF engine device (cpu, cuda)")
    p.add_argument("--dtype", default="float32", help="HF engine dtype (float32, bfloat16)")
    p.add_argument("--concurrency", type=int, default=16, help="items in flight at once")
    p.add_argument("--limit", type=int, help="first N input rows only")
    p.add_argument("--no-progress", action="store_true")


def open_engine(args: argparse.Namespace) -> tuple[Engine, Any, str]:
    """The engine, processor and model name (for config.json) the command line asks for."""
    from visionleaf.engines.open import open_engine as open_any

    try:
        engine, processor, _, name = open_any(
            args.model, args.server or (), args.processor, args.backend, args.device, args.dtype
        )
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc
    return engine, processor, name


async def close_engine(engine: Any) -> None:
    aclose = getattr(engine, "aclose", None)
    if aclose is not None:
        await aclose()


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain fixed-width table (also returned, for the summary file and tests)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [title] + [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in cells
    ]
    lines.insert(2, "  ".join("-" * w for w in widths))
    text = "\n".join(lines)
    print(text, file=sys.stderr)
    return text
