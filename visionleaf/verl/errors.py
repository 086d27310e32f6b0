"""Count agent-loop failures that verl 0.9.1's V1 trainer only logs, and log them as a metric.

verl's ``AgentLoopWorkerTQ._run_prompt`` logs ``Error in _run_prompt`` and drops the failed sessions;
training goes on with fewer samples and no metric says so. Two small subclasses close that gap:

- :class:`CountingAgentLoopManager` (``actor_rollout_ref.rollout.agent.agent_loop_manager_class``) runs
  workers that count every agent-loop session that raised;
- the ``visionleaf_sync`` trainer mode (``trainer.v1.trainer_mode``) is verl's ``sync`` trainer that adds
  ``rollout/agent_loop_errors`` (failed sessions since the previous step) to every step's metrics, and
  the reward components, tool use and tree shape of :func:`visionleaf.verl.metrics.leaf_metrics`.
"""

from __future__ import annotations

from typing import Any

import ray
import transfer_queue as tq
from tensordict import TensorDict
from verl.trainer.ppo.v1 import AgentLoopManagerTQ, AgentLoopWorkerTQ, PPOTrainerSync
from verl.workers.utils.padding import response_to_nested

from visionleaf.algo.advantages import tree_grpo_advantages
from visionleaf.verl.metrics import leaf_metrics

TREE_GRPO = "visionleaf_tree_grpo"
"""``algorithm.adv_estimator`` of the tree-aware estimator (computed by the ``visionleaf_sync`` trainer)."""

ERROR_METRIC = "rollout/agent_loop_errors"
"""Metric: agent-loop sessions that raised since the previous logged step (0 in a healthy run)."""

TRAINER_MODE = "visionleaf_sync"
"""``trainer.v1.trainer_mode`` of :class:`ErrorCountingTrainer` (registered by the plugin)."""


class CountingAgentLoopWorker(AgentLoopWorkerTQ.__ray_actor_class__):  # type: ignore[name-defined]
    """verl's TransferQueue agent-loop worker that counts sessions whose agent loop raised."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.errors = 0

    async def _run_agent_loop(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super()._run_agent_loop(*args, **kwargs)
        except Exception:
            self.errors += 1
            raise

    def pop_errors(self) -> int:
        """Failed sessions since the previous call."""
        errors, self.errors = self.errors, 0
        return errors


class CountingAgentLoopManager(AgentLoopManagerTQ):
    """verl's TransferQueue agent-loop manager over :class:`CountingAgentLoopWorker`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.agent_loop_workers_class = ray.remote(CountingAgentLoopWorker)

    def pop_errors(self) -> int:
        """Failed sessions of all workers since the previous call."""
        workers: list[Any] = self.agent_loop_workers
        return sum(ray.get([worker.pop_errors.remote() for worker in workers]))


class ErrorCountingTrainer(PPOTrainerSync):
    """verl's sync V1 trainer, plus :data:`ERROR_METRIC` in each step's metrics."""

    def _compute_metrics(self, batch: Any, metrics: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        result = super()._compute_metrics(batch, metrics, *args, **kwargs)
        manager = self.agent_loop_manager
        if not isinstance(manager, CountingAgentLoopManager):
            raise TypeError(
                f"trainer.v1.trainer_mode={TRAINER_MODE} needs actor_rollout_ref.rollout.agent.agent_loop_manager_class"
                f"=visionleaf.verl.errors.CountingAgentLoopManager, got {type(manager).__name__}"
            )
        metrics[ERROR_METRIC] = manager.pop_errors()
        keys = [key for key, tag in zip(batch.keys, batch.tags, strict=True) if not tag.get("is_padding", False)]
        data = tq.kv_batch_get(keys=keys, partition_id=batch.partition_id, select_fields=["extra_fields"])
        metrics.update(leaf_metrics(data.pop("extra_fields").tolist()))
        return result

    def _compute_advantage(self, batch: Any, metrics: dict[str, Any]) -> Any:
        """``algorithm.adv_estimator=visionleaf_tree_grpo``: GRPO plus the subtree-relative term over the
        leaves' node paths (:func:`visionleaf.algo.advantages.tree_grpo_advantages`); else verl's own."""
        if self.config.algorithm.adv_estimator != TREE_GRPO:
            return super()._compute_advantage(batch, metrics)
        if self.config.algorithm.use_kl_in_reward:
            raise ValueError(f"{TREE_GRPO} uses outcome rewards only; set algorithm.use_kl_in_reward=false")
        fields = ["uid", "response_mask", "rm_scores", "extra_fields"]
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)
        response_mask = data["response_mask"]
        mask = response_mask.to_padded_tensor(padding=0)  # [B, L]
        scores = data["rm_scores"].to_padded_tensor(padding=0.0).sum(dim=-1)  # [B]
        extra = data.pop("extra_fields").tolist()
        if any("node_path" not in e for e in extra):
            raise ValueError(
                f"{TREE_GRPO} needs the node paths of actor_rollout_ref.rollout.agent.default_agent_loop="
                "visionleaf_tree"
            )
        advantages = tree_grpo_advantages(
            scores,
            [str(u) for u in data.pop("uid").tolist()],
            [e["node_path"] for e in extra],
            subtree_weight=float(self.config.algorithm.get("tree_subtree_weight", 1.0)),
        )
        advantages = advantages[:, None] * mask  # [B, L]: broadcast to every token, observation tokens 0
        nested = response_to_nested(advantages, response_mask)
        return tq.kv_batch_put(
            keys=batch.keys,
            partition_id=batch.partition_id,
            fields=TensorDict({"advantages": nested, "returns": nested}, batch_size=len(batch)),
        )
