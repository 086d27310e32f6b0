"""The engine contract (SPEC §7), run against every engine in ``tests/engines/conftest.py``'s ``CASES``.

What each check proves:

- finish reasons: every turn ends exactly where :func:`~visionleaf.engines.sampling.finish_reason` first
  fires (no earlier prefix of its tokens had ended) and carries its reason; eos, stop and length all occur.
- logprobs: one finite logprob per token, equal to a teacher-forced forward of the same model (vision
  tokens masked) within the case's tolerance, so they are of the distribution actually sampled from.
- vision tokens: the model makes a vision pad the unmasked argmax at (nearly) every sampled position, and
  none is ever sampled; at temperature 1.5 the ban, not luck, keeps them out.
- cached tokens: a prefix seen before is reported cached (whole, or in whole blocks for vLLM), siblings
  are served by one prefill, and engines that cannot tell report None.
- probes: top-k logprobs equal the teacher-forced next-token distribution; a generate asked for
  ``first_top_logprobs`` returns the probe's answer for its prefix in every row (engines of the verl path
  refuse, naming the setting).
- aborts and timeouts raise ``EngineError`` (skipped, with the reason, where an engine has neither).
- per-tree metrics: trees grown concurrently on one engine count only their own requests.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import replace
from typing import Any

import pytest
import torch

from tests.conftest import noise_image
from tests.engines.conftest import DOMINANT, EngineCase
from visionleaf.engines.base import EngineError, Prefix, SamplingParams, image_key
from visionleaf.engines.sampling import banned_token_ids, eos_token_ids, finish_reason
from visionleaf.protocol import build_messages, expand_image_pads, render_prompt
from visionleaf.rollout.tree import TreeConfig, TreeSampler
from visionleaf.tools import get_tool

MESSAGES = build_messages("What colour is the dot?\n(A) red\n(B) blue", [get_tool("image_zoom_in_tool")])


def image_prefix(case: EngineCase, seed: int, route: str = "contract") -> Prefix:
    """The prompt of a fresh image (a prefix no engine has seen)."""
    image = noise_image(280 + 8 * (seed % 16), 224, seed=1000 + seed)
    processor = case.processor
    text = expand_image_pads(render_prompt(processor, MESSAGES), [image], processor.image_processor)
    ids = processor.tokenizer.encode(text, add_special_tokens=False)
    return Prefix(tuple(ids), (image,), (image_key(image),), route)


def run(case: EngineCase, body: Any) -> Any:
    """``await body(engine)`` on a new engine of ``case``, closing it afterwards."""
    engine = case.make()

    async def go():
        try:
            return await body(engine)
        finally:
            if case.close is not None:
                await case.close(engine)

    return asyncio.run(go())


def teacher_forced(case: EngineCase, prefix: Prefix, tokens: tuple[int, ...]) -> torch.Tensor:
    """Unmasked logits [len(tokens) + 1, V] of the positions that predict each token and the next one."""
    processor, model = case.processor, case.model
    pixels = processor.image_processor(images=list(prefix.images), return_tensors="pt")
    ids = torch.tensor([list(prefix.token_ids) + list(tokens)])
    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    with torch.no_grad():
        logits = model(
            input_ids=ids,
            pixel_values=pixels["pixel_values"],
            image_grid_thw=pixels["image_grid_thw"],
            mm_token_type_ids=(ids == pad).int(),
        ).logits[0]
    return logits[len(prefix.token_ids) - 1 :].float()


def masked_logprobs(case: EngineCase, logits: torch.Tensor) -> torch.Tensor:
    vocab = case.model.get_output_embeddings().weight.shape[0]
    logits = logits.clone()
    logits[:, banned_token_ids(case.processor.tokenizer, vocab)] = float("-inf")
    return torch.log_softmax(logits, dim=-1)


def test_finish_reasons_follow_the_one_rule(engine_case):
    case = engine_case
    tokenizer = case.processor.tokenizer
    eos = eos_token_ids(tokenizer)
    prefix = image_prefix(case, 1)
    samplings = [
        SamplingParams(max_new_tokens=64, stop=("</think>",)),
        SamplingParams(max_new_tokens=160, stop=()),
        SamplingParams(max_new_tokens=3),
    ]

    async def body(engine):
        return [await engine.generate([prefix] * 4, s, [11, 12, 13, 14]) for s in samplings]

    seen = set()
    for sampling, continuations in zip(samplings, run(case, body), strict=True):
        for cont in continuations:
            ids = cont.token_ids
            assert cont.finish_reason == finish_reason(ids, sampling, eos, tokenizer)
            assert all(finish_reason(ids[:k], sampling, eos, tokenizer) is None for k in range(1, len(ids)))
            seen.add(cont.finish_reason)
    assert seen == {"stop", "eos", "length"}


def test_logprobs_are_aligned_with_the_tokens_and_the_model(engine_case):
    case = engine_case
    prefix = image_prefix(case, 2)
    sampling = SamplingParams(max_new_tokens=24, stop=())

    async def body(engine):
        return await engine.generate([prefix] * 2, sampling, [5, 6])

    for cont in run(case, body):
        assert len(cont.logprobs) == len(cont.token_ids) > 0
        assert all(math.isfinite(lp) and lp <= 0 for lp in cont.logprobs)
        if case.model is None:
            continue
        expected = masked_logprobs(case, teacher_forced(case, prefix, cont.token_ids))
        want = [expected[i, t].item() for i, t in enumerate(cont.token_ids)]
        assert max(abs(a - b) for a, b in zip(cont.logprobs, want, strict=True)) < case.logprob_tol


def test_vision_tokens_are_never_sampled(engine_case):
    case = engine_case
    tokenizer = case.processor.tokenizer
    banned = set(banned_token_ids(tokenizer))
    dominant = {tokenizer.convert_tokens_to_ids(t) for t in DOMINANT}
    prefix = image_prefix(case, 3)
    sampling = SamplingParams(max_new_tokens=32, temperature=1.5, stop=())

    async def body(engine):
        return await engine.generate([prefix] * 4, sampling, [1, 2, 3, 4])

    continuations = run(case, body)
    assert not banned & {t for c in continuations for t in c.token_ids}
    if case.model is not None:  # the ban was needed: unmasked, a vision pad is the argmax almost everywhere
        for cont in continuations:
            argmax = teacher_forced(case, prefix, cont.token_ids)[:-1].argmax(dim=-1).tolist()
            assert sum(a in dominant for a in argmax) >= 0.9 * len(argmax)


def test_cached_tokens_are_exact_where_reported(engine_case):
    case = engine_case
    prefix = image_prefix(case, 4)
    n = len(prefix.token_ids)
    longer = Prefix(prefix.token_ids + tuple(prefix.token_ids[-40:]), prefix.images, prefix.image_keys, prefix.route)

    async def body(engine):
        first = (await engine.probe([prefix], 5))[0]
        again = (await engine.probe([prefix], 5))[0]
        siblings = await engine.generate([prefix] * 3, SamplingParams(max_new_tokens=4, stop=()), [1, 2, 3])
        [extended] = await engine.generate([longer], SamplingParams(max_new_tokens=4, stop=()), [4])
        return first, again, siblings, extended

    first, again, siblings, extended = run(case, body)
    reported = [first.cached_tokens, again.cached_tokens, *(c.cached_tokens for c in siblings), extended.cached_tokens]
    if case.cached == "unknown":
        assert reported == [None] * len(reported)
    elif case.cached == "exact":
        assert first.cached_tokens == 0
        assert again.cached_tokens == n
        assert [c.cached_tokens for c in siblings] == [n, n, n]
        assert extended.cached_tokens == n
    else:  # whole blocks; the last prompt token is always recomputed
        full = (n - 1) // case.block * case.block
        assert first.cached_tokens is not None and first.cached_tokens % case.block == 0
        assert again.cached_tokens == full
        assert [c.cached_tokens for c in siblings] == [full, n, n]  # one request with n=3: one prefill
        assert extended.cached_tokens == n // case.block * case.block


def test_probes_are_the_teacher_forced_next_token_distribution(engine_case):
    case = engine_case
    if case.model is None:
        pytest.skip(f"{case.name}: the model behind the engine is not known to the test")
    prefix = image_prefix(case, 5)

    async def body(engine):
        return (await engine.probe([prefix], 5))[0]

    probe = run(case, body)
    expected = masked_logprobs(case, teacher_forced(case, prefix, ())[:1])[0].topk(5).values.tolist()
    assert list(probe.top_logprobs) == pytest.approx(expected, abs=case.logprob_tol)


def test_generate_returns_the_probe_of_its_prefix(engine_case):
    case = engine_case
    prefix = image_prefix(case, 7)
    sampling = SamplingParams(max_new_tokens=3, stop=(), first_top_logprobs=1)
    if not case.folds_probe:
        with pytest.raises(ValueError, match=r"tree\.schedule=lockstep"):
            run(case, lambda engine: engine.generate([prefix], sampling, [1]))
        return

    # ending inside a thought: after the assistant header a warm model writes "<think>" almost surely
    thought = tuple(case.processor.tokenizer.encode("<think>Let me zoom in on the", add_special_tokens=False))
    prefixes = [
        replace(p, token_ids=p.token_ids + thought) for p in (prefix, image_prefix(case, 8), image_prefix(case, 9))
    ]

    async def body(engine):
        # many siblings of a few prompts at temperature 1: some sample a first token that is not the top one
        out = []
        for p in prefixes:
            continuations = await engine.generate([p] * 16, sampling, list(range(16)))
            out.append((continuations, (await engine.probe([p], 1))[0]))
        return out

    off_top = 0
    for continuations, probe in run(case, body):
        assert len(probe.top_logprobs) == 1
        for cont in continuations:
            assert list(cont.first_top_logprobs) == pytest.approx(probe.top_logprobs, abs=case.logprob_tol)
        off_top += sum(c.logprobs[0] < probe.top_logprobs[0] - 1e-3 for c in continuations)
    assert off_top > 0, "the check needs a row whose first token is not the top one"


@pytest.mark.parametrize("kind", ["abort", "timeout"])
def test_aborts_and_timeouts_raise_engine_errors(engine_case, kind):
    case = engine_case
    if case.fail is None:
        pytest.skip(f"{case.name}: {case.no_fail_reason}")
    prefix = image_prefix(case, 6)
    engine = case.fail(kind)

    async def body():
        try:
            with pytest.raises(EngineError):
                await engine.generate([prefix] * 2, SamplingParams(max_new_tokens=4), [1, 2])
            with pytest.raises(EngineError):
                await engine.probe([prefix], 5)
        finally:
            if case.close is not None:
                await case.close(engine)

    asyncio.run(body())


def test_trees_on_one_engine_count_their_own_requests(engine_case):
    case = engine_case
    config = TreeConfig(budget=4, branch_factor=2, max_turns=2, sampling=SamplingParams(max_new_tokens=24))
    images = [noise_image(300 + 16 * i, 240, seed=2000 + i) for i in range(3)]

    def grow(indices):
        async def body(engine):
            sampler = TreeSampler(engine, case.processor, config)
            trees = await asyncio.gather(
                *(sampler.sample(MESSAGES, images[i], route=f"tree-{i}", seed=i) for i in indices)
            )
            return [record.metrics for _, record in trees], engine.stats

        return run(case, body)

    together, stats = grow([0, 1, 2])
    if case.cached == "unknown":
        assert all("engine_computed_tokens" not in m and "engine_cached_tokens" not in m for m in together)
        return
    # the trees' own counts add up to what the engine served all of them (no request counted twice)
    assert sum(m["engine_cached_tokens"] for m in together) == stats.cached_tokens > 0
    if case.cached == "exact":  # each tree alone on a fresh engine counts the same as among others
        for i, metrics in enumerate(together):
            [alone], _ = grow([i])
            assert metrics["engine_computed_tokens"] == alone["engine_computed_tokens"]
            assert metrics["engine_cached_tokens"] == alone["engine_cached_tokens"]
