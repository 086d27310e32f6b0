"""LFPC's offline resolution selection (the information gap): per item, the global view at which the model
stops giving its original-resolution answer.

For each item the model answers greedily, from the global view alone (no tools offered), on the original
downsampled to the ladder's largest pixel budget (the reference answer), then on views downsampled to each
lower budget in turn. The chosen level is the first (highest-resolution) budget whose answer differs from
the reference (LFPC: "an appropriately low resolution such that the model yields answers inconsistent
with those obtained at higher resolutions"); the ladder's floor when no level flips. The output row shows
that view as its global image and keeps ``extra_info.original_image`` (crops are cut from the original);
``extra_info.info_gap_level`` is the chosen budget in pixels and ``extra_info.info_gap_flipped`` whether
the answer flipped there.

    python -m visionleaf.data.info_gap --model ckpt --in data/curated --out data/info_gap \\
        --ladder 12845056,3211264,1605632,802816,401408,200704

Output folder: ``<input file name>.parquet`` (the rows with their new global views), ``views/`` (the
downsampled images), ``dropped.jsonl`` (rows that break the schema or whose image does not read),
``summary.json`` with the histogram of levels, and the resumable ``records.jsonl`` + ``config.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import re
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from visionleaf.data.images import ImageLoadError, load_image
from visionleaf.data.runs import (
    InputRow,
    RecordLog,
    add_engine_args,
    answers,
    canonical_answer,
    close_engine,
    direct_prefix,
    fingerprint,
    open_engine,
    print_table,
    read_rows,
    write_json,
    write_jsonl,
)
from visionleaf.data.schema import Item, write_parquet
from visionleaf.engines.base import Engine, EngineError, SamplingParams
from visionleaf.eval.protocol import VISUAL_TOKEN_PIXELS, global_view
from visionleaf.eval.runner import question_seed

DEFAULT_LADDER = tuple(tokens * VISUAL_TOKEN_PIXELS for tokens in (16384, 4096, 2048, 1024, 512, 256))
"""Pixel budgets of the global view, largest first (16384 visual tokens down to 256)."""
STAGE = "info_gap"


@dataclass(frozen=True)
class InfoGapConfig:
    """How to select resolutions. Every field but ``concurrency`` and ``progress`` must match on resume."""

    ladder: tuple[int, ...] = DEFAULT_LADDER
    """Pixel budgets, strictly decreasing: the first gives the reference answer, the last is the floor."""
    max_new_tokens: int = 512
    """Tokens of the answer turn."""
    seed: int = 0
    concurrency: int = 16
    progress: bool = True

    def __post_init__(self) -> None:
        if len(self.ladder) < 2 or any(b >= a for a, b in zip(self.ladder, self.ladder[1:], strict=False)):
            raise ValueError(f"--ladder needs at least 2 strictly decreasing pixel budgets, got {list(self.ladder)}")
        if self.ladder[-1] < 4 * VISUAL_TOKEN_PIXELS:
            raise ValueError(f"--ladder's floor must be >= {4 * VISUAL_TOKEN_PIXELS} pixels (4 visual tokens)")
        if self.concurrency < 1:
            raise ValueError(f"--concurrency must be >= 1, got {self.concurrency}")

    def resume_keys(self) -> dict[str, Any]:
        return {"ladder": list(self.ladder), "max_new_tokens": self.max_new_tokens, "seed": self.seed}


@dataclass
class InfoGapResult:
    """What :func:`select_resolutions` returns (also on disk under ``out``)."""

    out: Path
    summary: dict[str, Any]
    rows: list[dict[str, Any]]
    dropped: list[dict[str, Any]]


def _view_path(out: Path, uid: str) -> Path:
    return out / "views" / (re.sub(r"[^A-Za-z0-9._-]", "_", uid) + ".png")


class _Selection:
    def __init__(self, config: InfoGapConfig, engine: Engine, processor: Any, out: Path) -> None:
        self.config, self.engine, self.processor, self.out = config, engine, processor, out
        self.greedy = SamplingParams(max_new_tokens=config.max_new_tokens, temperature=0.0)

    async def item(self, row: InputRow) -> dict[str, Any]:
        try:
            item = Item.from_row(row.row)
            original = await asyncio.to_thread(load_image, item.original_image)
        except (ValueError, ImageLoadError) as exc:
            return {"keep": False, "reason": str(exc)}
        seed = question_seed(self.config.seed, row.uid)
        said: dict[str, str | None] = {}
        reference: str | None = None
        latest: str | None = None
        previous: tuple[int, int] | None = None
        chosen, flipped = self.config.ladder[-1], False
        view = original
        for level, budget in enumerate(self.config.ladder):
            view = global_view(original, budget)
            if view.size != previous:  # the same view gives the same greedy answer
                prefix = direct_prefix(self.processor, item.question, view, f"{row.uid}:{budget}")
                (answer,) = await answers(self.engine, self.processor, prefix, self.greedy, [seed])
                latest = canonical_answer(answer, item.options)
            said[str(budget)] = latest
            previous = view.size
            if level == 0:
                reference = latest
            elif latest != reference:
                chosen, flipped = budget, True
                break
        path = ""
        if view.size != original.size:
            path = str(_view_path(self.out, row.uid).resolve())
            await asyncio.to_thread(view.save, path)
        return {
            "keep": True,
            "reason": "",
            "level": chosen,
            "flipped": flipped,
            "answers": said,
            "view": path,
            "view_size": list(view.size),
        }


def _with_view(row: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    row = copy.deepcopy(row)
    if record["view"]:
        row["images"] = [{**row["images"][0], "image": record["view"]}]
    else:  # the original is already within the chosen budget
        row["images"] = [{**row["images"][0], "image": row["extra_info"]["original_image"]}]
    row["extra_info"]["info_gap_level"] = int(record["level"])
    row["extra_info"]["info_gap_flipped"] = bool(record["flipped"])
    return row


async def select_resolutions_async(
    rows_path: str | Path,
    out: str | Path,
    engine: Engine,
    processor: Any,
    config: InfoGapConfig = InfoGapConfig(),
    model: str = "",
    limit: int | None = None,
) -> InfoGapResult:
    """:func:`select_resolutions` inside a running event loop."""
    out = Path(out)
    rows = read_rows(rows_path, limit)
    log = RecordLog(out, {**config.resume_keys(), "input": fingerprint(rows_path), "limit": limit, "model": model})
    (out / "views").mkdir(exist_ok=True)
    selection = _Selection(config, engine, processor, out)
    gate = asyncio.Semaphore(config.concurrency)
    todo = [row for row in rows if log.get(row.uid, STAGE) is None]
    bar = tqdm(total=len(todo), unit="item", disable=not config.progress, dynamic_ncols=True, file=sys.stderr)
    failures: list[str] = []
    start = time.perf_counter()

    async def one(row: InputRow) -> None:
        source = str(row.row.get("data_source")) if isinstance(row.row, dict) else "?"
        async with gate:
            try:
                record = await selection.item(row)
            except EngineError as exc:  # not recorded: a rerun retries it
                failures.append(f"{row.uid}: {exc}")
                bar.update(1)
                return
        log.write({"uid": row.uid, "stage": STAGE, "data_source": source, **record})
        bar.update(1)

    try:
        await asyncio.gather(*(one(row) for row in todo))
    finally:
        log.close()
        bar.close()
    by_file: dict[str, list[dict[str, Any]]] = defaultdict(list)
    dropped, histogram, pending = [], Counter[str](), 0
    for row in rows:
        record = log.get(row.uid, STAGE)
        if record is None:
            pending += 1
        elif not record["keep"]:
            dropped.append(
                {"uid": row.uid, "data_source": record["data_source"], "stage": STAGE, "reason": record["reason"]}
            )
        else:
            by_file[row.file].append(_with_view(row.row, record))
            histogram[str(record["level"]) if record["flipped"] else f"{record['level']} (floor, no flip)"] += 1
    for file, kept in by_file.items():
        write_parquet(kept, out / Path(file).with_suffix(".parquet").name)
    write_jsonl(out / "dropped.jsonl", dropped)
    levels = [str(b) for b in config.ladder[1:]] + [f"{config.ladder[-1]} (floor, no flip)"]
    table = print_table(
        "information gap: chosen global-view budget (pixels; visual tokens = pixels / 784)",
        ["level", "visual tokens", "items"],
        [[level, int(level.split()[0]) // VISUAL_TOKEN_PIXELS, histogram[level]] for level in levels],
    )
    summary = {
        "histogram": {level: histogram[level] for level in levels},
        "rows": len(rows),
        "selected": sum(histogram.values()),
        "dropped": len(dropped),
        "pending": pending,
        "engine_failures": failures,
        "wall_s": time.perf_counter() - start,
        "resumed_records": log.resumed,
        "config": config.resume_keys(),
        "table": table,
    }
    write_json(out / "summary.json", summary)
    return InfoGapResult(out, summary, [r for rs in by_file.values() for r in rs], dropped)


def select_resolutions(
    rows_path: str | Path,
    out: str | Path,
    engine: Engine,
    processor: Any,
    config: InfoGapConfig = InfoGapConfig(),
    model: str = "",
    limit: int | None = None,
) -> InfoGapResult:
    """Choose each row's global view (see the module docstring) and write the rows to ``out``, many items
    at once on ``engine``. ``model`` names the model in ``config.json`` (a resumed run must use the same)."""
    return asyncio.run(select_resolutions_async(rows_path, out, engine, processor, config, model, limit))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m visionleaf.data.info_gap",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--in", dest="rows", required=True, help="rows: a parquet/JSONL file or a folder of parquet")
    p.add_argument("--out", required=True, help="output folder (rerun with the same folder to resume)")
    add_engine_args(p)
    p.add_argument(
        "--ladder",
        default=",".join(str(b) for b in DEFAULT_LADDER),
        help="comma-separated pixel budgets, largest first (default: 16384 down to 256 visual tokens x 784)",
    )
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


async def _main(args: argparse.Namespace) -> int:
    try:
        ladder = tuple(int(v) for v in args.ladder.split(",") if v.strip())
    except ValueError:
        print(f"--ladder takes comma-separated integers (pixels), got {args.ladder!r}", file=sys.stderr)
        return 2
    config = InfoGapConfig(
        ladder=ladder,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        concurrency=args.concurrency,
        progress=not args.no_progress,
    )
    engine, processor, model = open_engine(args)
    try:
        result = await select_resolutions_async(args.rows, args.out, engine, processor, config, model, args.limit)
    finally:
        await close_engine(engine)
    print(
        f"selected {len(result.rows)} global views, dropped {len(result.dropped)}; wrote {result.out}", file=sys.stderr
    )
    return 1 if result.summary["engine_failures"] else 0


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(asyncio.run(_main(parse_args(argv))))


if __name__ == "__main__":
    main()
