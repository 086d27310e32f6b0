"""The tree rollout inside verl 0.9.1's V1 agent-loop workers (the plugin registers it as ``visionleaf_tree``).

verl's V1 worker runs the N sessions of one prompt ``uid`` as N tasks of one agent loop each
(``AgentLoopWorkerTQ._run_prompt``; N is the row's ``__rollout_n__``, else ``rollout.n`` /
``rollout.val_kwargs.n``), and GRPO groups what those sessions return. verl also lets one session return a
list of outputs, but treats such a list as the pieces of ONE trajectory (only the last is scored, its reward
is copied to the others, and only the last counts in GRPO and validation), so N leaves must be N sessions.
All N sessions of a uid therefore share one tree through a per-uid group:

1. :class:`visionleaf.verl.trainer.CountingAgentLoopWorker` publishes N (:data:`SESSIONS_PER_PROMPT`) before
   verl creates the sessions; the first session to arrive starts growing the tree with ``budget`` = N, with
   :class:`~visionleaf.rollout.tree.TreeSampler` over :class:`~visionleaf.verl.engine.VerlEngine`, whose
   ``request_id`` is the uid so that every branch lands on the same server and its prefix cache;
2. every session, whenever it arrives, waits for that tree and returns leaf ``session_id``;
3. the group is dropped when all N sessions have left; when every waiting session was cancelled (the tree
   is cancelled too); or :data:`LATE_SESSION_GRACE_S` after the tree finished with sessions still missing.

If the tree fails (an engine error after retries), every session of the uid raises, verl marks the group
failed, and :mod:`visionleaf.verl.trainer` counts the sessions in ``rollout/agent_loop_errors``.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import Any

from verl.experimental.agent_loop.agent_loop import AgentLoopBase, AgentLoopMetrics, AgentLoopOutput
from verl.utils.fs import copy_to_local

from visionleaf.data.images import load_image
from visionleaf.engines.base import SamplingParams
from visionleaf.engines.open import model_vocab_size
from visionleaf.reward.score import format_problems
from visionleaf.rollout.tree import Leaf, TreeConfig, TreeRecord, TreeSampler
from visionleaf.verl.engine import VerlEngine

SESSIONS_PER_PROMPT: ContextVar[int | None] = ContextVar("visionleaf_sessions_per_prompt", default=None)
"""Sessions verl runs for the current prompt: verl's per-sample ``__rollout_n__``, else ``rollout.n`` /
``rollout.val_kwargs.n``. Set by :class:`visionleaf.verl.trainer.CountingAgentLoopWorker` before verl
creates the session tasks, which inherit it."""

LATE_SESSION_GRACE_S = 300.0
"""How long a finished tree keeps the leaves of sessions that have not arrived yet; then they are dropped."""

TREE_SAMPLING_FROM_VERL = ("temperature", "top_p", "top_k")
"""Sampling settings that come from verl (``actor_rollout_ref.rollout.*``, ``val_kwargs.*`` in validation)."""


@dataclass(frozen=True)
class _Tree:
    leaves: list[Leaf]
    record: TreeRecord
    versions: list[int]
    """``global_steps`` of the weights that served the tree's requests."""


@dataclass
class _Group:
    """The sessions of one uid and the task growing their shared tree."""

    size: int
    task: asyncio.Task[_Tree]
    arrived: set[int] = field(default_factory=set)
    waiting: int = 0
    expiry: asyncio.TimerHandle | None = None


_GROUPS: dict[str, _Group] = {}


def _release(key: str, group: _Group) -> None:
    """Drop ``group`` once nobody can still need it (called when a session stops waiting)."""
    if group.waiting > 0:
        return
    if not group.task.done():  # every waiting session was cancelled: stop the tree too
        group.task.cancel()
        _drop(key, group)
    elif len(group.arrived) == group.size:
        _drop(key, group)
    elif group.expiry is None:  # sessions still missing: keep their leaves for a while
        group.expiry = asyncio.get_running_loop().call_later(LATE_SESSION_GRACE_S, _drop, key, group)


def _drop(key: str, group: _Group) -> None:
    if group.expiry is not None:
        group.expiry.cancel()
    if _GROUPS.get(key) is group:
        del _GROUPS[key]


def tree_config_from(config: Any, budget: int, sampling_params: Mapping[str, Any] | None = None) -> TreeConfig:
    """``TreeConfig`` from the trainer config's top-level ``visionleaf.tree`` section (missing keys: defaults).

    ``budget`` is the prompt's session count; ``sampling_params`` are verl's (temperature, top_p, top_k;
    ``top_k`` <= 0 means off). Setting either in ``visionleaf.tree`` is an error, not silently ignored.
    """
    section = dict((config.get("visionleaf") or {}).get("tree") or {})
    sampling = dict(section.pop("sampling", {}) or {})
    if "budget" in section:
        raise ValueError(
            "visionleaf.tree.budget is the prompt's session count (actor_rollout_ref.rollout.n, "
            "rollout.val_kwargs.n in validation, or a row's __rollout_n__); remove it from visionleaf.tree"
        )
    clash = sorted(set(sampling) & set(TREE_SAMPLING_FROM_VERL))
    if clash:
        raise ValueError(
            f"visionleaf.tree.sampling.{clash[0]} is verl's: set actor_rollout_ref.rollout.{clash[0]} "
            f"(and rollout.val_kwargs.{clash[0]} for validation) instead"
        )
    if "tools" in section:
        section["tools"] = tuple(section["tools"])
    if "stop" in sampling:
        sampling["stop"] = tuple(sampling["stop"])
    verl = dict(sampling_params or {})
    if "temperature" in verl:
        sampling["temperature"] = float(verl["temperature"])
    if "top_p" in verl:
        sampling["top_p"] = float(verl["top_p"])
    if verl.get("top_k") is not None:
        sampling["top_k"] = max(int(verl["top_k"]), 0)  # verl's -1 (and 0) = off
    return TreeConfig(budget=budget, sampling=SamplingParams(**sampling), **section)


def tree_seed(kwargs: Mapping[str, Any], base: int = 0) -> int:
    """Seed of one prompt's tree: its row (``extra_info.index`` when the row has one, else a hash of the
    prompt and ``extra_info``), the step and ``base`` (``visionleaf.tree.seed``); the same row at the same
    step gives the same seed in every process."""
    extra = kwargs.get("extra_info") or {}
    index = extra.get("index") if isinstance(extra, Mapping) else None
    if index is not None:
        row = f"index:{int(index)}"
    else:  # verl gives rows without an index the index 0; the prompt text and extra_info tell them apart
        row = json.dumps([_prompt_text(kwargs.get("raw_prompt") or []), extra], sort_keys=True, default=str)
    text = f"{row}|step:{kwargs.get('global_steps')}|seed:{base}"
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def _prompt_text(messages: Sequence[Mapping[str, Any]]) -> list[str]:
    """The text parts of the chat messages (images left out: a path or a PIL image is not row content)."""
    texts = []
    for message in messages:
        content = message.get("content")
        parts = content if isinstance(content, list) else [{"type": "text", "text": content}]
        texts += [f"{message.get('role')}:{p.get('text')}" for p in parts if isinstance(p, Mapping) and "text" in p]
    return texts


class TreeAgentLoop(AgentLoopBase):
    """One leaf of the uid's shared rollout tree per session (module docstring)."""

    async def run(self, sampling_params: dict[str, Any], **kwargs: Any) -> AgentLoopOutput:
        uid, session = str(kwargs["uid"]), int(kwargs["session_id"])
        size = SESSIONS_PER_PROMPT.get()
        if size is None:
            raise RuntimeError(
                "the visionleaf_tree agent loop needs to know how many sessions each prompt has; set "
                "actor_rollout_ref.rollout.agent.agent_loop_manager_class="
                "visionleaf.verl.trainer.CountingAgentLoopManager"
            )
        if not 0 <= session < size:
            raise ValueError(f"uid {uid}: session_id {session} is outside the prompt's {size} sessions")
        key = f"{uid}@{kwargs.get('global_steps')}"  # a uid seen again at a later step is another tree
        group = _GROUPS.get(key)
        if group is None:
            group = _GROUPS[key] = _Group(size, asyncio.ensure_future(self._grow(uid, size, sampling_params, kwargs)))
        elif group.size != size or session in group.arrived:
            raise RuntimeError(
                f"uid {uid} step {kwargs.get('global_steps')}: session {session} of {size} joins a tree of "
                f"{group.size} leaves whose sessions {sorted(group.arrived)} arrived already"
            )
        group.arrived.add(session)
        if group.expiry is not None:  # a late session: its leaf is still there
            group.expiry.cancel()
            group.expiry = None
        group.waiting += 1
        try:
            tree = await asyncio.shield(group.task)
        finally:
            group.waiting -= 1
            _release(key, group)
        return self._output(tree.leaves[session], tree.record, tree.versions)

    async def _grow(self, uid: str, budget: int, sampling_params: dict[str, Any], kwargs: dict[str, Any]) -> _Tree:
        """Grow the uid's tree of ``budget`` leaves."""
        rollout = self.rollout_config
        config = tree_config_from(self.config, budget, sampling_params)
        config = replace(
            config,
            # verl pads to these lengths; the sampler ends branches before them instead of truncating
            max_response_tokens=min(config.max_response_tokens, rollout.response_length),
            max_context_tokens=min(config.max_context_tokens, rollout.prompt_length + rollout.response_length),
        )
        messages = list(kwargs["raw_prompt"])
        images = (await self.process_multi_modal_info(messages)).get("images") or []
        if len(images) != 1:
            raise ValueError(f"uid {uid}: the tree rollout expects exactly one image per prompt, got {len(images)}")
        extra = kwargs.get("extra_info") or {}
        original = extra.get("original_image")
        # crops are cut from the full-resolution original, loaded here once per tree; only the images the
        # model sees (the dataset's model-sized global view and the crops) go to the rollout server
        original_image = await asyncio.to_thread(load_image, original) if original else None
        model_path = self.config.actor_rollout_ref.get("model", {}).get("path")
        vocab_size = await asyncio.to_thread(_vocab_size, model_path) if model_path else None
        engine = VerlEngine(self.server_manager, self.tokenizer, vocab_size=vocab_size)
        sampler = TreeSampler(engine, self.processor, config)
        seed = tree_seed(kwargs, config.seed)
        leaves, record = await sampler.sample(messages, images[0], original_image=original_image, route=uid, seed=seed)
        return _Tree(leaves, record, engine.weight_versions)

    def _output(self, leaf: Leaf, record: TreeRecord, versions: list[int]) -> AgentLoopOutput:
        limit = self.rollout_config.prompt_length
        if len(leaf.prompt_ids) > limit:
            raise ValueError(
                f"prompt has {len(leaf.prompt_ids)} tokens > rollout.prompt_length={limit}; "
                "raise it or lower the image processor's max_pixels"
            )
        metrics = record.metrics
        spans = {node.id: node.span for node in record.nodes}
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
                # from the real turn boundaries: a turn that writes its own <tool_response> fools a text parse
                "format_problems": list(format_problems(leaf.turn_texts)),
                "node_path": leaf.node_path,
                # [start, end) response offsets of each node on the path, for the tree-packed training forward
                "node_spans": [list(spans[node]) for node in leaf.node_path],
                "stop_reason": leaf.stop_reason,
                "tree_splits": metrics["splits"],
                "tree_splits_below_root": float(
                    sum(node.depth > 0 for split in record.splits for node in record.nodes if node.id == split.node)
                ),
                "tree_prefix_reuse": _prefix_reuse(metrics),
                "tree_tool_calls_per_leaf": metrics["tool_calls_per_leaf"],
                "tree_wall_time_s": metrics["wall_time_s"],
                "min_global_steps": min(versions, default=None),
                "max_global_steps": max(versions, default=None),
                "turn_scores": [],
                "tool_rewards": [],
                "timestamp": time.time(),
            },
        )


@functools.cache
def _vocab_size(path: str) -> int | None:
    """The model's output rows, read once per worker (``path`` may be a remote folder verl copies)."""
    return model_vocab_size(copy_to_local(path))


def _prefix_reuse(metrics: Mapping[str, float | None]) -> float | None:
    """Engine-computed over unique tokens of the tree; None when the engine could not tell (no cached-token
    counts), so that the metric is left out rather than logged wrong."""
    computed = metrics.get("engine_computed_tokens")
    if computed is None:
        return None
    return float(computed) / max(float(metrics["unique_tokens"] or 0.0), 1.0)
