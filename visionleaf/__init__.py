"""visionleaf: RL post-training for vision-language models that think with images, on verl.

The public API, importable from the top like TRL's::

    from visionleaf import TreeSampler, TreeConfig, HFEngine, SamplingParams, compute_score

Names load on first use (PEP 562): ``import visionleaf`` imports neither torch, transformers nor verl.
Training runs through verl: ``python -m visionleaf.train --config-name tiny_cpu``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from visionleaf.algo.advantages import grpo_advantages, tree_grpo_advantages
    from visionleaf.algo.loss import clipped_policy_loss
    from visionleaf.data.images import load_image
    from visionleaf.data.schema import Item, write_parquet
    from visionleaf.engines.base import Continuation, Engine, EngineError, SamplingParams
    from visionleaf.engines.hf import HFEngine
    from visionleaf.engines.server import ServerConfig, ServerEngine
    from visionleaf.eval.runner import EvalConfig, evaluate
    from visionleaf.reward.score import RewardConfig, compute_score
    from visionleaf.rollout.tree import Leaf, TreeConfig, TreeRecord, TreeSampler
    from visionleaf.tools.base import get_tool, register_tool
    from visionleaf.tools.parse import parse_turn

_EXPORTS = {
    # rollout: the entropy-guided tree sampler and what it returns
    "TreeSampler": "visionleaf.rollout.tree",
    "TreeConfig": "visionleaf.rollout.tree",
    "Leaf": "visionleaf.rollout.tree",
    "TreeRecord": "visionleaf.rollout.tree",
    # engines: the protocol the sampler drives, and its in-process and HTTP implementations
    "Engine": "visionleaf.engines.base",
    "EngineError": "visionleaf.engines.base",
    "SamplingParams": "visionleaf.engines.base",
    "Continuation": "visionleaf.engines.base",
    "HFEngine": "visionleaf.engines.hf",
    "ServerEngine": "visionleaf.engines.server",
    "ServerConfig": "visionleaf.engines.server",
    # reward (verl's custom_reward_function signature)
    "compute_score": "visionleaf.reward.score",
    "RewardConfig": "visionleaf.reward.score",
    # tools and the turn parser
    "parse_turn": "visionleaf.tools.parse",
    "register_tool": "visionleaf.tools.base",
    "get_tool": "visionleaf.tools.base",
    # data
    "Item": "visionleaf.data.schema",
    "load_image": "visionleaf.data.images",
    "write_parquet": "visionleaf.data.schema",
    # advantages and loss (pure torch)
    "grpo_advantages": "visionleaf.algo.advantages",
    "tree_grpo_advantages": "visionleaf.algo.advantages",
    "clipped_policy_loss": "visionleaf.algo.loss",
    # offline evaluation
    "EvalConfig": "visionleaf.eval.runner",
    "evaluate": "visionleaf.eval.runner",
}
"""Public name -> the module that defines it."""

__all__ = [
    "Continuation",
    "Engine",
    "EngineError",
    "EvalConfig",
    "HFEngine",
    "Item",
    "Leaf",
    "RewardConfig",
    "SamplingParams",
    "ServerConfig",
    "ServerEngine",
    "TreeConfig",
    "TreeRecord",
    "TreeSampler",
    "clipped_policy_loss",
    "compute_score",
    "evaluate",
    "get_tool",
    "grpo_advantages",
    "load_image",
    "parse_turn",
    "register_tool",
    "tree_grpo_advantages",
    "write_parquet",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'visionleaf' has no attribute {name!r}; its public names: {', '.join(__all__)}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
