"""The hf rollout's HFServer: exact prefix-cache accounting through verl's client, and weight updates."""

import asyncio

import pytest
import torch

from tests.engines.contract_verl import hf_engine
from tests.verl.test_engine import make_prefix
from visionleaf.engines.base import Prefix, SamplingParams
from visionleaf.verl.hf_replica import HFServer

SAMPLING = SamplingParams(max_new_tokens=5, temperature=1.0, stop=())


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    return HFServer(str(tiny_model_dir), response_length=64)


def test_probe_and_generate_report_exact_cache_hits(tiny_model_dir, bpe_processor):
    """A probe prefills its node: that prefill is reported, and the turn that follows reuses it."""
    engine = hf_engine(tiny_model_dir, bpe_processor, vocab_size=None)
    server = engine.server_manager._load_balancer.target._servers["hf://0"].target
    prefix = make_prefix(bpe_processor)

    async def two_turns():
        (probe,) = await engine.probe([prefix], 4)
        (turn,) = await engine.generate([prefix], SAMPLING, [1])
        observation = bpe_processor.tokenizer.encode(
            "<|im_end|>\n<|im_start|>user\nmore<|im_end|>\n<|im_start|>assistant\n"
        )
        child = Prefix(
            prefix.token_ids + turn.token_ids + tuple(observation), prefix.images, prefix.image_keys, "uid-7"
        )
        (child_probe,) = await engine.probe([child], 4)
        (child_turn,) = await engine.generate([child], SAMPLING, [2])
        return probe, turn, child, child_probe, child_turn

    probe, turn, child, child_probe, child_turn = asyncio.run(two_turns())
    n = len(prefix.token_ids)
    assert probe.cached_tokens == 0 and len(probe.top_logprobs) == 4
    assert turn.cached_tokens == n  # the probe's prefill is reused
    assert child_probe.cached_tokens == n + len(turn.token_ids) - 1  # the turn's KV but its last token
    assert child_turn.cached_tokens == len(child.token_ids)
    # what the replies say was computed is what the server's engine computed (it feeds each sampled token
    # but the last one back through the model)
    reported = sum(
        len(p.token_ids) - r.cached_tokens
        for p, r in ((prefix, probe), (prefix, turn), (child, child_probe), (child, child_turn))
    )
    fed = len(turn.token_ids) - 1 + len(child_turn.token_ids) - 1
    assert reported + fed == server.engine.stats.computed_tokens


def test_update_weights_refuses_a_state_with_missing_tensors(server):
    model = server.engine.model
    state = {name: tensor.detach().clone() + 1.0 for name, tensor in model.state_dict().items()}
    before = model.state_dict()["model.language_model.norm.weight"].clone()
    partial = {k: v for k, v in state.items() if k != "model.language_model.norm.weight"}
    with pytest.raises(ValueError, match=r"lack 1 tensors.*model\.language_model\.norm\.weight"):
        server.update_weights(partial, global_steps=3)
    assert torch.equal(model.state_dict()["model.language_model.norm.weight"], before)  # nothing was loaded
    assert server.global_steps is None


def test_update_weights_loads_a_full_state_and_counts_a_tied_tensor_once(server):
    model = server.engine.model
    state = {name: tensor.detach().clone() * 0.5 for name, tensor in model.state_dict().items()}
    state.pop("lm_head.weight")  # tied to the input embeddings, which are sent
    assert server.update_weights(state, global_steps=4) == len(state)
    assert torch.equal(model.lm_head.weight, state["model.language_model.embed_tokens.weight"])
    assert server.global_steps == 4
    with pytest.raises(ValueError, match="does not have"):
        server.update_weights({**state, "extra.weight": torch.zeros(1)})
