"""End-to-end demo on CPU: tiny Qwen2.5-VL + synthetic hi-res set -> tree rollouts with tools -> rewards.

    python -m visionleaf.demo                       # ~2 min on 2 cores, first run builds the model
    python -m visionleaf.demo --mode chain          # the same with N independent chains

Builds (once, under ``--out``) a tiny Qwen2.5-VL with a short format warm-up and a small synthetic
visual-search set, then for every item grows one rollout tree (``--budget`` leaves) on the in-process HF
engine, runs the zoom tool between turns, scores every leaf with the gated reward and prints per-item
lines and a summary. The model is tiny and barely trained: expect low accuracy and many broken calls.
It shows the machinery, not a result.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from visionleaf.data import Item, generate, load_image
from visionleaf.engines.base import SamplingParams
from visionleaf.engines.hf import HFEngine
from visionleaf.models import tiny
from visionleaf.reward import compute_score
from visionleaf.rollout.tree import TreeConfig, TreeSampler

WARMUP_STEPS = 400


def prepare(out: Path, n: int, seed: int) -> tuple[Path, list[Item]]:
    """The tiny model and the synthetic test split under ``out``, built when missing."""
    model_dir = out / "tiny-qwen25vl"
    if not (model_dir / "model.safetensors").exists():
        print(f"[demo] building the tiny Qwen2.5-VL with a {WARMUP_STEPS}-step format warm-up (~1 min)...")
        tiny.build(model_dir, vocab="bpe", seed=seed, warmup_steps=WARMUP_STEPS)
    data = out / "synthetic"
    parquet = data / "test.parquet"
    if not parquet.exists() or pq.read_metadata(parquet).num_rows != n:
        print(f"[demo] generating {n} synthetic visual-search items in {data}...")
        generate(data, n, seed=seed, split="test")
    items = [Item.from_row(row) for row in pq.read_table(parquet).to_pylist()]
    return model_dir, items


def score_leaves(item: Item, leaves: list[Any], tokenizer: Any) -> list[dict[str, Any]]:
    extra = item.to_row()["extra_info"]
    return [
        compute_score(
            item.data_source,
            tokenizer.decode(leaf.response_ids, skip_special_tokens=False),
            item.ground_truth,
            {**extra, **leaf.reward_info()},
        )
        for leaf in leaves
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"), help="where the model and data live")
    parser.add_argument("--n", type=int, default=8, help="synthetic items")
    parser.add_argument("--budget", type=int, default=8, help="leaves per item (GRPO group size N)")
    parser.add_argument("--branch-factor", type=int, default=2, help="branches per split (B)")
    parser.add_argument("--mode", choices=("tree", "chain"), default="tree", help="tree rollout or N chains")
    parser.add_argument("--max-turns", type=int, default=3, help="assistant turns per branch")
    parser.add_argument("--max-new-tokens", type=int, default=96, help="tokens per turn")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    model_dir, items = prepare(args.out, args.n, args.seed)
    model, processor = tiny.load(model_dir)
    engine = HFEngine(model, processor)
    config = TreeConfig(
        budget=args.budget,
        branch_factor=args.branch_factor,
        mode=args.mode,
        max_turns=args.max_turns,
        sampling=SamplingParams(max_new_tokens=args.max_new_tokens),
        seed=args.seed,
    )
    sampler = TreeSampler(engine, processor, config)
    print(f"[demo] {len(items)} items x {args.budget} leaves, {args.mode} rollouts, max {args.max_turns} turns")

    scores: list[dict[str, Any]] = []
    trees = []
    stops: Counter[str] = Counter()
    for item in items:
        leaves, record = asyncio.run(
            sampler.sample(
                list(item.messages),
                load_image(item.image),
                original_image=load_image(item.original_image),
                route=f"{item.split}-{item.index}",
                seed=args.seed * 100_003 + item.index,
            )
        )
        item_scores = score_leaves(item, leaves, processor.tokenizer)
        scores += item_scores
        trees.append(record.metrics)
        stops.update(leaf.stop_reason for leaf in leaves)
        print(
            f"  {item.category:18s} gt={item.ground_truth} "
            f"answers={''.join(_answer(s) for s in item_scores)} "
            f"score={statistics.mean(s['score'] for s in item_scores):+.2f} "
            f"tool_calls/leaf={record.metrics['tool_calls_per_leaf']:.2f} "
            f"splits={record.metrics['splits']:.0f} depth={record.metrics['max_depth']:.0f} "
            f"{record.metrics['wall_time_s']:.1f}s"
        )

    def mean(key: str) -> float:
        return statistics.mean(float(s[key]) for s in scores)

    calls = sum(s["num_tool_calls"] for s in scores)
    errors = sum(s["num_tool_errors"] for s in scores)
    # absent where the engine could not tell its cached tokens
    known = all("engine_computed_tokens" in t for t in trees)
    computed = sum(t["engine_computed_tokens"] for t in trees) if known else None
    unique = sum(t["unique_tokens"] for t in trees)
    chain = sum(t["chain_tokens"] for t in trees)
    print("[demo] summary")
    print(f"  leaves            {len(scores)}  (stop reasons: {dict(stops)})")
    print(f"  reward            score {mean('score'):+.3f}  acc {mean('acc'):.3f}  format penalty {mean('format'):.3f}")
    print(f"  tool              bonus rate {mean('tool'):.3f}  calls/leaf {calls / len(scores):.2f}  errors {errors}")
    print(f"  grounding         mean IoU of scored crops {mean('iou'):.3f}")
    if computed is None:
        print(f"  tree              tokens: unique {unique:.0f}, as chains {chain:.0f}, engine-computed unknown")
    else:
        print(f"  tree              tokens: unique {unique:.0f}, as chains {chain:.0f}, engine-computed {computed:.0f}")
        print(f"  prefix reuse      engine-computed / unique tokens = {computed / unique:.2f}")
    print(f"  wall time         {time.perf_counter() - start:.1f}s")


def _answer(score: dict[str, Any]) -> str:
    """One character per leaf: + correct, - wrong answer, x broken format."""
    if score["acc"] > 0:
        return "+"
    return "x" if score["format"] else "-"


if __name__ == "__main__":
    main()
