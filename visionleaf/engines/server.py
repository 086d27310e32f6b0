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
with backoff; then the call raises :class:`~visionleaf.engines.base.EngineError` naming the server.
Logprobs are what the server reports: start vLLM with ``--logprobs-mode processed_logprobs`` (the serve
script does) so they are of the distribution sampled from, as in the HF engine.
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

from visionleaf.engines.base import Continuation, EngineError, EngineStats, FinishReason, Prefix, SamplingParams
from visionleaf.engines.hf import VISION_TOKENS


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
    ) -> None:
        self.config = config
        self._transport = transport
        self.stats = EngineStats()
        self.image_pad_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.banned = [tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS]
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

    async def probe(self, prefixes: list[Prefix], top_k: int) -> list[tuple[float, ...]]:
        return list(await asyncio.gather(*(self._probe(prefix, top_k) for prefix in prefixes)))

    async def _generate_group(self, prefix: Prefix, n: int, sampling: SamplingParams, seed: int) -> list[Continuation]:
        params = self._sampling(sampling, n=n, seed=seed % (1 << 31))
        body = self._request(prefix, params, top_logprobs=0)
        response = await self._post(prefix.route, body)
        continuations = self._continuations(response, prefix, n)
        self.stats.generated_tokens += sum(len(c.token_ids) for c in continuations)
        self.stats.computed_tokens += sum(len(c.token_ids) for c in continuations)
        return continuations

    async def _probe(self, prefix: Prefix, top_k: int) -> tuple[float, ...]:
        params = self._sampling(SamplingParams(max_new_tokens=1, temperature=0, stop=()), n=1, seed=0)
        response = await self._post(prefix.route, self._request(prefix, params, top_logprobs=top_k))
        choice = self._choices(response, prefix, 1)[0]
        return tuple(sorted(choice["top"], reverse=True))

    # -- request / response translation ---------------------------------------------------------------

    def _sampling(self, sampling: SamplingParams, n: int, seed: int) -> dict[str, Any]:
        return {
            "n": n,
            "seed": seed,
            "max_tokens": sampling.max_new_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "top_k": sampling.top_k if sampling.top_k > 0 else (0 if self.config.backend == "vllm" else -1),
            "stop": list(sampling.stop),
            "logit_bias": {str(t): -100 for t in self.banned},  # vision tokens are never sampled
        }

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
            sglang_params = {k: v for k, v in params.items() if k not in ("max_tokens", "seed")}
            sglang_params.update(max_new_tokens=params["max_tokens"], sampling_seed=params["seed"])
            return {
                "input_ids": ids,
                "image_data": images,
                "sampling_params": sglang_params,
                "return_logprob": True,
                "top_logprobs_num": top_logprobs,
                "logprob_start_len": -1,
                "rid_prefix": prefix.route,
            }
        params = {**params, "logprobs": max(top_logprobs, 0), "include_stop_str_in_output": True}
        return {
            "token_ids": ids,
            "content_parts": [{"type": "image_url", "url": url} for url in images],
            "sampling_params": params,
            "return_token_ids": True,
            "output_mode": "tokens",
        }

    def _choices(self, response: Any, prefix: Prefix, n: int) -> list[dict[str, Any]]:
        """Normalised choices: ``ids``, ``logprobs``, ``top`` (top logprobs of the first token), ``finish``."""
        try:
            if self.config.backend == "sglang":
                items = response if isinstance(response, list) else [response]
                choices = [_sglang_choice(item) for item in items]
                cached = int(items[0]["meta_info"].get("cached_tokens", 0))
            else:
                expanded = response.get("prompt_token_ids")
                if expanded is not None and tuple(expanded) != prefix.token_ids:
                    raise EngineError(
                        f"server expanded the prompt to {len(expanded)} tokens, the client to "
                        f"{len(prefix.token_ids)}: client and server disagree on image sizes "
                        "(check min_pixels / max_pixels of both processors)"
                    )
                choices = [_vllm_choice(choice) for choice in sorted(response["choices"], key=lambda c: c["index"])]
                cached = int((response.get("usage") or {}).get("prompt_tokens_details", {}).get("cached_tokens") or 0)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            if isinstance(exc, EngineError):
                raise
            raise EngineError(f"unexpected {self.config.backend} response ({exc!r}): {str(response)[:300]}") from exc
        if len(choices) != n:
            raise EngineError(f"server returned {len(choices)} choices, expected {n}")
        self.stats.requests += n
        self.stats.prompt_tokens += len(prefix.token_ids) * n
        self.stats.cached_tokens += cached + len(prefix.token_ids) * (n - 1)  # n > 1: prefilled once
        self.stats.computed_tokens += len(prefix.token_ids) - cached
        return choices

    def _continuations(self, response: Any, prefix: Prefix, n: int) -> list[Continuation]:
        before = self.stats.cached_tokens
        choices = self._choices(response, prefix, n)
        server_hits = self.stats.cached_tokens - before - len(prefix.token_ids) * (n - 1)
        return [
            Continuation(
                tuple(c["ids"]), tuple(c["logprobs"]), c["finish"], server_hits if i == 0 else len(prefix.token_ids)
            )
            for i, c in enumerate(choices)
        ]

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
    finish: FinishReason = "length" if choice["finish_reason"] == "length" else "stop"
    if finish == "stop" and choice.get("stop_reason") is None:
        finish = "eos"  # vLLM reports an eos token as finish "stop" without a stop string
    return {"ids": ids, "logprobs": [float(t["logprob"]) for t in content], "top": top, "finish": finish}


def _sglang_choice(item: dict[str, Any]) -> dict[str, Any]:
    meta = item["meta_info"]
    # output_token_logprobs: [(logprob, token_id, text_or_None), ...]
    pairs: Sequence[Sequence[Any]] = meta["output_token_logprobs"]
    ids = [int(p[1]) for p in pairs] if pairs else [int(t) for t in item.get("output_ids", [])]
    top_lists = meta.get("output_top_logprobs") or []
    top = [float(p[0]) for p in top_lists[0]] if top_lists and top_lists[0] else []
    # finish_reason: {"type": "length"} | {"type": "stop", "matched": <stop string or eos token id>}
    finish_info = meta.get("finish_reason") or {}
    matched = finish_info.get("matched") if isinstance(finish_info, dict) else None
    finish: FinishReason = "stop" if isinstance(matched, str) else "eos"
    if (finish_info.get("type") if isinstance(finish_info, dict) else finish_info) == "length":
        finish = "length"
    return {"ids": ids, "logprobs": [float(p[0]) for p in pairs], "top": top, "finish": finish}
