"""An engine whose answers a test scripts from what each request shows (images, crops, resolution)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from visionleaf.engines.base import Continuation, EngineStats, Prefix, Probe, SamplingParams


class ScriptedEngine:
    """Answers ``<answer>{rule(prefix)}</answer>`` to every request; counts the calls per route."""

    def __init__(self, tokenizer, rule: Callable[[Prefix], str]) -> None:
        self.tokenizer, self.rule = tokenizer, rule
        self.stats = EngineStats()
        self.rows = 0
        self.routes: Counter[str] = Counter()

    async def generate(self, prefixes: list[Prefix], sampling: SamplingParams, seeds: list[int]) -> list[Continuation]:
        out = []
        for prefix in prefixes:
            self.rows += 1
            self.routes[prefix.route] += 1
            ids = tuple(self.tokenizer.encode(f"<answer>{self.rule(prefix)}</answer>", add_special_tokens=False))
            out.append(Continuation(ids, (0.0,) * len(ids), "stop"))
        return out

    async def probe(self, prefixes: list[Prefix], top_k: int) -> list[Probe]:
        return [Probe((0.0,) * top_k) for _ in prefixes]
