"""A deterministic scripted engine: the tests decide every turn's text and every node's entropy."""

from __future__ import annotations

from collections.abc import Callable

from visionleaf.engines.base import Continuation, EngineStats, Prefix, Probe, SamplingParams

Script = Callable[[str, int], str]
"""(decoded prefix text, seed) -> the model turn to return."""


class ScriptedEngine:
    def __init__(
        self,
        tokenizer,
        script: Script,
        entropy: Callable[[str], float] | None = None,
        cached: Callable[[Prefix], int | None] = lambda prefix: 0,
    ) -> None:
        self.tokenizer = tokenizer
        self.script = script
        self.entropy = entropy or (lambda text: float(len(text) % 7))
        self.cached = cached
        """Cached prefix tokens each request reports (``None``: the engine cannot tell)."""
        self.stats = EngineStats()
        self.generate_calls: list[list[Prefix]] = []
        self.sampling_calls: list[SamplingParams] = []
        self.probe_calls: list[list[Prefix]] = []

    def text(self, prefix: Prefix) -> str:
        return self.tokenizer.decode(prefix.token_ids, skip_special_tokens=False)

    async def generate(self, prefixes: list[Prefix], sampling: SamplingParams, seeds: list[int]) -> list[Continuation]:
        self.generate_calls.append(prefixes)
        self.sampling_calls.append(sampling)
        out = []
        for prefix, seed in zip(prefixes, seeds, strict=True):
            text = self.script(self.text(prefix), seed)
            ids = self.tokenizer.encode(text, add_special_tokens=False)[: sampling.max_new_tokens]
            stop = any(text.endswith(s) for s in sampling.stop)
            reason = "stop" if stop else ("eos" if text.endswith("<|im_end|>") else "length")
            top = (-self.entropy(self.text(prefix)),) if sampling.first_top_logprobs else ()  # the probe's answer
            out.append(Continuation(tuple(ids), tuple(-0.5 for _ in ids), reason, self.cached(prefix), top))
            self.stats.requests += 1
            self.stats.prompt_tokens += len(prefix.token_ids)
            self.stats.computed_tokens += len(prefix.token_ids) + len(ids)
            self.stats.generated_tokens += len(ids)
        return out

    async def probe(self, prefixes: list[Prefix], top_k: int) -> list[Probe]:
        self.probe_calls.append(prefixes)
        # min-entropy of a distribution whose top logprob is -H
        return [Probe((-self.entropy(self.text(p)),), self.cached(p)) for p in prefixes]
