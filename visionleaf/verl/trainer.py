"""visionleaf's V1 trainer mode (``trainer.v1.trainer_mode=visionleaf_sync``) and its agent-loop manager.

- :class:`CountingAgentLoopManager` (``actor_rollout_ref.rollout.agent.agent_loop_manager_class``) runs
  :class:`CountingAgentLoopWorker`, verl's TransferQueue worker that also counts the sessions whose agent
  loop raised (verl only logs them) and tells every session how many sessions its prompt has (the tree
  agent loop grows one tree with that many leaves, :data:`visionleaf.verl.agent_loop.SESSIONS_PER_PROMPT`);
- :class:`VisionleafTrainer` is verl's ``sync`` trainer plus ``rollout/agent_loop_errors`` and the leaf
  metrics of :func:`visionleaf.verl.metrics.leaf_metrics` in every step, and the leaves' node paths for
  the ``visionleaf_tree_grpo`` advantage estimator (:mod:`visionleaf.verl.algos`), which then runs inside
  verl's own advantage step (KL-in-reward, rollout correction and ``norm_adv_by_std_in_grpo`` apply).
"""

from __future__ import annotations

from typing import Any

import ray
import transfer_queue as tq
from omegaconf import open_dict
from verl.trainer.ppo.v1 import AgentLoopManagerTQ, AgentLoopWorkerTQ, PPOTrainerSync

from visionleaf.verl.agent_loop import SESSIONS_PER_PROMPT
from visionleaf.verl.algos import TREE_GRPO, tree_node_paths
from visionleaf.verl.metrics import ERROR_METRIC, accuracy_by_category, crop_metrics, leaf_metrics
from visionleaf.verl.tree_forward import TreeForwardTrainerMixin
from visionleaf.verl.vepo import VepoTrainerMixin

TRAINER_MODE = "visionleaf_sync"
"""``trainer.v1.trainer_mode`` of :class:`VisionleafTrainer` (registered by the plugin)."""

SCHEDULE = "sync"
"""verl's trainer mode whose schedule :class:`VisionleafTrainer` runs (verl branches on this literal)."""

REPLAY_POLL_INTERVAL_S = 0.2
"""How often the trainer looks for finished rollouts. verl's replay buffer polls every 2 s and no config key
changes it, so a step waited up to 2 s after its last rollout had finished (4.0 s of every ~8 s tiny_cpu step)."""


class CountingAgentLoopWorker(AgentLoopWorkerTQ.__ray_actor_class__):  # type: ignore[name-defined]
    """verl's TransferQueue agent-loop worker that counts failed sessions and publishes each prompt's session count."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.errors = 0

    async def _run_prompt(self, prompt: dict, sampling_params: dict, trajectory: dict, trace: bool = False) -> None:
        # verl's own rule for the session count (AgentLoopWorkerTQ._run_prompt), read before verl pops it;
        # the session tasks verl creates inherit this context
        rollout = self.config.actor_rollout_ref.rollout
        default = rollout.val_kwargs.n if trajectory["validate"] else rollout.n
        SESSIONS_PER_PROMPT.set(int(prompt.get("__rollout_n__", default)))
        await super()._run_prompt(prompt, sampling_params, trajectory=trajectory, trace=trace)

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


class VisionleafTrainer(TreeForwardTrainerMixin, VepoTrainerMixin, PPOTrainerSync):
    """verl's sync V1 trainer, plus :data:`ERROR_METRIC`, the leaf metrics and ``visionleaf_tree_grpo``."""

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        # verl picked this class by its registered name; from here on verl compares the mode with the
        # literal "sync" (replay buffer, gen_batch_size refill, TransferQueue checkpoints), so let it read
        # "sync": the schedule is verl's sync one, unchanged.
        with open_dict(config):
            config.trainer.v1.trainer_mode = SCHEDULE
        super().__init__(config, *args, **kwargs)

    def _build_replay_buffer(self) -> Any:
        buffer = super()._build_replay_buffer()
        buffer.poll_interval = min(buffer.poll_interval, REPLAY_POLL_INTERVAL_S)
        return buffer

    def _compute_metrics(self, batch: Any, metrics: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        result = super()._compute_metrics(batch, metrics, *args, **kwargs)
        manager = self.agent_loop_manager
        if not isinstance(manager, CountingAgentLoopManager):
            raise TypeError(
                f"trainer.v1.trainer_mode={TRAINER_MODE} needs actor_rollout_ref.rollout.agent.agent_loop_manager_class"
                f"=visionleaf.verl.trainer.CountingAgentLoopManager, got {type(manager).__name__}"
            )
        metrics[ERROR_METRIC] = manager.pop_errors()
        keys = [key for key, tag in zip(batch.keys, batch.tags, strict=True) if not tag.get("is_padding", False)]
        data = tq.kv_batch_get(keys=keys, partition_id=batch.partition_id, select_fields=["extra_fields"])
        metrics.update(leaf_metrics(data.pop("extra_fields").tolist()))
        return result

    def _val_metrics_update(
        self, data_sources: Any, sample_uids: Any, reward_extra_infos_dict: Any, *args: Any, **kwargs: Any
    ) -> dict[str, float]:
        """verl's validation metrics (which include every numeric reward field: acc, tool, iou, ...) plus
        accuracy per question category and the crops' grounding over all leaves that cropped."""
        metrics = super()._val_metrics_update(data_sources, sample_uids, reward_extra_infos_dict, *args, **kwargs)
        return {**metrics, **accuracy_by_category(reward_extra_infos_dict), **crop_metrics(reward_extra_infos_dict)}

    def _compute_advantage(self, batch: Any, metrics: dict[str, Any]) -> Any:
        """verl's advantage step; for ``visionleaf_tree_grpo`` with the leaves' node paths in reach of the
        registered estimator (verl passes it rewards, mask and uids only)."""
        if self.config.algorithm.adv_estimator != TREE_GRPO:
            return super()._compute_advantage(batch, metrics)
        # same keys, same order as verl's own fetch inside _compute_advantage
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=["extra_fields"])
        extra = data.pop("extra_fields").tolist()
        if any(not isinstance(e, dict) or "node_path" not in e for e in extra):
            raise ValueError(
                f"algorithm.adv_estimator={TREE_GRPO} needs the node paths of "
                "actor_rollout_ref.rollout.agent.default_agent_loop=visionleaf_tree"
            )
        with tree_node_paths([list(e["node_path"]) for e in extra]):
            return super()._compute_advantage(batch, metrics)
