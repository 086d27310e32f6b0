"""``evaluate``: run a benchmark through the tree sampler, write per-question JSONL + summary, resumably.

Every question is one :meth:`TreeSampler.sample` call: ``samples`` independent chains (Avg@k; one
greedy chain by default) or, with ``tree=N``, VisionLeaf's entropy-guided tree of N leaves. Many
questions are in flight at once; the engine batches their concurrent calls (the HF engine's scheduler, a
server's continuous batching).

Output folder::

    results.jsonl     one line per (question, variant), appended and fsynced as each finishes
    summary.json      accuracy tables, tool/turn/token/latency/IoU statistics, crop-swap comparison
    config.json       the protocol; a rerun with the same --out must match it, and skips finished lines
    crops/<variant>/<qid>/s<sample>_c<k>.png   every crop the model saw
    images/<qid>.jpg  a thumbnail of the global view for the report's viewer
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import math
import os
import re
import statistics
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image
from tqdm import tqdm

from visionleaf.boxes import box_iou, intersection_area
from visionleaf.data.images import ImageLoadError
from visionleaf.data.schema import OPTION_LETTERS
from visionleaf.engines.base import Engine, EngineError, SamplingParams
from visionleaf.eval.loaders import EvalItem, LoadIssue, load_benchmark
from visionleaf.eval.protocol import (
    VISUAL_TOKEN_PIXELS,
    Presented,
    accuracy_table,
    default_shuffle,
    global_view,
    predicted_letter,
    present,
    subcategory_table,
)
from visionleaf.protocol import build_messages
from visionleaf.rollout.tree import Leaf, TreeConfig, TreeRecord, TreeSampler
from visionleaf.tools import get_tool, parse_turn

CROP_SWAPS = ("gt", "noise")
"""Crop-reliance diagnostics (LFPC §3): every successful crop replaced by the GT-box crop / by noise."""
THUMBNAIL_SIDE = 768
PROTOCOL_KEYS = (
    "benchmark",
    "shuffle",
    "seed",
    "samples",
    "temperature",
    "top_p",
    "max_turns",
    "max_new_tokens",
    "global_max_pixels",
    "tree",
    "branch_factor",
    "tools",
)
"""Config fields that change results: a resumed run must use the same values."""


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate and how. ``None`` fields take the benchmark's / mode's default."""

    benchmark: str
    data: str
    out: str
    n: int | None = None
    """Evaluate the first n questions only."""
    shuffle: bool | None = None
    """Shuffle options per question (default: yes, except HR-Bench whose rows already cycle them)."""
    seed: int = 0
    samples: int = 1
    """k samples per question: Avg@k (and pass@k, majority@k)."""
    temperature: float | None = None
    """Default 0 (greedy) for one sample, 1.0 for several samples or a tree."""
    top_p: float = 1.0
    max_turns: int = 5
    max_new_tokens: int = 1024
    """Tokens per turn."""
    max_response_tokens: int = 8192
    max_context_tokens: int = 16384
    global_max_pixels: int | None = None
    """Pixel budget of the global view (``visual_tokens * 28 * 28``); crops come from the original."""
    crop_swap: tuple[str, ...] = ()
    """Extra runs with every successful crop replaced: ``gt`` and/or ``noise``."""
    tree: int = 0
    """Grow a VisionLeaf tree of this many leaves per question (0: chains)."""
    branch_factor: int = 2
    tools: tuple[str, ...] = ("image_zoom_in_tool",)
    concurrency: int = 16
    """Questions in flight at once."""
    progress: bool = True

    def __post_init__(self) -> None:
        unknown = set(self.crop_swap) - set(CROP_SWAPS)
        if unknown:
            raise ValueError(f"--crop-swap takes {','.join(CROP_SWAPS)}, got {sorted(unknown)}")
        if self.samples < 1:
            raise ValueError(f"--samples must be >= 1, got {self.samples}")
        if self.tree and self.samples != 1:
            raise ValueError("--tree N already samples N leaves per question; leave --samples at 1")
        if self.tree < 0 or (self.tree > 1 and self.branch_factor < 2):
            raise ValueError("--tree must be >= 0 and --branch-factor >= 2")
        if self.concurrency < 1:
            raise ValueError(f"--concurrency must be >= 1, got {self.concurrency}")
        if self.global_max_pixels is not None and self.global_max_pixels < 4 * VISUAL_TOKEN_PIXELS:
            raise ValueError(f"--global-max-pixels must be >= {4 * VISUAL_TOKEN_PIXELS} (4 visual tokens)")

    @property
    def effective_shuffle(self) -> bool:
        return default_shuffle(self.benchmark) if self.shuffle is None else self.shuffle

    @property
    def effective_temperature(self) -> float:
        if self.temperature is not None:
            return self.temperature
        return 1.0 if (self.samples > 1 or self.tree > 1) else 0.0

    def protocol(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["shuffle"], values["temperature"] = self.effective_shuffle, self.effective_temperature
        values["tools"], values["crop_swap"] = list(self.tools), list(self.crop_swap)
        return values


@dataclass
class EvalResult:
    """What :func:`evaluate` returns (also on disk under ``out``)."""

    out: Path
    summary: dict[str, Any]
    records: list[dict[str, Any]]
    issues: list[LoadIssue] = field(default_factory=list)


class CropSwapImage(Image.Image):
    """The original image as the crop tool sees it, with every crop replaced (a :class:`ToolContext` hook).

    ``image_zoom_in_tool`` cuts ``context.original_image.crop(box)`` and resizes it by the smart-resize
    rule; this subclass answers that ``crop`` with the GT box's crop (``gt``) or with uniform noise of the
    requested size (``noise``), so the replacement goes through the same resize as a real crop. Every
    other use of the image (size, rotation, ...) sees the original.
    """

    def __init__(self, original: Image.Image, mode: str, gt_box: tuple[float, float, float, float] | None, seed: int):
        super().__init__()
        original.load()
        self.__dict__.update(original.__dict__)
        if mode == "gt" and gt_box is None:
            raise ValueError("crop swap 'gt' needs a GT box")
        self.swap_mode, self.gt_box, self.rng = mode, gt_box, np.random.default_rng(seed)
        self.swaps = 0

    def crop(self, box: Any = None) -> Image.Image:
        self.swaps += 1
        if self.swap_mode == "gt":
            assert self.gt_box is not None
            x1, y1, x2, y2 = self.gt_box
            gt = (
                math.floor(x1),
                math.floor(y1),
                max(math.ceil(x2), math.floor(x1) + 1),
                max(math.ceil(y2), math.floor(y1) + 1),
            )
            return super().crop(gt)
        left, top, right, bottom = (int(v) for v in box)
        pixels = self.rng.integers(0, 256, (max(bottom - top, 1), max(right - left, 1), 3), dtype=np.uint8)
        return Image.fromarray(pixels)


def _safe(qid: str) -> str:
    digest = hashlib.sha1(qid.encode()).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', qid)[:60]}-{digest}"


def question_seed(seed: int, qid: str) -> int:
    """Per-question sampling seed, the same in every variant (pred / gt / noise differ only in crops)."""
    return int.from_bytes(hashlib.sha1(f"{seed}:{qid}".encode()).digest()[:7], "big")


def _iou_stats(
    boxes: Sequence[tuple[float, float, float, float]], gt: Sequence[tuple[float, float, float, float]]
) -> dict[str, float] | None:
    """Best IoU with any GT box and best coverage of the smallest GT box over the crops (None: nothing to score)."""
    if not boxes or not gt:
        return None
    smallest = gt[0]
    area = max(0.0, smallest[2] - smallest[0]) * max(0.0, smallest[3] - smallest[1])
    return {
        "iou": max(box_iou(b, g) for b in boxes for g in gt),
        "coverage": max(intersection_area(b, smallest) / area for b in boxes) if area > 0 else 0.0,
        "iou_last": max(box_iou(boxes[-1], g) for g in gt),
    }


class RecordWriter:
    """Appends one JSON line per finished question, fsynced (a kill loses at most the line being written)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def read_records(path: Path) -> list[dict[str, Any]]:
    """Complete records of a results.jsonl; a torn last line (killed mid-write) is dropped from the file."""
    if not path.exists():
        return []
    records, good = [], 0
    with open(path, "rb") as f:
        data = f.read()
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
        good += len(line)
    if good != len(data):
        with open(path, "r+b") as f:
            f.truncate(good)
    return records


def _majority(letters: Sequence[str | None]) -> str | None:
    counts = Counter(x for x in letters if x is not None)
    if not counts:
        return None
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]


class Judge(Protocol):
    """What the eval needs from an LLM judge (:class:`visionleaf.reward.LLMJudge`)."""

    def score(self, question: str, answer: str, ground_truth: str) -> float: ...


class _Run:
    def __init__(self, config: EvalConfig, engine: Engine, processor: Any, out: Path, judge: Judge | None) -> None:
        self.config, self.processor, self.out, self.judge = config, processor, out, judge
        tree = config.tree > 1
        budget = config.tree if tree else config.samples
        self.tree_config = TreeConfig(
            budget=budget,
            branch_factor=config.branch_factor,
            mode="tree" if tree else "chain",
            max_turns=config.max_turns,
            max_response_tokens=config.max_response_tokens,
            max_context_tokens=config.max_context_tokens,
            tools=config.tools,
            sampling=SamplingParams(
                max_new_tokens=config.max_new_tokens, temperature=config.effective_temperature, top_p=config.top_p
            ),
            seed=config.seed,
        )
        self.sampler = TreeSampler(engine, processor, self.tree_config)
        self.tools = [get_tool(name) for name in config.tools]

    async def question(self, item: EvalItem, variant: str) -> dict[str, Any]:
        cfg = self.config
        presented = present(item, cfg.effective_shuffle, cfg.seed)
        base = {
            "qid": item.qid,
            "variant": variant,
            "category": item.category,
            "subcategory": item.subcategory,
            "cycle": item.cycle,
            "question": item.question,
            "options": list(presented.options),
            "order": list(presented.order),
            "answer": presented.answer_letter,
            "gt_boxes": [list(b) for b in item.gt_boxes],
        }
        try:
            original = await asyncio.to_thread(item.load_image)
            prepared = await asyncio.to_thread(item.load_view)
        except ImageLoadError as exc:
            return {**base, "error": str(exc), "score": 0.0}
        view = global_view(prepared or original, cfg.global_max_pixels)
        self._thumbnail(item.qid, view)
        seed = question_seed(cfg.seed, item.qid)
        source: Image.Image = original
        if variant != "pred":
            source = CropSwapImage(original, variant, item.gt_boxes[0] if item.gt_boxes else None, seed)
        messages = build_messages(presented.text, self.tools)
        start = time.perf_counter()
        try:
            leaves, record = await self.sampler.sample(
                messages, view, original_image=source, route=f"{variant}:{item.qid}", seed=seed
            )
        except ValueError as exc:  # e.g. a prompt longer than --max-context-tokens: this question only
            print(f"[eval] {variant}:{item.qid}: {exc}", file=sys.stderr)
            return {**base, "error": str(exc), "score": 0.0}
        latency = time.perf_counter() - start
        samples = [self._sample(item, presented, variant, i, leaf) for i, leaf in enumerate(leaves)]
        if self.judge is not None:
            await self._judge(presented, samples)
        letters = [s["pred"] for s in samples]
        out = {
            **base,
            "image_size": list(original.size),
            "view_size": list(view.size),
            "samples": samples,
            "score": statistics.fmean(float(s["correct"]) for s in samples),
            "pass": any(s["correct"] for s in samples),
            "majority": _majority(letters) == presented.answer_letter,
            "latency_s": latency,
        }
        if self.tree_config.mode == "tree":
            out["tree"] = _tree_json(record)
        return out

    async def _judge(self, presented: Presented, samples: list[dict[str, Any]]) -> None:
        """Free-form answers the rules map to no option go to the LLM judge (``judged`` marks them)."""
        assert self.judge is not None
        letter = presented.answer_letter
        truth = f"{letter}. {presented.options[OPTION_LETTERS.index(letter)]}"
        for sample in samples:
            if sample["pred"] is None and sample["answer_text"]:
                score = await asyncio.to_thread(self.judge.score, presented.text, sample["answer_text"], truth)
                sample["correct"], sample["judged"] = score > 0.5, True

    def _thumbnail(self, qid: str, view: Image.Image) -> None:
        path = self.out / "images" / f"{_safe(qid)}.jpg"
        if not path.exists():
            thumb = view.copy()
            thumb.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
            thumb.save(path, quality=85)

    def _sample(self, item: EvalItem, presented: Presented, variant: str, index: int, leaf: Leaf) -> dict[str, Any]:
        answer = parse_turn(leaf.turn_texts[-1]).answer if leaf.stop_reason == "answer" else None
        pred = predicted_letter(answer, presented.options)
        crop_dir = self.out / "crops" / variant / _safe(item.qid)
        crops = []
        for k, image in enumerate(leaf.images[1:]):
            crop_dir.mkdir(parents=True, exist_ok=True)
            path = crop_dir / f"s{index}_c{k}.png"
            image.save(path)
            crops.append(str(path.relative_to(self.out)))
        ok = [c for c in leaf.tool_calls if c.ok]
        return {
            "turns": leaf.turn_texts,
            "tool_calls": [
                {"name": c.name, "arguments": dict(c.arguments), "ok": c.ok, "error": c.error, "box": c.box}
                for c in leaf.tool_calls
            ],
            "crops": crops,
            "answer_text": answer,
            "pred": pred,
            "correct": pred is not None and pred == presented.answer_letter,
            "judged": False,
            "stop_reason": leaf.stop_reason,
            "num_turns": leaf.num_turns,
            "tool_calls_ok": len(ok),
            "tool_calls_failed": len(leaf.tool_calls) - len(ok),
            "prompt_tokens": len(leaf.prompt_ids),
            "generated_tokens": sum(leaf.response_mask),
            "response_tokens": len(leaf.response_ids),
            "grounding": _iou_stats([c.box for c in ok if c.box is not None], item.gt_boxes),
            "node_path": leaf.node_path,
        }


def _tree_json(record: TreeRecord) -> dict[str, Any]:
    return {
        "nodes": [
            {
                "id": n.id,
                "parent": n.parent,
                "depth": n.depth,
                "entropy": n.entropy,
                "split": n.split,
                "terminal": n.terminal,
            }
            for n in record.nodes
        ],
        "splits": [{"node": s.node, "new_branches": s.new_branches, "reopened": s.reopened} for s in record.splits],
        "metrics": record.metrics,
    }


def _check_config(out: Path, config: EvalConfig) -> None:
    path = out / "config.json"
    protocol = {k: config.protocol()[k] for k in PROTOCOL_KEYS}
    if path.exists():
        saved = json.loads(path.read_text())
        diff = {k: (saved.get(k), v) for k, v in protocol.items() if saved.get(k) != v}
        if diff:
            raise ValueError(
                f"{out} holds a run with a different protocol {diff} (saved, now); pass a new --out to start afresh"
            )
    path.write_text(json.dumps({**config.protocol(), **protocol}, indent=2))


async def evaluate_async(
    config: EvalConfig,
    engine: Engine,
    processor: Any,
    items: Sequence[EvalItem] | None = None,
    judge: Judge | None = None,
) -> EvalResult:
    """:func:`evaluate` inside a running event loop."""
    out = Path(config.out)
    issues: list[LoadIssue] = []
    if items is None:
        loaded = load_benchmark(config.benchmark, config.data)
        items, issues = loaded.items, loaded.issues
        for issue in issues:
            print(f"[eval] skipped {issue}", file=sys.stderr)
    items = list(items)[: config.n] if config.n is not None else list(items)
    for sub in ("images", "crops"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    _check_config(out, config)
    results = out / "results.jsonl"
    records = read_records(results)
    done = {(r["qid"], r["variant"]) for r in records}
    wanted = {(it.qid, v) for it in items for v in ("pred", *config.crop_swap)}
    records = [r for r in records if (r["qid"], r["variant"]) in wanted]
    todo = [
        (item, variant)
        for variant in ("pred", *config.crop_swap)
        for item in items
        if (item.qid, variant) not in done and not (variant == "gt" and not item.gt_boxes)
    ]
    run = _Run(config, engine, processor, out, judge)
    writer = RecordWriter(results)
    gate = asyncio.Semaphore(config.concurrency)
    bar = tqdm(total=len(todo), unit="q", disable=not config.progress, dynamic_ncols=True, file=sys.stderr)
    scores = [float(r["score"]) for r in records if r["variant"] == "pred" and "error" not in r]
    failures: list[str] = []
    start = time.perf_counter()

    async def one(item: EvalItem, variant: str) -> None:
        async with gate:
            try:
                record = await run.question(item, variant)
            except EngineError as exc:  # not written: a rerun retries it
                failures.append(f"{variant}:{item.qid}: {exc}")
                bar.update(1)
                return
        writer.write(record)
        records.append(record)
        if variant == "pred" and "error" not in record:
            scores.append(float(record["score"]))
        bar.update(1)
        bar.set_postfix(acc=f"{100 * statistics.fmean(scores):.1f}" if scores else "-", refresh=False)

    try:
        await asyncio.gather(*(one(item, variant) for item, variant in todo))
    finally:
        writer.close()
        bar.close()
    summary = summarize(config, items, records, issues, failures, time.perf_counter() - start, len(todo))
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(out / "summary.json")
    return EvalResult(out, summary, records, issues)


def evaluate(
    config: EvalConfig,
    engine: Engine,
    processor: Any,
    items: Sequence[EvalItem] | None = None,
    judge: Judge | None = None,
) -> EvalResult:
    """Evaluate ``config.benchmark`` with ``engine``.

    ``items`` replaces loading ``config.data``; ``judge`` (e.g. :class:`visionleaf.reward.LLMJudge`) scores
    answers that name no option by rule.
    """
    return asyncio.run(evaluate_async(config, engine, processor, items, judge))


def _stats(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)
    return {
        "mean": statistics.fmean(ordered),
        "p50": ordered[len(ordered) // 2],
        "p90": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
        "max": ordered[-1],
    }


def _variant_summary(benchmark: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    good = [r for r in records if "error" not in r]
    samples = [s for r in good for s in r["samples"]]
    grounded = [s["grounding"] for s in samples if s["grounding"] is not None]
    calls_hist = Counter(min(s["tool_calls_ok"] + s["tool_calls_failed"], 5) for s in samples)
    by_calls: dict[int, list[float]] = defaultdict(list)
    for s in samples:
        by_calls[min(s["tool_calls_ok"], 3)].append(float(s["correct"]))
    return {
        "questions": len(good),
        "errors": [{"qid": r["qid"], "error": r["error"]} for r in records if "error" in r],
        "accuracy": accuracy_table(benchmark, good),
        "pass_at_k": accuracy_table(benchmark, [{**r, "score": float(r["pass"])} for r in good]),
        "majority_at_k": accuracy_table(benchmark, [{**r, "score": float(r["majority"])} for r in good]),
        "subcategories": subcategory_table(good),
        "tool_calls_ok": statistics.fmean(s["tool_calls_ok"] for s in samples) if samples else None,
        "tool_calls_failed": statistics.fmean(s["tool_calls_failed"] for s in samples) if samples else None,
        "tool_call_histogram": {str(k): calls_hist[k] for k in sorted(calls_hist)},
        "accuracy_by_ok_calls": {str(k): 100 * statistics.fmean(v) for k, v in sorted(by_calls.items())},
        "turns": _stats([float(s["num_turns"]) for s in samples]),
        "generated_tokens": _stats([float(s["generated_tokens"]) for s in samples]),
        "prompt_tokens": _stats([float(s["prompt_tokens"]) for s in samples]),
        "latency_s": _stats([float(r["latency_s"]) for r in good]),
        "judged_samples": sum(bool(s.get("judged")) for s in samples),
        "no_answer_rate": statistics.fmean(s["answer_text"] is None for s in samples) if samples else None,
        "stop_reasons": dict(Counter(s["stop_reason"] for s in samples)),
        "grounding": {
            "scored_samples": len(grounded),
            "iou": _stats([g["iou"] for g in grounded]),
            "coverage": _stats([g["coverage"] for g in grounded]),
            "iou_values": [round(g["iou"], 4) for g in grounded],
        },
    }


def summarize(
    config: EvalConfig,
    items: Sequence[EvalItem],
    records: list[dict[str, Any]],
    issues: Sequence[LoadIssue],
    failures: Sequence[str],
    wall_s: float,
    ran: int,
) -> dict[str, Any]:
    """The summary.json content."""
    variants = {
        v: _variant_summary(config.benchmark, [r for r in records if r["variant"] == v])
        for v in ("pred", *config.crop_swap)
    }
    no_gt = [it.qid for it in items if not it.gt_boxes]
    return {
        "benchmark": config.benchmark,
        "config": config.protocol(),
        "questions": len(items),
        "load_issues": [dataclasses.asdict(i) for i in issues],
        "engine_failures": list(failures),
        "variants": variants,
        "crop_swap": {
            "accuracy": {v: variants[v]["accuracy"] for v in variants},
            "no_gt_boxes": no_gt if "gt" in config.crop_swap else [],
        },
        "wall_s": wall_s,
        "questions_run": ran,
        "questions_per_s": ran / wall_s if wall_s > 0 else None,
    }
