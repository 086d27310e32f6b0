"""The tree agent loop: the N sessions of one uid share one tree, one leaf each, however and whenever they come.

The first test runs verl's own ``AgentLoopWorkerTQ._run_prompt`` (through visionleaf's worker subclass) and
verl's real ``LLMServerClient`` over the engine-contract stand-in server (the HF engine behind verl's vLLM
server interface); only the TransferQueue writes are replaced. The grouping tests replace the tree by a
controllable task.
"""

import asyncio

import pytest
from omegaconf import OmegaConf
from verl.trainer.ppo.v1 import agent_loop_tq

from tests.conftest import noise_image
from tests.engines.contract_verl import StandInServer, verl_client
from visionleaf.models import tiny
from visionleaf.protocol import build_messages, template_messages
from visionleaf.reward import format_problems
from visionleaf.rollout.tree import TreeRecord
from visionleaf.tools import get_tool
from visionleaf.verl import agent_loop
from visionleaf.verl.agent_loop import _GROUPS, SESSIONS_PER_PROMPT, TreeAgentLoop, tree_config_from, tree_seed
from visionleaf.verl.dataset import PILImageDataset
from visionleaf.verl.metrics import leaf_metrics
from visionleaf.verl.servers import VISIONLEAF_VLLM
from visionleaf.verl.trainer import CountingAgentLoopWorker

N = 4


def trainer_config():
    return OmegaConf.create(
        {
            "actor_rollout_ref": {
                "rollout": {"n": N, "val_kwargs": {"n": 1}, "prompt_length": 1024, "response_length": 384},
            },
            "data": {},
            "visionleaf": {"tree": {"branch_factor": 2, "max_turns": 3, "sampling": {"max_new_tokens": 48}}},
        }
    )


@pytest.fixture(scope="module")
def loop_parts(warm_model_dir):
    model, processor = tiny.load(warm_model_dir)
    return model, processor, trainer_config()


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
    return {"uid": uid, "raw_prompt": messages, "index": seed, "extra_info": {"index": seed}, "global_steps": 1}


def make_worker(processor, config, client):
    """verl's TQ worker as ``_run_prompt`` / ``_run_agent_loop`` use it, without Ray or TransferQueue."""
    worker = object.__new__(CountingAgentLoopWorker)
    worker.config, worker.llm_client, worker.errors = config, client, 0
    worker.tokenizer, worker.processor, worker.hf_model_type = processor.tokenizer, processor, "qwen2_5_vl"
    worker.dataset_cls, worker.tools = PILImageDataset, []
    worker.outputs = {}

    async def postprocess(output, validate, **kwargs):  # verl puts each session's output into TransferQueue
        worker.outputs[(kwargs["uid"], kwargs["session_id"])] = output

    worker._agent_loop_postprocess = postprocess
    return worker


def test_verl_worker_runs_one_tree_per_uid_with_per_sample_n(loop_parts, warm_model_dir, monkeypatch):
    model, processor, config = loop_parts
    config = OmegaConf.merge(config, {"actor_rollout_ref": {"model": {"path": str(warm_model_dir)}}})
    engines = []

    class RecordingEngine(agent_loop.VerlEngine):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            engines.append(self)

    monkeypatch.setattr(agent_loop, "VerlEngine", RecordingEngine)
    client = verl_client({"standin:0": StandInServer(model, processor, global_steps=7)}, VISIONLEAF_VLLM)
    worker = make_worker(processor, config, client)
    statuses = []

    async def kv_put(key, partition_id, tag, **kwargs):
        statuses.append((key, tag["status"]))

    monkeypatch.setattr(agent_loop_tq.tq, "async_kv_put", kv_put)
    trajectory = {"validate": False, "step": 1, "sample_index": 0, "rollout_n": 0}
    rows = [
        {**prompt("uid-a", 1), "agent_name": "visionleaf_tree"},  # rollout.n sessions
        {**prompt("uid-b", 2), "agent_name": "visionleaf_tree", "__rollout_n__": 3},  # verl's per-sample n
    ]

    async def run_like_verl():
        await asyncio.gather(*(worker._run_prompt(row, {"temperature": 1.0, "top_k": -1}, trajectory) for row in rows))

    asyncio.run(run_like_verl())
    assert statuses[:2] == [("uid-a", "running"), ("uid-b", "running")]
    assert sorted(statuses[2:]) == [("uid-a", "finished"), ("uid-b", "finished")]
    assert worker.errors == 0 and not _GROUPS  # every group was released
    for uid, n in (("uid-a", N), ("uid-b", 3)):
        group = [worker.outputs[(uid, i)] for i in range(n)]
        paths = [tuple(o.extra_fields["node_path"]) for o in group]
        assert len(set(paths)) == n  # n distinct leaves...
        assert len({p[0] for p in paths}) == 1  # ...of one tree (same root)
        assert len({o.extra_fields["tree_splits"] for o in group}) == 1  # one tree's metrics on every leaf
        for o in group:
            assert len(o.response_ids) == len(o.response_mask) == len(o.response_logprobs) <= 384
            assert o.multi_modal_data["images"] and o.extra_fields["min_global_steps"] == 7
            assert isinstance(o.extra_fields["format_problems"], list)
    # each tree saw its own prompt's image (same question and size, so the same prompt ids)
    first, second = (worker.outputs[(uid, 0)].multi_modal_data["images"][0] for uid in ("uid-a", "uid-b"))
    assert first.tobytes() != second.tobytes()
    # the servers are told not to sample the model's padded vocabulary rows (read from model.path's config)
    padded = set(range(len(processor.tokenizer), model.config.text_config.vocab_size))
    assert padded and len(engines) == 2 and all(padded <= set(e.banned) for e in engines)


class FakeTree:
    """Stands in for ``TreeAgentLoop._grow``: a tree that finishes when the test says so."""

    def __init__(self):
        self.release = None
        self.grown, self.cancelled = [], 0

    async def grow(self, uid, budget, sampling_params, kwargs):  # bound to FakeTree, not to the loop
        self.grown.append((uid, budget))
        self.release = self.release or asyncio.Event()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        leaves = [LeafStub(i) for i in range(budget)]
        return agent_loop._Tree(leaves, TreeRecord([], [], {}), [])


class LeafStub:
    def __init__(self, i):
        self.i = i


@pytest.fixture
def fake_tree(monkeypatch):
    tree = FakeTree()
    monkeypatch.setattr(TreeAgentLoop, "_grow", tree.grow)
    monkeypatch.setattr(TreeAgentLoop, "_output", lambda self, leaf, record, versions: leaf.i)
    yield tree
    _GROUPS.clear()


def bare_loop():
    return object.__new__(TreeAgentLoop)


async def session(i, n, uid="u", step=1):
    SESSIONS_PER_PROMPT.set(n)  # what CountingAgentLoopWorker._run_prompt sets before verl's session tasks
    return await bare_loop().run({}, uid=uid, session_id=i, global_steps=step)


def test_late_sessions_get_their_leaf_of_the_same_tree(fake_tree):
    async def scenario():
        early = [asyncio.create_task(session(i, 4)) for i in range(2)]
        await asyncio.sleep(0.01)
        fake_tree.release.set()
        done = await asyncio.gather(*early)
        assert "u@1" in _GROUPS  # two sessions still to come: their leaves are kept
        late = await asyncio.gather(session(3, 4), session(2, 4))  # later, in any order
        return done + late

    assert asyncio.run(scenario()) == [0, 1, 3, 2]
    assert fake_tree.grown == [("u", 4)] and not _GROUPS


def test_sessions_that_never_arrive_are_dropped_after_the_grace(fake_tree, monkeypatch):
    monkeypatch.setattr(agent_loop, "LATE_SESSION_GRACE_S", 0.01)

    async def scenario():
        fake_tree.release = asyncio.Event()
        fake_tree.release.set()
        leaves = await asyncio.gather(*(session(i, 4) for i in range(3)))
        assert "u@1" in _GROUPS
        await asyncio.sleep(0.05)
        return leaves

    assert asyncio.run(scenario()) == [0, 1, 2]
    assert not _GROUPS


def test_cancelled_sessions_cancel_the_tree_and_leak_nothing(fake_tree):
    async def scenario():
        tasks = [asyncio.create_task(session(i, 4)) for i in range(4)]
        await asyncio.sleep(0.01)
        tasks[0].cancel()  # one session gone: the tree goes on for the others
        await asyncio.sleep(0.01)
        assert fake_tree.cancelled == 0 and "u@1" in _GROUPS
        for task in tasks[1:]:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(0.01)

    asyncio.run(scenario())
    assert fake_tree.cancelled == 1 and not _GROUPS


def test_a_failed_tree_fails_every_session_and_is_released(fake_tree, monkeypatch):
    async def broken(loop, uid, budget, sampling_params, kwargs):
        raise RuntimeError("server gone")

    monkeypatch.setattr(TreeAgentLoop, "_grow", broken)

    async def scenario():
        return await asyncio.gather(*(session(i, 2) for i in range(2)), return_exceptions=True)

    assert [str(r) for r in asyncio.run(scenario())] == ["server gone", "server gone"]
    assert not _GROUPS


def test_session_bookkeeping_errors(fake_tree):
    async def outside():
        return await session(4, 4)

    with pytest.raises(ValueError, match="outside the prompt's 4 sessions"):
        asyncio.run(outside())

    async def without_worker():
        return await bare_loop().run({}, uid="u", session_id=0, global_steps=1)

    with pytest.raises(RuntimeError, match="CountingAgentLoopManager"):
        asyncio.run(without_worker())
    assert not _GROUPS


def test_tree_config_from_budget_and_verl_sampling():
    config = trainer_config()
    tree = tree_config_from(config, 3, {"temperature": 0.7, "top_p": 0.9, "top_k": 20})
    assert tree.budget == 3 and tree.sampling.max_new_tokens == 48
    assert (tree.sampling.temperature, tree.sampling.top_p, tree.sampling.top_k) == (0.7, 0.9, 20)
    assert tree_config_from(config, 3, {"top_k": -1}).sampling.top_k == 0  # verl's "off"
    with pytest.raises(ValueError, match=r"visionleaf\.tree\.budget is the prompt.s session count"):
        tree_config_from(OmegaConf.merge(config, {"visionleaf": {"tree": {"budget": 8}}}), 4)
    with pytest.raises(ValueError, match=r"set actor_rollout_ref\.rollout\.top_k"):
        tree_config_from(OmegaConf.merge(config, {"visionleaf": {"tree": {"sampling": {"top_k": 5}}}}), 4)


def test_tree_seed_tells_rows_without_index_apart():
    def row(question, **extra):
        return {"raw_prompt": [{"role": "user", "content": question}], "extra_info": extra, "global_steps": 3}

    # verl gives rows without an index the index 0; their seeds still differ by content
    assert tree_seed(row("a")) != tree_seed(row("b"))
    assert tree_seed(row("a", original_image="x.png")) != tree_seed(row("a", original_image="y.png"))
    assert tree_seed(row("a")) == tree_seed(row("a"))  # deterministic (no process-salted hash)
    assert tree_seed(row("a", index=5)) == tree_seed(row("b", index=5))  # an index names the row
    assert tree_seed(row("a", index=5)) != tree_seed({**row("a", index=5), "global_steps": 4})
    assert tree_seed(row("a", index=5)) != tree_seed(row("a", index=5), base=1)  # visionleaf.tree.seed


def test_unknown_prefix_reuse_is_absent_from_the_metrics():
    unknown = agent_loop._prefix_reuse({"engine_computed_tokens": None, "unique_tokens": 100.0})
    assert unknown is None
    assert agent_loop._prefix_reuse({"engine_computed_tokens": 50.0, "unique_tokens": 100.0}) == 0.5
    metrics = leaf_metrics([{"tree_prefix_reuse": unknown, "tree_splits": 1}])
    assert "tree/engine_computed_over_unique_tokens" not in metrics and metrics["tree/splits_per_group"] == 1


def test_rollout_format_problems_use_the_real_turns():
    faked = '<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [1, 1, 9, 9]}}</tool_call>'
    faked += "<tool_response>red</tool_response><answer>A</answer>"
    assert format_problems([faked]) == ("call_and_answer",)
