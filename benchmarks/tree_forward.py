"""Update step (forward + backward) with the tree-shared forward vs per-leaf forwards, on the same trees.

    flock /tmp/visionleaf-heavy.lock .venv/bin/python benchmarks/tree_forward.py    # ~3 min on 2 CPU cores

Trees are grown by the real :class:`TreeSampler` at the rollout benchmark's shape (W = B = 4, N = 16, up to
3 turns, 64-token turns) with a scripted engine: every turn thinks a few dozen seeded words, then zooms
into a seeded box (a crop observation inside the branch) or answers. Models are random: the tiny
Qwen2.5-VL and the rollout benchmark's larger text config, float32, ``sdpa``.

Both sides compute the same thing: log-probs and entropies of every leaf's response tokens (hidden
states gathered before the LM head on both sides, so the LM head is not part of the difference) and a
backward through a weighted sum of them. Per-leaf: the leaves as one right-padded batch [N, L_max]
(causal + padding mask). Tree: :func:`visionleaf.algo.tree_forward.tree_forward` over the packed tree
(dense [T, T] ancestor mask). Printed per model, as ratios measured in this run (median of interleaved
repeats): per-leaf time / tree time (the speedup), tokens_per_leaf / tokens_packed, and the shared
fraction tokens_packed / tokens_per_leaf (the speedup's physical limit is its inverse), plus the largest
log-prob difference between the two sides.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image

from visionleaf.algo.tree_forward import (
    LeafSequence,
    PackedTree,
    leaf_sequence,
    node_spans,
    pack_tree,
    token_entropy,
    token_logprobs,
    tree_forward,
)
from visionleaf.engines.base import Continuation, Prefix, Probe, SamplingParams
from visionleaf.models import tiny
from visionleaf.protocol import build_messages
from visionleaf.rollout.tree import TreeConfig, TreeSampler
from visionleaf.tools import get_tool

LARGER = {"hidden_size": 384, "intermediate_size": 1024, "num_hidden_layers": 3, "num_attention_heads": 12}
"""The rollout benchmark's larger text config (benchmarks/tree_vs_chain.py)."""
WORDS = ("the", "sign", "red", "blue", "left", "right", "small", "corner", "text", "near", "top", "bottom")
CALL = '<tool_call>{{"name": "image_zoom_in_tool", "arguments": {{"bbox_2d": {}}}}}</tool_call>'


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


class ThinkThenZoom:
    """Scripted engine: seeded thoughts, then a zoom at a seeded box (depth < 2; sometimes an answer at
    depth 1) or an answer. Entropies are seeded by the prefix length, so splits land at varied depths."""

    def __init__(self, tokenizer: Any, words: int) -> None:
        self.tokenizer = tokenizer
        self.words = words

    def turn(self, prefix: Prefix, seed: int) -> str:
        rng = random.Random(seed)
        depth = len(prefix.images) - 1
        thought = " ".join(rng.choice(WORDS) for _ in range(self.words))
        if depth >= 2 or (depth == 1 and rng.random() < 0.3):
            return f"<think>{thought}</think><answer>{rng.choice('ABCD')}</answer>"
        x, y, w, h = rng.randrange(0, 120), rng.randrange(0, 80), rng.randrange(40, 100), rng.randrange(40, 80)
        return f"<think>{thought}</think>" + CALL.format([x, y, x + w, y + h])

    async def generate(self, prefixes: list[Prefix], sampling: SamplingParams, seeds: list[int]) -> list[Continuation]:
        out = []
        for prefix, seed in zip(prefixes, seeds, strict=True):
            ids = self.tokenizer.encode(self.turn(prefix, seed), add_special_tokens=False)[: sampling.max_new_tokens]
            out.append(Continuation(tuple(ids), tuple(-1.0 for _ in ids), "stop", 0))
        return out

    async def probe(self, prefixes: list[Prefix], top_k: int) -> list[Probe]:
        return [Probe((-float(len(p.token_ids) % 11),), 0) for p in prefixes]


def grow_trees(processor: Any, prompts: int, words: int) -> list[tuple[list[Any], Any]]:
    config = TreeConfig(
        budget=16, branch_factor=4, root_width=4, max_turns=3, sampling=SamplingParams(max_new_tokens=64)
    )
    sampler = TreeSampler(ThinkThenZoom(processor.tokenizer, words), processor, config)  # type: ignore[arg-type]
    messages = build_messages(
        "What does the sign say?\n(A) stop\n(B) go\n(C) left\n(D) right", [get_tool("image_zoom_in_tool")]
    )
    return [
        asyncio.run(sampler.sample(messages, noise_image(640, 480, seed=i), route=f"bench-{i}", seed=i))
        for i in range(prompts)
    ]


def per_leaf_step(model: Any, seqs: list[LeafSequence], weights: torch.Tensor) -> torch.Tensor:
    """Forward + backward of the leaves as one right-padded batch; returns the response log-probs [sum R]."""
    n, longest = len(seqs), max(len(s.input_ids) for s in seqs)
    input_ids = torch.zeros(n, longest, dtype=torch.long)  # [N, L_max]
    attention_mask = torch.zeros(n, longest, dtype=torch.long)  # [N, L_max]
    position_ids = torch.zeros(4, n, longest, dtype=torch.long)  # [4, N, L_max]
    rows, cols = [], []
    for i, seq in enumerate(seqs):
        length = len(seq.input_ids)
        input_ids[i, :length] = seq.input_ids
        attention_mask[i, :length] = 1
        position_ids[:, i, :length] = seq.position_ids
        rows.append(torch.full((length - seq.prompt_len,), i))
        cols.append(torch.arange(seq.prompt_len - 1, length - 1))
    pixels = [s.pixel_values for s in seqs if s.pixel_values is not None]
    grids = [s.image_grid_thw for s in seqs if s.image_grid_thw is not None]
    hidden = model.model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        pixel_values=torch.cat(pixels),
        image_grid_thw=torch.cat(grids),
        use_cache=False,
    ).last_hidden_state  # [N, L_max, H]
    logits = model.lm_head(hidden[torch.cat(rows), torch.cat(cols)])  # [sum R, V]
    labels = torch.cat([s.input_ids[s.prompt_len :] for s in seqs])  # [sum R]
    log_probs = token_logprobs(logits, labels)  # [sum R]
    loss = (weights * log_probs).sum() + (weights * token_entropy(logits)).sum()
    loss.backward()
    return log_probs.detach()


def tree_step(model: Any, packed: PackedTree, weights: torch.Tensor) -> torch.Tensor:
    """Forward + backward of the packed tree; returns the response log-probs [sum R] in leaf order."""
    out = tree_forward(model, packed)
    assert out.entropy is not None
    log_probs, entropy = torch.cat(out.log_probs), torch.cat(out.entropy)  # [sum R]
    loss = (weights * log_probs).sum() + (weights * entropy).sum()
    loss.backward()
    return log_probs.detach()


def timed(step: Callable[[], torch.Tensor], model: Any) -> tuple[float, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    result = step()
    return time.perf_counter() - start, result


def bench_model(name: str, model: Any, processor: Any, trees: list[tuple[list[Any], Any]], repeats: int) -> None:
    model.train()
    seq_groups, packs = [], []
    for leaves, record in trees:
        seqs = [leaf_sequence(model, processor, leaf) for leaf in leaves]
        seq_groups.append(seqs)
        packs.append(pack_tree(seqs, node_spans(record.nodes), model.config.image_token_id))
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(int(p.labels.numel()), generator=generator) for p in packs]
    times: dict[str, list[float]] = {"leaf": [], "tree": []}
    max_diff = 0.0
    for repeat in range(repeats + 1):  # the first round warms up and is not timed
        for seqs, packed, w in zip(seq_groups, packs, weights, strict=True):
            t_leaf, logp_leaf = timed(functools.partial(per_leaf_step, model, seqs, w), model)
            t_tree, logp_tree = timed(functools.partial(tree_step, model, packed, w), model)
            max_diff = max(max_diff, (logp_leaf - logp_tree).abs().max().item())
            if repeat:
                times["leaf"].append(t_leaf)
                times["tree"].append(t_tree)
    packed_tokens = sum(p.tokens_packed for p in packs)
    leaf_tokens = sum(p.tokens_per_leaf for p in packs)
    images_leaf = sum(
        sum(int(s.image_grid_thw.shape[0]) for s in seqs if s.image_grid_thw is not None) for seqs in seq_groups
    )
    images_tree = sum(int(p.image_grid_thw.shape[0]) for p in packs if p.image_grid_thw is not None)
    leaf_time, tree_time = statistics.median(times["leaf"]), statistics.median(times["tree"])
    print(f"\n== {name}: {len(packs)} trees x N={len(seq_groups[0])}, {repeats} timed repeats (median per tree)")
    print(
        f"tokens        per-leaf {leaf_tokens}  packed {packed_tokens}  "
        f"per-leaf/packed {leaf_tokens / packed_tokens:.2f}x"
    )
    print(f"shared frac   tokens_packed / tokens_per_leaf = {packed_tokens / leaf_tokens:.3f}")
    print(f"images        per-leaf {images_leaf}  packed {images_tree}  ({images_leaf / images_tree:.2f}x)")
    print(f"fwd+bwd time  per-leaf {leaf_time:.3f}s  tree {tree_time:.3f}s  speedup {leaf_time / tree_time:.2f}x")
    print(f"max |log-prob difference| per-leaf vs tree: {max_diff:.2e}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=2, help="trees per model")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per tree (after one warm-up)")
    parser.add_argument(
        "--words", type=int, default=12, help="thought words per turn (a zoom turn stays under 64 tokens)"
    )
    parser.add_argument("--models", default="tiny,larger", help="comma-separated: tiny, larger")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    processor = tiny.build_processor(tiny.build_tokenizer("bpe"))
    trees = grow_trees(processor, args.prompts, args.words)
    configs = {"tiny": None, "larger": LARGER}
    for name in args.models.split(","):
        if name not in configs:
            raise ValueError(f"--models takes {', '.join(configs)}; got {name!r}")
        model = tiny.build_model(processor.tokenizer, seed=0, text_config=configs[name])
        bench_model(name, model, processor, trees, args.repeats)


if __name__ == "__main__":
    main()
