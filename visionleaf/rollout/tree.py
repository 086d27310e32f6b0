"""Entropy-guided leaf-first tree rollout (VisionLeaf §3; SPEC §3). Pure asyncio: no Ray, no HTTP.

A node is a prefix of turns; a turn is thought + action + observation. Starting from the prompt, the
sampler repeatedly splits the most uncertain open node into clones that share its prefix, advances every
open branch by one turn (running tools in between), and collects finished branches as leaves, until
exactly ``budget`` leaves exist::

    A = [root]; C = []
    while len(C) < N:
        room = N - (len(A) + len(C))
        if room > 0:
            candidates = A or open internal nodes (root included)
            n* = select(entropy(candidates))        # high | low | random | registered
            k = W if n* is root else B
            n* in A ? clone n* to min(k, room + 1) branches : add min(k, room) branches at n*
        advance every branch of A by one turn; move finished ones to C

``mode="chain"`` is the same loop with W = N and no later splits: N independent multi-turn rollouts,
the vanilla GRPO baseline.

``splits_per_round`` (default 1: the algorithm above) lets one round split several candidates: after
``n*``, the strategy picks again among the candidates not yet split this round, while ``room`` lasts. Each
pick is what the strategy would choose among those candidates; what differs is the tree's shape (the
budget is spent at fewer, shallower turn boundaries) and the number of lockstep rounds (fewer).

``schedule`` says when a split's entropies are measured. ``lockstep`` (default: the algorithm above) probes
the candidates before the round, one batched ``probe`` call. ``folded`` (opt-in) makes no probe calls: the
entropy of a node is the distribution of the first token after its prefix, which is the first token the
``generate`` advancing the node samples, so every generate also returns that token's top-k logprobs
(``SamplingParams.first_top_logprobs``) and scores the node it advances. A split needs no probe when its
candidates are one node or the open internal nodes (all advanced, so all scored): it is taken before the
round, as in lockstep. Any other split is taken after the round, from the same candidates (the frontier's
nodes not split yet) with the same entropies, so the strategy picks what it would pick among them; its
new branches (``min(k, room + 1) - 1``, ``room`` counted before the round: the chosen node's own branch
is already in flight, so exactly N leaves result) are sampled from the chosen node's prefix in the next
round, batched with the other branches. What differs: those branches start one round later than
lockstep's clones. Up to the first such split the tree is lockstep's for the same seed (``high``/``low``
make the same first compared pick); after it, the lagging clones change the frontier, so the later
candidates, and the tree, are another sample, and a tree may need one more round to finish.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from PIL import Image

from visionleaf.boxes import Box
from visionleaf.engines.base import Continuation, Engine, EngineError, Prefix, SamplingParams, image_key
from visionleaf.protocol import (
    IM_END,
    expand_image_pads,
    image_pixel_budget,
    observation_text,
    render_prompt,
)
from visionleaf.rollout.entropy import ENTROPY_ESTIMATORS
from visionleaf.rollout.selection import SELECTION_STRATEGIES
from visionleaf.tools import ToolCall, ToolContext, parse_turn, run_tool
from visionleaf.tools.crop import model_size

StopReason = Literal["answer", "no_action", "max_turns", "length"]


@dataclass(frozen=True)
class TreeConfig:
    """Tree rollout settings. Errors say what to set instead."""

    budget: int = 16
    """N: finished leaves per prompt (the GRPO group size)."""
    branch_factor: int = 4
    """B: branches a split creates below the root."""
    root_width: int | None = None
    """W: branches a split of the root creates (default B; chain mode forces N)."""
    max_turns: int = 5
    """Assistant turns per branch; a branch still calling tools at this depth ends."""
    mode: Literal["tree", "chain"] = "tree"
    """``tree``: entropy-guided splits; ``chain``: N independent chains (vanilla multi-turn GRPO)."""
    selection: str = "high"
    """Node selection strategy (``high`` | ``low`` | ``random`` | registered name)."""
    entropy: str = "min"
    """Node entropy estimator (``min`` | ``topk`` | registered name)."""
    top_logprobs: int = 20
    """Top-k logprobs the entropy probe asks for (``min`` uses the first)."""
    max_response_tokens: int = 4096
    """Response tokens (model + observation) per branch; a branch over it ends with ``length``."""
    max_context_tokens: int = 8192
    """Prompt + response tokens per branch (the model's context)."""
    tools: tuple[str, ...] = ("image_zoom_in_tool",)
    """Tools the model is offered; other names get an ``Error:`` observation."""
    sampling: SamplingParams = field(default_factory=SamplingParams)
    """Per-turn sampling."""
    seed: int = 0
    """Seeds selection and sampling: same seed, same engine -> same tree."""
    splits_per_round: int = 1
    """Splits one round may make (1: the paper's algorithm; 0: as many as the budget's room allows, each
    chosen by ``selection`` among the candidates not split yet this round; fewer lockstep rounds)."""
    schedule: Literal["lockstep", "folded"] = "lockstep"
    """``lockstep`` (the paper's): candidates without an entropy are probed before the round (one ``probe``
    call). ``folded``: no probe calls; each generate also returns its first token's top logprobs, the
    entropy of the node it advances, and a split that would need a probe is decided after the round among
    the same candidates with the same entropies; its new branches start one round later (module docstring).
    Needs an engine that answers ``first_top_logprobs`` (HF, vLLM/SGLang servers at temperature 1)."""

    def __post_init__(self) -> None:
        if self.budget < 1:
            raise ValueError(f"tree.budget must be >= 1, got {self.budget}")
        if self.mode not in ("tree", "chain"):
            raise ValueError(f"tree.mode must be 'tree' or 'chain', got {self.mode!r}")
        if self.mode == "tree" and self.budget > 1 and self.branch_factor < 2:
            raise ValueError(
                f"tree.branch_factor must be >= 2 when tree.budget > 1, got {self.branch_factor}; "
                "set tree.mode=chain for independent rollouts"
            )
        if self.root_width is not None and not 1 <= self.root_width <= self.budget:
            raise ValueError(f"tree.root_width must be in [1, budget={self.budget}], got {self.root_width}")
        if self.max_turns < 1:
            raise ValueError(f"tree.max_turns must be >= 1, got {self.max_turns}")
        if self.top_logprobs < 1:
            raise ValueError(f"tree.top_logprobs must be >= 1, got {self.top_logprobs}")
        if self.schedule not in ("lockstep", "folded"):
            raise ValueError(f"tree.schedule must be 'lockstep' or 'folded', got {self.schedule!r}")
        if self.splits_per_round < 0:
            raise ValueError(
                "tree.splits_per_round must be >= 0 (1: the paper's schedule, 0: as many as the room allows), "
                f"got {self.splits_per_round}"
            )
        SELECTION_STRATEGIES.get(self.selection)
        ENTROPY_ESTIMATORS.get(self.entropy)

    @property
    def width(self) -> int:
        """Branches a root split creates."""
        if self.mode == "chain":
            return self.budget
        return self.root_width if self.root_width is not None else self.branch_factor


@dataclass(frozen=True)
class ToolCallRecord:
    """One executed (or refused) tool call."""

    name: str
    arguments: Mapping[str, Any]
    ok: bool
    """True when the tool returned an observation that is not an error."""
    error: str | None
    """The ``Error:`` text when not ok."""
    box: Box | None
    """Crop box in original-image pixels (zoom calls that succeeded)."""


@dataclass(frozen=True)
class Leaf:
    """One finished trajectory: everything the trainer and the reward need."""

    prompt_ids: list[int]
    """Prompt tokens (image pads expanded), ending with the assistant header."""
    response_ids: list[int]
    """Model and observation tokens of every turn, in order."""
    response_mask: list[int]
    """1 on sampled tokens, 0 on observation tokens (and a closing ``<|im_end|>`` the sampler added)."""
    logprobs: list[float]
    """Sampling log-probability of each response token; 0 where ``response_mask`` is 0."""
    images: list[Image.Image]
    """Every image the model saw, in order: the global view, then each observation's images."""
    turn_texts: list[str]
    """Decoded model text of each turn."""
    tool_calls: list[ToolCallRecord]
    """Tool calls in order (an unparseable call counts as a failed call named ``<malformed>``)."""
    num_turns: int
    """Assistant turns."""
    stop_reason: StopReason
    """Why the branch ended: ``answer``, ``no_action``, ``max_turns`` or ``length``."""
    node_path: list[int]
    """Node ids from the root (0) to this leaf."""

    @property
    def pred_boxes(self) -> list[Box]:
        """Boxes of the successful crops, original pixels, in call order."""
        return [c.box for c in self.tool_calls if c.ok and c.box is not None]

    def reward_info(self) -> dict[str, Any]:
        """What the rollout knows for :func:`visionleaf.reward.compute_score`'s ``extra_info``."""
        ok = sum(c.ok for c in self.tool_calls)
        return {
            "tool_calls_ok": ok,
            "tool_calls_failed": len(self.tool_calls) - ok,
            "pred_boxes": [list(b) for b in self.pred_boxes],
        }


@dataclass(frozen=True)
class NodeRecord:
    """One node of the finished tree."""

    id: int
    parent: int | None
    depth: int
    """Turns from the root."""
    entropy: float | None
    """Entropy of the first token after the node (None when never scored: lockstep scores the candidates
    it compares, folded every node it advances)."""
    split: bool
    """Whether branches were cloned or re-opened at this node."""
    span: tuple[int, int]
    """Response-token offsets [start, end) of this node's turn, the same in every leaf below it."""
    terminal: bool


@dataclass(frozen=True)
class SplitRecord:
    """One split decision."""

    node: int
    """Id of the node that was split."""
    candidates: tuple[int, ...]
    """Ids of the nodes it was chosen from."""
    new_branches: int
    """Branches added at the node."""
    reopened: bool
    """True when the frontier was empty and a finished subtree was re-opened."""


@dataclass(frozen=True)
class TreeRecord:
    """The tree of one prompt, with its metrics."""

    nodes: list[NodeRecord]
    splits: list[SplitRecord]
    metrics: dict[str, float]
    """leaves, splits, rounds (lockstep ``generate`` rounds), probe_calls, unique_tokens, chain_tokens,
    engine_computed_tokens, engine_cached_tokens, tool_calls_per_leaf, tool_errors_per_leaf, mean_turns,
    max_depth, wall_time_s, probe_time_s.
    The two ``engine_*`` keys count this tree's own requests; they are absent when the engine could not
    tell the cached tokens of some request (unknown, not zero)."""


@dataclass
class _Usage:
    """Engine work of one tree, summed over its own requests (other trees may share the engine)."""

    cached: int | None = 0
    """Prefix tokens served from the engine's cache; ``None`` once a request could not tell."""
    computed: int = 0
    """Prefix tokens not served from the cache plus tokens generated."""

    def add(self, prefix: Prefix, cached: int | None, generated: int) -> None:
        if cached is None or self.cached is None:
            self.cached = None
            return
        self.cached += cached
        self.computed += len(prefix.token_ids) - cached + generated


@dataclass(eq=False)
class _Node:
    id: int
    parent: _Node | None
    depth: int
    prefix: Prefix
    response_len: int
    turn_ids: list[int] = field(default_factory=list)
    turn_mask: list[int] = field(default_factory=list)
    turn_logprobs: list[float] = field(default_factory=list)
    turn_text: str = ""
    new_images: list[Image.Image] = field(default_factory=list)
    tool_calls: list[ToolCallRecord] = field(default_factory=list)
    stop_reason: StopReason | None = None
    entropy: float | None = None
    split: bool = False

    @property
    def terminal(self) -> bool:
        return self.stop_reason is not None

    def path(self) -> list[_Node]:
        node: _Node | None = self
        nodes = []
        while node is not None:
            nodes.append(node)
            node = node.parent
        return nodes[::-1]


class TreeSampler:
    """Samples ``config.budget`` leaves per prompt from an :class:`Engine`, with tools between turns."""

    def __init__(self, engine: Engine, processor: Any, config: TreeConfig) -> None:
        self.engine = engine
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.config = config
        self.crop_min_pixels, self.crop_max_pixels = image_pixel_budget(processor.image_processor)
        self.im_end_id = self.tokenizer.convert_tokens_to_ids(IM_END)
        self._select = SELECTION_STRATEGIES.get(config.selection)
        self._entropy = ENTROPY_ESTIMATORS.get(config.entropy)

    async def sample(
        self,
        messages: Sequence[dict[str, Any]],
        image: Image.Image,
        original_image: Image.Image | None = None,
        route: str = "",
        seed: int | None = None,
    ) -> tuple[list[Leaf], TreeRecord]:
        """Grow one tree for a prompt. ``image`` is the global view the model sees; crops are cut from
        ``original_image`` (default: ``image``). Raises :class:`EngineError` when the engine fails."""
        cfg = self.config
        start, usage = time.perf_counter(), _Usage()
        rng = random.Random(cfg.seed if seed is None else seed)
        original = original_image if original_image is not None else image
        context = ToolContext(
            original_image=original,
            model_size=model_size(image.size, self.crop_min_pixels, self.crop_max_pixels),
            crop_min_pixels=self.crop_min_pixels,
            crop_max_pixels=self.crop_max_pixels,
        )
        prompt_ids = self._encode(render_prompt(self.processor, messages), [image])
        root = _Node(0, None, 0, Prefix(tuple(prompt_ids), (image,), (image_key(image),), route), 0)
        nodes = [root]
        frontier: list[_Node] = [root]
        leaves: list[_Node] = []
        splits: list[SplitRecord] = []
        probe_time = 0.0
        rounds = probes = 0

        while len(leaves) < cfg.budget:
            room = cfg.budget - len(frontier) - len(leaves)
            in_frontier = bool(frontier)
            if in_frontier:  # its nodes not split yet (folded: a split's new branches wait a round at their node)
                candidates = [n for n in dict.fromkeys(frontier) if not n.split]
            else:  # every branch ended: the open internal nodes, root included
                candidates = [n for n in nodes if not n.terminal]
            after_round = False
            if room > 0 and candidates:
                if len(candidates) > 1 and any(n.entropy is None for n in candidates):  # one needs no entropy
                    if cfg.schedule == "folded":
                        after_round = True  # this round's generates score them
                    else:
                        t0 = time.perf_counter()
                        probes += await self._score(candidates, usage)
                        probe_time += time.perf_counter() - t0
                if not after_round:
                    frontier += self._split(candidates, room, in_frontier, rng, splits)
            seeds = [rng.getrandbits(63) for _ in frontier]
            children = await self._advance(frontier, context, seeds, len(nodes), usage)
            rounds += 1
            nodes += children
            frontier = [c for c in children if not c.terminal]
            leaves += [c for c in children if c.terminal]
            if after_round:  # room is unchanged: each advanced branch became one open child or one leaf
                frontier += self._split(candidates, room, True, rng, splits)

        return self._finish(root, nodes, leaves, splits, probe_time, (rounds, probes), start, usage)

    def _split(
        self, candidates: list[_Node], room: int, in_frontier: bool, rng: random.Random, splits: list[SplitRecord]
    ) -> list[_Node]:
        """New branches (one entry per branch, at its node) of up to ``splits_per_round`` picks among
        ``candidates``, within ``room``. A frontier node keeps its own branch (it adds ``k - 1``); a re-opened
        internal node gets ``k`` new ones."""
        cfg = self.config
        added: list[_Node] = []
        picks = 0
        while room > 0 and candidates and picks < (cfg.splits_per_round or cfg.budget):
            pick = self._select([n.entropy or 0.0 for n in candidates], rng) if len(candidates) > 1 else 0
            chosen = candidates[pick]
            width = cfg.width if chosen.parent is None else cfg.branch_factor
            new = min(width, room + 1) - 1 if in_frontier else min(width, room)
            added += [chosen] * new
            if new > 0:
                chosen.split = True
                splits.append(SplitRecord(chosen.id, tuple(c.id for c in candidates), new, not in_frontier))
            room -= new
            picks += 1
            candidates = [c for c in candidates if c is not chosen]
        return added

    def _encode(self, text: str, images: Sequence[Image.Image]) -> list[int]:
        expanded = expand_image_pads(text, images, self.processor.image_processor)
        return list(self.tokenizer.encode(expanded, add_special_tokens=False))

    async def _score(self, candidates: list[_Node], usage: _Usage) -> int:
        """Entropy of every candidate that has none yet (one batched probe); the engine calls made (0 or 1)."""
        unscored = [n for n in candidates if n.entropy is None]
        if unscored:
            probes = await self.engine.probe([n.prefix for n in unscored], self.config.top_logprobs)
            if len(probes) != len(unscored):
                raise EngineError(f"engine answered {len(probes)} probes for {len(unscored)} prefixes")
            for node, probe in zip(unscored, probes, strict=True):
                node.entropy = self._entropy(probe.top_logprobs)
                usage.add(node.prefix, probe.cached_tokens, generated=0)
        return int(bool(unscored))

    async def _advance(
        self, frontier: list[_Node], context: ToolContext, seeds: list[int], first_id: int, usage: _Usage
    ) -> list[_Node]:
        """One turn for every branch: sample, parse, run tools, build the child nodes."""
        continuations = await self._generate(frontier, seeds)
        for node, cont in zip(frontier, continuations, strict=True):
            usage.add(node.prefix, cont.cached_tokens, len(cont.token_ids))
            if cont.first_top_logprobs and node.entropy is None:  # folded: siblings share the distribution
                node.entropy = self._entropy(cont.first_top_logprobs)
        children = []
        for i, (parent, cont) in enumerate(zip(frontier, continuations, strict=True)):
            child = _Node(
                id=first_id + i,
                parent=parent,
                depth=parent.depth + 1,
                prefix=parent.prefix,
                response_len=parent.response_len,
                turn_ids=list(cont.token_ids),
                turn_mask=[1] * len(cont.token_ids),
                turn_logprobs=list(cont.logprobs),
                turn_text=self.tokenizer.decode(cont.token_ids, skip_special_tokens=False),
            )
            if cont.finish_reason == "stop":  # close the turn as the chat template does (not sampled)
                self._append(child, [self.im_end_id], [], mask=0)
            await self._finish_turn(child, cont.finish_reason == "length", context)
            children.append(child)
        return children

    async def _generate(self, frontier: list[_Node], seeds: list[int]) -> list[Continuation]:
        """A turn for every branch, ``max_new_tokens`` clamped to each branch's remaining budget (one engine
        call per distinct budget; siblings share theirs)."""
        groups: dict[int, list[int]] = {}
        for i, node in enumerate(frontier):
            groups.setdefault(self._turn_budget(node), []).append(i)
        cfg = self.config
        folded = cfg.schedule == "folded" and cfg.mode == "tree"  # chains never compare candidates
        sampling = replace(cfg.sampling, first_top_logprobs=cfg.top_logprobs if folded else 0)
        results = await asyncio.gather(
            *(
                self.engine.generate(
                    [frontier[i].prefix for i in rows],
                    replace(sampling, max_new_tokens=budget),
                    [seeds[i] for i in rows],
                )
                for budget, rows in groups.items()
            )
        )
        out: dict[int, Continuation] = {}
        for rows, continuations in zip(groups.values(), results, strict=True):
            if len(continuations) != len(rows):
                raise EngineError(f"engine answered {len(continuations)} continuations for {len(rows)} prefixes")
            if folded and not all(c.first_top_logprobs for c in continuations):
                raise EngineError(
                    f"{type(self.engine).__name__} returned no first-token top logprobs, which "
                    "tree.schedule=folded needs; set tree.schedule=lockstep"
                )
            out.update(zip(rows, continuations, strict=True))
        return [out[i] for i in range(len(frontier))]

    def _turn_budget(self, node: _Node) -> int:
        """``max_new_tokens`` for the next turn of ``node``: at most the configured one, and at most what
        ``max_response_tokens`` and ``max_context_tokens`` leave, less one for the closing ``<|im_end|>``
        (only the root's can be smaller than the configured one: every later node :meth:`_fits`)."""
        cfg = self.config
        room = min(cfg.max_response_tokens - node.response_len, cfg.max_context_tokens - len(node.prefix.token_ids))
        if room < 2:
            raise ValueError(
                f"a {len(node.prefix.token_ids)}-token prompt leaves no room for a turn within "
                f"tree.max_response_tokens={cfg.max_response_tokens} and "
                f"tree.max_context_tokens={cfg.max_context_tokens}; raise them or shorten the prompt"
            )
        return min(cfg.sampling.max_new_tokens, room - 1)

    def _append(self, node: _Node, ids: list[int], images: list[Image.Image], mask: int) -> None:
        node.turn_ids += ids
        node.turn_mask += [mask] * len(ids)
        node.turn_logprobs += [0.0] * len(ids)
        node.new_images += images

    async def _finish_turn(self, node: _Node, truncated: bool, context: ToolContext) -> None:
        """Decide whether the branch ends; otherwise run the tool and append the observation."""
        cfg = self.config
        turn = parse_turn(node.turn_text)
        if turn.answer is not None:
            node.stop_reason = "answer"
        elif truncated:
            node.stop_reason = "length"
        elif turn.is_final:
            node.stop_reason = "no_action"
        elif node.depth >= cfg.max_turns:
            node.stop_reason = "max_turns"
        else:
            texts = list(turn.call_errors)
            calls = [ToolCallRecord("<malformed>", {}, False, e, None) for e in turn.call_errors]
            images: list[Image.Image] = []
            for call in turn.tool_calls:
                obs = await asyncio.to_thread(run_tool, call, context, cfg.tools)
                calls.append(_record(call, obs.ok, obs.text, obs.box))
                texts.insert(0, obs.text)
                images += obs.images
            text = "\n".join(t for t in texts if t)
            observation = self._encode(observation_text(text, len(images)), images)
            if self._fits(node, len(node.turn_ids) + len(observation)):
                node.tool_calls += calls
                self._append(node, observation, images, mask=0)
            else:  # never cut an observation (and its image tokens) short: end the branch before it
                node.stop_reason = "length"
        prefix = node.parent.prefix if node.parent else node.prefix
        node.prefix = Prefix(
            prefix.token_ids + tuple(node.turn_ids),
            prefix.images + tuple(node.new_images),
            prefix.image_keys + tuple(image_key(im) for im in node.new_images),
            prefix.route,
        )
        node.response_len += len(node.turn_ids)
        if not node.terminal and not self._fits(node, 0):  # no room left for a whole next turn
            node.stop_reason = "length"

    def _fits(self, node: _Node, new_tokens: int) -> bool:
        """Whether ``new_tokens`` more response tokens still leave room for a whole next turn and its closing
        ``<|im_end|>``, within ``max_response_tokens`` and ``max_context_tokens`` (``node.prefix`` and
        ``node.response_len`` always describe the same tokens, so their difference is the prompt)."""
        cfg = self.config
        prompt = len(node.prefix.token_ids) - node.response_len
        response = node.response_len + new_tokens + cfg.sampling.max_new_tokens + 1
        return response <= cfg.max_response_tokens and prompt + response <= cfg.max_context_tokens

    def _finish(
        self,
        root: _Node,
        nodes: list[_Node],
        leaves: list[_Node],
        splits: list[SplitRecord],
        probe_time: float,
        calls: tuple[int, int],
        start: float,
        usage: _Usage,
    ) -> tuple[list[Leaf], TreeRecord]:
        prompt_ids = list(root.prefix.token_ids)
        out = [self._leaf(prompt_ids, leaf) for leaf in leaves]
        records = []
        for node in nodes:
            offset = node.response_len - len(node.turn_ids)
            records.append(
                NodeRecord(
                    id=node.id,
                    parent=node.parent.id if node.parent else None,
                    depth=node.depth,
                    entropy=node.entropy,
                    split=node.split,
                    span=(offset, node.response_len),
                    terminal=node.terminal,
                )
            )
        n = len(out)
        metrics = {
            "leaves": float(n),
            "splits": float(len(splits)),
            "rounds": float(calls[0]),
            "probe_calls": float(calls[1]),
            "unique_tokens": float(len(prompt_ids) + sum(len(node.turn_ids) for node in nodes)),
            "chain_tokens": float(sum(len(leaf.prompt_ids) + len(leaf.response_ids) for leaf in out)),
            "tool_calls_per_leaf": sum(len(leaf.tool_calls) for leaf in out) / n,
            "tool_errors_per_leaf": sum(not c.ok for leaf in out for c in leaf.tool_calls) / n,
            "mean_turns": sum(leaf.num_turns for leaf in out) / n,
            "max_depth": float(max(node.depth for node in nodes)),
            "wall_time_s": time.perf_counter() - start,
            "probe_time_s": probe_time,
        }
        if usage.cached is not None:
            metrics.update(engine_computed_tokens=float(usage.computed), engine_cached_tokens=float(usage.cached))
        return out, TreeRecord(records, splits, metrics)

    def _leaf(self, prompt_ids: list[int], node: _Node) -> Leaf:
        path = node.path()
        turns = path[1:]
        assert node.stop_reason is not None
        return Leaf(
            prompt_ids=prompt_ids,
            response_ids=[t for n in turns for t in n.turn_ids],
            response_mask=[m for n in turns for m in n.turn_mask],
            logprobs=[lp for n in turns for lp in n.turn_logprobs],
            images=list(node.prefix.images),
            turn_texts=[n.turn_text for n in turns],
            tool_calls=[c for n in turns for c in n.tool_calls],
            num_turns=len(turns),
            stop_reason=node.stop_reason,
            node_path=[n.id for n in path],
        )


def _record(call: ToolCall, ok: bool, text: str, box: Box | None) -> ToolCallRecord:
    return ToolCallRecord(call.name, dict(call.arguments), ok, None if ok else text, box if ok else None)
