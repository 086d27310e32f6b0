"""verl rollout ``hf``: visionleaf's :class:`~visionleaf.engines.hf.HFEngine` as a verl rollout replica.

For machines where vLLM and SGLang do not run (the CPU default). Three pieces, registered by
:mod:`visionleaf.verl.plugin`:

- :class:`HFServer`: an async Ray actor holding the model and an ``HFEngine`` (prefix KV cache). Its
  ``generate`` has the signature of verl's vLLM server: verl's ``LLMServerClient`` and load balancer
  talk to it unchanged. Concurrent requests are batched by the engine's own scheduler (while one batch
  runs, new requests queue; the next batch takes them all), the one that also batches concurrent trees.
- :class:`HFReplica`: the ``RolloutReplica`` that starts one ``HFServer`` per replica.
- :class:`HFRolloutAdapter`: the ``BaseRollout`` in the trainer worker; ``update_weights`` sends the
  actor's full weights to the server after every step (hybrid mode, ``checkpoint_engine.backend=naive``).

Sampling params are verl's vLLM-style dict (:func:`visionleaf.engines.sampling.from_request_params`).
A reply reports the prompt tokens served from the prefix cache in ``extra_fields["num_cached_tokens"]``,
as verl's vLLM server does. An entropy probe (``top_logprobs: k`` in the sampling params) is answered by
the probe alone: ``extra_fields["top_logprobs"]`` holds the k largest log-probabilities (descending) of
the first token after the prompt, ``num_cached_tokens`` the probe's cache hit, and no token is sampled.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import Any

import ray
import torch
from PIL import Image
from verl.utils.fs import copy_to_local
from verl.workers.rollout.base import BaseRollout
from verl.workers.rollout.replica import RolloutReplica, TokenOutput

from visionleaf.engines.base import Prefix, image_key
from visionleaf.engines.sampling import from_request_params

logger = logging.getLogger(__name__)


def server_actor_name(replica_rank: int) -> str:
    """Ray actor name of a replica's server (the adapter in the trainer worker finds it by name)."""
    return f"visionleaf_hf_server_{replica_rank}"


class HFServer:
    """Token-in, token-out generation over ``HFEngine`` in a Ray actor (see the module docstring)."""

    def __init__(self, model_path: str, response_length: int, seed: int = 0, cache_max_bytes: int = 1 << 30) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from visionleaf.compat import apply_torchvision_shim
        from visionleaf.engines.hf import HFEngine

        apply_torchvision_shim()
        model = AutoModelForImageTextToText.from_pretrained(model_path, dtype=torch.float32)
        self.engine = HFEngine(model, AutoProcessor.from_pretrained(model_path), cache_max_bytes=cache_max_bytes)
        self.response_length = response_length
        self.global_steps: int | None = None
        self._seed = seed
        self._requests = 0

    async def generate(
        self,
        prompt_ids: list[int],
        sampling_params: dict[str, Any],
        request_id: str,
        image_data: list[Image.Image] | None = None,
        video_data: list[Any] | None = None,
        **_: Any,
    ) -> TokenOutput:
        """One continuation of ``prompt_ids`` (image pads expanded) with ``image_data`` in order, or the
        entropy probe's answer when the params ask for ``top_logprobs``."""
        if video_data:
            raise ValueError("the hf rollout is image-only; got video_data")
        request = from_request_params(sampling_params, self.response_length)
        unbanned = set(request.banned) - set(self.engine.banned.tolist())
        if unbanned:
            raise ValueError(f"the hf rollout bans the vision tokens only; the request also bans {sorted(unbanned)}")
        other_stops = set(request.stop_token_ids) - set(self.engine.eos_ids)
        if other_stops:
            raise ValueError(f"the hf rollout stops at its eos tokens only; the request also stops at {other_stops}")
        images = tuple(image.convert("RGB") for image in image_data or ())
        prefix = Prefix(tuple(int(t) for t in prompt_ids), images, tuple(image_key(i) for i in images), request_id)
        extra: dict[str, Any] = {"global_steps": self.global_steps}
        if request.top_logprobs > 0:
            (probe,) = await self.engine.probe([prefix], request.top_logprobs)
            extra.update(top_logprobs=list(probe.top_logprobs), num_cached_tokens=probe.cached_tokens)
            return TokenOutput(token_ids=[], log_probs=[], stop_reason="completed", extra_fields=extra)
        self._requests += 1
        seed = request.seed if request.seed is not None else self._seed + self._requests
        (continuation,) = await self.engine.generate([prefix], request.sampling, [seed])
        extra["num_cached_tokens"] = continuation.cached_tokens
        return TokenOutput(
            token_ids=list(continuation.token_ids),
            log_probs=list(continuation.logprobs) if request.logprobs else None,
            stop_reason="completed",
            extra_fields=extra,
        )

    def update_weights(self, state: dict[str, torch.Tensor], global_steps: int | None = None) -> int:
        """Load the actor's full weights (HF names); returns how many tensors were loaded.

        Refuses a state that lacks any of the model's tensors (a tied tensor counts as sent when one of its
        names is): those would keep serving the old weights. Nothing is loaded then."""
        model = self.engine.model
        expected = model.state_dict(keep_vars=True)  # tied names map to one Parameter object
        unexpected = sorted(set(state) - set(expected))
        if unexpected:
            raise ValueError(f"weights the rollout model does not have: {unexpected[:5]}")
        sent = {id(tensor) for name, tensor in expected.items() if name in state}
        missing = sorted(name for name, tensor in expected.items() if name not in state and id(tensor) not in sent)
        if missing:
            raise ValueError(
                f"the actor's weights lack {len(missing)} tensors of the rollout model, e.g. {missing[:5]}: "
                "the rollout would keep serving stale weights; send the full state dict (HF names)"
            )
        model.load_state_dict(state, strict=False)
        self.engine.cache.clear()
        self.global_steps = global_steps
        return len(state)

    def set_global_steps(self, global_steps: int) -> None:
        self.global_steps = global_steps

    def clear_kv_cache(self) -> None:
        self.engine.cache.clear()

    def cache_stats(self) -> dict[str, int]:
        """The engine's cumulative counters (prefix-cache reuse: ``cached_tokens``)."""
        return dict(vars(self.engine.stats))

    # Lifecycle calls verl makes on every server. The model stays in host memory, so there is no
    # weight or KV memory to release and no in-flight request to abort (a batch is never interrupted).
    def wake_up(self, tags: list[str] | None = None) -> None:
        return None

    def sleep(self) -> None:
        return None

    def release_kv_cache(self) -> None:
        self.engine.cache.clear()

    def resume_kv_cache(self) -> None:
        return None

    def abort_all_requests(self, reject_request: bool = False) -> None:
        return None

    def resume_generation(self) -> None:
        return None

    def start_profile(self, **_: Any) -> None:
        return None

    def stop_profile(self) -> None:
        return None


class HFReplica(RolloutReplica):
    """One :class:`HFServer` per replica; its address is a name (there is no HTTP endpoint)."""

    async def launch_servers(self) -> None:
        name = server_actor_name(self.replica_rank) + self.name_suffix
        # 1 CPU so the server runs beside the trainer worker that holds the logical GPU.
        server: Any = (
            ray.remote(HFServer)
            .options(name=name, num_cpus=1, max_concurrency=self.max_concurrency)
            .remote(
                model_path=copy_to_local(self.model_config.path),
                response_length=self.config.response_length,
                seed=self.config.seed if hasattr(self.config, "seed") else 0,
            )
        )
        await server.__ray_ready__.remote()
        self.servers = [server]
        self._server_handle = server
        self._server_address = f"hf://{name}"

    def rollout_worker_use_gpu(self) -> bool:
        return False


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A detached host copy of ``tensor``, gathered first when it is an FSDP2 shard (a DTensor)."""
    if hasattr(tensor, "full_tensor"):
        tensor = tensor.full_tensor()
    return tensor.detach().to("cpu", copy=True)


class HFRolloutAdapter(BaseRollout):
    """Trainer-side rollout: sends the actor's weights to this worker's :class:`HFServer`."""

    def __init__(self, config: Any, model_config: Any, device_mesh: Any, replica_rank: int = -1) -> None:
        super().__init__(config, model_config, device_mesh)
        rank = int(os.environ.get("RANK", 0))
        world_size = self.config.tensor_model_parallel_size * self.config.data_parallel_size
        self.replica_rank = rank // world_size if replica_rank == -1 else replica_rank
        self.is_leader = rank % world_size == 0
        self._server: Any = None

    def _server_handle(self) -> Any:
        if self._server is None:
            self._server = ray.get_actor(server_actor_name(self.replica_rank))
        return self._server

    async def update_weights(
        self,
        weights: Iterable[tuple[str, torch.Tensor]],
        wire_format: str = "named_tensors",
        global_steps: int | None = None,
        **_: Any,
    ) -> None:
        if wire_format != "named_tensors":
            raise ValueError(f"the hf rollout takes wire_format='named_tensors' only, got {wire_format!r}")
        state = {name: _full(tensor) for name, tensor in weights}
        if self.is_leader:
            await self._server_handle().update_weights.remote(state, global_steps)

    async def resume(self, tags: list[str]) -> None:
        return None

    async def release(self) -> None:
        return None
