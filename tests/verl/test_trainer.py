"""``visionleaf_tree_grpo`` inside verl's own advantage step, and the worker's session count.

``compute_advantage`` is verl's (``verl.trainer.ppo.ray_trainer``); ``VisionleafTrainer._compute_advantage``
runs verl's ``_compute_advantage`` over an in-memory stand-in for TransferQueue's ``kv_batch_get`` /
``kv_batch_put`` that stores what verl stores (``list_of_dict_to_tensordict`` rows, jagged per-token fields).
"""

import asyncio

import numpy as np
import pytest
import torch
import transfer_queue
from omegaconf import OmegaConf
from transfer_queue.metadata import KVBatchMeta
from verl.protocol import DataProto
from verl.trainer.ppo.ray_trainer import compute_advantage
from verl.trainer.ppo.v1 import AgentLoopWorkerTQ
from verl.utils.tensordict_utils import list_of_dict_to_tensordict

from visionleaf.algo.advantages import grpo_advantages
from visionleaf.verl.agent_loop import SESSIONS_PER_PROMPT
from visionleaf.verl.algos import TREE_GRPO, tree_node_paths
from visionleaf.verl.trainer import REPLAY_POLL_INTERVAL_S, CountingAgentLoopWorker, VisionleafTrainer

# one prompt, 4 leaves: root 0 splits into 1 and 2, node 1 into leaves 3 and 4, node 2 into leaves 5 and 6
UIDS = ["p", "p", "p", "p"]
PATHS = [[0, 1, 3], [0, 1, 4], [0, 2, 5], [0, 2, 6]]
SCORES = [1.0, 0.0, 1.0, 1.0]
LENGTHS = [3, 5, 4, 2]


def proto(scores=SCORES, lengths=LENGTHS):
    width = max(lengths)
    mask = torch.tensor([[1] * n + [0] * (width - n) for n in lengths])  # [B, L]
    rewards = torch.zeros(len(scores), width)
    for row, (score, n) in enumerate(zip(scores, lengths, strict=True)):
        rewards[row, n - 1] = score  # outcome reward on the last token, as verl's rm_scores
    data = DataProto.from_dict({"token_level_rewards": rewards, "response_mask": mask})
    data.non_tensor_batch["uid"] = np.array(UIDS, dtype=object)
    return data


def algorithm(**overrides):
    return OmegaConf.create({"norm_adv_by_std_in_grpo": True, "tree_subtree_weight": 1.0, **overrides})


def first_token_advantages(data):
    return data.batch["advantages"][:, 0]


def test_tree_grpo_in_verls_compute_advantage_differs_from_grpo():
    grpo = compute_advantage(proto(), "grpo", config=algorithm())
    with tree_node_paths(PATHS):
        tree = compute_advantage(proto(), TREE_GRPO, config=algorithm())
    std = torch.tensor(SCORES).std() + 1e-6
    # GRPO part, plus the subtree term for leaves whose last split is below the root
    # (leaves 3 and 4 share node 1: scores 1 and 0, subtree mean 0.5; leaves 5 and 6 share node 2: both 1)
    expected = (torch.tensor(SCORES) - 0.75) / std + torch.tensor([0.5, -0.5, 0.0, 0.0]) / std
    assert torch.allclose(first_token_advantages(tree), expected, atol=1e-5)
    assert not torch.allclose(first_token_advantages(tree), first_token_advantages(grpo))
    assert torch.equal(tree.batch["advantages"] != 0, tree.batch["response_mask"].bool())  # model tokens only
    assert torch.equal(tree.batch["returns"], tree.batch["advantages"])


def test_tree_grpo_honours_norm_adv_by_std_in_grpo():
    with tree_node_paths(PATHS):
        scaled = compute_advantage(proto(), TREE_GRPO, config=algorithm())
        unscaled = compute_advantage(proto(), TREE_GRPO, config=algorithm(norm_adv_by_std_in_grpo=False))
    expected = torch.tensor(SCORES) - 0.75 + torch.tensor([0.5, -0.5, 0.0, 0.0])  # no division by the std
    assert torch.allclose(first_token_advantages(unscaled), expected, atol=1e-6)
    assert not torch.allclose(first_token_advantages(scaled), expected)
    # Dr. GRPO in visionleaf's own GRPO as well
    groups = grpo_advantages(torch.tensor(SCORES), UIDS, scale_by_std=False)
    assert torch.allclose(groups, torch.tensor(SCORES) - 0.75)


def test_tree_grpo_without_node_paths_names_the_trainer_mode():
    with pytest.raises(ValueError, match="trainer_mode=visionleaf_sync"):
        compute_advantage(proto(), TREE_GRPO, config=algorithm())
    with tree_node_paths(PATHS[:3]), pytest.raises(ValueError, match="3 node paths for a batch of 4"):
        compute_advantage(proto(), TREE_GRPO, config=algorithm())


class FakeTransferQueue:
    """``kv_batch_get`` / ``kv_batch_put`` of TransferQueue over a dict: rows in, jagged TensorDicts out."""

    def __init__(self, rows):
        self.rows = {row["key"]: {k: v for k, v in row.items() if k != "key"} for row in rows}

    def kv_batch_get(self, keys, partition_id, select_fields=None):
        fields = [f for f in select_fields if f in self.rows[keys[0]]]  # absent fields are left out
        return list_of_dict_to_tensordict([{f: self.rows[key][f] for f in fields} for key in keys])

    def kv_batch_put(self, keys, partition_id, fields, tags=None):
        for i, key in enumerate(keys):
            for name, value in fields.items():
                self.rows[key][name] = value[i]
        return KVBatchMeta(keys=list(keys), tags=[{} for _ in keys], partition_id=partition_id)


def tq_rows():
    rows = []
    for i, (uid, path, score, n) in enumerate(zip(UIDS, PATHS, SCORES, LENGTHS, strict=True)):
        rm_scores = torch.zeros(n)
        rm_scores[-1] = score
        rows.append(
            {
                "key": f"{uid}_{i}_0",
                "uid": uid,
                "response_mask": torch.ones(n, dtype=torch.int64),
                "rm_scores": rm_scores,
                "old_log_probs": torch.full((n,), -1.0),
                "rollout_log_probs": torch.full((n,), -1.5 if i == 0 else -1.0),  # leaf 0 drifted off-policy
                "extra_fields": {"node_path": path},
            }
        )
    return rows


def make_trainer(**algorithm_config):
    trainer = object.__new__(VisionleafTrainer)
    trainer.config = OmegaConf.create(
        {
            "algorithm": {
                "adv_estimator": TREE_GRPO,
                "gamma": 1.0,
                "lam": 1.0,
                "use_kl_in_reward": False,
                "norm_adv_by_std_in_grpo": True,
                **algorithm_config,
            },
            "actor_rollout_ref": {"rollout": {"n": 4}},
        }
    )
    return trainer


def run_advantage_step(monkeypatch, **algorithm_config):
    store = FakeTransferQueue(tq_rows())
    monkeypatch.setattr(transfer_queue, "kv_batch_get", store.kv_batch_get)
    monkeypatch.setattr(transfer_queue, "kv_batch_put", store.kv_batch_put)
    batch = KVBatchMeta(keys=list(store.rows), tags=[{} for _ in store.rows], partition_id="train")
    metrics = {}
    make_trainer(**algorithm_config)._compute_advantage(batch, metrics)
    return store, metrics


def test_trainer_runs_tree_grpo_through_verls_advantage_step(monkeypatch):
    correction = {"rollout_is": "sequence", "rollout_is_threshold": 2.0, "bypass_mode": False}
    store, metrics = run_advantage_step(monkeypatch, rollout_correction=correction)
    std = torch.tensor(SCORES).std() + 1e-6
    expected = (torch.tensor(SCORES) - 0.75) / std + torch.tensor([0.5, -0.5, 0.0, 0.0]) / std
    for row, key in enumerate(store.rows):
        advantages = store.rows[key]["advantages"]
        assert advantages.shape == (LENGTHS[row],)
        assert torch.allclose(advantages, expected[row].expand(LENGTHS[row]), atol=1e-5)
    # verl's rollout correction ran: importance weights stored, its metrics logged
    weights = [store.rows[key]["rollout_is_weights"] for key in store.rows]
    assert torch.allclose(weights[0], torch.full((LENGTHS[0],), 2.0))  # exp(3 * 0.5) clamped at the threshold
    assert all(torch.allclose(w, torch.ones_like(w)) for w in weights[1:])
    assert any(name.startswith("rollout_corr/") for name in metrics)


def test_trainer_without_node_paths_is_a_clear_error(monkeypatch):
    store = FakeTransferQueue([{**row, "extra_fields": {}} for row in tq_rows()])
    monkeypatch.setattr(transfer_queue, "kv_batch_get", store.kv_batch_get)
    batch = KVBatchMeta(keys=list(store.rows), tags=[{} for _ in store.rows], partition_id="train")
    with pytest.raises(ValueError, match="default_agent_loop=visionleaf_tree"):
        make_trainer()._compute_advantage(batch, {})


def test_worker_publishes_the_session_count_verl_uses(monkeypatch):
    seen = []

    async def verls_run_prompt(self, prompt, sampling_params, trajectory, trace=False):
        seen.append(SESSIONS_PER_PROMPT.get())  # what verl's session tasks (created here) inherit

    monkeypatch.setattr(AgentLoopWorkerTQ.__ray_actor_class__, "_run_prompt", verls_run_prompt)
    worker = object.__new__(CountingAgentLoopWorker)
    worker.config = OmegaConf.create({"actor_rollout_ref": {"rollout": {"n": 8, "val_kwargs": {"n": 2}}}})

    async def run():
        await worker._run_prompt({"uid": "a"}, {}, {"validate": False})
        await worker._run_prompt({"uid": "b"}, {}, {"validate": True})
        await worker._run_prompt({"uid": "c", "__rollout_n__": 3}, {}, {"validate": False})

    asyncio.run(run())
    assert seen == [8, 2, 3]


def test_validation_reports_accuracy_per_category():
    infos = {
        "reward": [1.0, 0.0, 1.0, 1.0],
        "acc": [1.0, 0.0, 1.0, 1.0],
        "num_tool_calls": [1, 0, 2, 1],
        "category": ["attribute/color", "attribute/color", "position/relative", ""],
    }
    metrics = make_trainer()._val_metrics_update(["synthetic"] * 4, ["a", "a", "b", "c"], infos, [2, 2, 2, 2])
    assert metrics["val/acc_by_category/attribute/color"] == 0.5
    assert metrics["val/acc_by_category/position/relative"] == 1.0
    assert not any(name.startswith("val/acc_by_category/") and name.endswith("/") for name in metrics)
    # verl's own validation metrics are still there, tool calls among them
    assert metrics["val-core/synthetic/acc/mean@2"] == 0.5
    assert "val-aux/synthetic/num_tool_calls/mean@2" in metrics


def test_visionleaf_sync_runs_verls_sync_schedule():
    # verl 0.9.1 branches on trainer_mode == "sync" (replay buffer, gen_batch_size refill, TransferQueue
    # checkpoints); under its registered name the trainer must still get verl's sync behaviour
    from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer, ReplayBufferAsync

    from tests.verl.test_configs import composed

    config = composed("tiny_cpu")
    assert config.trainer.v1.trainer_mode == "visionleaf_sync"
    trainer = VisionleafTrainer(config)
    assert trainer.trainer_mode == "sync"
    assert type(trainer.replay_buffer) is ReplayBuffer
    assert not isinstance(trainer.replay_buffer, ReplayBufferAsync)


def test_replay_buffer_polls_for_finished_rollouts_often():
    from tests.verl.test_configs import composed

    trainer = object.__new__(VisionleafTrainer)
    trainer.config = composed("tiny_cpu")
    trainer.trainer_mode = "sync"
    trainer._add_prompts_to_generate = lambda *args, **kwargs: None
    buffer = trainer._build_replay_buffer()
    assert type(buffer).__name__ == "ReplayBuffer"  # verl's own, with only the interval changed
    assert buffer.poll_interval == REPLAY_POLL_INTERVAL_S < 2.0
