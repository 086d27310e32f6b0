"""Clipped policy-gradient loss on model tokens only (VisionLeaf §3.3, DeepEyes: observation masking).

Tool observations (crops, error texts) are not the policy's actions: with ``response_mask`` 0 they add
nothing to the loss and nothing to its normaliser, so a long crop cannot dilute or distort the update.
"""

from __future__ import annotations

import torch


def clipped_policy_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    clip_dual: float = 3.0,
    num_tokens: float | torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO/GRPO clipped objective (dual-clip for negative advantages), ``token-mean`` over model tokens.

    All tensors are [B, L]. ``response_mask`` is 1 on model tokens (and may be fractional or zero on
    tokens a selection such as VEPO drops). ``num_tokens`` is the normaliser (default: the mask's sum in
    this batch; pass the global count when the batch is split across data-parallel ranks). ``weights``
    [B, L] scale each token's loss (e.g. rollout importance-sampling corrections).
    """
    mask = response_mask.to(log_prob.dtype)  # [B, L]
    log_ratio = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)  # [B, L]
    ratio = torch.exp(log_ratio)  # [B, L]
    unclipped = -advantages * ratio  # [B, L]
    clipped = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)  # [B, L]
    pg = torch.maximum(unclipped, clipped)  # [B, L]
    pg = torch.where(advantages < 0, torch.minimum(pg, -advantages * clip_dual), pg)  # [B, L] dual clip
    if weights is not None:
        pg = pg * weights  # [B, L]
    denominator = mask.sum().clamp(min=1.0) if num_tokens is None else num_tokens
    loss = (pg * mask).sum() / denominator
    with torch.no_grad():
        tokens = mask.sum().clamp(min=1.0)
        metrics = {
            "actor/pg_clipfrac": float(((clipped > unclipped).to(mask.dtype) * mask).sum() / tokens),
            "actor/ppo_kl": float((-log_ratio * mask).sum() / tokens),
            "actor/loss_tokens": float(mask.sum()),
        }
    return loss, metrics
