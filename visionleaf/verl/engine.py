"""The tree sampler's :class:`~visionleaf.engines.base.Engine` over verl's ``LLMServerClient``.

:class:`VerlEngine` reaches verl's rollout replicas (``vllm``, ``sglang``, visionleaf's probe-aware
``visionleaf_vllm`` / ``visionleaf_sglang``, and the ``hf`` replica) through the client verl hands to
agent loops. Every request of one prompt carries the prompt's routing key as ``request_id``: verl's load
balancer pins a request id to one server, so the whole tree shares that server's prefix cache.

What it relies on in a reply (verl 0.9.1's ``TokenOutput``):

- ``stop_reason`` ``"aborted"`` (vLLM) or ``"abort"`` (SGLang), with no tokens, when the server dropped
  the request (weight sync, a closed admission gate): retried, never a turn;
- ``extra_fields["num_cached_tokens"]``: prompt tokens served from the prefix cache (verl's vLLM server
  and visionleaf's replicas report it; verl's SGLang server does not, so cached tokens are unknown there
  and the tree's reuse metrics are left out);
- ``extra_fields["top_logprobs"]`` for an entropy probe (a request with ``top_logprobs: k``), which only
  visionleaf's replicas answer.

The folded schedule (``tree.schedule=folded``: a generate that also returns its first token's top
logprobs) is refused: verl's servers answer top logprobs only to a probe request (a generate request
with ``top_logprobs`` would be taken for one), so the tree keeps its separate probes there.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from visionleaf.engines.base import Continuation, EngineError, EngineStats, Prefix, Probe, SamplingParams
from visionleaf.engines.sampling import (
    Backend,
    banned_token_ids,
    eos_token_ids,
    reply_finish_reason,
    to_backend_params,
)

ABORTED = ("aborted", "abort")
"""``TokenOutput.stop_reason`` of a request the server dropped (vLLM / SGLang spelling)."""

SGLANG_ROLLOUTS = ("sglang", "visionleaf_sglang")
"""``rollout.name`` values whose servers take SGLang's sampling-params names."""


def backend_for(rollout_name: str) -> Backend:
    """Sampling-params vocabulary of a verl rollout: SGLang's for the sglang replicas, vLLM's otherwise
    (the ``hf`` replica reads vLLM's names)."""
    return "sglang" if rollout_name in SGLANG_ROLLOUTS else "vllm"


def client_rollout_name(client: Any) -> str:
    """``rollout.name`` in the config of verl's ``LLMServerClient``; ``vllm`` for a client without one."""
    config = getattr(client, "config", None)
    rollout = getattr(getattr(config, "actor_rollout_ref", None), "rollout", None)
    return str(getattr(rollout, "name", None) or "vllm")


@dataclass(frozen=True)
class RetryPolicy:
    """How long to wait for one reply and how often to try again before the group fails."""

    timeout_s: float = 600.0
    """Per attempt; a long multi-image turn on a busy server takes minutes, a stuck one forever."""
    max_retries: int = 2
    """Further attempts after a timeout, an error or an aborted reply."""
    backoff_s: float = 2.0
    """Delay before the first retry; doubles each retry."""

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.max_retries < 0 or self.backoff_s < 0:
            raise ValueError(f"need timeout_s > 0, max_retries >= 0, backoff_s >= 0, got {self}")


class VerlEngine:
    """:class:`~visionleaf.engines.base.Engine` over verl's ``LLMServerClient`` (module docstring).

    Prompt ids go with image pads expanded and the images as PIL, as verl's own agent loops send them.
    ``rollout_name`` (``actor_rollout_ref.rollout.name``; default: :func:`client_rollout_name`) picks the
    sampling-params vocabulary and names the servers in errors; ``vocab_size`` (the model's output rows)
    adds the padded rows to the banned tokens.
    """

    def __init__(
        self,
        server_manager: Any,
        tokenizer: Any,
        rollout_name: str | None = None,
        retry: RetryPolicy | None = None,
        vocab_size: int | None = None,
    ) -> None:
        self.server_manager = server_manager
        self.tokenizer = tokenizer
        self.rollout_name = rollout_name or client_rollout_name(server_manager)
        self.backend = backend_for(self.rollout_name)
        self.retry = retry or RetryPolicy()
        self.banned = banned_token_ids(tokenizer, vocab_size)
        self.eos_ids = eos_token_ids(tokenizer)
        self.stats = EngineStats()
        self.weight_versions: list[int] = []
        """``global_steps`` of the weights that served each request (verl's staleness control needs them)."""

    async def generate(self, prefixes: list[Prefix], sampling: SamplingParams, seeds: list[int]) -> list[Continuation]:
        if len(seeds) != len(prefixes):
            raise ValueError(f"need one seed per prefix, got {len(seeds)} seeds for {len(prefixes)} prefixes")
        if sampling.first_top_logprobs:
            raise ValueError(
                f"verl rollout {self.rollout_name!r} answers the first token's top logprobs only to a separate "
                "probe request, not within a generate: set visionleaf.tree.schedule=lockstep"
            )
        outputs = await asyncio.gather(
            *(
                self._call(prefix, self._params(sampling, seed), probe=False)
                for prefix, seed in zip(prefixes, seeds, strict=True)
            )
        )
        out = []
        for prefix, output in zip(prefixes, outputs, strict=True):
            ids = [int(t) for t in output.token_ids]
            reason = reply_finish_reason(ids, sampling, self.eos_ids, self.tokenizer) or "length"  # ids not empty
            cached = self._count(prefix, output, generated=len(ids))
            out.append(Continuation(tuple(ids), tuple(float(v) for v in output.log_probs), reason, cached))
        return out

    async def probe(self, prefixes: list[Prefix], top_k: int) -> list[Probe]:
        greedy = SamplingParams(max_new_tokens=1, temperature=0.0, stop=())
        params = {
            **to_backend_params(greedy, self.backend, banned=self.banned, eos_ids=self.eos_ids),
            "logprobs": True,
            "top_logprobs": top_k,
        }
        outputs = await asyncio.gather(*(self._call(prefix, params, probe=True) for prefix in prefixes))
        result = []
        for prefix, output in zip(prefixes, outputs, strict=True):
            top = tuple(sorted((float(v) for v in output.extra_fields["top_logprobs"]), reverse=True))
            result.append(Probe(top, self._count(prefix, output, generated=0)))
        return result

    def _params(self, sampling: SamplingParams, seed: int) -> dict[str, Any]:
        return {
            **to_backend_params(sampling, self.backend, banned=self.banned, eos_ids=self.eos_ids, seed=seed),
            "logprobs": True,
        }

    async def _call(self, prefix: Prefix, params: dict[str, Any], probe: bool) -> Any:
        """One reply for ``prefix``: retried after a timeout, an error or an abort, then :class:`EngineError`."""
        problems: list[str] = []
        for attempt in range(self.retry.max_retries + 1):
            if attempt:
                await asyncio.sleep(self.retry.backoff_s * 2 ** (attempt - 1))
            try:
                output = await asyncio.wait_for(
                    self.server_manager.generate(
                        request_id=prefix.route,
                        prompt_ids=list(prefix.token_ids),
                        sampling_params={**params, "logit_bias": dict(params["logit_bias"])},  # servers pop keys
                        image_data=list(prefix.images) or None,
                    ),
                    self.retry.timeout_s,
                )
            except TimeoutError:
                problems.append(f"no reply within {self.retry.timeout_s:g} s")
                continue
            except Exception as exc:  # the servers' own errors (and Ray's) carry no common type
                problems.append(f"{type(exc).__name__}: {exc}")
                continue
            problem = self._problem(output, probe)
            if problem is None:
                return output
            problems.append(problem)
        raise EngineError(
            f"verl rollout {self.rollout_name!r} failed a request of uid {prefix.route!r} {len(problems)} times "
            f"(the server verl's load balancer pinned the uid to): {'; '.join(problems)}"
        )

    def _problem(self, output: Any, probe: bool) -> str | None:
        """Why ``output`` is no answer (``None``: it is one); a probe the server cannot answer raises."""
        if output.stop_reason in ABORTED:
            return f"the server aborted the request (stop_reason={output.stop_reason!r})"
        if probe:
            if not output.extra_fields.get("top_logprobs"):
                raise EngineError(
                    f"verl rollout {self.rollout_name!r} returned no top_logprobs for the entropy probe; use "
                    "rollout.name=visionleaf_vllm, visionleaf_sglang or hf, or tree.mode=chain"
                )
            return None
        if not output.token_ids:
            return f"empty reply (stop_reason={output.stop_reason!r})"
        if output.log_probs is None or len(output.log_probs) != len(output.token_ids):
            return f"{len(output.token_ids)} tokens but {len(output.log_probs or [])} logprobs"
        return None

    def _count(self, prefix: Prefix, output: Any, generated: int) -> int | None:
        """Record ``output`` in the stats; returns its cached prompt tokens (``None``: not reported)."""
        for key in ("min_global_steps", "max_global_steps"):
            if output.extra_fields.get(key) is not None:
                self.weight_versions.append(int(output.extra_fields[key]))
        reported = output.extra_fields.get("num_cached_tokens")
        cached = None if reported is None else int(reported)
        self.stats.requests += 1
        self.stats.prompt_tokens += len(prefix.token_ids)
        self.stats.generated_tokens += generated
        if cached is None:
            self.stats.unknown_cached += 1
        else:
            self.stats.cached_tokens += cached
            self.stats.computed_tokens += len(prefix.token_ids) - cached + generated
        return cached
