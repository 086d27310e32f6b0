"""visionleaf's verl plugin: everything verl must see in each of its processes, registered on ``import verl``.

verl 0.9.1 imports every ``verl.plugins`` entry point at the end of ``import verl`` (``verl/__init__.py``
calls ``entry_point.load()``, which imports this module and calls nothing), in the driver and in every
Ray worker. Importing this module therefore registers, once per process:

- the ``cpu`` platform in verl's ``PlatformRegistry`` (used only when ``VERL_PLATFORM=cpu``), and, while
  it is selected, the cpu patches of :mod:`visionleaf.verl.cpu`;
- the ``hf`` rollout (:mod:`visionleaf.verl.hf_replica`) as a rollout replica and a rollout adapter;
- the ``sglang`` / ``vllm`` replicas with the entropy probe (:mod:`visionleaf.verl.servers`, GPU only);
- the ``visionleaf_tree`` agent loop (:mod:`visionleaf.verl.agent_loop`) and the ``visionleaf`` policy
  loss (:mod:`visionleaf.verl.algos`);
- the ``visionleaf_sync`` V1 trainer mode, which logs agent-loop failures (:mod:`visionleaf.verl.errors`);
- transformers' video-processor stand-in where torchvision is unusable (:mod:`visionleaf.compat`), so the
  Qwen2.5-VL processor loads in every worker.

verl swallows a plugin's import error (it logs it at DEBUG), so failures are logged at ERROR here first.
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Callable

import verl

SUPPORTED_VERL_VERSION = "0.9.1"
"""The verl release these registrations and patches were written against."""

HF_ROLLOUT = "hf"
"""``actor_rollout_ref.rollout.name`` of visionleaf's HF-engine rollout."""

TREE_AGENT_LOOP = "visionleaf_tree"
"""``rollout.agent.default_agent_loop`` of the tree rollout (:mod:`visionleaf.verl.agent_loop`)."""

TRAINER_MODE = "visionleaf_sync"
"""``trainer.v1.trainer_mode`` of verl's sync trainer plus the agent-loop error metric."""

logger = logging.getLogger(__name__)


def check_verl_version(version: str) -> None:
    """Raise when ``version`` is not the verl release visionleaf's plugin supports."""
    if version != SUPPORTED_VERL_VERSION:
        raise RuntimeError(
            f"visionleaf's verl plugin supports verl=={SUPPORTED_VERL_VERSION}, found verl=={version}; "
            f"install it with `pip install 'verl[verl-core]=={SUPPORTED_VERL_VERSION}'`, or disable the plugin "
            "with VERL_USE_EXTERNAL_PLUGINS=none"
        )


def register() -> None:
    """Register visionleaf's platform, patches, rollout and trainer mode with verl (idempotent)."""
    check_verl_version(verl.__version__)

    from verl.plugin.platform import PlatformRegistry

    from visionleaf.compat import apply_torchvision_shim
    from visionleaf.verl import cpu, device

    apply_torchvision_shim()
    if PlatformRegistry.get(cpu.PLATFORM_NAME) is None:
        PlatformRegistry.register(platform=cpu.PLATFORM_NAME)(cpu.CPUPlatform)
        if device.cpu_platform_selected():
            cpu.apply_patches()

    from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY, register_trainer
    from verl.workers.rollout import base as rollout_base
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    # Loaded on use, like verl's own replicas: a Ray worker that unpickles an HFServer imports
    # hf_replica first, and hf_replica's `import verl` lands here while hf_replica is half-imported.
    RolloutReplicaRegistry.register(HF_ROLLOUT, lambda: importlib.import_module(f"{__package__}.hf_replica").HFReplica)
    # verl keeps its rollout adapters in a module dict with no register function; add ours by path.
    rollout_base._ROLLOUT_REGISTRY[(HF_ROLLOUT, "async")] = f"{__package__}.hf_replica.HFRolloutAdapter"
    # A process whose first verl import came from visionleaf.verl.errors (an agent-loop worker being
    # unpickled) is half-way through importing it and runs no trainer: nothing to register there.
    # verl's sglang / vllm replicas, with the entropy probe (top logprobs); built on use (GPU only).
    RolloutReplicaRegistry.register("sglang", _lazy_replica("sglang_replica_class"))
    RolloutReplicaRegistry.register("vllm", _lazy_replica("vllm_replica_class"))
    # The tree agent loop (instantiated by path in the agent-loop workers) and the masked policy loss.
    from verl.experimental.agent_loop.agent_loop import _agent_loop_registry

    _agent_loop_registry[TREE_AGENT_LOOP] = {"_target_": f"{__package__}.agent_loop.TreeAgentLoop"}
    from visionleaf.verl import algos

    algos.register()
    if f"{__package__}.errors" not in sys.modules and TRAINER_MODE not in TRAINER_REGISTRY:
        from visionleaf.verl import errors

        register_trainer(TRAINER_MODE)(errors.ErrorCountingTrainer)


def _lazy_replica(factory: str) -> Callable[[], type]:
    """A replica-class loader that imports :mod:`visionleaf.verl.servers` (and sglang / vllm) on use."""

    def load() -> type:
        return getattr(importlib.import_module(f"{__package__}.servers"), factory)()

    return load


try:
    register()
except Exception:
    logger.exception("visionleaf's verl plugin failed to register; verl runs without visionleaf's additions")
    raise
