"""Tree-shared forward == per-leaf forwards: log-probs, entropies and every parameter's gradient.

Trees are grown by the real :class:`TreeSampler` with a scripted engine that zooms into seed-dependent
boxes (same-size boxes give identical token runs with different pixels), so crops sit inside branches at
several levels. The model is the tiny random Qwen2.5-VL in float64 with ``sdpa`` and a dense bool mask.
"""

import asyncio

import pytest
import torch
from verl.utils.torch_functional import entropy_from_logits, logprobs_from_logits

from tests.conftest import noise_image
from tests.rollout.scripted import ScriptedEngine
from visionleaf.algo.tree_forward import (
    LeafSequence,
    leaf_sequence,
    node_spans,
    pack_tree,
    tree_forward,
)
from visionleaf.models import tiny
from visionleaf.protocol import build_messages
from visionleaf.rollout.tree import TreeConfig, TreeSampler
from visionleaf.tools import get_tool

ANSWER = "<think>I see it now.</think><answer>A</answer>"
CALL = '<think>zoom {}</think><tool_call>{{"name": "image_zoom_in_tool", "arguments": {{"bbox_2d": {}}}}}</tool_call>'
BOXES = ([0, 0, 56, 56], [100, 50, 156, 106], [140, 90, 196, 146], [20, 60, 120, 120])
"""Boxes in the global view's model pixels: three of the same size (identical tokens), one larger."""
TEMPERATURE = 0.7


def zoom_then_answer(text: str, seed: int) -> str:
    """Zoom at depth 0 and 1 (box by seed), answer at depth 2 (the system prompt names the tag once)."""
    if text.count("<tool_response>") >= 3:
        return ANSWER
    return CALL.format(seed % 7, BOXES[seed % len(BOXES)])


@pytest.fixture(scope="module")
def model(bpe_processor):
    model = tiny.build_model(bpe_processor.tokenizer, seed=1).double()
    assert model.config._attn_implementation == "sdpa"
    return model


def grow(processor, **config):
    engine = ScriptedEngine(processor.tokenizer, zoom_then_answer)
    sampler = TreeSampler(engine, processor, TreeConfig(max_turns=3, **config))
    messages = build_messages("What is written on the sign?\n(A) stop\n(B) go", [get_tool("image_zoom_in_tool")])
    return asyncio.run(sampler.sample(messages, noise_image(640, 480, seed=3), route="uid-0"))


def per_leaf(model, seq: LeafSequence) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's computation on one leaf: full causal forward, logits / T, log-probs and entropy of the response."""
    vision = {}
    if seq.pixel_values is not None:
        vision = {"pixel_values": seq.pixel_values.double(), "image_grid_thw": seq.image_grid_thw}
    logits = model(
        input_ids=seq.input_ids[None], position_ids=seq.position_ids[:, None], use_cache=False, **vision
    ).logits[0]  # [L, V]
    logits = logits[seq.prompt_len - 1 : -1] / TEMPERATURE  # [R, V]
    labels = seq.input_ids[seq.prompt_len :]  # [R]
    return logprobs_from_logits(logits, labels), entropy_from_logits(logits)


def assert_equivalent(model, leaves, record, processor):
    seqs = [leaf_sequence(model, processor, leaf) for leaf in leaves]
    packed = pack_tree(seqs, node_spans(record.nodes), model.config.image_token_id)
    generator = torch.Generator().manual_seed(0)
    # a loss over sampled tokens only, as verl's: observation tokens (response_mask 0) carry no weight
    masks = [torch.tensor(leaf.response_mask, dtype=torch.float64) for leaf in leaves]
    weights = [
        tuple(torch.randn(len(m), generator=generator, dtype=torch.float64) * m for _ in range(2)) for m in masks
    ]

    model.zero_grad()
    reference, loss = [], 0.0
    for seq, (w_logp, w_ent) in zip(seqs, weights, strict=True):
        logp, ent = per_leaf(model, seq)
        reference.append((logp.detach(), ent.detach()))
        loss = loss + (w_logp * logp).sum() + (w_ent * ent).sum()
    loss.backward()
    ref_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    model.zero_grad()
    out = tree_forward(model, packed, temperature=TEMPERATURE)
    loss = sum(
        (w_logp * logp).sum() + (w_ent * ent).sum()
        for (w_logp, w_ent), logp, ent in zip(weights, out.log_probs, out.entropy, strict=True)
    )
    loss.backward()

    for (ref_logp, ref_ent), logp, ent in zip(reference, out.log_probs, out.entropy, strict=True):
        torch.testing.assert_close(logp.detach(), ref_logp, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(ent.detach(), ref_ent, rtol=1e-9, atol=1e-9)
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys()
    assert any(name.startswith("model.visual") for name in grads)  # the vision encoder is in the check
    for name, grad in grads.items():
        # RMSNorm computes in float32 even in a float64 model: agreement is ~1e-8 of the gradient's scale
        scale = ref_grads[name].abs().max().item()
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-6, atol=1e-6 * scale, msg=f"gradient of {name}")
    return packed, seqs


def test_tree_with_crops_inside_branches_matches_per_leaf(model, bpe_processor):
    leaves, record = grow(bpe_processor, budget=6, branch_factor=2, root_width=2)
    packed, _ = assert_equivalent(model, leaves, record, bpe_processor)
    # the tree really shares crop-holding turns between leaves, at more than one level
    inner = [n for leaf in leaves for n in leaf.node_path[1:-1]]
    shared = {n for n in inner if inner.count(n) > 1}
    assert {record.nodes[n].depth for n in shared} == {1, 2}
    assert all(len(leaf.images) == 3 for leaf in leaves)
    unique_images = 1 + len({n for leaf in leaves for n in leaf.node_path[1:3]})
    assert packed.image_grid_thw.shape[0] == unique_images < sum(len(leaf.images) for leaf in leaves)
    assert packed.tokens_packed == record.metrics["unique_tokens"]
    assert packed.tokens_per_leaf == record.metrics["chain_tokens"] > packed.tokens_packed


def test_chains_sharing_only_the_prompt_match_per_leaf(model, bpe_processor):
    leaves, record = grow(bpe_processor, budget=3, mode="chain")
    packed, seqs = assert_equivalent(model, leaves, record, bpe_processor)
    prompt = seqs[0].prompt_len
    assert packed.tokens_packed == prompt + sum(len(s.input_ids) - prompt for s in seqs)


def test_single_leaf_matches_per_leaf(model, bpe_processor):
    leaves, record = grow(bpe_processor, budget=1)
    packed, [seq] = assert_equivalent(model, leaves, record, bpe_processor)
    assert packed.tokens_packed == packed.tokens_per_leaf == len(seq.input_ids)
    assert torch.equal(packed.input_ids, seq.input_ids)


def text_leaf(ids: list[int], prompt_len: int, path: tuple[int, ...]) -> LeafSequence:
    tensor = torch.tensor(ids)
    return LeafSequence(tensor, torch.arange(len(ids))[None].expand(4, -1), prompt_len, path)


def test_packing_layout_and_ancestor_mask():
    # root (prompt 10 11) -> node 1 (20 21) -> leaves 3 (30) and 4 (40 41); root -> node 2 (50)
    spans = {1: (0, 2), 2: (0, 1), 3: (2, 3), 4: (2, 4)}
    leaves = [
        text_leaf([10, 11, 20, 21, 30], 2, (0, 1, 3)),
        text_leaf([10, 11, 50], 2, (0, 2)),
        text_leaf([10, 11, 20, 21, 40, 41], 2, (0, 1, 4)),
    ]
    packed = pack_tree(leaves, spans, image_token_id=-1)
    assert packed.input_ids.tolist() == [10, 11, 20, 21, 30, 40, 41, 50]  # depth-first, children by appearance
    assert [i.tolist() for i in packed.leaf_index] == [[0, 1, 2, 3, 4], [0, 1, 7], [0, 1, 2, 3, 5, 6]]
    # the last token of node 1 (slot 3) predicts 30 for leaf 0 and 40 for leaf 2
    assert packed.predict_index.tolist() == [1, 2, 3, 1, 1, 2, 3, 5]
    assert packed.labels.tolist() == [20, 21, 30, 50, 20, 21, 40, 41]
    mask = packed.attention_mask()
    for q, k in [(4, 3), (4, 0), (5, 3), (6, 5), (7, 1), (3, 3)]:
        assert mask[q, k], (q, k)
    for q, k in [(5, 4), (6, 4), (7, 2), (7, 6), (2, 3)]:
        assert not mask[q, k], (q, k)


@pytest.mark.parametrize(
    ("leaves", "words"),
    [
        ([text_leaf([10, 11, 20], 2, (0, 1)), text_leaf([10, 11, 21], 2, (0, 1))], "disagrees"),
        ([text_leaf([10, 11, 20, 21], 2, (0, 1))], "cut or padded"),
        ([text_leaf([10, 11, 20], 2, (0, 1)), text_leaf([10, 11, 20], 2, (5, 1))], "one tree at a time"),
        ([text_leaf([10, 11, 20], 2, (0, 9))], "no span"),
    ],
)
def test_leaves_that_are_not_one_tree_are_refused(leaves, words):
    with pytest.raises(ValueError, match=words):
        pack_tree(leaves, {1: (0, 1)}, image_token_id=-1)


def test_eager_attention_gives_the_same_outputs_and_others_are_refused(model, bpe_processor):
    leaves, record = grow(bpe_processor, budget=3, branch_factor=2)
    seqs = [leaf_sequence(model, bpe_processor, leaf) for leaf in leaves]
    packed = pack_tree(seqs, node_spans(record.nodes), model.config.image_token_id)
    with torch.no_grad():
        sdpa = tree_forward(model, packed)
        model.config._attn_implementation = "eager"
        try:
            eager = tree_forward(model, packed)
            model.config._attn_implementation = "flash_attention_2"
            with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
                tree_forward(model, packed)
        finally:
            model.config._attn_implementation = "sdpa"
    for a, b in zip(sdpa.log_probs + sdpa.entropy, eager.log_probs + eager.entropy, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)  # eager's softmax runs in float32


def test_logits_at_every_slot_give_the_same_outputs(model, bpe_processor):
    """``logits_to_keep=False`` (forwards that ignore it, like verl's patched one) picks the same slots."""
    leaves, record = grow(bpe_processor, budget=3, branch_factor=2)
    seqs = [leaf_sequence(model, bpe_processor, leaf) for leaf in leaves]
    packed = pack_tree(seqs, node_spans(record.nodes), model.config.image_token_id)
    with torch.no_grad():
        kept, full = (
            tree_forward(model, packed, TEMPERATURE),
            tree_forward(model, packed, TEMPERATURE, logits_to_keep=False),
        )
    for a, b in zip(kept.log_probs + kept.entropy, full.log_probs + full.entropy, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
