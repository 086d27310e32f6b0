"""In-process transformers engine (CPU or one GPU) with a prefix KV cache at turn boundaries.

What it guarantees, like sglang's radix cache or vLLM's prefix cache:

- **No recomputation of shared prefixes.** KV states are kept per prefix (token ids + image content
  keys), matched by longest prefix, LRU-evicted under a byte cap. After a turn is sampled its KV is
  stored too, so the next turn only prefills the observation. Siblings (identical prefixes in one
  ``generate`` call) prefill once and decode together in one batch.
- **Exact positions.** Qwen2.5-VL's 3-D mRoPE positions of a suffix are computed on the suffix alone and
  offset by the cached prefix's next position (``get_rope_index`` is sequential, so this equals the
  positions of the whole sequence).
- **Logprobs of the distribution actually sampled from**: vision special tokens and padded vocabulary
  entries are masked, logits divided by the temperature, top-k / top-p applied and renormalised; the
  logprob of each sampled token is taken from that distribution (at temperature 0, greedy, from the
  untempered one). Sampling is inverse-CDF with one seeded generator per sequence, so a sequence's tokens
  do not depend on which other sequences share its batch.
- **Entropy probe for free**: ``probe`` prefills the prefix (kept in the cache for the clones that follow)
  and reads the next-token distribution from the prefill logits; no extra forward. A ``generate`` with
  ``first_top_logprobs`` reads the same logits of its prefill.
- **One scheduler for every caller.** Concurrent ``generate`` and ``probe`` calls (many trees, many
  questions, many verl requests) queue; each batch takes everything queued, prefills each distinct prefix
  once and decodes all rows with the same sampling settings together (each row keeps its own
  ``max_new_tokens``). A batch starts once no new call has arrived for ``batch_window_s``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from transformers import DynamicCache

from visionleaf.engines.base import Continuation, EngineStats, FinishReason, Prefix, Probe, SamplingParams
from visionleaf.engines.sampling import banned_token_ids, eos_token_ids, finish_reason

logger = logging.getLogger(__name__)

INDEX_BLOCK = 32
"""Tokens per block of the prefix cache's index (chained block hashes, as vLLM's prefix cache)."""


@dataclass(frozen=True)
class CacheEntry:
    """KV states of one prefix."""

    token_ids: tuple[int, ...]
    image_keys: tuple[str, ...]
    kv: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    """Per layer (keys, values), each [kv_heads, len(token_ids), head_dim]."""
    last_logits: torch.Tensor
    """[vocab] logits of the token after the prefix."""
    next_position: int
    """mRoPE position of the token after the prefix."""

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.kv) + self.last_logits.nbytes

    def matches(self, prefix: Prefix) -> bool:
        """True when this entry is a prefix of ``prefix`` (tokens and images)."""
        n, m = len(self.token_ids), len(self.image_keys)
        return (
            n <= len(prefix.token_ids)
            and prefix.token_ids[:n] == self.token_ids
            and prefix.image_keys[:m] == self.image_keys
        )


CacheKey = tuple[tuple[int, ...], tuple[str, ...]]


def _chain(token_ids: tuple[int, ...], blocks: int) -> Iterator[int]:
    """Chained hashes of the first ``blocks`` whole :data:`INDEX_BLOCK`-token blocks of ``token_ids``."""
    h = 0
    for d in range(blocks):
        h = hash((h, token_ids[d * INDEX_BLOCK : (d + 1) * INDEX_BLOCK]))
        yield h


class PrefixCache:
    """Longest-prefix lookup over :class:`CacheEntry`, LRU-evicted above ``max_bytes`` (0 disables).

    Indexed by chained hashes of whole token blocks: a lookup hashes the query's blocks while some entry
    shares them and then only compares the entries that end in the deepest shared block, so its cost
    grows with the prefix length, not with the number of entries."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[CacheKey, CacheEntry] = OrderedDict()
        self._ending: dict[int, set[CacheKey]] = {}
        """Chained hash of an entry's whole blocks (0: none) -> keys of the entries with exactly those blocks."""
        self._chains: Counter[int] = Counter()
        """Every chained block hash of every entry (reference counts)."""
        self.nbytes = 0
        self.oversized = 0
        """Entries not cached because one alone is over ``max_bytes``."""

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, prefix: Prefix) -> CacheEntry | None:
        ids = prefix.token_ids
        chain = [0]
        for h in _chain(ids, len(ids) // INDEX_BLOCK):
            if h not in self._chains:
                break
            chain.append(h)
        for depth in reversed(range(len(chain))):
            best: CacheEntry | None = None
            for key in self._ending.get(chain[depth], ()):
                entry = self._entries[key]
                if (best is None or len(entry.token_ids) > len(best.token_ids)) and entry.matches(prefix):
                    best = entry
            if best is not None:
                self._entries.move_to_end((best.token_ids, best.image_keys))
                return best
        return None

    def put(self, entry: CacheEntry) -> None:
        key = (entry.token_ids, entry.image_keys)
        if self.max_bytes <= 0 or key in self._entries:
            return
        if entry.nbytes > self.max_bytes:
            if not self.oversized:
                logger.warning(
                    "prefix KV of %d tokens needs %d bytes > cache_max_bytes=%d: not cached, so its turns are "
                    "recomputed (raise cache_max_bytes; counted in PrefixCache.oversized)",
                    len(entry.token_ids),
                    entry.nbytes,
                    self.max_bytes,
                )
            self.oversized += 1
            return
        self._entries[key] = entry
        chain = list(_chain(entry.token_ids, len(entry.token_ids) // INDEX_BLOCK))
        self._chains.update(chain)
        self._ending.setdefault(chain[-1] if chain else 0, set()).add(key)
        self.nbytes += entry.nbytes
        while self.nbytes > self.max_bytes:
            self._remove(next(iter(self._entries)))

    def _remove(self, key: CacheKey) -> None:
        evicted = self._entries.pop(key)
        self.nbytes -= evicted.nbytes
        chain = list(_chain(evicted.token_ids, len(evicted.token_ids) // INDEX_BLOCK))
        self._chains.subtract(chain)
        for h in chain:
            if self._chains[h] <= 0:
                del self._chains[h]
        ending = chain[-1] if chain else 0
        self._ending[ending].discard(key)
        if not self._ending[ending]:
            del self._ending[ending]

    def clear(self) -> None:
        self._entries.clear()
        self._ending.clear()
        self._chains.clear()
        self.nbytes = 0


@dataclass
class _Call:
    """One queued ``generate`` (``sampling`` set) or ``probe`` (``top_k`` set) call."""

    prefixes: list[Prefix]
    future: asyncio.Future[Any] = field(repr=False)
    sampling: SamplingParams | None = None
    seeds: list[int] = field(default_factory=list)
    top_k: int = 0


class HFEngine:
    """:class:`~visionleaf.engines.base.Engine` over an in-process Qwen2.5-VL-style model."""

    def __init__(
        self,
        model: Any,
        processor: Any,
        cache_max_bytes: int = 1 << 30,
        max_batch_size: int = 64,
        batch_window_s: float = 0.005,
    ) -> None:
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.cache = PrefixCache(cache_max_bytes)
        self.max_batch_size = max_batch_size
        self.stats = EngineStats()
        self.device = next(model.parameters()).device
        vocab = model.get_output_embeddings().weight.shape[0]
        self.eos_ids = eos_token_ids(self.tokenizer)
        self.banned = torch.tensor(banned_token_ids(self.tokenizer, vocab), dtype=torch.long)
        self.image_token_id = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.batch_window_s = batch_window_s
        self.batches: list[int] = []
        """Rows of every batch run (generate rows + probes), in order."""
        self.decode_steps = 0
        """Decoding forwards run (one per generated token position of a batch)."""
        self._queue: list[_Call] = []
        self._pump: asyncio.Task[None] | None = None

    async def probe(self, prefixes: list[Prefix], top_k: int) -> list[Probe]:
        if top_k < 1:
            raise ValueError(f"probe top_k must be >= 1, got {top_k}")
        return await self._submit(_Call(prefixes, self._future(), top_k=top_k))

    async def generate(self, prefixes: list[Prefix], sampling: SamplingParams, seeds: list[int]) -> list[Continuation]:
        if len(seeds) != len(prefixes):
            raise ValueError(f"need one seed per prefix, got {len(seeds)} seeds for {len(prefixes)} prefixes")
        return await self._submit(_Call(prefixes, self._future(), sampling, list(seeds)))

    @staticmethod
    def _future() -> asyncio.Future[Any]:
        return asyncio.get_running_loop().create_future()

    async def _submit(self, call: _Call) -> Any:
        if not call.prefixes:
            return []
        self._queue.append(call)
        if self._pump is None or self._pump.done() or self._pump.get_loop() is not asyncio.get_running_loop():
            self._pump = asyncio.create_task(self._run())
        return await call.future

    async def _run(self) -> None:
        """Serve the queue in batches until it is empty: wait until calls stop arriving, take them all."""
        try:
            while self._queue:
                queued = -1
                while len(self._queue) != queued and self._rows(self._queue) < self.max_batch_size:
                    queued = len(self._queue)
                    await asyncio.sleep(self.batch_window_s)
                calls, self._queue = self._queue, []
                calls = [c for c in calls if not c.future.done()]  # a caller that was cancelled meanwhile
                if not calls:
                    continue
                try:
                    results = await asyncio.to_thread(self._serve, calls, asyncio.get_running_loop())
                except Exception as error:  # every caller of the batch gets the engine's error
                    for call in calls:
                        if not call.future.done():
                            call.future.set_exception(error)
                    continue
                for call, result in zip(calls, results, strict=True):
                    _resolve(call.future, result)
        except asyncio.CancelledError:  # the event loop is closing: fail what is left, keep nothing queued
            for call in self._queue:
                if not call.future.done():
                    call.future.cancel()
            self._queue = []
            raise

    @staticmethod
    def _rows(calls: list[_Call]) -> int:
        return sum(len(c.prefixes) for c in calls)

    @torch.inference_mode()
    def _serve(self, calls: list[_Call], loop: asyncio.AbstractEventLoop) -> list[list[Continuation] | list[Probe]]:
        """One batch: the probes (answered at once, so their trees can queue their next call while the batch
        decodes), then the generate calls, rows with equal sampling settings decoded together."""
        self.batches.append(self._rows(calls))
        results: dict[int, list[Any]] = {}
        probes = [i for i, c in enumerate(calls) if c.sampling is None]
        if probes:
            top_k = max(calls[i].top_k for i in probes)  # callers that asked for fewer take the first ones
            answers = iter(self._probe([p for i in probes for p in calls[i].prefixes], top_k))
            for i in probes:
                results[i] = [
                    Probe(tuple(lps[: calls[i].top_k]), cached)
                    for lps, cached in (next(answers) for _ in calls[i].prefixes)
                ]
                loop.call_soon_threadsafe(_resolve, calls[i].future, results[i])
        groups: dict[SamplingParams, list[int]] = {}
        for i, call in enumerate(calls):
            if call.sampling is not None:  # rows that differ in max_new_tokens / first_top_logprobs only: same key
                groups.setdefault(replace(call.sampling, max_new_tokens=1, first_top_logprobs=0), []).append(i)
        for members in groups.values():
            prefixes = [p for i in members for p in calls[i].prefixes]
            samplings = [calls[i].sampling for i in members for _ in calls[i].prefixes]
            seeds = [s for i in members for s in calls[i].seeds]
            out = iter(self._generate(prefixes, samplings, seeds))  # type: ignore[arg-type]
            for i in members:
                results[i] = [next(out) for _ in calls[i].prefixes]
        return [results[i] for i in range(len(calls))]

    def _probe(self, prefixes: list[Prefix], top_k: int) -> list[tuple[list[float], int]]:
        """Top-``top_k`` log-probabilities (descending) of the first token after each prefix, and the prefix
        tokens served from the cache."""
        out = []
        for prefix in prefixes:
            entry, cached = self._prefill(prefix)
            out.append((self._top_logprobs(entry, top_k), cached))
        return out

    def _top_logprobs(self, entry: CacheEntry, top_k: int) -> list[float]:
        """Top-``top_k`` log-probabilities (descending) of the token after ``entry``: its masked prefill
        logits, before temperature, top-k and top-p (the probe's distribution)."""
        if top_k < 1:
            return []
        logprobs = torch.log_softmax(self._mask(entry.last_logits[None]), dim=-1)[0]  # [V]
        return logprobs.topk(min(top_k, logprobs.numel())).values.tolist()

    def _generate(
        self, prefixes: list[Prefix], samplings: list[SamplingParams], seeds: list[int]
    ) -> list[Continuation]:
        # One prefill per distinct prefix; its rows (siblings) reuse it.
        entries: dict[CacheKey, CacheEntry] = {}
        rows, cached = [], []
        for prefix in prefixes:
            key = (prefix.token_ids, prefix.image_keys)
            if key not in entries:
                entries[key], hit = self._prefill(prefix)
            else:
                hit = len(prefix.token_ids)
                self._count_prompt(prefix, cached=hit)
            rows.append(entries[key])
            cached.append(hit)
        out: list[Continuation] = []
        for start in range(0, len(rows), self.max_batch_size):
            batch = slice(start, start + self.max_batch_size)
            out += self._decode(rows[batch], seeds[batch], samplings[batch])
        for i, (entry, sampling) in enumerate(zip(rows, samplings, strict=True)):
            k = sampling.first_top_logprobs
            out[i] = replace(out[i], cached_tokens=cached[i], first_top_logprobs=tuple(self._top_logprobs(entry, k)))
        return out

    def _count_prompt(self, prefix: Prefix, cached: int) -> None:
        self.stats.requests += 1
        self.stats.prompt_tokens += len(prefix.token_ids)
        self.stats.cached_tokens += cached
        self.stats.computed_tokens += len(prefix.token_ids) - cached

    def _prefill(self, prefix: Prefix) -> tuple[CacheEntry, int]:
        """KV of ``prefix`` (from the cache, or by prefilling what the longest cached prefix lacks) and the
        number of its tokens that came from the cache."""
        hit = self.cache.lookup(prefix)
        start = len(hit.token_ids) if hit else 0
        self._count_prompt(prefix, cached=start)
        if hit is not None and start == len(prefix.token_ids):
            return hit, start
        suffix = torch.tensor(prefix.token_ids[start:], dtype=torch.long, device=self.device)[None]  # [1, S]
        n_before = len(hit.image_keys) if hit else 0
        images = list(prefix.images[n_before:])
        vision: dict[str, torch.Tensor] = {}
        grid = None
        if images:
            processed = self.processor.image_processor(images=images, return_tensors="pt")
            grid = processed["image_grid_thw"].to(self.device)  # [n_images, 3]
            vision = {
                "pixel_values": processed["pixel_values"].to(self.device, self.model.dtype),
                "image_grid_thw": grid,
            }
        token_types = (suffix == self.image_token_id).int()  # [1, S]
        positions, _ = self.model.model.get_rope_index(suffix, token_types, image_grid_thw=grid)  # [3, 1, S]
        positions = positions + (hit.next_position if hit else 0)
        cache = DynamicCache(ddp_cache_data=[(k[None], v[None]) for k, v in hit.kv]) if hit else DynamicCache()
        output = self.model(
            input_ids=suffix,
            position_ids=positions,
            attention_mask=torch.ones(1, len(prefix.token_ids), dtype=torch.long, device=self.device),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
            **vision,
        )
        entry = CacheEntry(
            token_ids=prefix.token_ids,
            image_keys=prefix.image_keys,
            kv=tuple((k[0], v[0]) for k, v in _layers(output.past_key_values)),
            last_logits=output.logits[0, -1].float(),
            next_position=int(positions.max()) + 1,
        )
        self.cache.put(entry)
        return entry, start

    def _mask(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float().clone()
        logits[:, self.banned.to(logits.device)] = float("-inf")
        return logits

    def _sample(
        self, logits: torch.Tensor, sampling: SamplingParams, generators: Sequence[torch.Generator]
    ) -> tuple[list[int], list[float]]:
        """One token per row of ``logits`` [B, V] and its logprob under the distribution sampled from."""
        logits = self._mask(logits)  # [B, V]
        if sampling.temperature == 0:
            tokens = logits.argmax(dim=-1)  # [B]
            logprobs = torch.log_softmax(logits, dim=-1)  # [B, V]
        else:
            logits = logits / sampling.temperature
            if sampling.top_k > 0:
                kth = logits.topk(min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # [B, 1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            if sampling.top_p < 1:
                sorted_logits, order = logits.sort(dim=-1, descending=True)  # [B, V]
                probs = torch.softmax(sorted_logits, dim=-1)
                drop = probs.cumsum(dim=-1) - probs > sampling.top_p  # keep the token that crosses top_p
                logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
            logprobs = torch.log_softmax(logits, dim=-1)  # [B, V]
            u = torch.stack([torch.rand((), generator=g) for g in generators]).to(logits.device)  # [B]
            tokens = inverse_cdf(logprobs.exp(), u)
        chosen = logprobs.gather(-1, tokens[:, None]).squeeze(-1)  # [B]
        return tokens.tolist(), chosen.tolist()

    def _decode(self, rows: list[CacheEntry], seeds: list[int], samplings: list[SamplingParams]) -> list[Continuation]:
        """Batched decoding of ``rows`` from their cached prefixes (left-padded into one KV batch); the
        ``samplings`` of the rows differ in ``max_new_tokens`` at most."""
        sampling = samplings[0]
        n = len(rows)
        length = max(len(e.token_ids) for e in rows)
        pads = [length - len(e.token_ids) for e in rows]
        kv = []
        for layer in range(len(rows[0].kv)):
            keys, values = rows[0].kv[layer]
            k = keys.new_zeros(n, keys.shape[0], length, keys.shape[2])  # [B, H, L, D]
            v = values.new_zeros(n, values.shape[0], length, values.shape[2])
            for b, entry in enumerate(rows):
                k[b, :, pads[b] :] = entry.kv[layer][0]
                v[b, :, pads[b] :] = entry.kv[layer][1]
            kv.append((k, v))
        cache = DynamicCache(ddp_cache_data=kv)
        mask = torch.ones(n, length, dtype=torch.long, device=self.device)  # [B, L]
        for b, pad in enumerate(pads):
            mask[b, :pad] = 0
        positions = torch.tensor([e.next_position for e in rows], device=self.device)  # [B]
        logits = torch.stack([e.last_logits for e in rows])  # [B, V]
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        tokens: list[list[int]] = [[] for _ in rows]
        logprobs: list[list[float]] = [[] for _ in rows]
        reasons: list[FinishReason | None] = [None] * n
        active = list(range(n))  # original row index of each batch row

        while active:
            sampled, chosen = self._sample(logits, sampling, [generators[i] for i in active])
            self.stats.generated_tokens += len(active)
            for i, token, logprob in zip(active, sampled, chosen, strict=True):
                tokens[i].append(token)
                logprobs[i].append(logprob)
                reasons[i] = finish_reason(tokens[i], samplings[i], self.eos_ids, self.tokenizer)
            keep = [b for b, i in enumerate(active) if reasons[i] is None]
            for b, i in enumerate(active):
                if reasons[i] is not None:  # KV so far covers the prefix and all but the last token
                    self._store(rows[i], tokens[i], logits[b], cache, b, pads[i])
            if not keep:
                break
            if len(keep) < len(active):
                index = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(index)
                mask, positions = mask[index], positions[index]
                sampled = [sampled[b] for b in keep]
                active = [active[b] for b in keep]
            mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)  # [B, L + 1]
            output = self.model(
                input_ids=torch.tensor(sampled, device=self.device)[:, None],  # [B, 1]
                position_ids=positions.view(1, -1, 1).expand(3, -1, -1),  # [3, B, 1]
                attention_mask=mask,
                past_key_values=cache,
                use_cache=True,
            )
            self.stats.computed_tokens += len(active)
            self.decode_steps += 1
            logits = output.logits[:, -1]  # [B, V]
            positions = positions + 1
        return [
            Continuation(tuple(t), tuple(lp), r)  # type: ignore[arg-type]
            for t, lp, r in zip(tokens, logprobs, reasons, strict=True)
        ]

    def _store(
        self, entry: CacheEntry, tokens: list[int], logits: torch.Tensor, cache: DynamicCache, row: int, pad: int
    ) -> None:
        """Keep the KV of ``entry`` + ``tokens[:-1]`` so the next turn only prefills its new tokens."""
        if len(tokens) < 2 or self.cache.max_bytes <= 0:
            return
        self.cache.put(
            CacheEntry(
                token_ids=entry.token_ids + tuple(tokens[:-1]),
                image_keys=entry.image_keys,
                kv=tuple((k[row, :, pad:].clone(), v[row, :, pad:].clone()) for k, v in _layers(cache)),
                last_logits=logits.float().clone(),
                next_position=entry.next_position + len(tokens) - 1,
            )
        )


def _resolve(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():
        future.set_result(result)


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Token per row of ``probs`` [B, V] (unnormalised) for uniforms ``u`` [B] in [0, 1): the first token
    whose cumulative mass exceeds ``u`` times the total. Never a zero-probability token, also at u = 0 and
    where float rounding puts ``u`` times the total at the very end."""
    cdf = probs.cumsum(dim=-1)  # [B, V]
    tokens = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(-1)  # [B]
    last = (probs > 0).cumsum(dim=-1).argmax(dim=-1)  # [B] last token with mass
    return torch.minimum(tokens, last)


def _layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) of each layer of a ``DynamicCache``, each [B, kv_heads, L, head_dim]."""
    return [(layer.keys, layer.values) for layer in cache.layers]
