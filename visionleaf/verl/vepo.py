"""VEPO inside verl 0.9.1's trainer (``visionleaf.vepo.mode``; the math is :mod:`visionleaf.algo.vepo`).

Once per step the old-log-prob pass becomes a pair of forwards of the old policy, without grad:

1. :class:`VepoTrainerMixin` (part of the ``visionleaf_sync`` trainer mode) writes a seed per sample to
   TransferQueue and flags verl's ``compute_log_prob`` call with the :class:`VepoConfig`;
2. :class:`VepoEngine` (verl's FSDP engine, registered in its ``EngineRegistry``) runs the real-image
   forward as usual (old log-probs and entropy) and then the same sequences with every image perturbed,
   and returns the per-token divergence: full-vocabulary JSD in chunks, or VPPO's sampled-token k3;
3. the mixin selects the top-k tokens of each response (:func:`visionleaf.algo.vepo.select_tokens`),
   stores them as ``vepo_mask`` and logs ``vepo/*`` and ``timing_s/vepo``;
4. in the actor update :class:`VepoEngine` uses ``vepo_mask`` as the mini-batch's ``response_mask`` and
   ``loss_mask``: the policy loss accumulates only selected tokens and verl's global token count (the
   ``token-mean`` normaliser) counts only them. Entropy and KL terms, when enabled, follow the same mask.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch
import transfer_queue as tq
from omegaconf import DictConfig, OmegaConf
from tensordict import NonTensorData, TensorDict
from verl.utils import tensordict_utils as tu
from verl.utils.device import get_device_id, get_device_name, get_torch_device
from verl.workers.engine.base import EngineRegistry
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead
from verl.workers.engine.utils import detach_tree
from verl.workers.utils.padding import response_from_nested, response_to_nested

from visionleaf.algo.vepo import VepoConfig, perturb_patches, sample_seed, sampled_token_k3, select_tokens, token_jsd
from visionleaf.verl.tree_forward import TreeForwardEngineMixin

VEPO_KEY = "visionleaf_vepo"
"""Non-tensor entry of verl's ``compute_log_prob`` batch that asks for the counterfactual forward."""

SEED_FIELD = "vepo_seed"
"""TransferQueue field: [B] int64 perturbation seed of each sample."""

DIVERGENCE_FIELD = "vepo_divergence"
"""TransferQueue field: per-position JSD (or k3), nested like verl's ``log_probs``."""

SECONDS_FIELD = "vepo_seconds"
"""TransferQueue field: [B, 1] seconds of the counterfactual part, on the first sample of each micro-batch."""

MASK_FIELD = "vepo_mask"
"""TransferQueue field: the selected tokens, nested like ``response_mask``."""


def vepo_config(config: DictConfig) -> VepoConfig:
    """The ``visionleaf.vepo`` block of a run's config (mode off when absent)."""
    section = OmegaConf.select(config, "visionleaf.vepo", default=None)
    if section is None:
        return VepoConfig()
    values = OmegaConf.to_container(section, resolve=True)
    known = {f.name for f in dataclasses.fields(VepoConfig)}
    unknown = sorted(set(values) - known) if isinstance(values, dict) else []
    if not isinstance(values, dict) or unknown:
        raise ValueError(f"visionleaf.vepo has unknown keys {unknown}; valid keys: {', '.join(sorted(known))}")
    return VepoConfig(**{str(k): v for k, v in values.items()})


def train_selected_tokens(data: TensorDict) -> None:
    """When ``data`` holds ``vepo_mask``, make it the ``response_mask`` and ``loss_mask`` of an actor update.

    verl's ``ppo_loss`` hands ``response_mask`` to the policy loss, and the FSDP engine counts
    ``loss_mask`` over the mini-batch on every data-parallel rank for the ``token-mean`` normaliser.
    """
    if MASK_FIELD in data:
        data["response_mask"] = data[MASK_FIELD]
        data["loss_mask"] = data[MASK_FIELD]


class VepoEngine(TreeForwardEngineMixin, FSDPEngineWithLMHead):
    """verl's FSDP language-model engine plus VEPO's counterfactual forward and selected-token update, and the
    tree-packed forward (:mod:`visionleaf.verl.tree_forward`). One registered class dispatches each call: a
    VEPO-flagged one runs the counterfactual forward, a tree-flagged one packs trees, any other is verl's."""

    def forward_backward_batch(self, data: TensorDict, loss_function: Any, forward_only: bool = False) -> Any:
        if not forward_only:
            train_selected_tokens(data)
        return super().forward_backward_batch(data, loss_function, forward_only=forward_only)

    def forward_step(self, micro_batch: TensorDict, loss_function: Any, forward_only: bool) -> Any:
        settings = tu.get_non_tensor_data(data=micro_batch, key=VEPO_KEY, default=None)
        if settings is None:
            return super().forward_step(micro_batch, loss_function, forward_only)
        if not forward_only:
            raise RuntimeError(f"{VEPO_KEY} is for verl's compute_log_prob (forward only), not for training")
        return self._counterfactual_step(micro_batch, VepoConfig(**settings))

    def _counterfactual_step(self, micro_batch: TensorDict, config: VepoConfig) -> tuple[torch.Tensor, dict]:
        """Real-image forward (old log-probs, entropy) and perturbed-image forward (divergence)."""
        if config.divergence == "jsd" and tu.get_non_tensor_data(micro_batch, "use_fused_kernels", False):
            raise ValueError(
                f"visionleaf.vepo.mode={config.mode} compares full next-token distributions, which fused kernels "
                "never materialise; set actor_rollout_ref.model.use_fused_kernels=false (or visionleaf.vepo.mode=vppo)"
            )
        device_name = get_device_name()
        micro_batch = micro_batch.to(get_device_id())
        model_inputs, output_args = self.prepare_model_inputs(micro_batch=micro_batch)
        autocast_dtype = getattr(self, "_autocast_dtype", torch.bfloat16)
        autocast = torch.autocast(
            device_type=device_name, dtype=autocast_dtype, enabled=autocast_dtype != torch.float32
        )
        with autocast:
            real = self.module(**model_inputs, use_cache=False)
            model_output = self.prepare_model_outputs(real, output_args, micro_batch, None)
            get_torch_device().synchronize()
            start = time.perf_counter()
            pixels = self._perturbed_pixels(micro_batch, model_inputs, config)
            perturbed = self.module(**{**model_inputs, "pixel_values": pixels}, use_cache=False)
            if config.divergence == "jsd":
                divergence = self._per_token_jsd(real.logits, perturbed.logits, output_args, micro_batch, config.chunk)
            else:
                without_entropy = micro_batch.copy()
                tu.assign_non_tensor(without_entropy, calculate_entropy=False)
                aug = self.prepare_model_outputs(perturbed, output_args, without_entropy, None)["log_probs"]
                real_lp = model_output["log_probs"]
                k3 = sampled_token_k3(real_lp.values(), aug.values())  # [nnz]
                divergence = torch.nested.nested_tensor_from_jagged(k3, real_lp.offsets())
            get_torch_device().synchronize()
            seconds = time.perf_counter() - start
        model_output[DIVERGENCE_FIELD] = divergence
        per_sample = torch.zeros(micro_batch.batch_size[0], dtype=torch.float32)  # [b]
        per_sample[0] = seconds
        model_output[SECONDS_FIELD] = torch.nested.as_nested_tensor(list(per_sample[:, None]), layout=torch.jagged)
        output = {"model_output": detach_tree(model_output), "loss": 1.0, "metrics": {}}
        return torch.tensor(1.0, device=device_name), output

    def _perturbed_pixels(self, micro_batch: TensorDict, model_inputs: dict, config: VepoConfig) -> torch.Tensor:
        """``pixel_values`` of the micro-batch with every image of every sample perturbed (seeded per sample)."""
        image_processor = getattr(self.model_config.processor, "image_processor", None)
        if image_processor is None or getattr(image_processor, "image_mean", None) is None:
            raise ValueError("visionleaf.vepo needs a vision-language model whose processor has an image processor")
        mean, std = list(image_processor.image_mean), list(image_processor.image_std)
        seeds = micro_batch[SEED_FIELD].tolist()
        tokens = [int(m.sum()) for m in micro_batch["response_mask"].unbind()]
        uids = micro_batch["uid"] if "uid" in micro_batch else [None] * len(seeds)
        samples = micro_batch.get("multi_modal_inputs", None)
        samples = [None] * len(seeds) if samples is None else samples
        pieces = []
        for i, inputs in enumerate(samples):
            inputs = inputs.data if isinstance(inputs, NonTensorData) else inputs
            rows = inputs.get("pixel_values") if isinstance(inputs, dict) else None
            if rows is None or rows.shape[0] == 0:
                if tokens[i] > 0:
                    raise ValueError(
                        f"visionleaf.vepo.mode={config.mode} perturbs the images of each trajectory, but sample "
                        f"uid={uids[i]} (seed {seeds[i]}) has none; train it with visionleaf.vepo.mode=off or drop "
                        "text-only rows from the data"
                    )
                continue
            generator = torch.Generator().manual_seed(int(seeds[i]))
            pieces.append(perturb_patches(rows, config, generator, mean, std))
        pixels = model_inputs.get("pixel_values")
        if pixels is None:
            return None  # type: ignore[return-value]  # only padding samples: nothing to perturb
        perturbed = torch.cat(pieces).to(device=pixels.device, dtype=pixels.dtype)  # [N, C * F]
        if perturbed.shape != pixels.shape:
            raise RuntimeError(f"perturbed pixel_values {tuple(perturbed.shape)} != model input {tuple(pixels.shape)}")
        return perturbed

    def _per_token_jsd(
        self, real: torch.Tensor, perturbed: torch.Tensor, output_args: dict, micro_batch: TensorDict, chunk: int
    ) -> torch.Tensor:
        """Per-position JSD at the sampling temperature, nested like verl's ``log_probs``."""
        offsets = micro_batch["input_ids"].offsets()
        if "temperature_rmpad" in output_args:  # packed: [1, nnz (+ pad), V]
            jsd = token_jsd(real[0], perturbed[0], chunk, output_args["temperature_rmpad"])  # [nnz + pad]
            jsd = self._gather_and_unpad_packed(jsd, output_args["pad_size"])  # [nnz]
            return torch.nested.nested_tensor_from_jagged(jsd, offsets)
        batch, width, vocab = real.shape  # padded: [B, T, V]
        temperature = output_args["temperature"].float()[:, None].expand(batch, width).reshape(-1)  # [B * T]
        jsd = token_jsd(real.reshape(-1, vocab), perturbed.reshape(-1, vocab), chunk, temperature).view(batch, width)
        lengths = offsets.diff().tolist()
        values = torch.cat([jsd[i, :n] for i, n in enumerate(lengths)])  # [nnz]
        return torch.nested.nested_tensor_from_jagged(values, offsets)


class VepoTrainerMixin:
    """Trainer steps of VEPO for verl's V1 trainer (mixed into the ``visionleaf_sync`` trainer mode)."""

    config: Any
    timing_raw: dict[str, float]
    global_steps: int
    actor_rollout_wg: Any

    def _compute_old_log_prob(self, batch: Any, metrics: dict[str, Any]) -> Any:
        settings = vepo_config(self.config)
        if settings.mode == "off":
            return super()._compute_old_log_prob(batch, metrics)  # type: ignore[misc]
        correction = self.config.algorithm.get("rollout_correction", None)
        if correction and correction.get("bypass_mode", False):
            raise ValueError(
                f"visionleaf.vepo.mode={settings.mode} runs its counterfactual forward with the old log-probs; "
                "set algorithm.rollout_correction.bypass_mode=false"
            )
        seeds = torch.tensor([sample_seed(settings.seed, self.global_steps, key) for key in batch.keys])  # [B]
        tq.kv_batch_put(
            keys=batch.keys,
            partition_id=batch.partition_id,
            fields=TensorDict({SEED_FIELD: seeds}, batch_size=len(batch)),
        )
        batch.extra_info[VEPO_KEY] = dataclasses.asdict(settings)
        try:
            result = super()._compute_old_log_prob(batch, metrics)  # type: ignore[misc]
        finally:
            batch.extra_info.pop(VEPO_KEY, None)
        result.extra_info.pop(VEPO_KEY, None)  # never reaches the actor update
        self._select_tokens(result, settings, metrics)
        return result

    def _select_tokens(self, batch: Any, settings: VepoConfig, metrics: dict[str, Any]) -> None:
        """Select each response's tokens from the stored entropy and divergence; store ``vepo_mask``."""
        fields = ["response_mask", "entropy", DIVERGENCE_FIELD, SECONDS_FIELD]
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)
        response_mask = data["response_mask"]
        mask = response_mask.to_padded_tensor(padding=0)  # [B, L]
        entropy = data["entropy"].to_padded_tensor(padding=0.0)  # [B, L], response-aligned by verl
        divergence = response_from_nested(data[DIVERGENCE_FIELD], response_mask).to_padded_tensor(padding=0.0)  # [B, L]
        selection = select_tokens(entropy, divergence, mask, settings)
        selected = response_to_nested(selection.mask.to(mask.dtype), response_mask)
        tq.kv_batch_put(
            keys=batch.keys,
            partition_id=batch.partition_id,
            fields=TensorDict({MASK_FIELD: selected}, batch_size=len(batch)),
        )
        metrics.update(selection.metrics)
        ranks = self.actor_rollout_wg._dispatch_info.get("actor") or [0]
        # each data-parallel rank reports its own micro-batches; they run side by side
        self.timing_raw["vepo"] = float(data[SECONDS_FIELD].values().sum()) / (max(ranks) + 1)


def register_engine() -> None:
    """Make :class:`VepoEngine` verl's FSDP language-model engine (idempotent; same behaviour when VEPO is off).

    verl's ``EngineRegistry.register`` refuses a taken (device) key, so the registry entries of verl's own
    FSDP engine are replaced in place; entries another plugin changed are left alone.
    """
    for backend in ("fsdp", "fsdp2"):
        registry = EngineRegistry._engines.get("language_model", {}).get(backend, {})
        for key, engine in list(registry.items()):
            if engine is FSDPEngineWithLMHead:
                registry[key] = VepoEngine
