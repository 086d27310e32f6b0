"""The one place for how a turn ends and how :class:`SamplingParams` reach each backend.

- :func:`finish_reason`: the rule every engine applies to the tokens of a turn: an eos token ends it with
  ``eos``, a stop string in the decoded tail with ``stop``, ``max_new_tokens`` tokens with ``length``;
  otherwise the turn is still going (``None``). Engines that only see a finished reply use
  :func:`reply_finish_reason` (a reply that ends for none of these reasons was cut short by the server).
- :func:`banned_token_ids`: the tokens no engine may sample (vision special tokens: a sampled
  ``<|image_pad|>`` breaks the trainer's image-token count; padded vocabulary rows are not tokens).
- :func:`to_backend_params`: :class:`SamplingParams` in the vocabulary of vLLM or SGLang (HTTP servers and
  verl's in-process servers take the same keys), with the banned tokens given a :data:`BAN_BIAS`.
- :func:`from_request_params`: the vLLM-style dict verl's ``LLMServerClient`` sends, back to
  :class:`SamplingParams` (visionleaf's ``hf`` rollout replica).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from visionleaf.engines.base import FinishReason, SamplingParams

VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
"""Special tokens that only the processor writes; never sampled."""
EOS_TOKENS = ("<|im_end|>", "<|endoftext|>")
"""Tokens that end a turn with finish reason ``eos``."""
STOP_WINDOW = 16
"""Generated tokens decoded to look for a stop string (stop strings span fewer tokens)."""
BAN_BIAS = -1e9
"""Logit bias that bans a token on servers (vLLM and SGLang add it to the float32 logits: probability 0)."""

Backend = Literal["vllm", "sglang"]


def eos_token_ids(tokenizer: Any) -> frozenset[int]:
    """Ids of :data:`EOS_TOKENS` in ``tokenizer``."""
    return frozenset(tokenizer.convert_tokens_to_ids(t) for t in EOS_TOKENS)


def banned_token_ids(tokenizer: Any, vocab_size: int | None = None) -> list[int]:
    """Sorted ids no engine may sample: :data:`VISION_TOKENS`, and with the model's ``vocab_size`` (its
    output-embedding rows) also the padded rows beyond the tokenizer's vocabulary."""
    banned = {tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    if vocab_size is not None:
        banned.update(range(len(tokenizer), vocab_size))
    return sorted(banned)


def finish_reason(
    token_ids: Sequence[int], sampling: SamplingParams, eos_ids: Iterable[int], tokenizer: Any
) -> FinishReason | None:
    """Why a turn with these generated tokens has ended, or ``None`` when it goes on (the module rule).

    Eos first (the eos token is part of the turn), then a stop string anywhere in the last
    :data:`STOP_WINDOW` tokens decoded with special tokens, then the length limit."""
    if not token_ids:
        return None
    if token_ids[-1] in eos_ids:
        return "eos"
    if sampling.stop:
        tail = tokenizer.decode(list(token_ids[-STOP_WINDOW:]), skip_special_tokens=False)
        if any(stop in tail for stop in sampling.stop):
            return "stop"
    if len(token_ids) >= sampling.max_new_tokens:
        return "length"
    return None


def reply_finish_reason(
    token_ids: Sequence[int], sampling: SamplingParams, eos_ids: Iterable[int], tokenizer: Any
) -> FinishReason | None:
    """:func:`finish_reason` of a finished server reply. A non-empty reply that ended for none of the rule's
    reasons was cut short by the server (its context limit): ``length``. ``None`` only for an empty
    reply, which the caller must treat as a failed (aborted) request, never as a turn."""
    if not token_ids:
        return None
    return finish_reason(token_ids, sampling, eos_ids, tokenizer) or "length"


def ban_bias(banned: Iterable[int], backend: Backend) -> dict[Any, float]:
    """``logit_bias`` that bans ``banned``: int keys for vLLM (verl builds ``SamplingParams(**params)`` in
    process, which compares them with the vocabulary size), str keys for SGLang (its ``SamplingParams``
    declares ``Dict[str, float]`` and is msgpack-decoded with that type; consumers call ``int(key)``).
    Over HTTP, JSON makes every key a string, which both servers accept."""
    if backend == "sglang":
        return {str(int(t)): BAN_BIAS for t in banned}
    return {int(t): BAN_BIAS for t in banned}


def to_backend_params(
    sampling: SamplingParams,
    backend: Backend,
    *,
    banned: Iterable[int],
    eos_ids: Iterable[int],
    n: int = 1,
    seed: int | None = None,
) -> dict[str, Any]:
    """``sampling`` as the sampling-params dict of ``backend`` (vLLM ``SamplingParams`` / SGLang
    ``sampling_params`` keys). The output includes the stop string; every ``eos_ids`` token stops (the
    model's own eos may be only one of them); ``banned`` tokens are never sampled. Logprob options are the
    caller's (they differ between the HTTP and the in-process APIs)."""
    params: dict[str, Any] = {
        "n": n,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "stop": list(sampling.stop),
        "stop_token_ids": sorted(eos_ids),
        "logit_bias": ban_bias(banned, backend),
    }
    if backend == "vllm":
        params.update(max_tokens=sampling.max_new_tokens, top_k=sampling.top_k, include_stop_str_in_output=True)
        if seed is not None:
            params["seed"] = seed % (1 << 31)
    elif backend == "sglang":
        top_k = sampling.top_k if sampling.top_k > 0 else -1
        params.update(max_new_tokens=sampling.max_new_tokens, top_k=top_k, no_stop_trim=True)
        if seed is not None:
            params["sampling_seed"] = seed % (1 << 31)
    else:
        raise ValueError(f"backend must be 'vllm' or 'sglang', got {backend!r}")
    return params


@dataclass(frozen=True)
class RequestParams:
    """A verl request's sampling-params dict, parsed (see :func:`from_request_params`)."""

    sampling: SamplingParams
    logprobs: bool
    """Whether the reply carries the sampled tokens' logprobs."""
    top_logprobs: int
    """Top log-probabilities of the first token to return (the entropy probe; 0 = none)."""
    seed: int | None
    banned: tuple[int, ...]
    """Token ids the request bans through ``logit_bias`` (the engine must ban at least these)."""
    stop_token_ids: tuple[int, ...]
    """Token ids that must end the turn (the engine's eos tokens must include these)."""


_IGNORED = {"include_stop_str_in_output": True, "ignore_eos": False, "n": 1, "detokenize": False}
"""Keys the hf replica accepts only with these values (the behaviour it always has)."""


def from_request_params(params: Mapping[str, Any], default_max_tokens: int) -> RequestParams:
    """verl's vLLM-style sampling-params dict -> :class:`RequestParams`.

    Keys: ``temperature``, ``top_p``, ``top_k`` (-1 or 0 = off), ``max_tokens`` or ``max_new_tokens``
    (default ``default_max_tokens``), ``stop``, ``stop_token_ids``, ``logprobs`` (bool), ``top_logprobs``, ``seed``,
    ``logit_bias`` (bans only: every value <= ``BAN_BIAS``), ``repetition_penalty`` (1.0 only). Any other
    key is an error: a setting the engine would silently ignore changes what is sampled."""
    params = dict(params)
    penalty = float(params.pop("repetition_penalty", 1.0))
    if penalty != 1.0:
        raise ValueError(f"the hf rollout supports repetition_penalty=1.0 only, got {penalty}")
    bias = params.pop("logit_bias", None) or {}
    if any(float(v) > BAN_BIAS for v in bias.values()):
        raise ValueError(f"the hf rollout takes logit_bias bans only (values <= {BAN_BIAS}), got {bias}")
    for key, value in _IGNORED.items():
        if key in params and params.pop(key) != value:
            raise ValueError(f"the hf rollout supports {key}={value!r} only")
    max_tokens = params.pop("max_tokens", None) or params.pop("max_new_tokens", None) or default_max_tokens
    params.pop("max_new_tokens", None)
    seed = params.pop("seed", None)
    stop_ids = tuple(sorted(int(t) for t in params.pop("stop_token_ids", None) or ()))
    sampling = SamplingParams(
        max_new_tokens=int(max_tokens),
        temperature=float(params.pop("temperature", 1.0)),
        top_p=float(params.pop("top_p", 1.0)),
        top_k=max(int(params.pop("top_k", 0) or 0), 0),
        stop=tuple(params.pop("stop", None) or ()),
    )
    logprobs, top = bool(params.pop("logprobs", False)), int(params.pop("top_logprobs", 0) or 0)
    if params:
        raise ValueError(f"the hf rollout does not support sampling params {sorted(params)}")
    banned = tuple(sorted(int(t) for t in bias))
    return RequestParams(sampling, logprobs, top, None if seed is None else int(seed), banned, stop_ids)
