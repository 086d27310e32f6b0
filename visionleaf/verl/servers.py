"""Rollouts ``visionleaf_vllm`` / ``visionleaf_sglang``: verl's vLLM and SGLang servers, taught the entropy probe.

The tree sampler scores a node by the entropy of its next token, asked for as a 1-token greedy request
with ``sampling_params["top_logprobs"] = k``. verl's servers build their engine requests internally and
return only the sampled token's logprob, so the subclasses below answer such a request themselves (top-k
logprobs of the first token in ``TokenOutput.extra_fields["top_logprobs"]``; vLLM's probe also reports the
prompt tokens served from the prefix cache in ``extra_fields["num_cached_tokens"]``, as verl's vLLM server
does for every request, while verl's SGLang server reports none, so neither does its probe: a tree's reuse
metrics are then left out, not guessed) and hand every other request to verl unchanged.
A probe is served as verl serves a request: the vLLM probe waits at verl's admission gate (so a weight
sync never sees it half-admitted) and both use the LoRA adapter when verl's generate would.

They are registered under their own names (:mod:`visionleaf.verl.plugin`); verl's ``vllm`` / ``sglang``
rollouts stay verl's own. Under ``rollout.full_determinism`` verl passes the caller's request id to the
engine, and all requests of one tree share it (it routes them to one server), so the servers give
concurrent requests with one id distinct engine ids (:class:`InFlightIds`).

sglang and vllm do not install on CPU: the classes are defined lazily, and the request/response
translation and the admission logic are in the pure functions below, unit-tested against stand-ins.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

VISIONLEAF_VLLM = "visionleaf_vllm"
"""``rollout.name`` of verl's vLLM rollout with the entropy probe."""
VISIONLEAF_SGLANG = "visionleaf_sglang"
"""``rollout.name`` of verl's SGLang rollout with the entropy probe."""
BASE_ROLLOUT = {VISIONLEAF_VLLM: "vllm", VISIONLEAF_SGLANG: "sglang"}
"""The verl rollout each one extends (its trainer-side adapter is verl's)."""

TOP_LOGPROBS_KEY = "top_logprobs"
"""sampling_params key that turns a request into an entropy probe."""

ProbeFn = Callable[[Any, list[int], str, Any, int, dict[str, Any]], Awaitable[Any]]
"""(server, prompt ids, request id, images, top k, the request's other sampling params) -> ``TokenOutput``."""


class InFlightIds:
    """Engine request ids for concurrent requests that arrive with one id: the first keeps it, the others
    get ``<id>#<k>``. Ids are released when their request ends, so nothing accumulates."""

    def __init__(self) -> None:
        self._running: set[str] = set()

    @contextmanager
    def claim(self, request_id: str) -> Iterator[str]:
        unique, k = request_id, 0
        while unique in self._running:
            k += 1
            unique = f"{request_id}#{k}"
        self._running.add(unique)
        try:
            yield unique
        finally:
            self._running.discard(unique)


def probe_params(params: Mapping[str, Any], limit_key: str) -> dict[str, Any]:
    """The request's sampling params (its vision-token ban included) as a 1-token greedy probe."""
    out = {k: v for k, v in params.items() if k not in ("logprobs", "max_tokens", "max_new_tokens")}
    out.update({limit_key: 1, "temperature": 0.0})
    return out


def sglang_probe_request(
    request_id: str, prompt_ids: Sequence[int], image_data: Any, top_k: int, params: Mapping[str, Any], lora: str | None
) -> dict[str, Any]:
    """SGLang ``GenerateReqInput`` fields of an entropy probe: one greedy token with its top-k logprobs."""
    request = {
        "rid": request_id,
        "input_ids": list(prompt_ids),
        "image_data": image_data,
        "sampling_params": probe_params(params, "max_new_tokens"),
        "return_logprob": True,
        "top_logprobs_num": top_k,
        "logprob_start_len": -1,
    }
    if lora is not None:
        request["lora_path"] = lora
    return request


def sglang_probe_result(output: Mapping[str, Any], global_steps: int | None) -> dict[str, Any]:
    """``TokenOutput`` fields from SGLang's answer to :func:`sglang_probe_request`."""
    meta = output["meta_info"]
    extra: dict[str, Any] = {"global_steps": global_steps}
    if (meta.get("finish_reason") or {}).get("type") == "abort" or not meta.get("output_top_logprobs"):
        return {"token_ids": [], "log_probs": None, "stop_reason": "aborted", "extra_fields": extra}
    sampled = meta["output_token_logprobs"]  # [(logprob, token_id, text), ...]
    top = meta["output_top_logprobs"][0]  # top-k of the first position: [(logprob, token_id, text), ...]
    extra[TOP_LOGPROBS_KEY] = [float(t[0]) for t in top]  # no cache hits: verl's SGLang turns report none either
    return {
        "token_ids": [int(t[1]) for t in sampled],
        "log_probs": [float(t[0]) for t in sampled],
        "stop_reason": "completed",
        "extra_fields": extra,
    }


def vllm_probe_result(request_output: Any, top_k: int, global_steps: int | None) -> dict[str, Any]:
    """``TokenOutput`` fields from vLLM's final ``RequestOutput`` of a 1-token request with ``logprobs=top_k``."""
    extra: dict[str, Any] = {"global_steps": global_steps}
    if request_output is None or not request_output.outputs or request_output.outputs[0].finish_reason == "abort":
        return {"token_ids": [], "log_probs": None, "stop_reason": "aborted", "extra_fields": extra}
    completion = request_output.outputs[0]
    first = completion.logprobs[0]  # {token_id: Logprob(logprob=..., rank=...)}: the top-k and the sampled token
    ranked = sorted(
        (lp for lp in first.values() if lp.rank is not None and 1 <= lp.rank <= top_k), key=lambda lp: lp.rank
    )
    token = completion.token_ids[0]
    extra.update(
        {TOP_LOGPROBS_KEY: [float(lp.logprob) for lp in ranked], "num_cached_tokens": request_output.num_cached_tokens}
    )
    return {
        "token_ids": list(completion.token_ids),
        "log_probs": [float(first[token].logprob)],
        "stop_reason": "completed",
        "extra_fields": extra,
    }


async def vllm_admitted(server: Any, request_id: str, outputs: Callable[[], AsyncIterator[Any]]) -> Any:
    """The final output of ``outputs()`` run past verl's admission gate, as ``vLLMHttpServer.generate`` does;
    the gate's aborted ``TokenOutput`` when it rejects the request."""
    rejected = await server._park_until_admitted(request_id)
    if rejected is not None:
        return rejected
    final, admitted = None, False
    try:
        async for output in outputs():
            if not admitted:  # the engine holds the request now: the gate may close behind it
                admitted = True
                server._admitting -= 1
            final = output
    finally:
        if not admitted:
            server._admitting -= 1
    return final


async def vllm_lora(server: Any, lora_id: int) -> bool:
    """Whether verl's generate would use the LoRA adapter (adapter mode and the adapter is loaded)."""
    return bool(server.lora_as_adapter) and lora_id in await server.engine.list_loras()


def _replica_serving(replica: type, server: type) -> type:
    """A subclass of verl's ``replica`` whose servers are ``server`` Ray actors."""
    import ray

    class Replica(replica):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.server_class: Any = ray.remote(server)

    Replica.__name__ = Replica.__qualname__ = f"Visionleaf{replica.__name__}"
    return Replica


def probe_aware(server: type, probe: ProbeFn) -> type:
    """A subclass of verl's ``server`` that answers entropy probes with ``probe``, hands every other request
    to verl unchanged, and gives concurrent requests with one id distinct engine ids."""

    class Server(server):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.visionleaf_ids = InFlightIds()

        async def generate(  # forwards verl's keyword arguments unchanged
            self, prompt_ids: Any, sampling_params: dict[str, Any], request_id: str, **kwargs: Any
        ) -> Any:
            with self.visionleaf_ids.claim(request_id) as unique:
                top_k = sampling_params.pop(TOP_LOGPROBS_KEY, None)
                if top_k is None:
                    return await super().generate(prompt_ids, sampling_params, unique, **kwargs)
                images = kwargs.get("image_data")
                return await probe(self, list(prompt_ids), unique, images, int(top_k), sampling_params)

    Server.__name__ = Server.__qualname__ = f"TopLogprob{server.__name__}"
    return Server


def sglang_replica_class() -> type:
    """verl's ``SGLangReplica`` serving with the probe-aware SGLang server (imports sglang)."""
    from verl.workers.rollout.replica import RolloutReplicaRegistry, TokenOutput

    replica = RolloutReplicaRegistry.get("sglang")  # verl's loader: sglang imports under verl's environment
    from sglang.srt.managers.io_struct import GenerateReqInput
    from verl.workers.rollout.sglang_rollout.async_sglang_server import SGLangHttpServer
    from verl.workers.rollout.sglang_rollout.utils import SGLANG_LORA_NAME

    async def probe(server: Any, ids: list[int], request_id: str, images: Any, top_k: int, params: Any) -> Any:
        lora = SGLANG_LORA_NAME if server.lora_as_adapter else None
        request = GenerateReqInput(**sglang_probe_request(request_id, ids, images, top_k, params, lora))
        output = await server.tokenizer_manager.generate_request(request, None).__anext__()
        return TokenOutput(**sglang_probe_result(output, server.global_steps))

    return _replica_serving(replica, probe_aware(SGLangHttpServer, probe))


def vllm_replica_class() -> type:
    """verl's ``vLLMReplica`` serving with the probe-aware vLLM server (imports vllm)."""
    from verl.workers.rollout.replica import RolloutReplicaRegistry, TokenOutput

    replica = RolloutReplicaRegistry.get("vllm")  # verl's own loader
    from verl.workers.rollout.utils import qwen2_5_vl_dedup_image_tokens
    from verl.workers.rollout.vllm_rollout.utils import VLLM_LORA_INT_ID, VLLM_LORA_NAME, VLLM_LORA_PATH
    from verl.workers.rollout.vllm_rollout.vllm_async_server import vLLMHttpServer
    from vllm import SamplingParams, TokensPrompt
    from vllm.lora.request import LoRARequest

    async def probe(server: Any, ids: list[int], request_id: str, images: Any, top_k: int, params: Any) -> Any:
        ids = qwen2_5_vl_dedup_image_tokens(ids, server.model_config.processor)
        prompt = TokensPrompt(prompt_token_ids=ids, multi_modal_data={"image": images} if images else {})
        sampling = SamplingParams(**probe_params(params, "max_tokens"), logprobs=top_k)
        lora = None
        if await vllm_lora(server, VLLM_LORA_INT_ID):
            lora = LoRARequest(lora_name=VLLM_LORA_NAME, lora_int_id=VLLM_LORA_INT_ID, lora_path=VLLM_LORA_PATH)

        def outputs() -> AsyncIterator[Any]:
            return server.engine.generate(
                prompt=prompt, sampling_params=sampling, request_id=request_id, lora_request=lora
            )

        final = await vllm_admitted(server, request_id, outputs)
        if isinstance(final, TokenOutput):  # the gate rejected it
            return final
        return TokenOutput(**vllm_probe_result(final, top_k, server.global_steps))

    return _replica_serving(replica, probe_aware(vLLMHttpServer, probe))
