"""The tree rollout inside verl 0.9.1's V1 agent-loop workers (the plugin registers it as ``visionleaf_tree``).

verl's V1 worker runs the N sessions of one prompt ``uid`` as N tasks of one agent loop each, created
together in one event loop (``AgentLoopWorkerTQ._run_prompt``). GRPO groups whatever those N sessions
return. So all N sessions of a uid share one tree, through a per-uid coordinator rather than a custom
worker (which would fork verl's worker class):

1. every session registers under its uid and yields once; verl creates the N session tasks before any of
   them runs, so after one scheduling tick all N are registered (the count is checked against
   ``rollout.n`` / ``rollout.val_kwargs.n``);
2. the first session grows the tree (``budget`` = N) with :class:`~visionleaf.rollout.tree.TreeSampler`
   over :class:`VerlEngine`, an adapter over verl's ``LLMServerClient`` whose ``request_id`` is the uid, so
   every branch of the tree lands on the same server and its prefix cache;
3. each session returns leaf ``session_id`` as its own ``AgentLoopOutput``.

If the tree fails (an engine error after retries), every session of the uid raises, verl marks the group
failed, and :mod:`visionleaf.verl.errors` counts the sessions in ``rollout/agent_loop_errors``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from verl.experimental.agent_loop.agent_loop import AgentLoopBase, AgentLoopMetrics, AgentLoopOutput

from visionleaf.data.images import load_image
from visionleaf.engines.base import Continuation, EngineError, EngineStats, FinishReason, Prefix, SamplingParams
from visionleaf.engines.hf import EOS_TOKENS, STOP_WINDOW
from visionleaf.rollout.tree import Leaf, TreeConfig, TreeRecord, TreeSampler


class VerlEngine:
    """:class:`~visionleaf.engines.base.Engine` over verl's ``LLMServerClient`` (sglang, vllm or hf replicas).

    Prompt ids go with image pads expanded and the images as PIL, as verl's own agent loops send them.
    The entropy probe asks for one greedy token with ``top_logprobs``; the server must return them in
    ``TokenOutput.extra_fields["top_logprobs"]`` (visionleaf's hf replica and server subclasses do).
    """

    def __init__(self, server_manager: Any, tokenizer: Any, base_params: dict[str, Any] | None = None) -> None:
        self.server_manager = server_manager
        self.tokenizer = tokenizer
        self.base_params = dict(base_params or {})
        self.eos_ids = {tokenizer.convert_tokens_to_ids(t) for t in EOS_TOKENS}
        self.stats = EngineStats()
        self.weight_versions: list[int] = []
        """``global_steps`` of the weights that served each request (verl's staleness control needs them)."""

    async def generate(self, prefixes: list[Prefix], sampling: SamplingParams, seeds: list[int]) -> list[Continuation]:
        params = {
            **self.base_params,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "top_k": sampling.top_k if sampling.top_k > 0 else -1,
            "max_tokens": sampling.max_new_tokens,
            "stop": list(sampling.stop),
            "include_stop_str_in_output": True,
            "logprobs": True,
        }
        outputs = await asyncio.gather(
            *(
                self._call(prefix, {**params, "seed": seed % (1 << 31)})
                for prefix, seed in zip(prefixes, seeds, strict=True)
            )
        )
        out = []
        for prefix, output in zip(prefixes, outputs, strict=True):
            ids = list(output.token_ids)
            logprobs = list(output.log_probs or [])
            if len(logprobs) != len(ids):
                raise EngineError(f"server returned {len(ids)} tokens but {len(logprobs)} logprobs")
            out.append(Continuation(tuple(ids), tuple(logprobs), self._finish(ids, sampling)))
            self._count(prefix, output, generated=len(ids))
        return out

    async def probe(self, prefixes: list[Prefix], top_k: int) -> list[tuple[float, ...]]:
        params = {"temperature": 0.0, "max_tokens": 1, "logprobs": True, "top_logprobs": top_k}
        outputs = await asyncio.gather(*(self._call(prefix, params) for prefix in prefixes))
        result = []
        for prefix, output in zip(prefixes, outputs, strict=True):
            top = output.extra_fields.get("top_logprobs")
            if not top:
                raise EngineError(
                    "the rollout server returned no top_logprobs for the entropy probe; use visionleaf's "
                    "rollout replicas (hf, or the sglang/vllm subclasses) or tree.mode=chain"
                )
            result.append(tuple(sorted((float(v) for v in top), reverse=True)))
            self._count(prefix, output, generated=1)
        return result

    async def _call(self, prefix: Prefix, params: dict[str, Any]) -> Any:
        try:
            return await self.server_manager.generate(
                request_id=prefix.route,
                prompt_ids=list(prefix.token_ids),
                sampling_params=params,
                image_data=list(prefix.images) or None,
            )
        except EngineError:
            raise
        except Exception as exc:  # the server's own errors carry no common type
            raise EngineError(f"rollout server failed for {prefix.route}: {type(exc).__name__}: {exc}") from exc

    def _finish(self, ids: Sequence[int], sampling: SamplingParams) -> FinishReason:
        if ids and ids[-1] in self.eos_ids:
            return "eos"
        tail = self.tokenizer.decode(ids[-STOP_WINDOW:], skip_special_tokens=False)
        if any(tail.endswith(stop) for stop in sampling.stop):
            return "stop"
        return "length" if len(ids) >= sampling.max_new_tokens else "stop"

    def _count(self, prefix: Prefix, output: Any, generated: int) -> None:
        for key in ("min_global_steps", "max_global_steps"):
            if output.extra_fields.get(key) is not None:
                self.weight_versions.append(int(output.extra_fields[key]))
        cached = int(output.extra_fields.get("cached_tokens", 0))
        self.stats.requests += 1
        self.stats.prompt_tokens += len(prefix.token_ids)
        self.stats.cached_tokens += cached
        self.stats.computed_tokens += len(prefix.token_ids) - cached + generated
        self.stats.generated_tokens += generated


@dataclass
class _Group:
    """The sessions of one uid waiting for their shared tree."""

    sessions: set[int] = field(default_factory=set)
    task: asyncio.Task[tuple[list[Leaf], TreeRecord, list[int]]] | None = None
    taken: int = 0


_GROUPS: dict[str, _Group] = {}


def tree_config_from(config: Any, budget: int) -> TreeConfig:
    """``TreeConfig`` from the trainer config's top-level ``visionleaf.tree`` section (missing keys: defaults)."""
    section = dict((config.get("visionleaf") or {}).get("tree") or {})
    sampling = dict(section.pop("sampling", {}) or {})
    if "tools" in section:
        section["tools"] = tuple(section["tools"])
    if "stop" in sampling:
        sampling["stop"] = tuple(sampling["stop"])
    return TreeConfig(budget=budget, sampling=SamplingParams(**sampling), **section)


class TreeAgentLoop(AgentLoopBase):
    """One leaf of the uid's shared rollout tree per session (module docstring)."""

    async def run(self, sampling_params: dict[str, Any], **kwargs: Any) -> AgentLoopOutput:
        uid, session = str(kwargs["uid"]), int(kwargs["session_id"])
        key = f"{uid}@{kwargs.get('global_steps')}"  # a uid seen again at a later step is another tree
        group = _GROUPS.setdefault(key, _Group())
        group.sessions.add(session)
        await asyncio.sleep(0)  # let the uid's other sessions register (they were created together)
        if group.task is None:
            group.task = asyncio.ensure_future(self._grow(uid, len(group.sessions), sampling_params, kwargs))
        try:
            leaves, record, versions = await asyncio.shield(group.task)
        finally:
            group.taken += 1
            if group.taken == len(group.sessions):
                _GROUPS.pop(key, None)
        return self._output(leaves[session], record, versions)

    async def _grow(
        self, uid: str, budget: int, sampling_params: dict[str, Any], kwargs: dict[str, Any]
    ) -> tuple[list[Leaf], TreeRecord, list[int]]:
        """Grow the uid's tree; also returns the weight versions (global steps) that served it."""
        rollout = self.rollout_config
        if budget not in (rollout.n, rollout.val_kwargs.n):
            raise RuntimeError(
                f"{budget} sessions arrived for uid {uid}, but rollout.n={rollout.n} and "
                f"rollout.val_kwargs.n={rollout.val_kwargs.n}: the tree needs all sessions of a uid in one worker"
            )
        config = tree_config_from(self.config, budget)
        config = replace(
            config,
            # verl pads to these lengths; the sampler ends branches before them instead of truncating
            max_response_tokens=min(config.max_response_tokens, rollout.response_length),
            max_context_tokens=min(config.max_context_tokens, rollout.prompt_length + rollout.response_length),
            sampling=replace(
                config.sampling,
                temperature=float(sampling_params.get("temperature", config.sampling.temperature)),
                top_p=float(sampling_params.get("top_p", config.sampling.top_p)),
            ),
        )
        messages = list(kwargs["raw_prompt"])
        images = (await self.process_multi_modal_info(messages)).get("images") or []
        if len(images) != 1:
            raise ValueError(f"uid {uid}: the tree rollout expects exactly one image per prompt, got {len(images)}")
        extra = kwargs.get("extra_info") or {}
        original = extra.get("original_image")
        original_image = await asyncio.to_thread(load_image, original) if original else None
        engine = VerlEngine(self.server_manager, self.tokenizer)
        sampler = TreeSampler(engine, self.processor, config)
        # fresh randomness per prompt and step; reproducible for the same data order and step
        seed = int(kwargs.get("index") or 0) * 1_000_003 + int(kwargs.get("global_steps") or 0)
        leaves, record = await sampler.sample(messages, images[0], original_image=original_image, route=uid, seed=seed)
        return leaves, record, engine.weight_versions

    def _output(self, leaf: Leaf, record: TreeRecord, versions: list[int]) -> AgentLoopOutput:
        limit = self.rollout_config.prompt_length
        if len(leaf.prompt_ids) > limit:
            raise ValueError(
                f"prompt has {len(leaf.prompt_ids)} tokens > rollout.prompt_length={limit}; "
                "raise it or lower the image processor's max_pixels"
            )
        metrics = record.metrics
        return AgentLoopOutput(
            prompt_ids=leaf.prompt_ids,
            response_ids=leaf.response_ids,
            response_mask=leaf.response_mask,
            response_logprobs=leaf.logprobs,
            multi_modal_data={"images": leaf.images},
            num_turns=2 * leaf.num_turns,
            metrics=AgentLoopMetrics(generate_sequences=metrics["wall_time_s"]),
            extra_fields={
                **leaf.reward_info(),
                "node_path": leaf.node_path,
                "stop_reason": leaf.stop_reason,
                "tree_splits": metrics["splits"],
                "tree_prefix_reuse": metrics["engine_computed_tokens"] / max(metrics["unique_tokens"], 1.0),
                "tree_tool_calls_per_leaf": metrics["tool_calls_per_leaf"],
                "tree_wall_time_s": metrics["wall_time_s"],
                "min_global_steps": min(versions, default=None),
                "max_global_steps": max(versions, default=None),
                "turn_scores": [],
                "tool_rewards": [],
                "timestamp": time.time(),
            },
        )
