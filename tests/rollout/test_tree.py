import asyncio
import itertools
import math
import random
import zlib
from dataclasses import replace

import pytest
from PIL import Image

from tests.rollout.scripted import ScriptedEngine
from visionleaf.engines.base import EngineError, SamplingParams
from visionleaf.protocol import build_messages
from visionleaf.rollout.entropy import ENTROPY_ESTIMATORS, min_entropy, topk_entropy
from visionleaf.rollout.selection import SELECTION_STRATEGIES
from visionleaf.rollout.tree import TreeConfig, TreeSampler
from visionleaf.tools import get_tool

ANSWER = "<think>I see it.</think><answer>A</answer>"
CALL = '<think>zoom</think><tool_call>{{"name": "image_zoom_in_tool", "arguments": {{"bbox_2d": {}}}}}</tool_call>'
ZOOM = CALL.format([10, 10, 60, 60])
BAD_ZOOM = CALL.format([60, 60, 10, 10])  # x1 > x2: the crop tool answers with an error

SCRIPTS = {
    "answer_first": lambda text, seed: ANSWER,
    "always_zoom": lambda text, seed: ZOOM,
    "tool_errors": lambda text, seed: BAD_ZOOM,
    "mixed": lambda text, seed: (ANSWER, ZOOM, BAD_ZOOM, "<think>hmm</think>")[seed % 4],
}


def run(processor, script, entropy=None, **config):
    engine = ScriptedEngine(processor.tokenizer, script, entropy)
    sampler = TreeSampler(engine, processor, TreeConfig(**config))
    messages = build_messages("What colour is the dot?\n(A) red\n(B) blue", [get_tool("image_zoom_in_tool")])
    image = Image.new("RGB", (640, 480), "white")
    leaves, record = asyncio.run(sampler.sample(messages, image, route="uid-0"))
    return leaves, record, engine


@pytest.mark.parametrize("schedule", ["lockstep", "folded"])
@pytest.mark.parametrize("splits_per_round", [1, 0, 2])
@pytest.mark.parametrize("script", sorted(SCRIPTS))
@pytest.mark.parametrize(
    ("budget", "branch", "width"),
    [(1, 2, None), (2, 2, None), (5, 3, None), (16, 4, None), (16, 2, 8), (7, 4, 1)],
)
def test_exactly_budget_leaves(bpe_processor, script, budget, branch, width, splits_per_round, schedule):
    leaves, record, engine = run(
        bpe_processor,
        SCRIPTS[script],
        budget=budget,
        branch_factor=branch,
        root_width=width,
        max_turns=3,
        splits_per_round=splits_per_round,
        schedule=schedule,
    )
    if schedule == "folded":
        assert engine.probe_calls == [] and record.metrics["probe_calls"] == 0
    assert len(leaves) == budget
    assert record.metrics["leaves"] == budget
    assert all(leaf.num_turns <= 3 for leaf in leaves)
    assert len({leaf.node_path[-1] for leaf in leaves}) == budget  # distinct leaves


def test_all_answer_at_turn_one_reopens_the_root(bpe_processor):
    leaves, record, _ = run(bpe_processor, SCRIPTS["answer_first"], budget=16, branch_factor=4)
    assert all(leaf.num_turns == 1 and leaf.stop_reason == "answer" for leaf in leaves)
    assert [s.reopened for s in record.splits] == [False, True, True, True]
    assert all(s.node == 0 for s in record.splits)


def test_all_hit_max_turns(bpe_processor):
    leaves, _, _ = run(bpe_processor, SCRIPTS["always_zoom"], budget=6, branch_factor=2, max_turns=3)
    assert all(leaf.stop_reason == "max_turns" and leaf.num_turns == 3 for leaf in leaves)
    # Two crops were executed per leaf (turns 1 and 2); the turn-3 call ends the branch unexecuted.
    assert all(len(leaf.tool_calls) == 2 and all(c.ok for c in leaf.tool_calls) for leaf in leaves)
    assert all(len(leaf.images) == 3 and len(leaf.pred_boxes) == 2 for leaf in leaves)


def test_tool_errors_become_observations_and_the_branch_goes_on(bpe_processor):
    leaves, record, _ = run(bpe_processor, SCRIPTS["tool_errors"], budget=4, branch_factor=2, max_turns=2)
    for leaf in leaves:
        assert leaf.num_turns == 2 and len(leaf.images) == 1
        assert [c.ok for c in leaf.tool_calls] == [False]
        assert leaf.tool_calls[0].error.startswith("Error: bbox_2d needs x1 < x2")
    assert record.metrics["tool_errors_per_leaf"] == 1.0


def _runs(mask):
    """Maximal runs of equal mask values as (value, start, end)."""
    out, start = [], 0
    for value, group in itertools.groupby(mask):
        n = len(list(group))
        out.append((value, start, start + n))
        start += n
    return out


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_leaf_tokens_follow_the_node_path_and_mask_zeros_observations(bpe_processor, script):
    tokenizer = bpe_processor.tokenizer
    leaves, record, engine = run(bpe_processor, SCRIPTS[script], budget=8, branch_factor=3, max_turns=3)
    nodes = {n.id: n for n in record.nodes}
    for leaf in leaves:
        assert len(leaf.response_ids) == len(leaf.response_mask) == len(leaf.logprobs)
        # The node spans tile the response, and nodes shared by two leaves have the same tokens there.
        spans = [nodes[i].span for i in leaf.node_path[1:]]
        assert spans[0][0] == 0 and spans[-1][1] == len(leaf.response_ids)
        assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
        # Model tokens are exactly the scripted turns; everything else is the observation.
        model_runs = [r for r in _runs(leaf.response_mask) if r[0] == 1]
        assert [tokenizer.decode(leaf.response_ids[s:e]) for _, s, e in model_runs] == leaf.turn_texts
        for value, s, e in _runs(leaf.response_mask):
            if value == 0:
                text = tokenizer.decode(leaf.response_ids[s:e])
                assert text == "<|im_end|>" or (
                    text.startswith("<|im_end|>\n<|im_start|>user\n<tool_response>")
                    and text.endswith("</tool_response><|im_end|>\n<|im_start|>assistant\n")
                )
        assert all(lp == 0.0 for lp, m in zip(leaf.logprobs, leaf.response_mask, strict=True) if m == 0)
        assert all(lp == -0.5 for lp, m in zip(leaf.logprobs, leaf.response_mask, strict=True) if m == 1)
    by_node = {}
    for leaf in leaves:
        for node_id in leaf.node_path[1:]:
            start, end = nodes[node_id].span
            by_node.setdefault(node_id, set()).add(tuple(leaf.response_ids[start:end]))
    assert all(len(v) == 1 for v in by_node.values())
    # The engine saw, for each leaf's last turn, exactly the prompt and the earlier turns.
    seen = {p.token_ids for call in engine.generate_calls for p in call}
    for leaf in leaves:
        last = nodes[leaf.node_path[-1]].span[0]
        assert tuple(leaf.prompt_ids + leaf.response_ids[:last]) in seen


def test_chain_mode_shares_no_turn_boundary(bpe_processor):
    leaves, record, engine = run(bpe_processor, SCRIPTS["mixed"], budget=8, mode="chain", max_turns=3)
    paths = [set(leaf.node_path[1:]) for leaf in leaves]
    assert all(not (a & b) for a, b in itertools.combinations(paths, 2))
    assert len(record.splits) == 1 and record.splits[0].node == 0 and record.splits[0].new_branches == 7
    assert engine.probe_calls == []  # a single candidate needs no entropy
    assert record.metrics["unique_tokens"] == record.metrics["chain_tokens"] - 7 * len(leaves[0].prompt_ids)


def _entropy_by_text(text):
    return (zlib.crc32(text.encode()) % 1000) / 100.0


@pytest.mark.parametrize("schedule", ["lockstep", "folded"])
@pytest.mark.parametrize("splits_per_round", [1, 0])
@pytest.mark.parametrize(("selection", "pick"), [("high", max), ("low", min)])
def test_selection_picks_the_extreme_entropy_candidate(bpe_processor, selection, pick, splits_per_round, schedule):
    script = lambda text, seed: (ZOOM, ZOOM, ANSWER)[seed % 3]  # noqa: E731
    _, record, _ = run(
        bpe_processor,
        script,
        _entropy_by_text,
        budget=16,
        branch_factor=2,
        selection=selection,
        max_turns=4,
        splits_per_round=splits_per_round,
        schedule=schedule,
    )
    nodes = {n.id: n for n in record.nodes}
    compared = [s for s in record.splits if len(s.candidates) > 1]
    assert compared, "the scenario must compare candidates"
    for split in compared:
        entropies = [nodes[c].entropy for c in split.candidates]
        assert None not in entropies
        assert nodes[split.node].entropy == pick(entropies)


def test_several_splits_per_round_need_no_more_rounds_than_chains(bpe_processor):
    kwargs = {"budget": 16, "branch_factor": 4, "max_turns": 3}
    _, chain, chain_engine = run(bpe_processor, SCRIPTS["always_zoom"], mode="chain", **kwargs)
    _, paper, paper_engine = run(bpe_processor, SCRIPTS["always_zoom"], _entropy_by_text, **kwargs)
    _, wide, wide_engine = run(bpe_processor, SCRIPTS["always_zoom"], _entropy_by_text, splits_per_round=0, **kwargs)
    for record, engine in ((chain, chain_engine), (paper, paper_engine), (wide, wide_engine)):
        assert len(engine.generate_calls) == record.metrics["rounds"]  # one engine call per lockstep round
    assert chain.metrics["rounds"] == 3
    # The paper's schedule adds one split per round (4, 7, 10, ... branches) and re-opens finished subtrees.
    assert paper.metrics["rounds"] >= 6
    # Several splits per round: the root's 4 branches split together at turn 1 -> 16 branches, 3 rounds.
    assert wide.metrics["rounds"] == 3
    assert [(s.new_branches, s.reopened) for s in wide.splits] == [(3, False)] + [(3, False)] * 4
    assert len(wide_engine.probe_calls) == wide.metrics["probe_calls"] == 1  # 4 candidates, one probe
    assert wide.metrics["unique_tokens"] < chain.metrics["unique_tokens"]


LEFT = ZOOM.replace("<think>zoom", "<think>left")
RIGHT = ZOOM.replace("<think>zoom", "<think>right")


def _side_entropy(text):
    """Entropy 5 below a turn that looked left, 1 below one that looked right, 3 elsewhere."""
    return 5.0 if "<think>left" in text else 1.0 if "<think>right" in text else 3.0


def _left_then_right(later):
    """First turns alternate LEFT, RIGHT in call order; later turns are ``later(text)``."""
    calls = itertools.count()
    return lambda text, seed: (
        (LEFT, RIGHT)[next(calls) % 2] if text.count("<|im_start|>assistant") == 1 else later(text)
    )


@pytest.mark.parametrize(("selection", "side"), [("high", "left"), ("low", "right")])
def test_folded_takes_lockstep_s_split_after_the_round(bpe_processor, selection, side):
    # The root's branches look left and right: the first split that compares candidates. The right branch
    # then zooms once more; everything else answers.
    def later(text):
        return ZOOM if text.count("<|im_start|>assistant") == 2 and "<think>right" in text else ANSWER

    kwargs = {"budget": 4, "branch_factor": 2, "max_turns": 3, "selection": selection}
    leaves, fold, fold_engine = run(bpe_processor, _left_then_right(later), _side_entropy, schedule="folded", **kwargs)
    _, lock, lock_engine = run(bpe_processor, _left_then_right(later), _side_entropy, **kwargs)
    assert len(leaves) == 4 and fold_engine.probe_calls == [] and len(lock_engine.probe_calls) >= 1
    fold_split, lock_split = (next(s for s in r.splits if len(s.candidates) > 1) for r in (fold, lock))
    assert fold_split == lock_split  # same node, same candidates, same number of new branches
    assert [fold.nodes[c].entropy for c in fold_split.candidates] == [5.0, 1.0]
    assert [lock.nodes[c].entropy for c in lock_split.candidates] == [5.0, 1.0]
    assert fold.nodes[fold_split.node].entropy == {"left": 5.0, "right": 1.0}[side]
    # Lockstep clones the chosen node within the round that scores it; folded samples the clone from the
    # chosen node's prefix in the next round, batched with the other branches' turns.
    chosen = lock_engine.generate_calls[1][-1]
    assert fold_engine.generate_calls[1] == lock_engine.generate_calls[1][:-1]
    assert chosen in fold_engine.generate_calls[2] and len(fold_engine.generate_calls[2]) == 3
    assert fold.metrics["rounds"] <= lock.metrics["rounds"] + lock.metrics["probe_calls"]


def test_folded_scores_every_advanced_node_with_the_probe_entropy(bpe_processor):
    kwargs = {"budget": 16, "branch_factor": 2, "max_turns": 4, "schedule": "folded", "top_logprobs": 5}
    script = lambda text, seed: (ZOOM, ZOOM, ANSWER)[seed % 3]  # noqa: E731
    leaves, record, engine = run(bpe_processor, script, _entropy_by_text, **kwargs)
    assert engine.probe_calls == [] and len(engine.generate_calls) == record.metrics["rounds"]
    assert {s.first_top_logprobs for s in engine.sampling_calls} == {5}
    texts = {}  # node id -> the text of its prefix, from the leaves' tokens
    nodes = {n.id: n for n in record.nodes}
    for leaf in leaves:
        for node_id in leaf.node_path:
            end = nodes[node_id].span[1] if node_id else 0
            texts[node_id] = bpe_processor.tokenizer.decode(leaf.prompt_ids + leaf.response_ids[:end])
    advanced = {n.parent for n in record.nodes if n.parent is not None}
    assert all(nodes[i].entropy == pytest.approx(_entropy_by_text(texts[i])) for i in advanced)
    assert all(nodes[i].entropy is None for i in nodes if i not in advanced)  # leaves were never advanced
    assert any(len(s.candidates) > 1 for s in record.splits) and any(s.reopened for s in record.splits)


def test_folded_needs_an_engine_that_returns_first_token_logprobs(bpe_processor):
    class Unfolded(ScriptedEngine):
        async def generate(self, prefixes, sampling, seeds):
            return [replace(c, first_top_logprobs=()) for c in await super().generate(prefixes, sampling, seeds)]

    engine = Unfolded(bpe_processor.tokenizer, SCRIPTS["mixed"])
    sampler = TreeSampler(engine, bpe_processor, TreeConfig(budget=4, branch_factor=2, schedule="folded"))
    with pytest.raises(EngineError, match=r"set tree\.schedule=lockstep"):
        asyncio.run(sampler.sample(build_messages("q", []), Image.new("RGB", (64, 64))))
    # chains never compare candidates: they ask for no entropies
    _, _, chains = run(bpe_processor, SCRIPTS["mixed"], budget=4, mode="chain", schedule="folded")
    assert {s.first_top_logprobs for s in chains.sampling_calls} == {0}


def test_random_selection_is_seed_reproducible(bpe_processor):
    script = lambda text, seed: (ZOOM, ANSWER)[seed % 2]  # noqa: E731
    kwargs = {"budget": 12, "branch_factor": 2, "selection": "random", "max_turns": 4}
    _, a, _ = run(bpe_processor, script, seed=3, **kwargs)
    _, b, _ = run(bpe_processor, script, seed=3, **kwargs)
    _, c, _ = run(bpe_processor, script, seed=4, **kwargs)
    assert a.nodes == b.nodes and a.splits == b.splits
    assert (a.nodes, a.splits) != (c.nodes, c.splits)


def test_length_limits_end_branches(bpe_processor):
    long_turn = lambda text, seed: "<think>" + "blah " * 200  # noqa: E731  never closes, never stops
    leaves, _, _ = run(bpe_processor, long_turn, budget=3, branch_factor=3, sampling=SamplingParams(max_new_tokens=16))
    assert all(leaf.stop_reason == "length" and leaf.num_turns == 1 for leaf in leaves)
    assert all(len(leaf.response_ids) == 16 for leaf in leaves)
    # The response budget ends a branch before it can overflow, and never cuts an observation short.
    depths = set()
    for limit in (120, 200, 600):
        leaves, _, _ = run(
            bpe_processor,
            SCRIPTS["always_zoom"],
            budget=2,
            branch_factor=2,
            max_turns=8,
            max_response_tokens=limit,
            sampling=SamplingParams(max_new_tokens=64),
        )
        for leaf in leaves:
            depths.add(leaf.num_turns)
            assert leaf.stop_reason == "length" and len(leaf.response_ids) <= limit
            text = bpe_processor.tokenizer.decode(leaf.response_ids)
            assert text.count("<|vision_start|>") == text.count("<|vision_end|>") == len(leaf.images) - 1
            assert text.count("<tool_response>") == text.count("</tool_response>")
    assert len(depths) == 3  # the three limits stop the branches at different depths
    leaves, _, _ = run(bpe_processor, SCRIPTS["always_zoom"], budget=2, branch_factor=2, max_context_tokens=700)
    assert all(len(leaf.prompt_ids) + len(leaf.response_ids) <= 700 for leaf in leaves)


def test_no_turn_exceeds_the_response_budget_not_even_the_first(bpe_processor):
    long_turn = lambda text, seed: "<think>" + "blah " * 200  # noqa: E731
    stop_early = lambda text, seed: "<think>" + "ok " * 3 + "</think><answer>A</answer>"  # noqa: E731
    for script, limit in ((long_turn, 10), (stop_early, 9), (long_turn, 40)):
        leaves, _, engine = run(
            bpe_processor, script, budget=2, max_response_tokens=limit, sampling=SamplingParams(max_new_tokens=64)
        )
        assert all(len(leaf.response_ids) <= limit for leaf in leaves)
        # the first turn's max_new_tokens is clamped to the budget, less one for the closing <|im_end|>
        assert {s.max_new_tokens for s in engine.sampling_calls} == {min(64, limit - 1)}
    # a turn that stops exactly at the clamp still gets its closing <|im_end|> within the budget
    turn = len(bpe_processor.tokenizer.encode(stop_early("", 0), add_special_tokens=False))
    leaves, _, _ = run(bpe_processor, stop_early, budget=2, max_response_tokens=turn + 1)
    assert all(leaf.stop_reason == "answer" and len(leaf.response_ids) == turn + 1 for leaf in leaves)
    prompt = len(leaves[0].prompt_ids)
    leaves, _, engine = run(bpe_processor, long_turn, budget=2, max_context_tokens=prompt + 20)
    assert all(len(leaf.prompt_ids) + len(leaf.response_ids) <= prompt + 20 for leaf in leaves)
    with pytest.raises(ValueError, match="leaves no room for a turn"):
        run(bpe_processor, long_turn, budget=2, max_context_tokens=prompt + 1)


def _trees(processor, engine, seeds):
    """Trees for ``seeds`` grown concurrently on ``engine`` (one route per tree)."""
    sampler = TreeSampler(engine, processor, TreeConfig(budget=6, branch_factor=2, max_turns=3))
    messages = build_messages("What colour is the dot?\n(A) red\n(B) blue", [get_tool("image_zoom_in_tool")])
    image = Image.new("RGB", (640, 480), "white")

    async def many():
        return await asyncio.gather(*(sampler.sample(messages, image, route=f"uid-{s}", seed=s) for s in seeds))

    return asyncio.run(many())


def test_tree_metrics_count_only_the_trees_own_requests(bpe_processor):
    # One engine serves several trees at once: each tree's engine metrics are its own requests only.
    def engine():
        return ScriptedEngine(bpe_processor.tokenizer, SCRIPTS["mixed"], cached=lambda p: len(p.token_ids) // 2)

    seeds = [0, 1, 2, 3]
    together = _trees(bpe_processor, engine(), seeds)
    alone = [_trees(bpe_processor, engine(), [s])[0] for s in seeds]
    computed = [record.metrics["engine_computed_tokens"] for _, record in alone]
    assert len(set(computed)) > 1  # the trees differ, so mixing them up would show
    for (_, a), (_, b) in zip(together, alone, strict=True):
        assert a.metrics["engine_computed_tokens"] == b.metrics["engine_computed_tokens"]
        assert a.metrics["engine_cached_tokens"] == b.metrics["engine_cached_tokens"]


def test_unknown_cached_tokens_leave_the_reuse_metrics_out(bpe_processor):
    # An engine that cannot tell its cache hits for even one request: the tree reports no reuse numbers.
    calls = []

    def cached(prefix):
        calls.append(prefix)
        return None if len(calls) == 3 else 0

    _, record, _ = run(bpe_processor, SCRIPTS["mixed"], budget=6, branch_factor=2, max_turns=3)
    assert record.metrics["engine_cached_tokens"] == 0 and record.metrics["engine_computed_tokens"] > 0
    [(_, record)] = _trees(bpe_processor, ScriptedEngine(bpe_processor.tokenizer, SCRIPTS["mixed"], cached=cached), [0])
    assert len(calls) > 3
    assert "engine_computed_tokens" not in record.metrics and "engine_cached_tokens" not in record.metrics
    assert record.metrics["leaves"] == 6


def test_engine_failure_fails_the_group(bpe_processor):
    class Broken(ScriptedEngine):
        async def generate(self, prefixes, sampling, seeds):
            raise EngineError("server 127.0.0.1:1 unreachable after 3 tries")

    sampler = TreeSampler(Broken(bpe_processor.tokenizer, SCRIPTS["answer_first"]), bpe_processor, TreeConfig(budget=2))
    with pytest.raises(EngineError, match="unreachable"):
        asyncio.run(sampler.sample(build_messages("q", []), Image.new("RGB", (64, 64))))

    class Short(ScriptedEngine):
        async def generate(self, prefixes, sampling, seeds):
            return (await super().generate(prefixes, sampling, seeds))[:-1]

    sampler = TreeSampler(Short(bpe_processor.tokenizer, SCRIPTS["answer_first"]), bpe_processor, TreeConfig(budget=2))
    with pytest.raises(EngineError, match="continuations for 2 prefixes"):
        asyncio.run(sampler.sample(build_messages("q", []), Image.new("RGB", (64, 64))))


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"budget": 0}, "tree.budget must be >= 1"),
        ({"budget": 4, "branch_factor": 1}, "set tree.mode=chain"),
        ({"budget": 4, "root_width": 5}, "tree.root_width must be in"),
        ({"max_turns": 0}, "tree.max_turns"),
        ({"mode": "forest"}, "tree.mode"),
        (
            {"selection": "best"},
            "unknown selection strategy 'best'; registered: \\['high', 'low', 'random'\\]",
        ),
        ({"entropy": "gini"}, "unknown entropy estimator"),
        ({"splits_per_round": -1}, "tree.splits_per_round must be >= 0"),
        ({"schedule": "async"}, "tree.schedule must be 'lockstep' or 'folded'"),
    ],
)
def test_config_errors_say_what_to_set(kwargs, words):
    with pytest.raises((ValueError, KeyError), match=words):
        TreeConfig(**kwargs)


def test_chain_mode_allows_branch_factor_one():
    assert TreeConfig(budget=8, branch_factor=1, mode="chain").width == 8


def test_entropy_estimators():
    assert min_entropy([math.log(0.5), math.log(0.3)]) == pytest.approx(math.log(2))
    # top-2 covers all the mass: plain Shannon entropy
    assert topk_entropy([math.log(0.5), math.log(0.5)]) == pytest.approx(math.log(2))
    # top-1 of 0.5: 0.5*log2 from the token and 0.5*log2 from the tail bucket
    assert topk_entropy([math.log(0.5)]) == pytest.approx(math.log(2))
    assert sorted(ENTROPY_ESTIMATORS) == ["min", "topk"]


def test_selection_strategies():
    rng = random.Random(0)
    assert SELECTION_STRATEGIES.get("high")([0.1, 0.9, 0.5], rng) == 1
    assert SELECTION_STRATEGIES.get("low")([0.1, 0.9, 0.5], rng) == 0
    picks = {SELECTION_STRATEGIES.get("random")([0.0] * 3, random.Random(s)) for s in range(30)}
    assert picks == {0, 1, 2}
