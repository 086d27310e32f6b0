import asyncio

import pytest
import torch

from tests.conftest import noise_image
from visionleaf.engines.base import Prefix, SamplingParams, image_key
from visionleaf.engines.hf import HFEngine, PrefixCache
from visionleaf.models import tiny
from visionleaf.protocol import build_messages
from visionleaf.rollout.tree import TreeConfig, TreeSampler
from visionleaf.tools import get_tool

MESSAGES = build_messages("What colour is the dot?\n(A) red\n(B) blue", [get_tool("image_zoom_in_tool")])
ZOOM = (
    '<think>zoom</think><tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [40, 40, 120, 100]}}'
    "</tool_call>"
)


@pytest.fixture(scope="module")
def model_and_processor():
    tokenizer = tiny.build_tokenizer("bpe")
    return tiny.build_model(tokenizer, seed=1), tiny.build_processor(tokenizer)


def sample_tree(model, processor, cache_bytes=1 << 30, **config):
    engine = HFEngine(model, processor, cache_max_bytes=cache_bytes)
    config = {"sampling": SamplingParams(max_new_tokens=24), "max_turns": 3, **config}
    sampler = TreeSampler(engine, processor, TreeConfig(**config))
    image = noise_image(900, 700, seed=3)
    leaves, record = asyncio.run(sampler.sample(MESSAGES, image, route="uid"))
    return leaves, record, engine


def full_forward_logprobs(model, processor, leaf):
    """Teacher-forced log-softmax of every response token: one forward, positions from scratch, no cache,
    with the tokens the engine never samples masked out as the engine does."""
    batch = processor.image_processor(images=leaf.images, return_tensors="pt")
    ids = torch.tensor([leaf.prompt_ids + leaf.response_ids])
    token_types = (ids == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).int()
    with torch.no_grad():
        logits = model(
            input_ids=ids,
            pixel_values=batch["pixel_values"],
            image_grid_thw=batch["image_grid_thw"],
            mm_token_type_ids=token_types,
        ).logits[0]
    logits = logits.float()
    logits[:, HFEngine(model, processor).banned] = float("-inf")
    logprobs = torch.log_softmax(logits, dim=-1)
    start = len(leaf.prompt_ids)
    return [logprobs[start + i - 1, t].item() for i, t in enumerate(leaf.response_ids)]


def test_logprobs_match_a_full_forward(model_and_processor):
    model, processor = model_and_processor
    leaves, _, engine = sample_tree(model, processor, budget=6, branch_factor=3)
    assert engine.stats.cached_tokens > 0
    for leaf in leaves:
        expected = full_forward_logprobs(model, processor, leaf)
        for got, want, m in zip(leaf.logprobs, expected, leaf.response_mask, strict=True):
            if m:
                assert got == pytest.approx(want, abs=2e-4)


def test_multi_image_prefix_positions_match_a_full_forward(model_and_processor):
    # A prefix that already holds a crop (two images): the next turn is prefilled on top of the cached
    # first turn, with mRoPE positions offset after the crop's visual tokens.
    model, processor = model_and_processor
    engine = HFEngine(model, processor)
    tokenizer = processor.tokenizer
    sampler = TreeSampler(engine, processor, TreeConfig(budget=1))
    image, crop = noise_image(900, 700, seed=3), noise_image(200, 160, seed=4)
    from visionleaf.protocol import observation_text, render_prompt

    prompt = sampler._encode(render_prompt(processor, MESSAGES), [image])
    turn = tokenizer.encode(ZOOM + "<|im_end|>", add_special_tokens=False)
    observation = sampler._encode(observation_text("", 1), [crop])
    first = Prefix(tuple(prompt), (image,), (image_key(image),))
    second = Prefix(tuple(prompt + turn + observation), (image, crop), (image_key(image), image_key(crop)))
    asyncio.run(engine.probe([first], 5))  # cache the prompt only
    sampling = SamplingParams(max_new_tokens=12, stop=())
    [cont] = asyncio.run(engine.generate([second], sampling, [7]))
    assert engine.stats.cached_tokens == len(prompt)  # the second prefill reused the prompt's KV

    from visionleaf.rollout.tree import Leaf

    leaf = Leaf(
        prompt,
        turn + observation + list(cont.token_ids),
        [0] * (len(turn) + len(observation)) + [1] * len(cont.token_ids),
        [0.0] * (len(turn) + len(observation)) + list(cont.logprobs),
        [image, crop],
        [],
        [],
        1,
        "length",
        [0],
    )
    expected = full_forward_logprobs(model, processor, leaf)[len(turn) + len(observation) :]
    assert list(cont.logprobs) == pytest.approx(expected, abs=2e-4)


def test_prefix_cache_avoids_recomputation_and_changes_nothing(model_and_processor):
    model, processor = model_and_processor
    cached, record, engine = sample_tree(model, processor, budget=8, branch_factor=2)
    uncached, record_off, engine_off = sample_tree(model, processor, cache_bytes=0, budget=8, branch_factor=2)
    # Same seeds -> same tokens with and without the cache.
    assert [leaf.response_ids for leaf in cached] == [leaf.response_ids for leaf in uncached]
    # With the cache the engine computes about the unique tokens of the tree; without it, every prefix again.
    computed, unique = record.metrics["engine_computed_tokens"], record.metrics["unique_tokens"]
    assert computed <= 1.1 * unique
    assert record_off.metrics["engine_computed_tokens"] > 2 * computed
    # Without the cache only siblings of one call share their prefill (like n > 1 in vLLM).
    assert 0 < engine_off.stats.cached_tokens < engine.stats.cached_tokens
    assert len(engine_off.cache) == 0


def test_vision_tokens_are_never_sampled(model_and_processor):
    _, processor = model_and_processor
    biased = tiny.build_model(processor.tokenizer, seed=1)
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    vision_start = processor.tokenizer.convert_tokens_to_ids("<|vision_start|>")
    with torch.no_grad():  # make the vision tokens by far the most likely outputs
        biased.get_output_embeddings().weight[[image_pad, vision_start]] *= 200
    engine = HFEngine(biased, processor)
    image = noise_image(300, 200)
    prefix = Prefix(tuple(processor.tokenizer.encode("hello", add_special_tokens=False)), (), ())
    top = asyncio.run(engine.probe([prefix], 3))[0]
    conts = asyncio.run(engine.generate([prefix] * 4, SamplingParams(max_new_tokens=20, stop=()), [1, 2, 3, 4]))
    sampled = {t for c in conts for t in c.token_ids}
    assert image_pad not in sampled and vision_start not in sampled
    assert all(lp > float("-inf") for lp in top) and image is not None


def test_sampling_parameters(model_and_processor):
    model, processor = model_and_processor
    engine = HFEngine(model, processor)
    prefix = Prefix(tuple(processor.tokenizer.encode("<think>", add_special_tokens=False)), (), ())
    greedy = asyncio.run(
        engine.generate([prefix] * 2, SamplingParams(max_new_tokens=8, temperature=0, stop=()), [1, 2])
    )
    assert greedy[0].token_ids == greedy[1].token_ids  # greedy ignores the seed
    top1 = asyncio.run(engine.generate([prefix] * 2, SamplingParams(max_new_tokens=8, top_k=1, stop=()), [1, 2]))
    assert top1[0].token_ids == top1[1].token_ids == greedy[0].token_ids
    assert all(lp == pytest.approx(0.0) for lp in top1[0].logprobs)  # one token kept: probability 1
    nucleus = asyncio.run(engine.generate([prefix], SamplingParams(max_new_tokens=8, top_p=0.5, stop=()), [3]))
    assert all(-0.7 < lp <= 0 for lp in nucleus[0].logprobs[:1]) or len(nucleus[0].token_ids) > 0
    seeded = [
        asyncio.run(engine.generate([prefix], SamplingParams(max_new_tokens=8, stop=()), [5]))[0] for _ in range(2)
    ]
    assert seeded[0] == seeded[1]
    assert all(c.finish_reason == "length" and len(c.token_ids) == 8 for c in seeded)


def test_probe_is_the_prefill_distribution(model_and_processor):
    model, processor = model_and_processor
    engine = HFEngine(model, processor)
    ids = processor.tokenizer.encode("<think>look", add_special_tokens=False)
    top = asyncio.run(engine.probe([Prefix(tuple(ids), (), ())], 5))[0]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
    logits[engine.banned] = float("-inf")
    expected = torch.log_softmax(logits, dim=-1).topk(5).values.tolist()
    assert list(top) == pytest.approx(expected, abs=1e-4)
    assert engine.stats.computed_tokens == len(ids)
    asyncio.run(engine.probe([Prefix(tuple(ids), (), ())], 5))
    assert engine.stats.computed_tokens == len(ids)  # the second probe is a cache hit
    # Per-request cached counts: the whole prefix for every row now that it is cached.
    conts = asyncio.run(engine.generate([Prefix(tuple(ids), (), ())] * 2, SamplingParams(max_new_tokens=2), [1, 2]))
    assert [c.cached_tokens for c in conts] == [len(ids), len(ids)]
    longer = Prefix(tuple(ids + ids), (), ())
    [cont] = asyncio.run(engine.generate([longer], SamplingParams(max_new_tokens=2), [3]))
    assert cont.cached_tokens == len(ids)  # the longest cached prefix


def test_prefix_cache_lru_and_images():
    cache = PrefixCache(max_bytes=3 * 1000)
    kv = ((torch.zeros(1, 1, 125), torch.zeros(1, 1, 125)),)  # 1000 bytes of KV per entry + logits

    def entry(ids, images=()):
        from visionleaf.engines.hf import CacheEntry

        return CacheEntry(tuple(ids), tuple(images), kv, torch.zeros(0), 0)

    cache.put(entry([1, 2]))
    cache.put(entry([1, 2, 3, 4]))
    assert cache.lookup(Prefix((1, 2, 3, 4, 5), (), ())).token_ids == (1, 2, 3, 4)  # longest match
    assert cache.lookup(Prefix((1, 9), (), ())) is None
    cache.put(entry([1, 2, 3], ["img-a"]))
    assert cache.lookup(Prefix((1, 2, 3, 7), (), ("img-b",))).token_ids == (1, 2)  # same tokens, other image
    # Use order now: [1,2,3,4] (least recent), [1,2], [1,2,3]+img-a. Over the cap, [1,2,3,4] goes.
    cache.put(entry([5]))
    assert len(cache) == 3 and cache.nbytes <= 3000
    assert cache.lookup(Prefix((1, 2, 3, 4), (), ())).token_ids == (1, 2)
