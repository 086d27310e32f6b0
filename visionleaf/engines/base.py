"""The one ``Engine`` protocol the tree sampler talks to, and the types that cross it.

Engines see token ids and images only; tokenisation, tools and the tree live in the sampler. Every
request of one prompt carries the same routing key, so a multi-server engine keeps a prompt's whole
tree on one server and its prefix cache.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal, Protocol

from PIL import Image

FinishReason = Literal["stop", "eos", "length"]


def image_key(image: Image.Image) -> str:
    """Content hash of an image (size, mode, pixels): images with the same key are the same input."""
    digest = hashlib.blake2b(image.tobytes(), digest_size=16)
    digest.update(f"{image.mode}{image.size}".encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class Prefix:
    """A node's full context: token ids (image pads expanded) and the images whose pads they contain."""

    token_ids: tuple[int, ...]
    """Prompt and every turn so far, ending with the assistant header."""
    images: tuple[Image.Image, ...] = field(default=(), compare=False)
    """Images in order of appearance (the global view, then each observation's)."""
    image_keys: tuple[str, ...] = ()
    """:func:`image_key` of each image; identity of the prefix together with ``token_ids``."""
    route: str = ""
    """Routing key shared by all requests of one prompt (server engines pin it to one server)."""


@dataclass(frozen=True)
class SamplingParams:
    """How one turn is sampled. Logprobs are of the distribution actually sampled from."""

    max_new_tokens: int = 512
    """Tokens per turn at most."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy."""
    top_p: float = 1.0
    """Nucleus mass kept (1 = off); the kept tokens are renormalised."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 = off)."""
    stop: tuple[str, ...] = ("</tool_call>", "</answer>")
    """Stop strings; the output includes the stop string. The eos tokens always stop."""
    first_top_logprobs: int = 0
    """Also return the top-k log-probabilities of the first token's distribution, the one
    :meth:`Engine.probe` reads (0 = none): a generate that advances a node then scores it too
    (``tree.schedule=folded``). Not a sampling setting: rows that differ only in it decode together."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.first_top_logprobs < 0:
            raise ValueError(f"first_top_logprobs must be >= 0 (0 = none), got {self.first_top_logprobs}")


@dataclass(frozen=True)
class Continuation:
    """One sampled turn."""

    token_ids: tuple[int, ...]
    """Generated tokens, the stop string or eos token included."""
    logprobs: tuple[float, ...]
    """Log-probability of each generated token under the sampling distribution; aligned with token_ids."""
    finish_reason: FinishReason
    """``stop`` (a stop string), ``eos`` (an eos token) or ``length`` (max_new_tokens)."""
    cached_tokens: int | None = 0
    """Prefix tokens the engine served from its cache for this request (siblings: the whole prefix);
    ``None`` when the engine cannot tell (the tree's reuse metrics are then left out, not guessed)."""
    first_top_logprobs: tuple[float, ...] = ()
    """Top-``sampling.first_top_logprobs`` log-probabilities (descending) of the first token after the
    prefix: what ``probe(prefix, k)`` returns; empty when not asked for."""


@dataclass(frozen=True)
class Probe:
    """The entropy probe's answer for one prefix."""

    top_logprobs: tuple[float, ...]
    """Top-k log-probabilities (descending) of the first token after the prefix."""
    cached_tokens: int | None = 0
    """Prefix tokens served from the engine's cache for this probe; ``None`` when the engine cannot tell."""


@dataclass
class EngineStats:
    """Cumulative counters of one engine over every tree it served (per-tree numbers come from the
    per-request ``cached_tokens`` of each :class:`Continuation` and :class:`Probe`)."""

    requests: int = 0
    """Sequences requested (generate rows + probes)."""
    prompt_tokens: int = 0
    """Prefix tokens of all requests."""
    cached_tokens: int = 0
    """Prefix tokens served from the prefix cache (not recomputed), of the requests where it is known."""
    unknown_cached: int = 0
    """Requests whose cached tokens the engine could not tell (not in ``cached_tokens``/``computed_tokens``)."""
    computed_tokens: int = 0
    """Tokens the engine ran through the model: prefix cache misses plus fed generated tokens."""
    generated_tokens: int = 0
    """Tokens sampled."""

    def snapshot(self) -> EngineStats:
        return EngineStats(**vars(self))

    def since(self, before: EngineStats) -> EngineStats:
        return EngineStats(**{k: v - getattr(before, k) for k, v in vars(self).items()})


class EngineError(RuntimeError):
    """The engine could not serve a request (after its own retries); the group fails cleanly."""


class Engine(Protocol):
    """What the tree sampler needs from an inference engine."""

    stats: EngineStats

    async def generate(self, prefixes: list[Prefix], sampling: SamplingParams, seeds: list[int]) -> list[Continuation]:
        """Sample one turn for each prefix (identical prefixes are siblings: share their prefill); with
        ``sampling.first_top_logprobs = k``, each continuation also carries ``probe(prefix, k)``'s answer."""
        ...

    async def probe(self, prefixes: list[Prefix], top_k: int) -> list[Probe]:
        """Top-``top_k`` log-probabilities (descending) of the first token after each prefix."""
        ...
