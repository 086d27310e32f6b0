"""VEPO on verl's path: the selected-token mask through verl's own ppo_loss, the counterfactual pieces of
the engine, the config, and (slow) verl's real trainer on CPU with ``visionleaf.vepo.mode=vepo``."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from tensordict import NonTensorData, NonTensorStack, TensorDict
from verl.utils import tensordict_utils as tu
from verl.workers.config import ActorConfig, PolicyLossConfig
from verl.workers.engine.fsdp.transformer_impl import FSDPEngine
from verl.workers.utils.losses import ppo_loss

from visionleaf.algo.vepo import VepoConfig, perturb_patches
from visionleaf.verl import algos, vepo

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
PROMPT_LENS, RESPONSE_LENS = [3, 2], [4, 5]


def _nested(rows):
    return torch.nested.as_nested_tensor([torch.as_tensor(r) for r in rows], layout=torch.jagged)


def _mini_batch(selected):
    """A mini-batch as verl's actor update sees it (nested, no padding), with ``vepo_mask`` = ``selected``."""
    response_mask = [[1, 1, 0, 1], [1, 0, 0, 1, 1]]  # 0 = tool observation tokens
    data = TensorDict(
        {
            "prompts": _nested([[5] * n for n in PROMPT_LENS]),
            "responses": _nested([[7] * n for n in RESPONSE_LENS]),
            "response_mask": _nested(response_mask),
            "loss_mask": _nested(response_mask),
            "old_log_probs": _nested([[-1.0] * n for n in RESPONSE_LENS]),
            "advantages": _nested([[1.0] * 4, [-0.5] * 5]),
            vepo.MASK_FIELD: _nested(selected),
        },
        batch_size=2,
    )
    tu.assign_non_tensor(data, max_response_len=5, global_batch_size=2, dp_size=1)
    return data


def _actor_config():
    algos.register()
    return ActorConfig(
        strategy="fsdp2",
        ppo_mini_batch_size=2,
        ppo_micro_batch_size_per_gpu=2,
        rollout_n=1,
        policy_loss=PolicyLossConfig(loss_mode="visionleaf"),
    )


def test_only_selected_tokens_carry_gradient_through_verls_ppo_loss():
    selected = [[0, 1, 0, 0], [1, 0, 0, 0, 1]]  # 3 selected model tokens
    data = _mini_batch(selected)
    vepo.train_selected_tokens(data)  # what VepoEngine does to each actor-update mini-batch
    # the FSDP engine's global token count: the sum of loss_mask over the mini-batch (one rank here)
    tu.assign_non_tensor(data, batch_num_tokens=int(data["loss_mask"].values().sum()))
    assert tu.get(data, "batch_num_tokens") == 3
    # the model's per-position log-probs over prompt + response (verl's layout before no_padding_2_padding)
    log_probs = torch.full((sum(PROMPT_LENS) + sum(RESPONSE_LENS),), -1.0, requires_grad=True)
    offsets = torch.tensor([0, PROMPT_LENS[0] + RESPONSE_LENS[0], sum(PROMPT_LENS) + sum(RESPONSE_LENS)])
    model_output = {"log_probs": torch.nested.nested_tensor_from_jagged(log_probs, offsets)}
    loss, _ = ppo_loss(_actor_config(), model_output, data)
    loss.backward()
    grad = log_probs.grad
    # position t predicts token t + 1: response token j of row i sits at offset + prompt_len + j - 1
    expected = torch.zeros_like(grad)
    for row, (start, prompt) in enumerate(zip(offsets[:-1].tolist(), PROMPT_LENS, strict=True)):
        for j, keep in enumerate(selected[row]):
            if keep:
                advantage = 1.0 if row == 0 else -0.5
                expected[start + prompt + j - 1] = -advantage / 3  # ratio 1: d(-A * ratio)/d logp, over 3 tokens
    torch.testing.assert_close(grad, expected)


def test_without_a_selection_the_update_is_verls():
    data = _mini_batch([[1, 1, 0, 1], [1, 0, 0, 1, 1]])
    del data[vepo.MASK_FIELD]
    before = data["response_mask"].values().clone()
    vepo.train_selected_tokens(data)
    assert torch.equal(data["response_mask"].values(), before) and torch.equal(data["loss_mask"].values(), before)


def _engine_stub():
    processor = types.SimpleNamespace(image_processor=types.SimpleNamespace(image_mean=CLIP_MEAN, image_std=CLIP_STD))
    return types.SimpleNamespace(model_config=types.SimpleNamespace(processor=processor), use_ulysses_sp=False)


def _vision_batch(images_of_second=True):
    g = torch.Generator().manual_seed(0)
    first = {"pixel_values": torch.randn(8, 3 * 2 * 14 * 14, generator=g), "image_grid_thw": torch.tensor([[1, 2, 4]])}
    second = {"pixel_values": torch.randn(4, 3 * 2 * 14 * 14, generator=g), "image_grid_thw": torch.tensor([[1, 2, 2]])}
    data = TensorDict(
        {"response_mask": _nested([[1, 1], [1, 0, 1]]), vepo.SEED_FIELD: torch.tensor([11, 12])}, batch_size=2
    )
    data["multi_modal_inputs"] = NonTensorStack(NonTensorData(first), NonTensorData(second if images_of_second else {}))
    data["uid"] = ["a", "b"]
    pixels = torch.cat([first["pixel_values"], second["pixel_values"]] if images_of_second else [first["pixel_values"]])
    return data, {"pixel_values": pixels}, (first, second)


def test_every_image_of_every_sample_is_perturbed_with_its_own_seed():
    data, inputs, (first, second) = _vision_batch()
    config = VepoConfig(mode="vepo")
    out = vepo.VepoEngine._perturbed_pixels(_engine_stub(), data, inputs, config)
    expected = [
        perturb_patches(first["pixel_values"], config, torch.Generator().manual_seed(11), CLIP_MEAN, CLIP_STD),
        perturb_patches(second["pixel_values"], config, torch.Generator().manual_seed(12), CLIP_MEAN, CLIP_STD),
    ]
    assert torch.equal(out, torch.cat(expected))
    assert not torch.equal(out[:8], inputs["pixel_values"][:8]) and not torch.equal(out[8:], inputs["pixel_values"][8:])


def test_a_trajectory_without_images_is_named():
    data, inputs, _ = _vision_batch(images_of_second=False)
    with pytest.raises(ValueError, match=r"sample uid=b .* has none; .*visionleaf.vepo.mode=off"):
        vepo.VepoEngine._perturbed_pixels(_engine_stub(), data, inputs, VepoConfig(mode="vepo"))


def _jsd64(p, q):
    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    a, b = softmax(p), softmax(q)
    m = (a + b) / 2
    return 0.5 * (a * np.log(a / m)).sum(-1) + 0.5 * (b * np.log(b / m)).sum(-1)


@pytest.mark.parametrize("packed", [True, False])
def test_per_token_jsd_in_verls_layouts(packed):
    lengths, vocab, temperature = [3, 5], 11, 0.7
    g = torch.Generator().manual_seed(0)
    offsets = torch.tensor([0, 3, 8])
    batch = TensorDict(
        {"input_ids": torch.nested.nested_tensor_from_jagged(torch.zeros(8, dtype=torch.long), offsets)}, [2]
    )
    stub = _engine_stub()
    stub._gather_and_unpad_packed = types.MethodType(FSDPEngine._gather_and_unpad_packed, stub)
    if packed:  # verl's remove-padding layout: [1, nnz + pad, V]
        real, fake = torch.randn(1, 10, vocab, generator=g), torch.randn(1, 10, vocab, generator=g)
        args = {"temperature_rmpad": torch.full((10,), temperature), "pad_size": 2}
        p, q = real[0, :8].numpy(), fake[0, :8].numpy()
    else:  # padded: [B, T, V]
        real, fake = torch.randn(2, 5, vocab, generator=g), torch.randn(2, 5, vocab, generator=g)
        args = {"temperature": torch.full((2,), temperature)}
        p = np.concatenate([real[i, :n].numpy() for i, n in enumerate(lengths)])
        q = np.concatenate([fake[i, :n].numpy() for i, n in enumerate(lengths)])
    jsd = vepo.VepoEngine._per_token_jsd(stub, real, fake, args, batch, chunk=3)
    assert jsd.is_nested and jsd.offsets().tolist() == offsets.tolist()
    np.testing.assert_allclose(jsd.values().numpy(), _jsd64(p / temperature, q / temperature), atol=1e-5)


def test_config_block():
    assert vepo.vepo_config(OmegaConf.create({})).mode == "off"
    config = vepo.vepo_config(OmegaConf.create({"visionleaf": {"vepo": {"mode": "vision", "k": 0.3}}}))
    assert (config.mode, config.k, config.score_alpha) == ("vision", 0.3, 1.0)
    with pytest.raises(ValueError, match=r"unknown keys \['kk'\]; valid keys: alpha, chunk"):
        vepo.vepo_config(OmegaConf.create({"visionleaf": {"vepo": {"kk": 0.3}}}))
    with pytest.raises(ValueError, match=r"visionleaf.vepo.alpha must be in \[0, 1\]"):
        vepo.vepo_config(OmegaConf.create({"visionleaf": {"vepo": {"mode": "vepo", "alpha": 2}}}))


def test_engine_registry_serves_the_vepo_engine():
    from verl.workers.engine.base import EngineRegistry

    vepo.register_engine()
    registry = EngineRegistry._engines["language_model"]
    assert registry["fsdp2"]["cuda"] is vepo.VepoEngine and registry["fsdp"]["cuda"] is vepo.VepoEngine


def test_paper_config_composes_and_selects_vepo():
    from tests.verl.test_configs import composed

    config = composed("vepo_qwen25vl_7b")
    settings = vepo.vepo_config(config)
    assert (settings.mode, settings.alpha, settings.k, settings.perturbation) == ("vepo", 0.7, 0.2, "patch_blackening")
    assert (
        "7B" in config.actor_rollout_ref.model.path
        and config.actor_rollout_ref.actor.policy_loss.loss_mode == "visionleaf"
    )
    assert config.trainer.v1.trainer_mode == "visionleaf_sync"  # the trainer mode that runs VEPO's steps
    assert vepo.vepo_config(composed("tiny_cpu")).mode == "off"
    assert vepo.vepo_config(composed("tiny_cpu", "visionleaf.vepo.mode=entropy")).mode == "entropy"


@pytest.mark.slow
def test_vepo_mode_on_verls_cpu_trainer(tmp_path):
    from tests.verl.test_cpu_e2e import REPO, _step_metrics, _train
    from visionleaf.models import tiny

    out, model = tmp_path / "run", REPO / "outputs" / "tiny_cpu" / "model"
    overrides = ("visionleaf.vepo.mode=vepo", "trainer.val_before_train=false", "trainer.test_freq=-1")
    steps = _step_metrics(_train(out, model, 2, *overrides))
    assert [s["step"] for s in steps] == ["1", "2"]
    for metrics in steps:
        assert float(metrics["rollout/agent_loop_errors"]) == 0
        assert 0.2 <= float(metrics["vepo/selected_frac"]) < 0.3  # ceil(k * n) per response: k and a little more
        assert float(metrics["vepo/jsd_mean"]) > 0 and float(metrics["timing_s/vepo"]) > 0
    assert any(float(m["vepo/top_jsd_missed_by_top_entropy"]) > 0 for m in steps)
    initial = tiny.load(model)[0].state_dict()
    trained = torch.load(
        out / "checkpoints" / "global_step_2" / "actor" / "model_world_size_1_rank_0.pt", weights_only=False
    )
    full = {name: t.full_tensor() if hasattr(t, "full_tensor") else t for name, t in trained.items()}
    assert any(not torch.equal(full[name], initial[name]) for name in full if name in initial)
