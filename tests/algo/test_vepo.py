"""VEPO's pure core against direct float64 references, and its selection rules."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from visionleaf.algo import vepo
from visionleaf.algo.vepo import VepoConfig

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _softmax64(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _jsd64(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    p, q = _softmax64(p_logits), _softmax64(q_logits)
    m = 0.5 * (p + q)
    return 0.5 * (p * np.log(p / m)).sum(-1) + 0.5 * (q * np.log(q / m)).sum(-1)


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])  # 7 does not divide 10: the last chunk is short
def test_jsd_and_entropy_match_float64_reference_across_chunk_boundaries(chunk):
    rng = np.random.default_rng(0)
    p, q = rng.normal(size=(10, 50)) * 3, rng.normal(size=(10, 50)) * 3
    p[2] = q[2]  # identical distributions: JSD 0
    q[5] = p[5] + 4.0  # a shift of all logits: the same distribution
    jsd = vepo.token_jsd(torch.tensor(p, dtype=torch.float32), torch.tensor(q, dtype=torch.float32), chunk=chunk)
    np.testing.assert_allclose(jsd.numpy(), _jsd64(p, q), atol=2e-6)
    assert jsd[2] == pytest.approx(0.0, abs=1e-6) and jsd[5] == pytest.approx(0.0, abs=1e-6)
    assert (jsd <= math.log(2) + 1e-6).all()
    probs = _softmax64(p)
    entropy = vepo.token_entropy(torch.tensor(p, dtype=torch.float32), chunk=chunk)
    np.testing.assert_allclose(entropy.numpy(), -(probs * np.log(probs)).sum(-1), atol=2e-5)


def test_jsd_of_disjoint_point_masses_is_ln2_and_bf16_inputs_work():
    p = torch.full((1, 4), -1e4)
    q = p.clone()
    p[0, 0], q[0, 3] = 1e4, 1e4
    assert vepo.token_jsd(p.bfloat16(), q.bfloat16())[0].item() == pytest.approx(math.log(2), abs=1e-5)


_PEAK_SCRIPT = """
import sys, torch
from visionleaf.algo import vepo


def status(field):  # kB of /proc/self/status's field: this process's memory, not inherited from a parent
    with open("/proc/self/status") as lines:
        return next(int(line.split()[1]) for line in lines if line.startswith(field + ":")) * 1024


t, v, chunk = 2048, 8192, int(sys.argv[1])
torch.manual_seed(0)
p, q = torch.empty(t, v, dtype=torch.bfloat16), torch.empty(t, v, dtype=torch.bfloat16)
for start in range(0, t, 64):  # filled in slices: no large temporary
    p[start : start + 64].normal_()
    q[start : start + 64].normal_()
vepo.token_jsd(p[:2], q[:2], chunk=1)  # warm-up: kernels and thread pools exist before the baseline
with open("/proc/self/clear_refs", "w") as refs:
    refs.write("5")  # reset the peak (VmHWM) to the current resident size
before = status("VmRSS")
vepo.token_jsd(p, q, chunk=chunk)
print(status("VmHWM") - before)
"""


def _peak_growth(chunk: int) -> int:
    """Bytes the process's peak RSS grows by while computing the JSD of a bf16 [2048, 8192] pair."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(chunk)], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    return int(result.stdout.split()[-1])


def test_jsd_memory_stays_within_the_chunk():
    # T * V = 16M: one float32 [T, V] buffer is 64 MB; a 16-position chunk is 0.5 MB per buffer
    chunk_bytes = 16 * 8192 * 4
    chunked = _peak_growth(16)
    # a few chunk buffers plus allocator slack (3.5 MB measured), far below one [T, V] buffer (64 MB)
    assert chunked < 48 * chunk_bytes, f"peak grew {chunked / 2**20:.1f} MB with 0.5 MB chunks"
    # the same measurement sees a full-sequence computation (chunk = T): four [T, V] float32 buffers
    full = 2048 * 8192 * 4
    assert full < _peak_growth(2048) < 5 * full


def test_k3_is_vppos_clamped_divergence():
    real = torch.tensor([0.0, -1.0, -30.0, -1.0])
    aug = torch.tensor([0.0, -2.0, 0.0, -1.5])
    d = np.clip(aug.numpy() - real.numpy(), -20, 20)
    expected = np.clip(np.exp(d) - d - 1, 0, 10)
    np.testing.assert_allclose(vepo.sampled_token_k3(real, aug).numpy(), expected, rtol=1e-6)
    assert vepo.sampled_token_k3(real, aug)[2] == 10.0  # a huge ratio is clamped


def test_minmax_normalisation_uses_model_tokens_only():
    values = torch.tensor([[5.0, 1.0, 100.0, 3.0], [2.0, 2.0, 9.0, 0.0]])
    mask = torch.tensor([[1, 1, 0, 1], [1, 1, 0, 0]])  # 100 and 9 sit on observation tokens
    out = vepo.minmax_normalize(values, mask)
    assert out[0].tolist() == pytest.approx([1.0, 0.0, 0.0, 0.5])
    assert out[1].tolist() == [1.0, 1.0, 0.0, 0.0]  # a constant row does not veto the other factor


def test_score_formula_by_hand():
    entropy = torch.tensor([[0.0, 1.0, 2.0, 4.0]])
    jsd = torch.tensor([[0.4, 0.0, 0.2, 0.1]])
    mask = torch.tensor([[1, 1, 1, 0]])
    scores = vepo.vepo_scores(entropy, jsd, mask, alpha=0.7)
    h, d = np.array([0.0, 0.5, 1.0]), np.array([1.0, 0.0, 0.5])
    np.testing.assert_allclose(scores[0, :3].numpy(), h**0.3 * d**0.7, atol=1e-6)
    assert scores[0, 3] == -1.0


@pytest.mark.parametrize(
    ("n", "k", "kept"),
    [
        (10, 0.2, 2),
        (10, 0.7, 7),  # 0.7 * 10 is 7.000000000000001 in floats: still 7
        (11, 0.2, 3),  # ceil(2.2)
        (3, 0.2, 1),  # fewer model tokens than 1/k: at least one
        (1, 0.01, 1),
        (5, 1.0, 5),
        (0, 0.2, 0),
    ],
)
def test_top_k_count(n, k, kept):
    assert vepo.top_k_count(n, k) == kept


def test_selection_per_response_with_deterministic_ties():
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.5, 0.1, 7.0], [0.2, 0.2, 0.2, 0.2, 0.2, 0.2]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]])
    selected = vepo.select_top_k(scores, mask, k=0.4)  # ceil(0.4 * 5) = 2 per row
    assert selected[0].tolist() == [True, True, False, False, False, False]  # 7.0 is an observation token
    assert selected[1].tolist() == [False, True, True, False, False, False]  # ties: earliest model tokens


def _fixed_batch():
    g = torch.Generator().manual_seed(3)
    entropy = torch.rand(4, 30, generator=g)
    jsd = torch.rand(4, 30, generator=g)
    mask = torch.ones(4, 30, dtype=torch.long)
    mask[0, 10:15] = 0  # a tool observation
    mask[1, 25:] = 0
    mask[3, 2:] = 0  # a response with 2 model tokens
    return entropy, jsd, mask


def _top_k_by_hand(values, mask, k):
    out = torch.zeros_like(mask, dtype=torch.bool)
    for row in range(values.shape[0]):
        positions = [i for i in range(values.shape[1]) if mask[row, i]]
        best = sorted(positions, key=lambda i: (-values[row, i].item(), i))[: vepo.top_k_count(len(positions), k)]
        out[row, best] = True
    return out


@pytest.mark.parametrize(("mode", "signal"), [("entropy", 0), ("vision", 1), ("vppo", 1)])
def test_ablation_modes_select_exactly_top_k_of_their_signal(mode, signal):
    entropy, jsd, mask = _fixed_batch()
    selection = vepo.select_tokens(entropy, jsd, mask, VepoConfig(mode=mode, k=0.2))
    assert torch.equal(selection.mask, _top_k_by_hand((entropy, jsd)[signal], mask, 0.2))


def test_vepo_mode_metrics_and_never_selects_observation_tokens():
    entropy, jsd, mask = _fixed_batch()
    selection = vepo.select_tokens(entropy, jsd, mask, VepoConfig(mode="vepo", alpha=0.7, k=0.2))
    assert not (selection.mask & ~mask.bool()).any()
    per_row = [vepo.top_k_count(int(n), 0.2) for n in mask.sum(-1)]
    assert selection.mask.sum(-1).tolist() == per_row
    metrics = selection.metrics
    assert metrics["vepo/selected_frac"] == pytest.approx(sum(per_row) / mask.sum().item())
    assert metrics["vepo/jsd_mean"] == pytest.approx(jsd[mask.bool()].mean().item(), rel=1e-5)
    assert metrics["vepo/entropy_mean"] == pytest.approx(entropy[mask.bool()].mean().item(), rel=1e-5)
    top_h, top_j = _top_k_by_hand(entropy, mask, 0.2), _top_k_by_hand(jsd, mask, 0.2)
    missed = (top_j & ~top_h).sum().item() / top_j.sum().item()
    assert metrics["vepo/top_jsd_missed_by_top_entropy"] == pytest.approx(missed)
    assert 0 < missed < 1  # independent random signals: top-entropy misses some top-JSD tokens
    assert metrics["vepo/vision_token_share"] == pytest.approx(
        (selection.mask & ~top_h).sum().item() / selection.mask.sum().item()
    )


def test_low_entropy_vision_token_is_selected_by_vepo_not_by_entropy():
    # the paper's motivating case: a confident token whose distribution moves when the image is hidden
    entropy = torch.tensor([[0.9, 0.8, 0.25, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]])
    jsd = torch.tensor([[0.01, 0.02, 0.60, 0.01, 0.01, 0.01, 0.02, 0.01, 0.01, 0.01]])
    mask = torch.ones(1, 10)
    by_entropy = vepo.select_tokens(entropy, jsd, mask, VepoConfig(mode="entropy", k=0.2)).mask
    by_vepo = vepo.select_tokens(entropy, jsd, mask, VepoConfig(mode="vepo", alpha=0.7, k=0.2)).mask
    assert not by_entropy[0, 2] and by_vepo[0, 2]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("alpha", 1.5, r"visionleaf.vepo.alpha must be in \[0, 1\]"),
        ("alpha", -0.1, r"visionleaf.vepo.alpha"),
        ("k", 0.0, r"visionleaf.vepo.k .* \(0, 1\].*mode=off"),
        ("k", 1.2, r"visionleaf.vepo.k"),
        ("mode", "topk", r"visionleaf.vepo.mode must be one of off, vepo"),
        ("perturbation", "blur", r"visionleaf.vepo.perturbation"),
        ("chunk", 0, r"visionleaf.vepo.chunk"),
    ],
)
def test_config_errors_say_what_to_set(field, value, message):
    with pytest.raises(ValueError, match=message):
        VepoConfig(**{"mode": "vepo", field: value})


def test_mode_alphas():
    assert VepoConfig(mode="vepo", alpha=0.3).score_alpha == 0.3
    assert VepoConfig(mode="entropy", alpha=0.3).score_alpha == 0.0
    assert VepoConfig(mode="vision").score_alpha == 1.0
    assert VepoConfig(mode="vppo").divergence == "k3" and VepoConfig(mode="vepo").divergence == "jsd"


def _patches(n=200, frames=2, size=14, seed=0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(n, 3, frames * size * size, generator=g)  # [N, C, F] in [0, 1]
    mean, std = torch.tensor(CLIP_MEAN)[None, :, None], torch.tensor(CLIP_STD)[None, :, None]
    return ((pixels - mean) / std).reshape(n, -1), pixels


def test_patch_blackening_blackens_whole_patches_with_probability_p():
    normalised, _ = _patches()
    config = VepoConfig(mode="vepo", perturbation="patch_blackening", patch_p=0.5)
    out = vepo.perturb_patches(normalised, config, torch.Generator().manual_seed(1), CLIP_MEAN, CLIP_STD)
    pixels = (out.reshape(200, 3, -1) * torch.tensor(CLIP_STD)[None, :, None]) + torch.tensor(CLIP_MEAN)[None, :, None]
    black = (pixels.abs() < 1e-5).all(dim=(1, 2))  # [N] whole patch black
    untouched = (out == normalised).all(dim=1)  # [N]
    assert torch.equal(black | untouched, torch.ones(200, dtype=torch.bool))
    assert 70 < black.sum().item() < 130  # p = 0.5 of 200 patches
    again = vepo.perturb_patches(normalised, config, torch.Generator().manual_seed(1), CLIP_MEAN, CLIP_STD)
    other = vepo.perturb_patches(normalised, config, torch.Generator().manual_seed(2), CLIP_MEAN, CLIP_STD)
    assert torch.equal(out, again) and not torch.equal(out, other)  # seeded per sample


def test_gaussian_noise_in_pixel_space_clipped():
    normalised, pixels = _patches()
    config = VepoConfig(mode="vepo", perturbation="gaussian", sigma=0.1)
    out = vepo.perturb_patches(normalised, config, torch.Generator().manual_seed(5), CLIP_MEAN, CLIP_STD)
    back = out.reshape(200, 3, -1) * torch.tensor(CLIP_STD)[None, :, None] + torch.tensor(CLIP_MEAN)[None, :, None]
    assert back.min() >= -1e-5 and back.max() <= 1 + 1e-5
    inside = (pixels > 0.3) & (pixels < 0.7)  # far from the clip: the noise shows its sigma
    assert (back - pixels)[inside].std().item() == pytest.approx(0.1, rel=0.05)


def test_sample_seed_is_stable_and_distinct():
    assert vepo.sample_seed(0, 3, "uid_0_1") == vepo.sample_seed(0, 3, "uid_0_1")
    assert len({vepo.sample_seed(0, s, k) for s in (1, 2) for k in ("a_0_0", "a_0_1")}) == 4


def test_jsd_temperature_scales_each_position():
    rng = np.random.default_rng(1)
    p, q = rng.normal(size=(6, 20)), rng.normal(size=(6, 20))
    t = np.array([1.0, 0.5, 2.0, 1.0, 0.7, 1.3])
    jsd = vepo.token_jsd(torch.tensor(p), torch.tensor(q), chunk=4, temperature=torch.tensor(t))
    np.testing.assert_allclose(jsd.numpy(), _jsd64(p / t[:, None], q / t[:, None]), atol=2e-6)
