"""visionleaf's verl plugin: everything verl must see in each of its processes, registered on ``import verl``.

verl 0.9.1 imports every ``verl.plugins`` entry point at the end of ``import verl`` (``verl/__init__.py``
calls ``entry_point.load()``, which imports this module and calls nothing), in the driver and in every
Ray worker. Importing this module therefore registers, once per process:

- the ``cpu`` platform in verl's ``PlatformRegistry`` (used only when ``VERL_PLATFORM=cpu``), and, while
  it is selected, the cpu patches of :mod:`visionleaf.verl.cpu`;
- the ``hf`` rollout (:mod:`visionleaf.verl.hf_replica`) as a rollout replica and a rollout adapter;
- the ``visionleaf_vllm`` / ``visionleaf_sglang`` rollouts: verl's vLLM / SGLang servers with the entropy
  probe (:mod:`visionleaf.verl.servers`, GPU only); verl's own ``vllm`` / ``sglang`` stay unchanged;
- the ``visionleaf_tree`` agent loop (:mod:`visionleaf.verl.agent_loop`), the ``visionleaf`` policy
  loss and the ``visionleaf_tree_grpo`` advantage estimator (:mod:`visionleaf.verl.algos`);
- the ``visionleaf_sync`` V1 trainer mode (:mod:`visionleaf.verl.trainer`);
- VEPO's FSDP engine (:mod:`visionleaf.verl.vepo`) under verl's FSDP language-model engine key: it runs
  the counterfactual forward only on calls the ``visionleaf_sync`` trainer flags (``visionleaf.vepo.mode``
  not ``off``) and is verl's engine otherwise;
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
"""``trainer.v1.trainer_mode`` of :class:`visionleaf.verl.trainer.VisionleafTrainer` (verl's sync trainer + metrics)."""

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
    from visionleaf.verl import cpu, device, servers

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
    # verl's vLLM / SGLang rollouts with the entropy probe, under their own names: verl's `vllm` / `sglang`
    # stay verl's own. Replicas are built on use (GPU only); the trainer-side adapters are verl's.
    for name, base in servers.BASE_ROLLOUT.items():
        RolloutReplicaRegistry.register(name, _lazy_replica(f"{base}_replica_class"))
        rollout_base._ROLLOUT_REGISTRY[(name, "async")] = rollout_base._ROLLOUT_REGISTRY[(base, "async")]
    # The tree agent loop (instantiated by path in the agent-loop workers), the loss and the estimator.
    from verl.experimental.agent_loop.agent_loop import _agent_loop_registry

    _agent_loop_registry[TREE_AGENT_LOOP] = {"_target_": f"{__package__}.agent_loop.TreeAgentLoop"}
    from visionleaf.verl import algos

    algos.register()
    # VEPO's engine as verl's FSDP language-model engine; a process whose first verl import came from
    # visionleaf.verl.vepo is half-way through importing it and builds no engine (unit tests, benchmarks).
    if f"{__package__}.vepo" not in sys.modules:
        from visionleaf.verl import vepo

        vepo.register_engine()
    # A process whose first verl import came from visionleaf.verl.trainer (an agent-loop worker being
    # unpickled) is half-way through importing it and runs no trainer: nothing to register there.
    if f"{__package__}.trainer" not in sys.modules and TRAINER_MODE not in TRAINER_REGISTRY:
        from visionleaf.verl import trainer

        register_trainer(TRAINER_MODE)(trainer.VisionleafTrainer)


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
