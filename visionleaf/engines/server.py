"""HTTP engine for a running vLLM or SGLang server: token ids and images in, token ids and logprobs out.

- **vLLM** (``backend="vllm"``): ``POST /inference/v1/generate`` (server flag ``--enable-scale-out``;
  ``scripts/serve_vllm_cpu.sh`` passes it). The prompt goes as token ids with ONE ``<|image_pad|>`` per
  image (the server expands it); images as base64 PNG data URLs. The server's expanded prompt is
  checked against ours, so a client/server disagreement on image token counts fails loudly.
- **SGLang** (``backend="sglang"``): native ``POST /generate`` with ``input_ids``, ``image_data``,
  ``return_logprob``, ``top_logprobs_num``. Exercised on GPU clusters only (sglang does not install on
  CPU); unit-tested against a stand-in server.

All requests of one prompt carry its routing key, which picks the server (stable hash), so a tree stays
on one server and its prefix cache. Siblings (identical prefixes in one call) go as one request with
``n`` = their count, prefilled once. Transient failures (connection errors, timeouts, 5xx) are retried
with backoff; then the call raises :class:`~visionleaf.engines.base.EngineError` naming the server; an
aborted or empty reply raises it too (never a turn). Sampling params come from
:func:`~visionleaf.engines.sampling.to_backend_params` (vision tokens banned with a logit bias, both eos
tokens stop) and finish reasons from :func:`~visionleaf.engines.sampling.reply_finish_reason` on the
returned tokens, the rule every engine uses. Cached prefix tokens are the server's report
(``None``, unknown, when the reply has none).
Logprobs are what the server reports: start vLLM with ``--logprobs-mode processed_logprobs`` (the serve
script does) so they are of the distribution sampled from, as in the HF engine.

``SamplingParams.first_top_logprobs = k`` (``tree.schedule=folded``) asks the generate request itself for
the top logprobs of the first token instead of a separate probe request. Both servers report top logprobs
of the distribution they sample from (vLLM's processed logprobs, SGLang's tempered ones), which is the
probe's (untempered, banned tokens masked) only for turns sampled at temperature 1 without top-k / top-p;
other settings are refused. vLLM returns top logprobs for every generated token, not only the first (the
server gathers and serialises k + 1 per token: keep ``tree.top_logprobs`` small, 1 for ``entropy=min``),
and lists the sampled token first, cutting the list at the requested count: the request asks for k + 1 so
the k largest are always complete (the server's ``--max-logprobs`` must be >= k + 1).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import httpx
from PIL import Image

from visionleaf.engines.base import Continuation, EngineError, EngineStats, Prefix, Probe, SamplingParams
from visionleaf.engines.sampling import banned_token_ids, eos_token_ids, reply_finish_reason, to_backend_params


@dataclass(frozen=True)
class ServerConfig:
    """Where the servers are and how patiently to talk to them."""

    urls: tuple[str, ...]
    """Base URLs, e.g. ``("http://127.0.0.1:8000",)``; a prompt's routing key picks one."""
    backend: Literal["vllm", "sglang"] = "vllm"
    """Server API: vLLM's token-in generate endpoint or SGLang's native /generate."""
    timeout_s: float = 300.0
    """Per-request timeout (a long multi-image prefill on CPU can take a while)."""
    max_retries: int = 3
    """Retries of a failed request before the group fails."""
    backoff_s: float = 0.5
    """First retry delay; doubles each retry."""

    def __post_init__(self) -> None:
        if not self.urls:
            raise ValueError("engine.urls must list at least one server URL, e.g. http://127.0.0.1:8000")
        if self.backend not in ("vllm", "sglang"):
            raise ValueError(f"engine.backend must be 'vllm' or 'sglang', got {self.backend!r}")
        if self.max_retries < 0 or self.timeout_s <= 0:
            raise ValueError("engine.max_retries must be >= 0 and engine.timeout_s > 0")


class _ServerError(Exception):
    """A failed request; ``retry`` says whether another try may help."""

    def __init__(self, message: str, retry: bool) -> None:
        super().__init__(message)
        self.retry = retry


class ServerEngine:
    """:class:`~visionleaf.engines.base.Engine` over HTTP."""

    def __init__(
        self,
        config: ServerConfig,
        tokenizer: Any,
        image_cache_size: int = 256,
        transport: httpx.AsyncBaseTransport | None = None,
        vocab_size: int | None = None,
    ) -> None:
        """``vocab_size``: the model's output rows; when given, the padded rows beyond the tokenizer's
        vocabulary are banned too (servers sample them otherwise, with a small but nonzero probability)."""
        self.config = config
        self._transport = transport
        self.stats = EngineStats()
        self.tokenizer = tokenizer
        self.image_pad_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.banned = banned_token_ids(tokenizer, vocab_size)
        self.eos_ids = eos_token_ids(tokenizer)
        self._client: httpx.AsyncClient | None = None
        self._data_urls: OrderedDict[str, str] = OrderedDict()
        self._image_cache_size = image_cache_size

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def url_for(self, route: str) -> str:
        """The server for a routing key (stable across processes)."""
        urls = self.config.urls
        return urls[int(hashlib.sha1(route.encode()).hexdigest(), 16) % len(urls)]

    async def generate(self, prefixes: list[Prefix], sampling: SamplingParams, seeds: list[int]) -> list[Continuation]:
        if len(seeds) != len(prefixes):
            raise ValueError(f"need one seed per prefix, got {len(seeds)} seeds for {len(prefixes)} prefixes")
        if sampling.first_top_logprobs and (sampling.temperature != 1 or sampling.top_p < 1 or sampling.top_k > 0):
            raise ValueError(
                f"a {self.config.backend} server reports the first token's top logprobs of the distribution it "
                "samples from, the probe's only at temperature=1, top_p=1, top_k=0; got temperature="
                f"{sampling.temperature}, top_p={sampling.top_p}, top_k={sampling.top_k}: sample at those settings "
                "or set tree.schedule=lockstep"
            )
        groups: dict[tuple[tuple[int, ...], tuple[str, ...]], list[int]] = {}
        for i, prefix in enumerate(prefixes):
            groups.setdefault((prefix.token_ids, prefix.image_keys), []).append(i)
        results = await asyncio.gather(
            *(self._generate_group(prefixes[rows[0]], len(rows), sampling, seeds[rows[0]]) for rows in groups.values())
        )
        out: list[Continuation | None] = [None] * len(prefixes)
        for rows, continuations in zip(groups.values(), results, strict=True):
            for row, continuation in zip(rows, continuations, strict=True):
                out[row] = continuation
        return [c for c in out if c is not None]

    async def probe(self, prefixes: list[Prefix], top_k: int) -> list[Probe]:
        return list(await asyncio.gather(*(self._probe(prefix, top_k) for prefix in prefixes)))

    async def _generate_group(self, prefix: Prefix, n: int, sampling: SamplingParams, seed: int) -> list[Continuation]:
        k = sampling.first_top_logprobs
        # vLLM lists the sampled token first and cuts at the count asked: one more keeps the top k whole
        asked = k + 1 if k and self.config.backend == "vllm" else k
        body = self._request(prefix, self._sampling(sampling, n=n, seed=seed), top_logprobs=asked)
        choices, cached = self._choices(await self._post(prefix.route, body), prefix, n)
        out = []
        for i, choice in enumerate(choices):
            finish = reply_finish_reason(choice["ids"], sampling, self.eos_ids, self.tokenizer)
            if finish is None:
                raise EngineError(f"{self.url_for(prefix.route)} returned an empty turn for {prefix.route!r}")
            top = tuple(sorted(choice["top"], reverse=True)[:k])
            if len(top) < k:
                raise EngineError(
                    f"{self.url_for(prefix.route)} returned {len(top)} first-token top logprobs, asked {k}"
                )
            # siblings after the first are served by the same prefill
            cached_i = cached if i == 0 else len(prefix.token_ids)
            out.append(Continuation(tuple(choice["ids"]), tuple(choice["logprobs"]), finish, cached_i, top))
        self._count(prefix, out)
        return out

    async def _probe(self, prefix: Prefix, top_k: int) -> Probe:
        params = self._sampling(SamplingParams(max_new_tokens=1, temperature=0, stop=()), n=1, seed=0)
        response = await self._post(prefix.route, self._request(prefix, params, top_logprobs=top_k))
        choices, cached = self._choices(response, prefix, 1)
        if not choices[0]["top"]:
            raise EngineError(f"{self.url_for(prefix.route)} returned no top logprobs for a probe of {prefix.route!r}")
        probe = Probe(tuple(sorted(choices[0]["top"], reverse=True)), cached)
        self._count(prefix, [Continuation((), (), "length", cached)])
        return probe

    def _count(self, prefix: Prefix, rows: Sequence[Continuation]) -> None:
        """Add one call's requests to the engine's cumulative stats."""
        for row in rows:
            self.stats.requests += 1
            self.stats.prompt_tokens += len(prefix.token_ids)
            self.stats.generated_tokens += len(row.token_ids)
            self.stats.computed_tokens += len(row.token_ids)
            if row.cached_tokens is None:
                self.stats.unknown_cached += 1
            else:
                self.stats.cached_tokens += row.cached_tokens
                self.stats.computed_tokens += len(prefix.token_ids) - row.cached_tokens

    # -- request / response translation ---------------------------------------------------------------

    def _sampling(self, sampling: SamplingParams, n: int, seed: int) -> dict[str, Any]:
        return to_backend_params(
            sampling, self.config.backend, banned=self.banned, eos_ids=self.eos_ids, n=n, seed=seed
        )

    def collapse_image_pads(self, prefix: Prefix) -> list[int]:
        """Token ids with each image's run of pads reduced to one pad (servers expand it themselves)."""
        out: list[int] = []
        for token in prefix.token_ids:
            if token == self.image_pad_id and out and out[-1] == self.image_pad_id:
                continue
            out.append(token)
        if out.count(self.image_pad_id) != len(prefix.images):
            raise EngineError(f"prefix has {out.count(self.image_pad_id)} image blocks but {len(prefix.images)} images")
        return out

    def _request(self, prefix: Prefix, params: dict[str, Any], top_logprobs: int) -> dict[str, Any]:
        ids = self.collapse_image_pads(prefix)
        images = [self._data_url(image, key) for image, key in zip(prefix.images, prefix.image_keys, strict=True)]
        if self.config.backend == "sglang":
            return {
                "input_ids": ids,
                "image_data": images,
                "sampling_params": params,
                "return_logprob": True,
                "top_logprobs_num": top_logprobs,
                "logprob_start_len": -1,
                "rid_prefix": prefix.route,
            }
        params = {**params, "logprobs": max(top_logprobs, 0)}
        return {
            "token_ids": ids,
            "content_parts": [{"type": "image_url", "url": url} for url in images],
            "sampling_params": params,
            "return_token_ids": True,
            "output_mode": "tokens",
        }

    def _choices(self, response: Any, prefix: Prefix, n: int) -> tuple[list[dict[str, Any]], int | None]:
        """Normalised choices (``ids``, ``logprobs``, ``top``: top logprobs of the first token) and the prefix
        tokens the server reports as cached (``None`` when it does not say). Aborted requests are errors."""
        try:
            if self.config.backend == "sglang":
                items = response if isinstance(response, list) else [response]
                choices = [_sglang_choice(item) for item in items]
                reported = items[0]["meta_info"].get("cached_tokens")
            else:
                expanded = response.get("prompt_token_ids")
                if expanded is not None and tuple(expanded) != prefix.token_ids:
                    raise EngineError(
                        f"server expanded the prompt to {len(expanded)} tokens, the client to "
                        f"{len(prefix.token_ids)}: client and server disagree on image sizes "
                        "(check min_pixels / max_pixels of both processors)"
                    )
                choices = [_vllm_choice(choice) for choice in sorted(response["choices"], key=lambda c: c["index"])]
                reported = ((response.get("usage") or {}).get("prompt_tokens_details") or {}).get("cached_tokens")
            cached = None if reported is None else int(reported)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise EngineError(
                f"{self.url_for(prefix.route)}: unexpected {self.config.backend} response ({exc!r}): "
                f"{str(response)[:300]}"
            ) from exc
        if len(choices) != n:
            raise EngineError(f"{self.url_for(prefix.route)} returned {len(choices)} choices, expected {n}")
        if any(c["aborted"] for c in choices):
            raise EngineError(f"{self.url_for(prefix.route)} aborted a request of {prefix.route!r}")
        return choices, cached

    def _data_url(self, image: Image.Image, key: str) -> str:
        """PNG data URL of ``image``, cached by content key (the global view is sent with every turn)."""
        url = self._data_urls.get(key)
        if url is None:
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="PNG", compress_level=1)
            url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
            self._data_urls[key] = url
            if len(self._data_urls) > self._image_cache_size:
                self._data_urls.popitem(last=False)
        self._data_urls.move_to_end(key)
        return url

    # -- transport --------------------------------------------------------------------------------------

    async def _post(self, route: str, body: dict[str, Any]) -> Any:
        base = self.url_for(route)
        url = base + ("/generate" if self.config.backend == "sglang" else "/inference/v1/generate")
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.config.timeout_s, transport=self._transport)
        delay, last = self.config.backoff_s, ""
        for attempt in range(self.config.max_retries + 1):
            try:
                return await self._post_once(url, body)
            except _ServerError as exc:
                last = str(exc)
                if not exc.retry:
                    break
            if attempt < self.config.max_retries:
                await asyncio.sleep(delay)
                delay *= 2
        raise EngineError(f"{url}: {last} (after {self.config.max_retries + 1} tries at most)")

    async def _post_once(self, url: str, body: dict[str, Any]) -> Any:
        assert self._client is not None
        try:
            response = await self._client.post(url, json=body)
        except httpx.TimeoutException as exc:
            raise _ServerError(f"timed out after {self.config.timeout_s}s ({type(exc).__name__})", retry=True) from exc
        except httpx.TransportError as exc:
            raise _ServerError(f"unreachable ({type(exc).__name__}: {exc})", retry=True) from exc
        if response.status_code >= 500:
            raise _ServerError(f"HTTP {response.status_code}: {response.text[:300]}", retry=True)
        if response.status_code >= 400:
            raise _ServerError(f"HTTP {response.status_code}: {response.text[:300]}", retry=False)
        try:
            return response.json()
        except ValueError as exc:
            raise _ServerError(f"response is not JSON: {response.text[:200]!r}", retry=False) from exc


def _vllm_choice(choice: dict[str, Any]) -> dict[str, Any]:
    content = (choice.get("logprobs") or {}).get("content") or []
    ids = [int(t) for t in choice["token_ids"]]
    if len(content) != len(ids):
        raise ValueError(f"{len(ids)} tokens but {len(content)} logprobs")
    top = [float(t["logprob"]) for t in content[0].get("top_logprobs", [])] if content else []
    aborted = choice.get("finish_reason") == "abort"
    return {"ids": ids, "logprobs": [float(t["logprob"]) for t in content], "top": top, "aborted": aborted}


def _sglang_choice(item: dict[str, Any]) -> dict[str, Any]:
    meta = item["meta_info"]
    # output_token_logprobs: [(logprob, token_id, text_or_None), ...]
    pairs: Sequence[Sequence[Any]] = meta["output_token_logprobs"]
    ids = [int(p[1]) for p in pairs] if pairs else [int(t) for t in item.get("output_ids", [])]
    top_lists = meta.get("output_top_logprobs") or []
    top = [float(p[0]) for p in top_lists[0]] if top_lists and top_lists[0] else []
    # finish_reason: {"type": "length" | "stop" | "abort", ...}
    finish_info = meta.get("finish_reason") or {}
    aborted = (finish_info.get("type") if isinstance(finish_info, dict) else finish_info) == "abort"
    return {"ids": ids, "logprobs": [float(p[0]) for p in pairs], "top": top, "aborted": aborted}
