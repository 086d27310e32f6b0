import asyncio
import logging
import math
import time
from dataclasses import replace

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


def grow_trees(engine, processor, concurrent, prompts=4, **config):
    """``prompts`` trees on one engine, all in flight together or one after another."""
    config = {"sampling": SamplingParams(max_new_tokens=16), "max_turns": 2, "budget": 4, "branch_factor": 2, **config}
    sampler = TreeSampler(engine, processor, TreeConfig(**config))
    images = [noise_image(320, 240, seed=10 + i) for i in range(prompts)]

    async def one(i):
        return await sampler.sample(MESSAGES, images[i], route=f"p{i}", seed=i)

    async def run():
        if concurrent:
            return await asyncio.gather(*(one(i) for i in range(prompts)))
        return [await one(i) for i in range(prompts)]

    return asyncio.run(run())


def test_concurrent_trees_share_forward_batches(model_and_processor):
    model, processor = model_and_processor
    forwards = []
    hook = model.register_forward_hook(lambda module, args, kwargs, out: forwards.append(1), with_kwargs=True)
    try:
        alone = HFEngine(model, processor)
        sequential = grow_trees(alone, processor, concurrent=False)
        sequential_forwards, forwards[:] = len(forwards), []
        together = HFEngine(model, processor)
        concurrent = grow_trees(together, processor, concurrent=True)
        concurrent_forwards = len(forwards)
    finally:
        hook.remove()
    # Same seeds, same trees: a row's tokens do not depend on which other rows share its batch.
    assert [[leaf.response_ids for leaf in leaves] for leaves, _ in concurrent] == [
        [leaf.response_ids for leaf in leaves] for leaves, _ in sequential
    ]
    # The four trees' calls were merged: fewer batches, fewer decoding forwards (prefills are one per prefix).
    assert len(together.batches) <= len(alone.batches) / 2
    assert max(together.batches) >= 4 * max(alone.batches) / 2
    assert together.decode_steps <= alone.decode_steps / 2
    assert concurrent_forwards < sequential_forwards
    assert together.stats.computed_tokens == alone.stats.computed_tokens


def test_probes_and_generates_of_concurrent_callers_are_answered_in_order(model_and_processor):
    model, processor = model_and_processor
    engine = HFEngine(model, processor)
    short = Prefix(tuple(processor.tokenizer.encode("<think>a", add_special_tokens=False)), (), (), "a")
    long = Prefix(tuple(processor.tokenizer.encode("<think>look at", add_special_tokens=False)), (), (), "b")

    async def run():
        return await asyncio.gather(
            engine.generate([short, short], SamplingParams(max_new_tokens=3, stop=()), [1, 2]),
            engine.probe([long], 2),
            engine.generate([long], SamplingParams(max_new_tokens=6, stop=()), [3]),
            engine.probe([short, long], 5),
        )

    gen_short, probe_long, gen_long, probes = asyncio.run(run())
    assert engine.batches == [6]  # one batch for all four callers (2 + 1 + 1 + 2 rows)
    assert [len(c.token_ids) for c in gen_short + gen_long] == [3, 3, 6]  # each row keeps its own limit
    assert len(probe_long[0].top_logprobs) == 2 and [len(p.top_logprobs) for p in probes] == [5, 5]
    assert probes[1].top_logprobs[:2] == probe_long[0].top_logprobs
    alone = HFEngine(model, processor)
    [expected] = asyncio.run(alone.generate([long], SamplingParams(max_new_tokens=6, stop=()), [3]))
    assert gen_long[0].token_ids == expected.token_ids


def test_first_top_logprobs_are_the_probe_at_any_sampling_and_change_nothing(model_and_processor):
    # A generate asked for first_top_logprobs reads its prefill's logits: the probe's distribution (before
    # temperature, top-k, top-p); rows that ask and rows that do not decode in one batch, sampling alike.
    model, processor = model_and_processor
    engine = HFEngine(model, processor)
    a = Prefix(tuple(processor.tokenizer.encode("<think>look", add_special_tokens=False)), (), (), "a")
    b = Prefix(tuple(processor.tokenizer.encode("<think>zoom in", add_special_tokens=False)), (), (), "b")
    hot = SamplingParams(max_new_tokens=5, temperature=1.7, top_p=0.9, top_k=40, stop=(), first_top_logprobs=4)

    async def run():
        return await asyncio.gather(
            engine.generate([a, a, b], hot, [1, 2, 3]), engine.generate([b], replace(hot, first_top_logprobs=0), [3])
        )

    asked, plain = asyncio.run(run())
    assert engine.batches == [4]
    probes = asyncio.run(HFEngine(model, processor).probe([a, b], 4))
    assert [c.first_top_logprobs for c in asked] == [probes[0].top_logprobs] * 2 + [probes[1].top_logprobs]
    assert plain[0].first_top_logprobs == ()
    assert plain[0].token_ids == asked[2].token_ids and plain[0].logprobs == asked[2].logprobs


def test_vision_tokens_are_never_sampled(model_and_processor):
    _, processor = model_and_processor
    biased = tiny.build_model(processor.tokenizer, seed=1)
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    vision_start = processor.tokenizer.convert_tokens_to_ids("<|vision_start|>")
    with torch.no_grad():  # make the vision tokens by far the most likely outputs
        biased.get_output_embeddings().weight[[image_pad, vision_start]] *= 200
    engine = HFEngine(biased, processor)
    prefix = Prefix(tuple(processor.tokenizer.encode("hello", add_special_tokens=False)), (), ())
    with torch.no_grad():
        unmasked = biased(input_ids=torch.tensor([prefix.token_ids])).logits[0, -1]
    assert unmasked.argmax().item() in (image_pad, vision_start)  # without the ban a vision token would come
    top = asyncio.run(engine.probe([prefix], 3))[0].top_logprobs
    conts = asyncio.run(engine.generate([prefix] * 4, SamplingParams(max_new_tokens=20, stop=()), [1, 2, 3, 4]))
    sampled = {t for c in conts for t in c.token_ids}
    assert image_pad not in sampled and vision_start not in sampled
    assert all(math.isfinite(lp) for lp in top)


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
    # top_p: each token's logprob is under the renormalised nucleus, so it is >= its unrenormalised one
    # and equals the teacher-forced one renormalised over the kept tokens
    nucleus = asyncio.run(engine.generate([prefix], SamplingParams(max_new_tokens=8, top_p=0.5, stop=()), [3]))[0]
    ids = torch.tensor([list(prefix.token_ids) + list(nucleus.token_ids)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prefix.token_ids) - 1 : -1].float()
    logits[:, engine.banned] = float("-inf")
    full = torch.log_softmax(logits, dim=-1)
    for i, (token, lp) in enumerate(zip(nucleus.token_ids, nucleus.logprobs, strict=True)):
        probs, order = full[i].exp().sort(descending=True)
        kept = order[: int((probs.cumsum(0) - probs <= 0.5).sum())]
        assert token in kept.tolist()
        assert lp == pytest.approx((full[i, token] - full[i, kept].logsumexp(0)).item(), abs=1e-4)
    seeded = [
        asyncio.run(engine.generate([prefix], SamplingParams(max_new_tokens=8, stop=()), [5]))[0] for _ in range(2)
    ]
    assert seeded[0] == seeded[1]
    assert all(c.finish_reason == "length" and len(c.token_ids) == 8 for c in seeded)


def test_probe_is_the_prefill_distribution(model_and_processor):
    model, processor = model_and_processor
    engine = HFEngine(model, processor)
    ids = processor.tokenizer.encode("<think>look", add_special_tokens=False)
    top = asyncio.run(engine.probe([Prefix(tuple(ids), (), ())], 5))[0].top_logprobs
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
    logits[engine.banned] = float("-inf")
    expected = torch.log_softmax(logits, dim=-1).topk(5).values.tolist()
    assert list(top) == pytest.approx(expected, abs=1e-4)
    assert engine.stats.computed_tokens == len(ids)
    [again] = asyncio.run(engine.probe([Prefix(tuple(ids), (), ())], 5))
    assert engine.stats.computed_tokens == len(ids)  # the second probe is a cache hit
    assert again.cached_tokens == len(ids)
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


def test_zero_probability_tokens_are_never_sampled(model_and_processor, monkeypatch):
    # Inverse-CDF sampling at the extremes of the uniform draw: u = 0 (the first token of the vocabulary
    # has zero mass under top_k) and the largest float32 below 1 (the padded rows at the end have none).
    model, processor = model_and_processor
    engine = HFEngine(model, processor)
    prefix = Prefix(tuple(processor.tokenizer.encode("<think>look", add_special_tokens=False)), (), ())
    sampling = SamplingParams(max_new_tokens=4, top_k=3, stop=())
    for u in (0.0, 1.0 - 2.0**-24):
        monkeypatch.setattr(torch, "rand", lambda *args, u=u, **kwargs: torch.tensor(u))
        [cont] = asyncio.run(engine.generate([prefix], sampling, [0]))
        assert all(math.isfinite(lp) for lp in cont.logprobs)
        ids = torch.tensor([list(prefix.token_ids) + list(cont.token_ids)])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(prefix.token_ids) - 1 : -1].float()
        logits[:, engine.banned] = float("-inf")
        for row, token in zip(logits, cont.token_ids, strict=True):
            assert token in row.topk(3).indices.tolist()


def test_inverse_cdf_skips_zero_mass():
    from visionleaf.engines.hf import inverse_cdf

    probs = torch.tensor([[0.0, 0.0, 0.25, 0.0, 0.75, 0.0, 0.0]] * 4)  # [4, 7]
    u = torch.tensor([0.0, 0.25, 0.5, 1.0 - 2.0**-24])
    assert inverse_cdf(probs, u).tolist() == [2, 4, 4, 4]


def _entry(ids, images=(), nbytes=1000):
    from visionleaf.engines.hf import CacheEntry

    kv = ((torch.zeros(1, 1, nbytes // 8), torch.zeros(1, 1, nbytes // 8)),)
    return CacheEntry(tuple(ids), tuple(images), kv, torch.zeros(0), 0)


def test_prefix_cache_index_agrees_with_a_linear_scan():
    import random

    rng = random.Random(0)
    cache = PrefixCache(max_bytes=60 * 1000)  # holds 60 of the entries below: evictions happen
    stems = [[rng.randrange(50) for _ in range(rng.randrange(1, 90))] for _ in range(6)]
    for step in range(400):
        stem = rng.choice(stems)
        ids = stem[: rng.randrange(1, len(stem) + 1)] + [rng.randrange(3) for _ in range(rng.randrange(0, 40))]
        images = rng.choice([(), ("a",), ("b",)])
        if step % 2:
            cache.put(_entry(ids, images))
            continue
        query = Prefix(tuple(ids), (), (*images, "c"))
        entries = list(cache._entries.values())
        matching = [e for e in entries if e.matches(query)]
        expected = max((len(e.token_ids) for e in matching), default=None)
        hit = cache.lookup(query)
        assert (hit and len(hit.token_ids)) == expected
    assert len(cache) == 60 and cache.nbytes <= 60 * 1000
    cache.clear()
    assert cache.lookup(Prefix(tuple(stems[0]), (), ())) is None and not cache._chains and not cache._ending


def test_prefix_cache_lookup_cost_does_not_grow_with_the_entries():
    # 2000 entries of ~800 tokens from 100 prompts; before the index, a lookup compared every entry.
    def fill(n):
        cache = PrefixCache(max_bytes=1 << 40)
        for i in range(n):
            prompt = [i % 100] * 600
            cache.put(_entry(prompt + [i] * (1 + i % 200)))
        return cache

    def timed(cache):
        query = Prefix(tuple([7] * 610 + [1, 2, 3]), (), ())  # entry 7 ([7] * 608) is its longest prefix
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(20):
                hit = cache.lookup(query)
            best = min(best, time.perf_counter() - start)
        assert hit is not None and len(hit.token_ids) == 608
        return best

    small, large = timed(fill(100)), timed(fill(2000))
    assert large < 4 * small, (small, large)


def test_an_entry_over_the_byte_cap_is_counted_and_logged_once(caplog):
    cache = PrefixCache(max_bytes=1500)
    with caplog.at_level(logging.WARNING, logger="visionleaf.engines.hf"):
        cache.put(_entry([1, 2, 3], nbytes=2000))
        cache.put(_entry([1, 2, 3, 4], nbytes=2000))
        cache.put(_entry([5], nbytes=1000))
    assert cache.oversized == 2 and len(cache) == 1
    assert len([r for r in caplog.records if "cache_max_bytes=1500" in r.getMessage()]) == 1
