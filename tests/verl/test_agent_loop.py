"""The tree agent loop's grouping: the N sessions of one uid share one tree, one leaf each.

verl's V1 worker creates the N session tasks of a uid together and each runs ``agent_loop.run``; this
test does the same with a stand-in for verl's ``LLMServerClient`` that serves from the real HF engine.
"""

import asyncio

import pytest
from omegaconf import OmegaConf
from verl.experimental.agent_loop.agent_loop import DictConfigWrap
from verl.workers.rollout.replica import TokenOutput

from tests.conftest import noise_image
from visionleaf.engines.base import Prefix, image_key
from visionleaf.engines.hf import HFEngine
from visionleaf.models import tiny
from visionleaf.protocol import build_messages, template_messages
from visionleaf.tools import get_tool
from visionleaf.verl import hf_replica
from visionleaf.verl.agent_loop import _GROUPS, TreeAgentLoop
from visionleaf.verl.dataset import PILImageDataset

N = 4


class StandInServerClient:
    """What ``LLMServerClient.generate`` does for an agent loop, over an in-process HF engine."""

    def __init__(self, engine):
        self.engine = engine
        self.request_ids = []

    async def generate(self, request_id, *, prompt_ids, sampling_params, image_data=None, **kwargs):
        self.request_ids.append(request_id)
        sampling, _, top_k = hf_replica.to_sampling(sampling_params, 64)
        images = tuple(image_data or ())
        prefix = Prefix(tuple(prompt_ids), images, tuple(image_key(i) for i in images), request_id)
        extra = {"min_global_steps": 7, "max_global_steps": 7}
        if top_k:
            (extra["top_logprobs"],) = await self.engine.probe([prefix], top_k)
        [out] = await self.engine.generate([prefix], sampling, [int(sampling_params.get("seed", 0))])
        extra["cached_tokens"] = out.cached_tokens
        return TokenOutput(token_ids=list(out.token_ids), log_probs=list(out.logprobs), extra_fields=extra)


@pytest.fixture(scope="module")
def loop_parts(warm_model_dir):
    model, processor = tiny.load(warm_model_dir)
    config = OmegaConf.create(
        {
            "actor_rollout_ref": {
                "rollout": {"n": N, "val_kwargs": {"n": 1}, "prompt_length": 1024, "response_length": 384},
            },
            "visionleaf": {"tree": {"branch_factor": 2, "max_turns": 3, "sampling": {"max_new_tokens": 48}}},
        }
    )
    return model, processor, config


def make_loop(model, processor, config, client):
    return TreeAgentLoop(
        trainer_config=DictConfigWrap(config),
        server_manager=client,
        tokenizer=processor.tokenizer,
        processor=processor,
        dataset_cls=PILImageDataset,
        data_config=DictConfigWrap(OmegaConf.create({})),
        hf_model_type="qwen2_5_vl",
    )


def prompt(uid, seed):
    image = noise_image(640, 480, seed=seed)
    messages = template_messages(
        build_messages("What colour is the dot?\n(A) red\n(B) blue", [get_tool("image_zoom_in_tool")])
    )
    for message in messages:  # verl's dataset puts the PIL image into the content list
        if isinstance(message["content"], list):
            message["content"] = [
                {"type": "image", "image": image} if p["type"] == "image" else p for p in message["content"]
            ]
    return {"uid": uid, "raw_prompt": messages, "index": seed, "extra_info": {}}


def test_sessions_of_a_uid_share_one_tree(loop_parts):
    model, processor, config = loop_parts
    client = StandInServerClient(HFEngine(model, processor))

    async def run_like_verl():
        # two prompts, N sessions each, all created before any runs (AgentLoopWorkerTQ._run_prompt)
        tasks = [
            asyncio.create_task(
                make_loop(model, processor, config, client).run({"temperature": 1.0}, session_id=i, **prompt(uid, s))
            )
            for uid, s in (("uid-a", 1), ("uid-b", 2))
            for i in range(N)
        ]
        return await asyncio.gather(*tasks)

    outputs = asyncio.run(run_like_verl())
    assert not _GROUPS  # every group was released
    for group in (outputs[:N], outputs[N:]):
        paths = [tuple(o.extra_fields["node_path"]) for o in group]
        assert len(set(paths)) == N  # N distinct leaves...
        assert len({p[0] for p in paths}) == 1  # ...of one tree (same root)
        assert len({o.extra_fields["tree_splits"] for o in group}) == 1  # one tree's metrics on every leaf
        for o in group:
            assert len(o.response_ids) == len(o.response_mask) == len(o.response_logprobs) <= 384
            assert o.multi_modal_data["images"] and o.extra_fields["min_global_steps"] == 7
    # every request of a tree was routed with its uid (one server, one prefix cache)
    assert set(client.request_ids) == {"uid-a", "uid-b"}
    # each tree saw its own prompt's image (same question and size, so the same prompt ids)
    first, second = outputs[0].multi_modal_data["images"][0], outputs[N].multi_modal_data["images"][0]
    assert first.tobytes() != second.tobytes()


def test_a_session_count_that_matches_no_n_is_an_error(loop_parts):
    model, processor, config = loop_parts
    client = StandInServerClient(HFEngine(model, processor))

    async def three_sessions():
        tasks = [
            asyncio.create_task(make_loop(model, processor, config, client).run({}, session_id=i, **prompt("uid-c", 3)))
            for i in range(3)
        ]
        return await asyncio.gather(*tasks, return_exceptions=True)

    results = asyncio.run(three_sessions())
    assert all(isinstance(r, RuntimeError) and "rollout.n=4" in str(r) for r in results)
    assert not _GROUPS
