"""The verl-path cases of the engine contract suite, and the in-process verl pieces they are built from.

All cases run :class:`~visionleaf.verl.engine.VerlEngine` over verl 0.9.1's REAL ``LLMServerClient`` and
``GlobalRequestLoadBalancer`` (plain classes; only Ray's calling convention is reproduced, by
:class:`InProcessActor`), so request ids are replaced by fresh uuids per request, the load balancer pins
a request id to a server, and ``full_determinism`` passes ids through, exactly as on a cluster:

- ``verl_hf``: the server is visionleaf's real :class:`~visionleaf.verl.hf_replica.HFServer`;
- ``verl_standin``: the server is :class:`StandInServer` treating a request as verl's
  ``vLLMHttpServer.generate`` does (vLLM ``SamplingParams`` keys only, int ``logit_bias`` keys, duplicate
  running request ids rejected, ``num_cached_tokens`` in the reply, ``stop_reason="aborted"`` with no
  tokens for a dropped request); it can be told to abort requests or to hang;
- ``verl_standin_sglang``: the same as verl's ``SGLangHttpServer.generate`` does (SGLang ``SamplingParams``
  keys only, str ``logit_bias`` keys, no cached-token count, ``stop_reason`` SGLang's finish type).
"""

from __future__ import annotations

import asyncio
import copy
import inspect
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf
from verl.workers.rollout.llm_server import LLMServerClient
from verl.workers.rollout.replica import TokenOutput
from verl.workers.rollout.router import GlobalRequestLoadBalancer

from visionleaf.engines.base import Prefix, SamplingParams, image_key
from visionleaf.engines.hf import HFEngine
from visionleaf.engines.sampling import Backend
from visionleaf.verl.engine import RetryPolicy, VerlEngine
from visionleaf.verl.hf_replica import HFServer
from visionleaf.verl.servers import TOP_LOGPROBS_KEY, VISIONLEAF_SGLANG, VISIONLEAF_VLLM

VLLM_SAMPLING_KEYS = frozenset(
    [
        "n",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "seed",
        "stop",
        "stop_token_ids",
        "ignore_eos",
        "max_tokens",
        "min_tokens",
        "logprobs",
        "prompt_logprobs",
        "detokenize",
        "skip_special_tokens",
        "spaces_between_special_tokens",
        "include_stop_str_in_output",
        "output_kind",
        "structured_outputs",
        "logit_bias",
        "allowed_token_ids",
        "extra_args",
        "bad_words",
    ]
)
"""Fields of vLLM's ``SamplingParams`` (vllm==0.24, verl's pin): verl's server builds ``SamplingParams(**params)``."""

SGLANG_SAMPLING_KEYS = frozenset(
    [
        "max_new_tokens",
        "stop",
        "stop_token_ids",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "frequency_penalty",
        "presence_penalty",
        "repetition_penalty",
        "min_new_tokens",
        "n",
        "json_schema",
        "regex",
        "ebnf",
        "structural_tag",
        "ignore_eos",
        "skip_special_tokens",
        "spaces_between_special_tokens",
        "no_stop_trim",
        "custom_params",
        "stream_interval",
        "logit_bias",
        "sampling_seed",
    ]
)
"""API fields of SGLang's ``SamplingParams`` (sglang==0.5.12, verl's pin): verl's server passes the dict on."""

FAST_RETRY = RetryPolicy(timeout_s=5.0, max_retries=1, backoff_s=0.0)
"""Retries for tests: a hung request fails within seconds."""


class InProcessActor:
    """Ray's actor calling convention over a local object: ``handle.method.remote(...)`` is awaitable.

    Arguments are deep-copied, as Ray serialises them (a server that pops keys from its sampling params
    must not change the caller's dict)."""

    def __init__(self, target: Any) -> None:
        self.target = target

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.target, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            args, kwargs = copy.deepcopy((args, kwargs))
            result = method(*args, **kwargs)
            return await result if inspect.isawaitable(result) else result

        return SimpleNamespace(remote=lambda *args, **kwargs: asyncio.ensure_future(call(*args, **kwargs)))


def verl_client(servers: dict[str, Any], rollout_name: str = "vllm", full_determinism: bool = False) -> Any:
    """verl's real ``LLMServerClient`` and load balancer over in-process servers (address -> server)."""
    config = OmegaConf.create(
        {"actor_rollout_ref": {"rollout": {"name": rollout_name, "full_determinism": full_determinism}}}
    )
    handles = {address: InProcessActor(server) for address, server in servers.items()}
    balancer = GlobalRequestLoadBalancer(handles, full_determinism=full_determinism)
    return LLMServerClient(config, InProcessActor(balancer))


class StandInServer:
    """verl's ``vLLMHttpServer.generate`` or ``SGLangHttpServer.generate`` (``backend``), with visionleaf's
    probe, over the HF engine (module docstring). Like the real engines it bans only what the request's
    ``logit_bias`` bans (values <= -100)."""

    def __init__(self, model: Any, processor: Any, global_steps: int = 3, backend: Backend = "vllm") -> None:
        self.model, self.processor = model, processor
        self.backend = backend
        self.global_steps = global_steps
        self.received: list[tuple[str, dict[str, Any]]] = []
        """(request id, sampling params) of every request, as received."""
        self.abort = 0
        """The next ``abort`` requests come back aborted."""
        self.hang = False
        """Requests never finish."""
        self._engines: dict[frozenset[int], HFEngine] = {}
        self._running: set[str] = set()

    def engine(self, banned: frozenset[int]) -> HFEngine:
        if banned not in self._engines:
            engine = HFEngine(self.model, self.processor)
            engine.banned = torch.tensor(sorted(banned), dtype=torch.long)
            self._engines[banned] = engine
        return self._engines[banned]

    async def generate(
        self,
        prompt_ids: list[int],
        sampling_params: dict[str, Any],
        request_id: str,
        image_data: list[Any] | None = None,
        video_data: list[Any] | None = None,
        audio_data: list[Any] | None = None,
        mm_processor_kwargs: dict[str, Any] | None = None,
        priority: int = 0,
    ) -> TokenOutput:
        if request_id in self._running:  # vLLM's output processor refuses a second running request with one id
            raise ValueError(f"Request id {request_id} already running.")
        self._running.add(request_id)
        self.received.append((request_id, copy.deepcopy(sampling_params)))
        try:
            return await self._serve(prompt_ids, dict(sampling_params), request_id, image_data)
        finally:
            self._running.discard(request_id)

    async def _serve(
        self, prompt_ids: list[int], params: dict[str, Any], request_id: str, image_data: list[Any] | None
    ) -> TokenOutput:
        top_logprobs = params.pop("top_logprobs", None)  # visionleaf's server subclass takes it out first
        sampling, seed, logprobs, banned = self._parse(params)
        if self.hang:
            await asyncio.Event().wait()
        extra: dict[str, Any] = {"global_steps": self.global_steps}
        if self.abort > 0:
            self.abort -= 1
            aborted = "aborted" if self.backend == "vllm" else "abort"
            return TokenOutput(token_ids=[], log_probs=None, stop_reason=aborted, extra_fields=extra)
        engine = self.engine(banned)
        images = tuple(image_data or ())
        prefix = Prefix(tuple(prompt_ids), images, tuple(image_key(i) for i in images), request_id)
        if top_logprobs:
            (probe,) = await engine.probe([prefix], int(top_logprobs))
            (greedy,) = await engine.generate([prefix], SamplingParams(max_new_tokens=1, temperature=0.0, stop=()), [0])
            extra[TOP_LOGPROBS_KEY] = list(probe.top_logprobs)
            out = greedy
            cached = probe.cached_tokens
        else:
            (out,) = await engine.generate([prefix], sampling, [seed])
            cached = out.cached_tokens
        if self.backend == "vllm":  # verl's SGLang server reports no cache hits
            extra["num_cached_tokens"] = cached
        finish = (
            "completed" if self.backend == "vllm" else ("stop" if out.finish_reason == "eos" else out.finish_reason)
        )
        return TokenOutput(
            token_ids=list(out.token_ids),
            log_probs=list(out.logprobs) if logprobs or top_logprobs else None,
            stop_reason=finish,
            extra_fields=extra,
        )

    def _parse(self, params: dict[str, Any]) -> tuple[SamplingParams, int, bool, frozenset[int]]:
        """(sampling, seed, logprobs, banned tokens) of a request, refused where the real server would fail."""
        logprobs = bool(params.pop("logprobs", False))
        if self.backend == "vllm":
            keys, limit, trim_key, seed_key, bias_key_type = (
                VLLM_SAMPLING_KEYS,
                "max_tokens",
                "include_stop_str_in_output",
                "seed",
                int,
            )
        else:
            keys, limit, trim_key, seed_key, bias_key_type = (
                SGLANG_SAMPLING_KEYS,
                "max_new_tokens",
                "no_stop_trim",
                "sampling_seed",
                str,
            )
        unknown = set(params) - keys
        if unknown:
            raise TypeError(f"SamplingParams.__init__() got unexpected keyword arguments {sorted(unknown)}")
        bias = params.get("logit_bias") or {}
        if not all(isinstance(token, bias_key_type) for token in bias):  # vLLM compares ints; SGLang decodes str
            raise TypeError(f"{self.backend} needs {bias_key_type.__name__} logit_bias keys, got {list(bias)[:3]}")
        if not params.get(trim_key, False):
            raise ValueError(f"the stand-in serves {trim_key}=True only")
        sampling = SamplingParams(
            max_new_tokens=int(params.get(limit, 16)),
            temperature=float(params.get("temperature", 1.0)),
            top_p=float(params.get("top_p", 1.0)),
            top_k=max(int(params.get("top_k", 0)), 0),
            stop=tuple(params.get("stop") or ()),
        )
        banned = frozenset(int(token) for token, value in bias.items() if value <= -100)
        return sampling, int(params.get(seed_key) or 0), logprobs, banned


def standin_engine(server: StandInServer, retry: RetryPolicy = FAST_RETRY, **client: Any) -> VerlEngine:
    """``VerlEngine`` over verl's client over ``server`` (``client``: :func:`verl_client` options)."""
    tokenizer = server.processor.tokenizer
    vocab = server.model.get_output_embeddings().weight.shape[0]
    name = {"vllm": VISIONLEAF_VLLM, "sglang": VISIONLEAF_SGLANG}[server.backend]
    client_manager = verl_client({"standin:0": server}, name, **client)
    return VerlEngine(client_manager, tokenizer, name, retry, vocab_size=vocab)


def hf_engine(model_dir: Path, processor: Any, vocab_size: int | None, retry: RetryPolicy = FAST_RETRY) -> VerlEngine:
    """``VerlEngine`` over verl's client over a fresh real ``HFServer`` loaded from ``model_dir``."""
    server = HFServer(str(model_dir), response_length=256)
    return VerlEngine(verl_client({"hf://0": server}, "hf"), processor.tokenizer, "hf", retry, vocab_size=vocab_size)


CASES: dict[str, list[Any]] = {"verl_hf": [], "verl_standin": [], "verl_standin_sglang": []}


@pytest.fixture(scope="session")
def engine_case_verl_hf(contract_model_dir, contract_model):
    from tests.engines.conftest import EngineCase

    model, processor = contract_model
    vocab = model.get_output_embeddings().weight.shape[0]
    return EngineCase(
        name="verl_hf",
        make=lambda: hf_engine(contract_model_dir, processor, vocab),
        processor=processor,
        model=model,
        cached="exact",
        fail=None,
        no_fail_reason="the hf replica never aborts or hangs; verl_standin covers aborts and timeouts",
        folds_probe=False,
    )


def standin_case(model: Any, processor: Any, backend: Backend) -> Any:
    from tests.engines.conftest import EngineCase

    def failing(kind: str) -> VerlEngine:
        server = StandInServer(model, processor, backend=backend)
        if kind == "abort":
            server.abort = 1 << 30
        elif kind == "timeout":
            server.hang = True
        else:
            raise ValueError(f"unknown failure {kind!r}")
        return standin_engine(server, RetryPolicy(timeout_s=0.5, max_retries=1, backoff_s=0.0))

    return EngineCase(
        name="verl_standin" if backend == "vllm" else "verl_standin_sglang",
        make=lambda: standin_engine(StandInServer(model, processor, backend=backend)),
        processor=processor,
        model=model,
        cached="exact" if backend == "vllm" else "unknown",
        fail=failing,
        folds_probe=False,
    )


@pytest.fixture(scope="session")
def engine_case_verl_standin(contract_model):
    return standin_case(*contract_model, "vllm")


@pytest.fixture(scope="session")
def engine_case_verl_standin_sglang(contract_model):
    return standin_case(*contract_model, "sglang")
