"""Command line: ``python -m visionleaf.eval --benchmark B --data PATH (--model DIR | --server URL) --out DIR``.

    # V* the way the papers print it (options shuffled per question, seed 0, greedy, max 5 turns)
    python -m visionleaf.eval --benchmark vstar --data data/vstar_bench --model ckpt --out runs/vstar
    # through a running vLLM server (the processor is read from --processor)
    python -m visionleaf.eval --benchmark hrbench8k --data data/hr_bench_8k.tsv \\
        --server http://127.0.0.1:8000 --processor ckpt --out runs/hr8k
    # LFPC's crop-reliance diagnostics with a 1024-token global view; Avg@32 like Mini-o3
    python -m visionleaf.eval ... --visual-tokens 1024 --crop-swap gt,noise
    python -m visionleaf.eval ... --samples 32 --temperature 1.0
    # a VisionLeaf tree per question (pass@N, majority of leaves, node entropies)
    python -m visionleaf.eval ... --tree 8 --branch-factor 2

Rerunning with the same ``--out`` resumes (finished questions are skipped); ``--report`` (default on)
writes ``report.html`` next to ``summary.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from visionleaf.engines.open import open_engine
from visionleaf.eval.loaders import BENCHMARKS
from visionleaf.eval.protocol import VISUAL_TOKEN_PIXELS
from visionleaf.eval.runner import CROP_SWAPS, EvalConfig, evaluate_async


def _context_limit(model: Any, requested: int) -> int:
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", config)
    limit = getattr(text, "max_position_embeddings", None)
    return min(requested, int(limit)) if isinstance(limit, int) else requested


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m visionleaf.eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--benchmark", required=True, choices=BENCHMARKS)
    p.add_argument("--data", required=True, help="benchmark file or folder (see visionleaf.eval.loaders)")
    p.add_argument("--out", required=True, help="output folder (rerun with the same folder to resume)")
    engine = p.add_mutually_exclusive_group(required=True)
    engine.add_argument("--model", help="checkpoint folder for the in-process HF engine")
    engine.add_argument("--server", action="append", help="running vLLM/SGLang server URL (repeat for several)")
    p.add_argument("--processor", help="processor/tokenizer folder (needed with --server)")
    p.add_argument("--backend", choices=("vllm", "sglang"), default="vllm", help="server API")
    p.add_argument("--device", default="cpu", help="HF engine device (cpu, cuda)")
    p.add_argument("--dtype", default="float32", help="HF engine dtype (float32, bfloat16)")
    p.add_argument("--n", type=int, help="first n questions only")
    shuffle = p.add_mutually_exclusive_group()
    shuffle.add_argument("--shuffle", dest="shuffle", action="store_true", default=None, help="shuffle options")
    shuffle.add_argument(
        "--no-shuffle", dest="shuffle", action="store_false", help="release order (DeepEyes' V* protocol: inflated)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=1, help="k samples per question: Avg@k")
    p.add_argument("--temperature", type=float, help="default 0 (greedy) for 1 sample, 1.0 otherwise")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-turns", type=int, default=5)
    p.add_argument("--max-new-tokens", type=int, default=1024, help="tokens per turn")
    p.add_argument("--max-response-tokens", type=int, default=8192)
    p.add_argument("--max-context-tokens", type=int, default=16384)
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--global-max-pixels", type=int, help="pixel budget of the global view")
    budget.add_argument("--visual-tokens", type=int, help="visual-token budget of the global view (e.g. 1024, 16384)")
    p.add_argument("--crop-swap", default="", help=f"comma list of {','.join(CROP_SWAPS)}: LFPC diagnostics")
    p.add_argument("--tree", type=int, default=0, help="grow a tree of N leaves per question")
    p.add_argument("--branch-factor", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=16, help="questions in flight")
    p.add_argument("--judge-url", help="OpenAI-compatible API root of an LLM judge for answers naming no option")
    p.add_argument("--judge-model", help="model name the judge server serves")
    p.add_argument("--no-report", action="store_true", help="skip report.html")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


async def _main(args: argparse.Namespace) -> int:
    from visionleaf.eval.report import write_report

    pixels = args.global_max_pixels or (args.visual_tokens * VISUAL_TOKEN_PIXELS if args.visual_tokens else None)
    context = args.max_context_tokens
    try:
        engine, processor, model, _ = open_engine(
            args.model, args.server or (), args.processor, args.backend, args.device, args.dtype
        )
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    if model is not None:
        context = _context_limit(model, context)
    config = EvalConfig(
        benchmark=args.benchmark,
        data=args.data,
        out=args.out,
        n=args.n,
        shuffle=args.shuffle,
        seed=args.seed,
        samples=args.samples,
        temperature=args.temperature,
        top_p=args.top_p,
        max_turns=args.max_turns,
        max_new_tokens=args.max_new_tokens,
        max_response_tokens=min(args.max_response_tokens, context),
        max_context_tokens=context,
        global_max_pixels=pixels,
        crop_swap=tuple(s for s in args.crop_swap.split(",") if s),
        tree=args.tree,
        branch_factor=args.branch_factor,
        concurrency=args.concurrency,
        progress=not args.no_progress,
    )
    judge = None
    if args.judge_url:
        from visionleaf.reward import JudgeConfig, LLMJudge

        judge = LLMJudge(JudgeConfig(base_url=args.judge_url, model=args.judge_model or ""))
    try:
        result = await evaluate_async(config, engine, processor, judge=judge)
    finally:
        if judge is not None:
            judge.close()
        if hasattr(engine, "aclose"):
            await engine.aclose()
    summary = result.summary
    print(json.dumps({v: s["accuracy"] for v, s in summary["variants"].items()}, indent=2))
    print(f"[eval] {summary['questions_run']} questions in {summary['wall_s']:.1f}s -> {result.out / 'summary.json'}")
    if not args.no_report:
        path = write_report(Path(args.out))
        print(f"[eval] report: {path}")
    return 0


def main(argv: list[str] | None = None) -> None:
    sys.exit(asyncio.run(_main(parse_args(argv))))


if __name__ == "__main__":
    main()
