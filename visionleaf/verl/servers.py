"""verl's SGLang and vLLM rollout servers, taught the tree sampler's entropy probe (GPU clusters only).

The tree sampler scores a node by the entropy of its next token, asked for as a 1-token greedy request
with ``sampling_params["top_logprobs"] = k``. verl's servers build their engine requests internally and
return only the sampled token's logprob, so the subclasses below answer such a request themselves (top-k
logprobs of the first token in ``TokenOutput.extra_fields["top_logprobs"]``, the engine's cached prompt
tokens in ``extra_fields["cached_tokens"]``) and hand every other request to verl unchanged. They replace
the built-in ``sglang`` / ``vllm`` replica names when the plugin loads.

sglang and vllm do not install on CPU: the classes are defined lazily, and the request/response
translation is in the pure functions below, unit-tested against stand-ins. On GPU clusters they run for
real; nothing here runs in the CPU CI.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

TOP_LOGPROBS_KEY = "top_logprobs"
"""sampling_params key that turns a request into an entropy probe."""

ProbeFn = Callable[[Any, list[int], str, Any, int], Awaitable[Any]]
"""(server, prompt ids, request id, images, top k) -> verl ``TokenOutput`` with ``top_logprobs``."""


def to_sglang_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """The tree sampler's vLLM-style sampling params in SGLang's names."""
    out = dict(params)
    if "include_stop_str_in_output" in out:
        out["no_stop_trim"] = bool(out.pop("include_stop_str_in_output"))
    if "seed" in out:
        out["sampling_seed"] = out.pop("seed")
    return out


def sglang_probe_request(request_id: str, prompt_ids: Sequence[int], image_data: Any, top_k: int) -> dict[str, Any]:
    """SGLang ``GenerateReqInput`` fields of an entropy probe: one greedy token with its top-k logprobs."""
    return {
        "rid": request_id,
        "input_ids": list(prompt_ids),
        "image_data": image_data,
        "sampling_params": {"max_new_tokens": 1, "temperature": 0.0},
        "return_logprob": True,
        "top_logprobs_num": top_k,
        "logprob_start_len": -1,
    }


def sglang_probe_result(output: Mapping[str, Any]) -> dict[str, Any]:
    """``TokenOutput`` fields from SGLang's answer to :func:`sglang_probe_request`."""
    meta = output["meta_info"]
    sampled = meta["output_token_logprobs"]  # [(logprob, token_id, text), ...]
    top = meta["output_top_logprobs"][0]  # top-k of the first position: [(logprob, token_id, text), ...]
    return {
        "token_ids": [int(t[1]) for t in sampled],
        "log_probs": [float(t[0]) for t in sampled],
        "extra_fields": {
            TOP_LOGPROBS_KEY: [float(t[0]) for t in top],
            "cached_tokens": int(meta.get("cached_tokens", 0)),
        },
    }


def vllm_probe_result(request_output: Any) -> dict[str, Any]:
    """``TokenOutput`` fields from vLLM's ``RequestOutput`` of a 1-token request with ``logprobs=k``."""
    completion = request_output.outputs[0]
    first = completion.logprobs[0]  # {token_id: Logprob(logprob=..., rank=...)}: the sampled token + top-k
    ranked = sorted(first.values(), key=lambda lp: lp.rank)
    top = [float(lp.logprob) for lp in ranked if lp.rank is not None and lp.rank >= 1]
    token = completion.token_ids[0]
    return {
        "token_ids": list(completion.token_ids),
        "log_probs": [float(first[token].logprob)],
        "extra_fields": {TOP_LOGPROBS_KEY: top, "cached_tokens": int(request_output.num_cached_tokens or 0)},
    }


def _replica_serving(replica: type, server: type) -> type:
    """A subclass of verl's ``replica`` whose servers are ``server`` Ray actors."""
    import ray

    class Replica(replica):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.server_class: Any = ray.remote(server)

    Replica.__name__ = Replica.__qualname__ = f"Visionleaf{replica.__name__}"
    return Replica


def _probe_aware(server: type, probe: ProbeFn, translate: Callable[[dict[str, Any]], dict[str, Any]]) -> type:
    """A subclass of verl's ``server`` that answers entropy probes with ``probe`` and hands every other
    request, its sampling params passed through ``translate``, to verl unchanged."""

    class Server(server):
        async def generate(  # forwards verl's keyword arguments unchanged
            self, prompt_ids: Any, sampling_params: dict[str, Any], request_id: str, **kwargs: Any
        ) -> Any:
            top_k = sampling_params.pop(TOP_LOGPROBS_KEY, None)
            if top_k is None:
                return await super().generate(prompt_ids, translate(sampling_params), request_id, **kwargs)
            return await probe(self, list(prompt_ids), request_id, kwargs.get("image_data"), int(top_k))

    Server.__name__ = Server.__qualname__ = f"TopLogprob{server.__name__}"
    return Server


def sglang_replica_class() -> type:
    """verl's ``SGLangReplica`` serving with the probe-aware SGLang server (imports sglang)."""
    from sglang.srt.managers.io_struct import GenerateReqInput
    from verl.workers.rollout.replica import TokenOutput
    from verl.workers.rollout.sglang_rollout.async_sglang_server import SGLangHttpServer, SGLangReplica

    async def probe(server: Any, ids: list[int], request_id: str, images: Any, top_k: int) -> Any:
        request = GenerateReqInput(**sglang_probe_request(request_id, ids, images, top_k))
        output = await server.tokenizer_manager.generate_request(request, None).__anext__()
        return TokenOutput(**sglang_probe_result(output))

    return _replica_serving(SGLangReplica, _probe_aware(SGLangHttpServer, probe, to_sglang_params))


def vllm_replica_class() -> type:
    """verl's ``vLLMReplica`` serving with the probe-aware vLLM server (imports vllm)."""
    from verl.workers.rollout.replica import TokenOutput
    from verl.workers.rollout.utils import qwen2_5_vl_dedup_image_tokens
    from verl.workers.rollout.vllm_rollout.vllm_async_server import vLLMHttpServer, vLLMReplica
    from vllm import SamplingParams, TokensPrompt

    async def probe(server: Any, ids: list[int], request_id: str, images: Any, top_k: int) -> Any:
        ids = qwen2_5_vl_dedup_image_tokens(ids, server.model_config.processor)
        prompt = TokensPrompt(prompt_token_ids=ids, multi_modal_data={"image": images} if images else {})
        params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=top_k)
        outputs = [
            o async for o in server.engine.generate(prompt=prompt, sampling_params=params, request_id=request_id)
        ]
        return TokenOutput(**vllm_probe_result(outputs[-1]))

    return _replica_serving(vLLMReplica, _probe_aware(vLLMHttpServer, probe, dict))
