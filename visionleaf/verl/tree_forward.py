"""Tree-shared training forward inside verl 0.9.1's trainer (``visionleaf.tree_forward.enable``; the packing
and the forward are :mod:`visionleaf.algo.tree_forward`).

- :class:`TreeForwardTrainerMixin` (part of the ``visionleaf_sync`` trainer mode) flags verl's old-log-prob,
  reference-log-prob and actor-update calls with ``visionleaf_tree_forward`` = the ``enable`` setting, and
  logs the engine's ``tree_forward/*`` metrics of the update.
- :class:`TreeForwardEngineMixin` (layered into verl's registered FSDP engine by :mod:`visionleaf.verl.vepo`)
  on a flagged call times verl's forward+backward (``tree_forward/update_fwd_bwd_s``, with and without
  packing); with ``enable`` it also orders the batch so that the leaves of a tree (one ``uid``) are
  consecutive, and in each micro-batch runs every tree's leaves as one packed forward. The outputs go back
  into verl's layout (the response log-probs of a sample of P + R tokens at positions P-1 ... P+R-2 of its
  nested row), so verl's loss, metrics and log-prob fields are unchanged. Leaves whose tree cannot be packed
  (no node path or spans, a response cut after the rollout, different temperatures) run verl's per-leaf
  forward; ``tree_forward/fallback/<reason>`` counts them.

Needs the padded path (``actor_rollout_ref.model.use_remove_padding=false``) and ``sdpa`` or ``eager``
attention: the tree's ancestor mask is a dense [T, T] mask, which flash-attention's varlen path cannot take.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tensordict import NonTensorData, NonTensorStack, TensorDict
from verl.utils import tensordict_utils as tu
from verl.utils import torch_functional as verl_F
from verl.utils.device import get_device_id, get_device_name
from verl.workers.engine.utils import detach_tree

from visionleaf.algo.tree_forward import LeafSequence, pack_tree, tree_forward

TREE_KEY = "visionleaf_tree_forward"
"""Non-tensor entry of verl's ``compute_log_prob`` / ``update_actor`` batches: True packs trees, False only times."""

METRIC_PREFIX = "tree_forward/"
RATIO_METRIC = "tree_forward/tokens_packed_over_tokens_per_leaf"
"""Tokens the model ran over the tokens per-leaf forwards run (1 = nothing shared; the compute left)."""
TIME_METRIC = "tree_forward/update_fwd_bwd_s"
"""Seconds of verl's forward+backward over one update mini-batch (logged with and without packing)."""
FALLBACK_REASONS = ("no_tree_info", "unpackable", "temperature")
"""Why a tree's leaves ran per leaf: no ``node_path``/``node_spans`` in ``extra_fields``; ``pack_tree`` refused
them (a response cut after the rollout, leaves that disagree); the leaves had different temperatures."""


@dataclasses.dataclass(frozen=True)
class TreeForwardConfig:
    """``visionleaf.tree_forward``."""

    enable: bool = False
    """Pack each tree's leaves into one forward for old log-probs, reference log-probs and the update."""


def tree_forward_config(config: DictConfig) -> TreeForwardConfig:
    """The ``visionleaf.tree_forward`` block of a run's config (off when absent)."""
    section = OmegaConf.select(config, "visionleaf.tree_forward", default=None)
    if section is None:
        return TreeForwardConfig()
    values = OmegaConf.to_container(section, resolve=True)
    known = {f.name for f in dataclasses.fields(TreeForwardConfig)}
    unknown = sorted(set(values) - known) if isinstance(values, dict) else []
    if not isinstance(values, dict) or unknown:
        raise ValueError(f"visionleaf.tree_forward has unknown keys {unknown}; valid keys: {', '.join(sorted(known))}")
    return TreeForwardConfig(**{str(k): v for k, v in values.items()})


def _rows(data: TensorDict, key: str) -> list[Any]:
    """Per-sample python values of a non-tensor column (None per sample when absent)."""
    if key not in data:
        return [None] * data.batch_size[0]
    value = data.get(key)
    if isinstance(value, NonTensorStack):
        return list(value.tolist())
    if isinstance(value, NonTensorData):
        return list(value.data)
    return list(value)


def _lengths(rows: Any) -> list[int]:
    """Per-sample lengths of a nested [B, j] (or a plain [B, L]) tensor."""
    if rows.is_nested:
        return [int(n) for n in rows.offsets().diff().tolist()]
    return [int(rows.shape[1])] * int(rows.shape[0])


def _nested(rows: list[torch.Tensor | None]) -> torch.Tensor:
    """Every sample's row (all filled in) as verl's nested [B, j] tensor."""
    filled = [row for row in rows if row is not None]
    assert len(filled) == len(rows), "a sample got no output"
    return torch.nested.as_nested_tensor(filled, layout=torch.jagged)


def tree_order(uids: Sequence[Any]) -> list[int]:
    """A stable order that puts samples of one tree (same uid) next to each other, trees by first appearance."""
    first: dict[Any, int] = {}
    for i, uid in enumerate(uids):
        first.setdefault(uid, i)
    return sorted(range(len(uids)), key=lambda i: (first[uids[i]], i))


def _leaf(
    input_ids: torch.Tensor, position_ids: torch.Tensor, prompt_len: int, extra: Any, inputs: Any
) -> tuple[LeafSequence, dict[int, tuple[int, int]]]:
    """One sample of a verl micro-batch as a :class:`LeafSequence`, and the spans of the nodes on its path.

    ``input_ids`` [L], ``position_ids`` [4, L] (or [L]), ``extra``: its ``extra_fields``, ``inputs``: its
    ``multi_modal_inputs``."""
    path, spans = extra.get("node_path"), extra.get("node_spans")
    if path is None or spans is None or len(path) != len(spans):
        raise LookupError("no node_path / node_spans")
    inputs = inputs.data if isinstance(inputs, NonTensorData) else inputs
    inputs = inputs if isinstance(inputs, dict) else {}
    pixels, grid = inputs.get("pixel_values"), inputs.get("image_grid_thw")
    if pixels is not None and pixels.shape[0] == 0:
        pixels = grid = None
    if position_ids.dim() == 1:
        position_ids = position_ids[None]
    leaf = LeafSequence(
        input_ids=input_ids,
        position_ids=position_ids,
        prompt_len=prompt_len,
        node_path=[int(n) for n in path],
        pixel_values=pixels,
        image_grid_thw=grid,
    )
    return leaf, {int(n): (int(s[0]), int(s[1])) for n, s in zip(path, spans, strict=True)}


class TreeForwardEngineMixin:
    """Tree-packed forward for verl's FSDP language-model engine (mixed in before ``FSDPEngineWithLMHead``)."""

    module: Any
    engine_config: Any
    use_ulysses_sp: bool

    def forward_backward_batch(self, data: TensorDict, loss_function: Any, forward_only: bool = False) -> Any:
        flag = tu.get_non_tensor_data(data=data, key=TREE_KEY, default=None)
        if flag is None:
            return super().forward_backward_batch(data, loss_function, forward_only=forward_only)  # type: ignore[misc]
        order = tree_order(_rows(data, "uid")) if flag else list(range(data.batch_size[0]))
        permuted = order != sorted(order)
        if permuted:
            data = tu.index_select_tensor_dict(data, order)
        start = time.perf_counter()
        output = super().forward_backward_batch(data, loss_function, forward_only=forward_only)  # type: ignore[misc]
        seconds = time.perf_counter() - start
        if permuted:
            inverse = sorted(range(len(order)), key=order.__getitem__)
            for key, value in output["model_output"].items():
                rows = value.unbind()
                output["model_output"][key] = torch.nested.as_nested_tensor(
                    [rows[j] for j in inverse], layout=torch.jagged
                )
        if not forward_only:
            output["metrics"][TIME_METRIC] = [seconds]
        return output

    def forward_step(self, micro_batch: TensorDict, loss_function: Any, forward_only: bool) -> Any:
        if not tu.get_non_tensor_data(data=micro_batch, key=TREE_KEY, default=False):
            return super().forward_step(micro_batch, loss_function, forward_only)  # type: ignore[misc]
        return self._tree_step(micro_batch, loss_function, forward_only)

    def _check_settings(self, micro_batch: TensorDict) -> None:
        """Refuse settings the packed forward cannot honour, saying what to set."""
        if tu.get_non_tensor_data(data=micro_batch, key="use_remove_padding", default=True):
            raise ValueError(
                "visionleaf.tree_forward.enable=true runs each tree under a dense ancestor mask, which verl's "
                "remove-padding (flash-attention varlen) path cannot take; set "
                "actor_rollout_ref.model.use_remove_padding=false (and attn_implementation=sdpa)"
            )
        if self.use_ulysses_sp:
            raise ValueError("visionleaf.tree_forward.enable=true needs ulysses_sequence_parallel_size=1")
        for key in ("use_fused_kernels", "calculate_sum_pi_squared", "distillation_use_topk"):
            if tu.get_non_tensor_data(data=micro_batch, key=key, default=False):
                raise ValueError(f"visionleaf.tree_forward.enable=true does not support {key}=true; turn one off")

    def _tree_step(self, micro_batch: TensorDict, loss_function: Any, forward_only: bool) -> tuple[torch.Tensor, dict]:
        """verl's forward_step with each tree of the micro-batch packed into one model call."""
        self._check_settings(micro_batch)
        device_name = get_device_name()
        micro_batch = micro_batch.to(get_device_id())
        size = micro_batch.batch_size[0]
        calculate_entropy = bool(tu.get_non_tensor_data(data=micro_batch, key="calculate_entropy", default=False))
        temperature = micro_batch["temperature"]
        temperatures = [
            float(temperature[i]) if isinstance(temperature, torch.Tensor) else float(temperature) for i in range(size)
        ]

        trees: dict[Any, list[int]] = {}
        for i, uid in enumerate(_rows(micro_batch, "uid")):
            trees.setdefault(uid, []).append(i)
        extras, inputs = _rows(micro_batch, "extra_fields"), _rows(micro_batch, "multi_modal_inputs")
        image_token_id = getattr(self.module.config, "image_token_id", -1)
        metrics = {f"{METRIC_PREFIX}fallback/{reason}": 0 for reason in FALLBACK_REASONS}
        lengths, prompt_lens = _lengths(micro_batch["input_ids"]), _lengths(micro_batch["prompts"])
        input_ids, position_ids = micro_batch["input_ids"].unbind(), micro_batch["position_ids"].unbind()
        packs, per_leaf = [], []
        for rows in trees.values():
            reason = None
            if len({temperatures[i] for i in rows}) > 1:
                reason = "temperature"
            else:
                try:
                    pairs = [
                        _leaf(input_ids[i], position_ids[i], prompt_lens[i], extras[i] or {}, inputs[i]) for i in rows
                    ]
                    spans = {node: span for _, leaf_spans in pairs for node, span in leaf_spans.items()}
                    packs.append((rows, pack_tree([leaf for leaf, _ in pairs], spans, image_token_id)))
                except LookupError:
                    reason = "no_tree_info"
                except ValueError:
                    reason = "unpackable"
            if reason is not None:
                metrics[f"{METRIC_PREFIX}fallback/{reason}"] += len(rows)
                per_leaf.extend(rows)

        log_probs: list[torch.Tensor | None] = [None] * size
        entropy: list[torch.Tensor | None] = [None] * size
        autocast_dtype = getattr(self, "_autocast_dtype", torch.bfloat16)
        autocast = (
            nullcontext()
            if autocast_dtype == torch.float32
            else torch.autocast(device_type=device_name, dtype=autocast_dtype)
        )
        with autocast:
            for rows, packed in packs:
                out = tree_forward(
                    self.module,
                    packed,
                    temperature=temperatures[rows[0]],
                    calculate_entropy=calculate_entropy,
                    logprob_fn=lambda logits, labels: verl_F.logprobs_from_logits(logits, labels),
                    entropy_fn=verl_F.entropy_from_logits,
                    logits_to_keep=False,  # verl's patched Qwen2.5-VL forward ignores it
                )
                for k, i in enumerate(rows):
                    log_probs[i] = self._full_row(out.log_probs[k], prompt_lens[i], lengths[i])
                    if out.entropy is not None:
                        entropy[i] = self._full_row(out.entropy[k], prompt_lens[i], lengths[i])
            if per_leaf:
                self._per_leaf(micro_batch, per_leaf, log_probs, entropy)
            model_output = {"log_probs": _nested(log_probs)}
            if calculate_entropy:
                model_output["entropy"] = _nested(entropy)
            if loss_function is not None:
                loss, loss_metrics = loss_function(
                    model_output=model_output,
                    data=micro_batch,
                    dp_group=self.get_data_parallel_group(),  # type: ignore[attr-defined]
                )
            else:
                loss, loss_metrics = torch.tensor(1.0, device=device_name), {}

        per_leaf_tokens = sum(lengths)
        packed_tokens = sum(packed.tokens_packed for _, packed in packs) + sum(lengths[i] for i in per_leaf)
        metrics.update(
            {
                f"{METRIC_PREFIX}tokens_packed": packed_tokens,
                f"{METRIC_PREFIX}tokens_per_leaf": per_leaf_tokens,
                f"{METRIC_PREFIX}trees_packed": len(packs),
            }
        )
        output = {
            "model_output": detach_tree(model_output),
            "loss": loss.detach().item(),
            "metrics": {**loss_metrics, **metrics},
        }
        return loss, output

    @staticmethod
    def _full_row(values: torch.Tensor, prompt_len: int, length: int) -> torch.Tensor:
        """[R] response values -> [P + R] verl row: position t holds the value predicting token t + 1."""
        before = values.new_zeros(prompt_len - 1)
        after = values.new_zeros(length - prompt_len - values.numel() + 1)
        return torch.cat([before, values, after])

    def _per_leaf(
        self,
        micro_batch: TensorDict,
        rows: list[int],
        log_probs: list[torch.Tensor | None],
        entropy: list[torch.Tensor | None],
    ) -> None:
        """verl's own forward over the samples ``rows``; their rows of ``log_probs`` / ``entropy`` filled in."""
        sub = tu.index_select_tensor_dict(micro_batch, rows)
        model_inputs, output_args = self.prepare_model_inputs(micro_batch=sub)  # type: ignore[attr-defined]
        raw = self.module(**model_inputs, use_cache=False)
        out = self.prepare_model_outputs(raw, output_args, sub, None)  # type: ignore[attr-defined]
        for k, i in enumerate(rows):
            log_probs[i] = out["log_probs"][k]
            if "entropy" in out:
                entropy[i] = out["entropy"][k]


class TreeForwardTrainerMixin:
    """Trainer steps of the tree-shared forward for verl's V1 trainer (mixed into the ``visionleaf_sync`` mode)."""

    config: Any

    def _flagged(self, method: str, batch: Any, metrics: dict[str, Any]) -> Any:
        batch.extra_info[TREE_KEY] = tree_forward_config(self.config).enable
        try:
            result = getattr(super(), method)(batch, metrics)
        finally:
            batch.extra_info.pop(TREE_KEY, None)
        if result is not None and hasattr(result, "extra_info"):
            result.extra_info.pop(TREE_KEY, None)
        return result

    def _compute_old_log_prob(self, batch: Any, metrics: dict[str, Any]) -> Any:
        return self._flagged("_compute_old_log_prob", batch, metrics)

    def _compute_ref_log_prob(self, batch: Any, metrics: dict[str, Any]) -> Any:
        return self._flagged("_compute_ref_log_prob", batch, metrics)

    def _update_actor(self, batch: Any, metrics: dict[str, Any]) -> Any:
        result = self._flagged("_update_actor", batch, metrics)
        metrics.update(update_metrics(metrics))
        return result


def update_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The engine's ``actor/tree_forward/*`` update metrics (means over micro-batches) as ``tree_forward/*``,
    plus :data:`RATIO_METRIC`. The actor entries are removed from ``metrics``."""
    out = {}
    for key in [k for k in metrics if k.startswith(f"actor/{METRIC_PREFIX}")]:
        out[key.removeprefix("actor/")] = float(metrics.pop(key))
    packed, per_leaf = out.get(f"{METRIC_PREFIX}tokens_packed"), out.get(f"{METRIC_PREFIX}tokens_per_leaf")
    if packed is not None and per_leaf:
        out[RATIO_METRIC] = packed / per_leaf
    return out
