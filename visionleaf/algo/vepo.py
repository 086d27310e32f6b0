"""VEPO token selection: train only the tokens that are both uncertain and vision-anchored (VEPO §3).

Every model token t of a response gets

    s_t = H_t^(1 - alpha) * JSD_t^alpha

where ``H_t`` is the entropy of the next-token distribution with the real images and ``JSD_t`` the
Jensen-Shannon divergence between the next-token distributions with the real and with perturbed images,
each min-max normalised within the response over model tokens (``response_mask == 1``; observation
tokens never score). The top ``ceil(k * model tokens)`` tokens of each response (at least one) keep
their policy loss. ``entropy`` mode is alpha = 0, ``vision`` mode alpha = 1; ``vppo`` ranks by VPPO's
sampled-token k3 divergence alone (no full distributions).

Pure torch: no verl. Full-vocabulary quantities are computed in chunks over the sequence, so at most
``chunk x V`` values of each distribution exist at once (V = 152064 for Qwen2.5).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

MODES = ("off", "vepo", "entropy", "vision", "vppo")
"""``visionleaf.vepo.mode`` values: off, VEPO, and the ablations (entropy only, JSD only, VPPO's k3)."""

PERTURBATIONS = ("patch_blackening", "gaussian")
"""``visionleaf.vepo.perturbation`` values."""


@dataclass(frozen=True)
class VepoConfig:
    """``visionleaf.vepo`` settings; errors name the key to set."""

    mode: str = "off"
    """off | vepo | entropy (alpha 0) | vision (alpha 1) | vppo (VPPO's sampled-token k3 divergence)."""
    alpha: float = 0.7
    """Weight of the visual term in ``s_t = H^(1-alpha) * JSD^alpha`` (mode vepo; the paper's 0.7)."""
    k: float = 0.2
    """Share of each response's model tokens that keep their loss, in (0, 1]."""
    perturbation: str = "patch_blackening"
    """patch_blackening (each vision patch black with probability ``patch_p``) | gaussian (noise ``sigma``)."""
    patch_p: float = 0.5
    """Probability that a patch is blackened (VPPO's default 0.5)."""
    sigma: float = 0.3
    """Standard deviation of the gaussian pixel noise, pixels in [0, 1]."""
    chunk: int = 1024
    """Sequence positions per chunk of the full-vocabulary JSD / entropy."""
    seed: int = 0
    """Base seed of the per-sample perturbations (mixed with the step and the sample's key)."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"visionleaf.vepo.mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(
                f"visionleaf.vepo.alpha must be in [0, 1] (0 = entropy only, 1 = JSD only; the paper uses 0.7), "
                f"got {self.alpha}"
            )
        if not 0.0 < self.k <= 1.0:
            raise ValueError(
                f"visionleaf.vepo.k is the share of model tokens trained and must be in (0, 1] (the paper uses 0.2); "
                f"got {self.k}. Set visionleaf.vepo.mode=off to train every token"
            )
        if self.perturbation not in PERTURBATIONS:
            raise ValueError(
                f"visionleaf.vepo.perturbation must be one of {', '.join(PERTURBATIONS)}; got {self.perturbation!r}"
            )
        if not 0.0 < self.patch_p <= 1.0:
            raise ValueError(f"visionleaf.vepo.patch_p must be in (0, 1], got {self.patch_p}")
        if self.sigma <= 0.0:
            raise ValueError(f"visionleaf.vepo.sigma must be > 0, got {self.sigma}")
        if self.chunk < 1:
            raise ValueError(f"visionleaf.vepo.chunk must be >= 1 sequence position, got {self.chunk}")

    @property
    def score_alpha(self) -> float:
        """The alpha the mode scores with: the config's in ``vepo``, 0 in ``entropy``, 1 otherwise."""
        return {"vepo": self.alpha, "entropy": 0.0}.get(self.mode, 1.0)

    @property
    def divergence(self) -> str:
        """Visual signal the counterfactual forward returns: ``jsd`` (full distributions) or ``k3``."""
        return "k3" if self.mode == "vppo" else "jsd"


def token_entropy(logits: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Entropy (nats) of softmax(logits) per position; [T, V] -> [T] float32, ``chunk`` rows at a time."""
    out = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    for start in range(0, logits.shape[0], chunk):
        log_p = torch.log_softmax(logits[start : start + chunk].float(), dim=-1)  # [c, V]
        out[start : start + chunk] = -log_p.exp().mul_(log_p).sum(dim=-1)  # [c]
    return out


def token_jsd(
    p_logits: torch.Tensor, q_logits: torch.Tensor, chunk: int = 1024, temperature: torch.Tensor | None = None
) -> torch.Tensor:
    """Jensen-Shannon divergence (nats, in [0, ln 2]) between softmax(p / t) and softmax(q / t) per position.

    [T, V], [T, V] (and ``temperature`` [T], default 1) -> [T] float32. ``JSD = (KL(P||M) + KL(Q||M)) / 2``
    with ``M = (P + Q) / 2``, computed ``chunk`` positions at a time in float32: at most four ``chunk x V``
    float32 buffers exist at once, whatever T.
    """
    if p_logits.shape != q_logits.shape:
        raise ValueError(f"JSD needs logits of one shape, got {tuple(p_logits.shape)} and {tuple(q_logits.shape)}")
    out = torch.empty(p_logits.shape[0], dtype=torch.float32, device=p_logits.device)
    for start in range(0, p_logits.shape[0], chunk):
        log_p = torch.log_softmax(_scaled(p_logits, temperature, start, chunk), dim=-1)  # [c, V]
        log_q = torch.log_softmax(_scaled(q_logits, temperature, start, chunk), dim=-1)  # [c, V]
        log_m = torch.logaddexp(log_p, log_q).sub_(math.log(2.0))  # [c, V]
        # in place from here on: four [c, V] buffers at most
        diff = torch.sub(log_p, log_m)  # [c, V]
        kl_p = log_p.exp_().mul_(diff).sum(dim=-1)  # [c]
        torch.sub(log_q, log_m, out=diff)  # [c, V], before log_q turns into q
        kl_q = log_q.exp_().mul_(diff).sum(dim=-1)  # [c]
        out[start : start + chunk] = (0.5 * (kl_p + kl_q)).clamp(min=0.0)  # [c]; rounding can dip below 0
    return out


def _scaled(logits: torch.Tensor, temperature: torch.Tensor | None, start: int, chunk: int) -> torch.Tensor:
    """Rows ``start : start + chunk`` of ``logits`` / temperature, in float32; [c, V]."""
    rows = logits[start : start + chunk]  # [c, V]
    if temperature is None:
        return rows.float()  # log_softmax writes a new tensor: the input is never modified
    return torch.div(rows, temperature[start : start + chunk, None].to(torch.float32).clamp(min=1e-8))  # [c, V]


def sampled_token_k3(log_prob: torch.Tensor, perturbed_log_prob: torch.Tensor) -> torch.Tensor:
    """VPPO's visual dependency of the sampled token: k3 of the log-ratio, clamped as VPPO does.

    ``d = clamp(perturbed - real, -20, 20)``, ``k3 = exp(d) - d - 1`` clamped to [0, 10]; any shape.
    """
    d = torch.clamp(perturbed_log_prob - log_prob, min=-20.0, max=20.0)
    return torch.clamp(torch.exp(d) - d - 1.0, min=0.0, max=10.0)


def minmax_normalize(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each row over its ``mask == 1`` positions; [B, L] -> [B, L] float32 in [0, 1].

    Positions outside the mask are 0. A row whose masked values are all equal gets 1 there: a signal
    with no spread cannot rank tokens, and 1 leaves the other factor of the score to decide.
    """
    keep = mask.bool()
    x = values.float()
    low = torch.where(keep, x, torch.inf).amin(dim=-1, keepdim=True)  # [B, 1]
    high = torch.where(keep, x, -torch.inf).amax(dim=-1, keepdim=True)  # [B, 1]
    spread = high - low  # [B, 1]
    flat = ~(spread > 0)  # [B, 1]: constant rows (and rows without model tokens)
    normalized = torch.where(flat, torch.ones_like(x), (x - low) / torch.where(flat, 1.0, spread))  # [B, L]
    return torch.where(keep, normalized, 0.0)


def vepo_scores(entropy: torch.Tensor, divergence: torch.Tensor, mask: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s_t = H_t^(1-alpha) * D_t^alpha`` on min-max normalised [B, L] inputs; -1 outside the mask.

    alpha 0 ranks by entropy alone and alpha 1 by the divergence alone (``x^0 = 1``, including ``0^0``).
    """
    h = minmax_normalize(entropy, mask)  # [B, L]
    d = minmax_normalize(divergence, mask)  # [B, L]
    scores = h.pow(1.0 - alpha) * d.pow(alpha)  # [B, L]
    return torch.where(mask.bool(), scores, -1.0)


def top_k_count(model_tokens: int, k: float) -> int:
    """Tokens kept of a response with ``model_tokens`` model tokens: ``ceil(k * n)``, at least 1 (0 if n = 0)."""
    if model_tokens <= 0:
        return 0
    return max(1, math.ceil(round(k * model_tokens, 9)))  # round: 0.7 * 10 is 7.000000000000001 in floats


def select_top_k(scores: torch.Tensor, mask: torch.Tensor, k: float) -> torch.Tensor:
    """Per row, the ``top_k_count`` highest-scoring positions with ``mask == 1``; [B, L] -> bool [B, L].

    Ties go to the earlier position (a stable sort), so a selection is reproducible.
    """
    keep = mask.bool()
    ranked = torch.where(keep, scores.float(), -torch.inf)  # [B, L]
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices  # [B, L]
    selected = torch.zeros_like(keep)
    for row, n in enumerate(keep.sum(dim=-1).tolist()):
        selected[row, order[row, : top_k_count(int(n), k)]] = True
    return selected


@dataclass(frozen=True)
class Selection:
    """Selected tokens of a batch and the diagnostics logged with them."""

    mask: torch.Tensor
    """[B, L] bool: the model tokens whose policy loss is kept."""
    metrics: dict[str, float]
    """``vepo/*`` metrics of the step."""


def select_tokens(entropy: torch.Tensor, divergence: torch.Tensor, mask: torch.Tensor, config: VepoConfig) -> Selection:
    """Select the tokens to train for ``config.mode`` and compute the step's diagnostics ([B, L] inputs).

    ``divergence`` is the per-token JSD (modes vepo / entropy / vision) or k3 (mode vppo).
    ``vepo/top_jsd_missed_by_top_entropy`` is the paper's Fig. 2b diagnostic: of the top-k tokens by the
    divergence, the share that top-k by entropy would not select; ``vepo/vision_token_share`` is the share
    of selected tokens that top-k by entropy would not select.
    """
    keep = mask.bool()
    selected = select_top_k(vepo_scores(entropy, divergence, keep, config.score_alpha), keep, config.k)  # [B, L]
    top_entropy = select_top_k(entropy, keep, config.k)  # [B, L]
    top_divergence = select_top_k(divergence, keep, config.k)  # [B, L]
    tokens = keep.sum().clamp(min=1).item()
    name = "jsd" if config.divergence == "jsd" else "k3"
    metrics = {
        "vepo/selected_frac": selected.sum().item() / tokens,
        f"vepo/{name}_mean": (divergence.float() * keep).sum().item() / tokens,
        "vepo/entropy_mean": (entropy.float() * keep).sum().item() / tokens,
        f"vepo/top_{name}_missed_by_top_entropy": _share_outside(top_divergence, top_entropy),
        "vepo/vision_token_share": _share_outside(selected, top_entropy),
    }
    return Selection(mask=selected, metrics=metrics)


def _share_outside(chosen: torch.Tensor, reference: torch.Tensor) -> float:
    """Share of ``chosen`` positions that ``reference`` does not hold (0 when nothing is chosen)."""
    total = chosen.sum().item()
    return (chosen & ~reference).sum().item() / total if total else 0.0


def blackened_patch_values(mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Normalised value of a black pixel per channel, ``(0 - mean) / std``; [C]."""
    return -torch.tensor(mean, dtype=torch.float32) / torch.tensor(std, dtype=torch.float32)


def perturb_patches(
    pixel_values: torch.Tensor,
    config: VepoConfig,
    generator: torch.Generator,
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """Perturb one sample's images in the vision encoder's patch layout (Qwen2-VL / Qwen2.5-VL processors).

    ``pixel_values`` [N, C * F] holds N patches of all the sample's images (global view and crops), each a
    normalised ``[C, F]`` block (F = temporal x patch x patch pixels; a patch is 14 px on Qwen2.5-VL).
    ``patch_blackening`` sets each patch black with probability ``config.patch_p``; ``gaussian`` adds
    N(0, sigma^2) noise to every pixel in [0, 1] space and clips to [0, 1]. Returns a new [N, C * F] tensor.
    """
    channels = len(mean)
    patches = pixel_values.float().reshape(pixel_values.shape[0], channels, -1)  # [N, C, F]
    mean_c = torch.tensor(mean, dtype=torch.float32, device=patches.device)[None, :, None]  # [1, C, 1]
    std_c = torch.tensor(std, dtype=torch.float32, device=patches.device)[None, :, None]  # [1, C, 1]
    if config.perturbation == "patch_blackening":
        hit = torch.rand(patches.shape[0], generator=generator) < config.patch_p  # [N]
        black = blackened_patch_values(mean, std).to(patches.device)[None, :, None]  # [1, C, 1]
        out = torch.where(hit.to(patches.device)[:, None, None], black, patches)  # [N, C, F]
    else:
        noise = torch.randn(patches.shape, generator=generator).to(patches.device) * config.sigma  # [N, C, F]
        pixels = (patches * std_c + mean_c + noise).clamp(0.0, 1.0)  # [N, C, F] in [0, 1]
        out = (pixels - mean_c) / std_c  # [N, C, F]
    return out.reshape(pixel_values.shape).to(pixel_values.dtype)


def sample_seed(base: int, step: int, key: str) -> int:
    """Seed of one sample's perturbation: stable across processes, different per step and sample."""
    return zlib.crc32(f"{base}:{step}:{key}".encode()) & 0x7FFFFFFF
