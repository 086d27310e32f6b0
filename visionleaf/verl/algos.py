"""visionleaf's loss and advantage estimator in verl's registries.

- ``actor.policy_loss.loss_mode=visionleaf``: :func:`visionleaf.algo.loss.clipped_policy_loss`, reading
  verl's actor config (clip ratios, dual clip) and its global batch info (token count across data-parallel
  ranks), so that verl's actor and any other pipeline share one loss;
- ``algorithm.adv_estimator=visionleaf_tree_grpo``: :func:`visionleaf.algo.advantages.tree_grpo_advantages`
  as a verl advantage estimator, so verl's own advantage step runs around it (KL-in-reward, rollout
  correction, ``algorithm.norm_adv_by_std_in_grpo``). verl hands an estimator rewards, mask and uids only;
  the leaves' node paths come through :func:`tree_node_paths`, which the ``visionleaf_sync`` trainer sets.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import numpy as np
import torch

from visionleaf.algo.advantages import tree_grpo_advantages
from visionleaf.algo.loss import clipped_policy_loss

POLICY_LOSS_NAME = "visionleaf"

TREE_GRPO = "visionleaf_tree_grpo"
"""``algorithm.adv_estimator`` of the tree-aware estimator (needs ``trainer.v1.trainer_mode=visionleaf_sync``)."""

_NODE_PATHS: ContextVar[list[list[int]] | None] = ContextVar("visionleaf_node_paths", default=None)


@contextmanager
def tree_node_paths(paths: Sequence[Sequence[int]]) -> Iterator[None]:
    """Make ``paths`` (one per batch row, in verl's row order) visible to :func:`tree_grpo_estimator`."""
    token = _NODE_PATHS.set([list(p) for p in paths])
    try:
        yield
    finally:
        _NODE_PATHS.reset(token)


def tree_grpo_estimator(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray,
    config: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl advantage estimator: tree_grpo over outcome rewards ([B, L] in, advantages = returns [B, L]).

    ``config`` is verl's ``algorithm`` config: ``norm_adv_by_std_in_grpo`` (default True) and
    ``tree_subtree_weight`` (default 1.0) are read from it.
    """
    paths = _NODE_PATHS.get()
    if paths is None:
        raise ValueError(
            f"algorithm.adv_estimator={TREE_GRPO} needs the leaves' node paths, which only "
            "trainer.v1.trainer_mode=visionleaf_sync provides; set it (and the visionleaf_tree agent loop)"
        )
    if len(paths) != len(index):
        raise ValueError(f"{TREE_GRPO}: {len(paths)} node paths for a batch of {len(index)} rows")
    get = config.get if config is not None else {}.get
    scores = token_level_rewards.sum(dim=-1)  # [B]
    advantages = tree_grpo_advantages(
        scores,
        [str(uid) for uid in index],
        paths,
        subtree_weight=float(get("tree_subtree_weight", 1.0)),
        scale_by_std=bool(get("norm_adv_by_std_in_grpo", True)),
    )
    advantages = advantages[:, None] * response_mask  # [B, L]: every model token, observation tokens 0
    return advantages, advantages


def visionleaf_policy_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl ``PolicyLossFn``: clipped objective, token-mean over model tokens ([B, L] tensors).

    With ``visionleaf.vepo.mode`` on, verl hands over VEPO's selected tokens as ``response_mask`` and counts
    only them in ``global_batch_info["batch_num_tokens"]`` (:mod:`visionleaf.verl.vepo`): the loss then
    accumulates and normalises over the selected tokens.
    """
    if loss_agg_mode != "token-mean":
        raise ValueError(
            f"the visionleaf policy loss averages over model tokens; set actor.loss_agg_mode=token-mean "
            f"(got {loss_agg_mode!r})"
        )
    if config is None:
        raise ValueError("the visionleaf policy loss needs the actor config (clip ratios)")
    clip = config.clip_ratio
    low = config.clip_ratio_low if config.clip_ratio_low is not None else clip
    high = config.clip_ratio_high if config.clip_ratio_high is not None else clip
    batch = dict(getattr(config, "global_batch_info", None) or {})
    dp_size = int(batch.get("dp_size") or 1)
    num_tokens = batch.get("batch_num_tokens")
    loss, metrics = clipped_policy_loss(
        log_prob,
        old_log_prob,
        advantages,
        response_mask,
        clip_low=low,
        clip_high=high,
        clip_dual=config.get("clip_ratio_c", 3.0),
        num_tokens=num_tokens,
        weights=rollout_is_weights,
    )
    # verl averages gradients over data-parallel ranks; the global token mean needs the dp factor back
    return (loss * dp_size if num_tokens is not None else loss), metrics


def register() -> None:
    """Add the loss and the estimator to verl's registries (called by the plugin in every process; idempotent)."""
    from verl.trainer.ppo.core_algos import (
        ADV_ESTIMATOR_REGISTRY,
        POLICY_LOSS_REGISTRY,
        register_adv_est,
        register_policy_loss,
    )

    if POLICY_LOSS_NAME not in POLICY_LOSS_REGISTRY:
        register_policy_loss(POLICY_LOSS_NAME)(visionleaf_policy_loss)
    if TREE_GRPO not in ADV_ESTIMATOR_REGISTRY:
        register_adv_est(TREE_GRPO)(tree_grpo_estimator)
