"""DeepEyes' three-stage curation of training rows, with the base model that will be trained.

Stages, in the order they run (cheapest first; each is a test on one item, so the kept set does not
depend on the order, only which stage an item that fails several is charged to)::

    format      options and answer normalised (the answer becomes the option letter); dropped: the answer
                is not among the options, two options are the same, the row breaks the schema, an image
                is unreadable or the original's size is not extra_info.original_size. No model calls.
    utility     (items with GT boxes; others pass) one greedy answer on the global view alone (no tools
                offered) and one after a zoom call whose observation is the GT crop of the original;
                kept: right with the crop and wrong without. 2 model calls.
    difficulty  n rollouts (default 8, temperature 1) of the row's own prompt with the zoom tool, as in
                training; dropped: solved 0/n or n/n. n model calls (multi-turn).

Command line (``--server URL --processor DIR`` instead of ``--model DIR`` for a vLLM/SGLang server)::

    python -m visionleaf.data.curate --model ckpt --in data/deepeyes --out data/deepeyes_curated

The output folder holds ``<input file name>.parquet`` (the kept rows, normalised), ``dropped.jsonl`` (every
dropped row with its stage, reason and numbers), ``summary.json`` and the resumable ``records.jsonl`` +
``config.json`` (rerun the same command after a crash or Ctrl-C: finished work is skipped).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import dataclasses
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from visionleaf.data.images import ImageLoadError, load_image
from visionleaf.data.runs import (
    ZOOM_TOOL,
    InputRow,
    RecordLog,
    add_engine_args,
    answers,
    close_engine,
    direct_prefix,
    fingerprint,
    gt_crop_prefix,
    is_correct,
    open_engine,
    print_table,
    read_rows,
    write_json,
    write_jsonl,
)
from visionleaf.data.schema import OPTION_LETTERS, Item, validate_row, write_parquet
from visionleaf.engines.base import Engine, EngineError, SamplingParams
from visionleaf.eval.runner import question_seed
from visionleaf.reward.accuracy import choice_index, normalize_text
from visionleaf.rollout.tree import TreeConfig, TreeSampler
from visionleaf.tools import parse_turn

STAGES = ("format", "utility", "difficulty")
"""The stages in the order they run."""


@dataclass(frozen=True)
class CurateConfig:
    """How to curate. Every field but ``concurrency`` and ``progress`` must match on resume."""

    samples: int = 8
    """Rollouts per item in the difficulty stage."""
    temperature: float = 1.0
    """Sampling temperature of the difficulty rollouts (the utility stage is greedy)."""
    max_turns: int = 5
    """Assistant turns per difficulty rollout."""
    max_new_tokens: int = 512
    """Tokens per turn."""
    max_context_tokens: int = 8192
    seed: int = 0
    utility: bool = True
    """Run the perception-utility stage (DeepEyes applies it to V* only: turn it off for other sources)."""
    difficulty: bool = True
    """Run the difficulty stage."""
    concurrency: int = 16
    """Items in flight at once."""
    progress: bool = True

    def __post_init__(self) -> None:
        if self.samples < 2:
            raise ValueError(f"--samples must be >= 2 (0/n and n/n are dropped), got {self.samples}")
        if self.concurrency < 1:
            raise ValueError(f"--concurrency must be >= 1, got {self.concurrency}")

    @property
    def stages(self) -> tuple[str, ...]:
        """The stages this run has, in the order they run."""
        off = {"utility"} if not self.utility else set()
        off |= {"difficulty"} if not self.difficulty else set()
        return tuple(s for s in STAGES if s not in off)

    def resume_keys(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        del values["concurrency"], values["progress"]
        return values


@dataclass
class CurateResult:
    """What :func:`curate` returns (also on disk under ``out``)."""

    out: Path
    summary: dict[str, Any]
    kept: list[dict[str, Any]]
    dropped: list[dict[str, Any]]


def standardize(row: Any) -> tuple[dict[str, Any] | None, str, list[str]]:
    """(normalised row, "", changes) or (None, reason, changes): the format stage without the image checks.

    Options are stripped; a multiple-choice answer given as ``b``, ``(B)``, ``B. red`` or the option text
    becomes the letter; a free-form answer is stripped.
    """
    if not isinstance(row, dict) or not isinstance(row.get("extra_info"), dict):
        return None, "schema: the row needs an extra_info mapping", []
    if not isinstance(row.get("reward_model"), dict):
        return None, "schema: reward_model: missing", []
    row = copy.deepcopy(row)
    extra, reward, changes = row["extra_info"], row["reward_model"], []
    options = extra.get("options")
    truth = reward.get("ground_truth")
    if isinstance(options, list) and all(isinstance(o, str) for o in options):
        stripped = [o.strip() for o in options]
        if stripped != options:
            changes.append("options stripped")
            extra["options"] = options = stripped
        seen: dict[str, int] = {}
        for i, option in enumerate(options):
            key = normalize_text(option) or option
            if key in seen:
                return None, f"options {seen[key]} and {i} ({option!r}) are the same", changes
            seen[key] = i
        if isinstance(truth, str) and options:
            index = choice_index(truth, options)
            if index is None or index >= len(options):
                return None, f"answer {truth!r} is not among the options {options}", changes
            if truth != OPTION_LETTERS[index]:
                changes.append(f"ground_truth {truth!r} -> {OPTION_LETTERS[index]!r}")
                reward["ground_truth"] = OPTION_LETTERS[index]
        elif isinstance(truth, str) and truth != truth.strip():
            changes.append("ground_truth stripped")
            reward["ground_truth"] = truth.strip()
    try:
        validate_row(row)
    except ValueError as exc:
        return None, f"schema: {exc}", changes
    return row, "", changes


def check_images(row: dict[str, Any]) -> str:
    """ "" when every image of ``row`` reads and the original has ``extra_info.original_size``, else the reason."""
    extra = row["extra_info"]
    try:
        for image in row["images"]:
            load_image(image["image"])
        original = load_image(extra["original_image"])
    except ImageLoadError as exc:
        return f"unreadable image: {exc}"
    if list(original.size) != list(extra["original_size"]):
        width, height = original.size
        return f"original image is {width}x{height}, extra_info.original_size says {extra['original_size']}"
    return ""


class _Curation:
    def __init__(self, config: CurateConfig, engine: Engine, processor: Any, log: RecordLog) -> None:
        self.config, self.engine, self.processor, self.log = config, engine, processor, log
        self.sampler = TreeSampler(
            engine,
            processor,
            TreeConfig(
                budget=config.samples,
                mode="chain",
                max_turns=config.max_turns,
                max_response_tokens=config.max_context_tokens,
                max_context_tokens=config.max_context_tokens,
                tools=(ZOOM_TOOL,),
                sampling=SamplingParams(max_new_tokens=config.max_new_tokens, temperature=config.temperature),
                seed=config.seed,
            ),
        )
        self.greedy = SamplingParams(max_new_tokens=config.max_new_tokens, temperature=0.0)

    async def item(self, row: InputRow) -> None:
        """Run the stages ``row`` still needs, recording each; stops at the first drop."""
        source = str(row.row.get("data_source")) if isinstance(row.row, dict) else "?"
        for stage in self.config.stages:
            record = self.log.get(row.uid, stage)
            if record is None:
                record = {"uid": row.uid, "stage": stage, "data_source": source, **await self._stage(stage, row)}
                self.log.write(record)
            if not record["keep"]:
                return

    async def _stage(self, stage: str, row: InputRow) -> dict[str, Any]:
        normalised, reason, changes = standardize(row.row)
        if stage == "format":
            if normalised is not None:
                reason = await asyncio.to_thread(check_images, normalised)
            return {"keep": not reason, "reason": reason, "changes": changes}
        assert normalised is not None
        item = Item.from_row(normalised)
        seed = question_seed(self.config.seed, row.uid)
        view = await asyncio.to_thread(load_image, item.image)
        original = (
            view if item.original_image == item.image else await asyncio.to_thread(load_image, item.original_image)
        )
        try:
            if stage == "utility":
                return await self._utility(item, row.uid, view, original, seed)
            return await self._difficulty(item, row.uid, view, original, seed)
        except ValueError as exc:  # e.g. a prompt longer than the context: this item only
            return {"keep": False, "reason": f"error: {exc}"}

    async def _utility(
        self, item: Item, uid: str, view: Image.Image, original: Image.Image, seed: int
    ) -> dict[str, Any]:
        if not item.gt_boxes:
            return {"keep": True, "reason": "", "skipped": "no gt_boxes"}
        without = direct_prefix(self.processor, item.question, view, f"{uid}:global")
        with_crop = await asyncio.to_thread(
            gt_crop_prefix, self.processor, item.messages, view, original, item.gt_boxes[0], f"{uid}:crop"
        )
        (plain,), (cropped,) = await asyncio.gather(
            answers(self.engine, self.processor, without, self.greedy, [seed]),
            answers(self.engine, self.processor, with_crop, self.greedy, [seed]),
        )
        right_without = is_correct(plain, item.ground_truth, item.options)
        right_with = is_correct(cropped, item.ground_truth, item.options)
        keep = right_with and not right_without
        reason = "" if keep else ("right without the crop" if right_without else "wrong with the GT crop")
        return {
            "keep": keep,
            "reason": reason,
            "with_crop": {"answer": cropped, "correct": right_with},
            "without": {"answer": plain, "correct": right_without},
        }

    async def _difficulty(
        self, item: Item, uid: str, view: Image.Image, original: Image.Image, seed: int
    ) -> dict[str, Any]:
        leaves, _ = await self.sampler.sample(item.messages, view, original_image=original, route=uid, seed=seed)
        said = [parse_turn(leaf.turn_texts[-1]).answer if leaf.stop_reason == "answer" else None for leaf in leaves]
        solved = sum(is_correct(a, item.ground_truth, item.options) for a in said)
        n = len(leaves)
        keep = 0 < solved < n
        zooms = sum(len(leaf.tool_calls) for leaf in leaves)
        return {
            "keep": keep,
            "reason": "" if keep else f"solved {solved}/{n}",
            "solved": solved,
            "n": n,
            "answers": said,
            "tool_calls": zooms,
        }


def _outcome(row: InputRow, log: RecordLog, config: CurateConfig) -> tuple[str, dict[str, Any] | None]:
    """("kept" | "dropped" | "pending", the record that dropped it)."""
    for stage in config.stages:
        record = log.get(row.uid, stage)
        if record is None:
            return "pending", None
        if not record["keep"]:
            return "dropped", record
    return "kept", None


def _summary(
    rows: Sequence[InputRow], log: RecordLog, config: CurateConfig
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    dropped, kept = [], defaultdict(list)
    for row in rows:
        outcome, record = _outcome(row, log, config)
        source = log.get(row.uid, "format")
        name = source["data_source"] if source else (row.row.get("data_source") if isinstance(row.row, dict) else "?")
        c = counts[str(name)]
        c["rows"] += 1
        utility = log.get(row.uid, "utility")
        if utility is not None and utility.get("skipped"):
            c["utility n/a"] += 1
        if outcome == "dropped":
            assert record is not None
            column = record["stage"]
            if column == "difficulty" and "solved" in record:
                column = "difficulty 0/n" if record["solved"] == 0 else "difficulty n/n"
            c[column] += 1
            numbers = {k: v for k, v in record.items() if k not in ("uid", "stage", "data_source", "keep", "reason")}
            dropped.append(
                {
                    "uid": row.uid,
                    "data_source": name,
                    "stage": record["stage"],
                    "reason": record["reason"],
                    **numbers,
                }
            )
        else:
            c[outcome] += 1
            if outcome == "kept":
                normalised, _, _ = standardize(row.row)
                assert normalised is not None
                kept[row.file].append(normalised)
    columns = ["rows", "format", "utility", "utility n/a", "difficulty 0/n", "difficulty n/n", "kept", "pending"]
    total: Counter[str] = sum(counts.values(), Counter())
    table = {name: {k: c[k] for k in columns} for name, c in sorted(counts.items())}
    table["total"] = {k: total[k] for k in columns}
    return {"columns": columns, "counts": table}, dropped, kept


async def curate_async(
    rows_path: str | Path,
    out: str | Path,
    engine: Engine,
    processor: Any,
    config: CurateConfig = CurateConfig(),
    model: str = "",
    limit: int | None = None,
) -> CurateResult:
    """:func:`curate` inside a running event loop."""
    out = Path(out)
    rows = read_rows(rows_path, limit)
    log = RecordLog(out, {**config.resume_keys(), "input": fingerprint(rows_path), "limit": limit, "model": model})
    curation = _Curation(config, engine, processor, log)
    gate = asyncio.Semaphore(config.concurrency)
    bar = tqdm(total=len(rows), unit="item", disable=not config.progress, dynamic_ncols=True, file=sys.stderr)
    failures: list[str] = []
    start = time.perf_counter()
    outcomes: Counter[str] = Counter()

    async def one(row: InputRow) -> None:
        async with gate:
            try:
                await curation.item(row)
            except EngineError as exc:  # not recorded: a rerun retries it
                failures.append(f"{row.uid}: {exc}")
        outcomes[_outcome(row, log, config)[0]] += 1
        bar.update(1)
        bar.set_postfix(kept=outcomes["kept"], dropped=outcomes["dropped"], refresh=False)

    try:
        await asyncio.gather(*(one(row) for row in rows))
    finally:
        log.close()
        bar.close()
    summary, dropped, kept = _summary(rows, log, config)
    for file in sorted({row.file for row in rows}):
        if kept[file]:
            write_parquet(kept[file], out / Path(file).with_suffix(".parquet").name)
    write_jsonl(out / "dropped.jsonl", dropped)
    columns = summary["columns"]
    summary["table"] = print_table(
        "curation: rows dropped at each stage, per data source",
        ["data_source", *columns],
        [[name, *(c[k] for k in columns)] for name, c in summary["counts"].items()],
    )
    summary.update(
        engine_failures=failures,
        wall_s=time.perf_counter() - start,
        resumed_records=log.resumed,
        config=config.resume_keys(),
    )
    write_json(out / "summary.json", summary)
    return CurateResult(out, summary, [r for rs in kept.values() for r in rs], dropped)


def curate(
    rows_path: str | Path,
    out: str | Path,
    engine: Engine,
    processor: Any,
    config: CurateConfig = CurateConfig(),
    model: str = "",
    limit: int | None = None,
) -> CurateResult:
    """Curate the rows at ``rows_path`` (parquet/JSONL file or folder of parquet) into ``out`` with ``engine``,
    many items at once. ``model`` names the model in ``config.json`` (a resumed run must use the same)."""
    return asyncio.run(curate_async(rows_path, out, engine, processor, config, model, limit))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m visionleaf.data.curate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--in", dest="rows", required=True, help="rows: a parquet/JSONL file or a folder of parquet")
    p.add_argument("--out", required=True, help="output folder (rerun with the same folder to resume)")
    add_engine_args(p)
    p.add_argument("--samples", type=int, default=8, help="difficulty rollouts per item")
    p.add_argument("--temperature", type=float, default=1.0, help="difficulty rollouts' temperature")
    p.add_argument("--max-turns", type=int, default=5)
    p.add_argument("--max-new-tokens", type=int, default=512, help="tokens per turn")
    p.add_argument("--max-context-tokens", type=int, default=8192)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-utility", action="store_true", help="skip the perception-utility stage")
    p.add_argument("--no-difficulty", action="store_true", help="skip the difficulty stage")
    return p.parse_args(argv)


async def _main(args: argparse.Namespace) -> int:
    config = CurateConfig(
        samples=args.samples,
        temperature=args.temperature,
        max_turns=args.max_turns,
        max_new_tokens=args.max_new_tokens,
        max_context_tokens=args.max_context_tokens,
        seed=args.seed,
        utility=not args.no_utility,
        difficulty=not args.no_difficulty,
        concurrency=args.concurrency,
        progress=not args.no_progress,
    )
    engine, processor, model = open_engine(args)
    try:
        result = await curate_async(args.rows, args.out, engine, processor, config, model, args.limit)
    finally:
        await close_engine(engine)
    print(f"kept {len(result.kept)} rows, dropped {len(result.dropped)}; wrote {result.out}", file=sys.stderr)
    return 1 if result.summary["engine_failures"] else 0


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(asyncio.run(_main(parse_args(argv))))


if __name__ == "__main__":
    main()
