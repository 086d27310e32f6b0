"""visionleaf's loss in verl's policy-loss registry (``actor.policy_loss.loss_mode=visionleaf``).

The math is :func:`visionleaf.algo.loss.clipped_policy_loss`; this adapter reads verl's actor config
(clip ratios, dual clip) and its global batch info (token count across data-parallel ranks), so that
verl's actor and any other pipeline share one loss.
"""

from __future__ import annotations

from typing import Any

import torch

from visionleaf.algo.loss import clipped_policy_loss

POLICY_LOSS_NAME = "visionleaf"


def visionleaf_policy_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl ``PolicyLossFn``: clipped objective, token-mean over model tokens ([B, L] tensors)."""
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
    """Add the loss to verl's registry (called by the plugin in every process; idempotent)."""
    from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY, register_policy_loss

    if POLICY_LOSS_NAME not in POLICY_LOSS_REGISTRY:
        register_policy_loss(POLICY_LOSS_NAME)(visionleaf_policy_loss)
