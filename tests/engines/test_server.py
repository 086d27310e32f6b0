"""ServerEngine request/response translation, routing and retries, against stand-in servers."""

import asyncio
import json

import httpx
import pytest

from tests.conftest import noise_image
from visionleaf.engines.base import EngineError, Prefix, SamplingParams, image_key
from visionleaf.engines.server import ServerConfig, ServerEngine


@pytest.fixture(scope="module")
def tokenizer(bpe_processor):
    return bpe_processor.tokenizer


def make_prefix(tokenizer, n_pads=(4,), route="uid-1"):
    """<text><vision_start><pad * n><vision_end>... with one image per pad run."""
    ids = tokenizer.encode("<|im_start|>user\n", add_special_tokens=False)
    images = []
    for i, n in enumerate(n_pads):
        ids += tokenizer.encode("<|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|>", add_special_tokens=False)
        images.append(noise_image(56, 56, seed=i))
    ids += tokenizer.encode("look<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    return Prefix(tuple(ids), tuple(images), tuple(image_key(im) for im in images), route)


def vllm_response(prefix, n, tokens=(5, 6, 7), finish="stop", stop_reason="</answer>", cached=0):
    return {
        "prompt_token_ids": list(prefix.token_ids),
        "usage": {"prompt_tokens_details": {"cached_tokens": cached}},
        "choices": [
            {
                "index": i,
                "token_ids": list(tokens),
                "finish_reason": finish,
                "stop_reason": stop_reason,
                "logprobs": {
                    "content": [
                        {
                            "token_id": t,
                            "logprob": -0.1 * (j + 1),
                            "top_logprobs": [{"logprob": -0.05}, {"logprob": -3.0}],
                        }
                        for j, t in enumerate(tokens)
                    ]
                },
            }
            for i in reversed(range(n))  # out of order on purpose
        ],
    }


def engine_with(tokenizer, handler, **config):
    config = {"urls": ("http://a:1",), "backoff_s": 0.0, **config}
    return ServerEngine(ServerConfig(**config), tokenizer, transport=httpx.MockTransport(handler))


def test_vllm_request_and_response(tokenizer):
    prefix = make_prefix(tokenizer, n_pads=(4, 2))
    seen = []

    def handler(request):
        seen.append((str(request.url), json.loads(request.content)))
        return httpx.Response(200, json=vllm_response(prefix, 3, cached=32))

    engine = engine_with(tokenizer, handler)
    sampling = SamplingParams(max_new_tokens=50, temperature=0.7, top_p=0.9)
    out = asyncio.run(engine.generate([prefix] * 3, sampling, [11, 12, 13]))
    assert len(seen) == 1  # three siblings -> one request with n=3
    url, body = seen[0]
    assert url == "http://a:1/inference/v1/generate"
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert body["token_ids"].count(pad) == 2  # one pad per image: the server expands them
    assert len(body["token_ids"]) == len(prefix.token_ids) - 4  # 3 + 1 pads collapsed
    assert [p["url"][:22] for p in body["content_parts"]] == ["data:image/png;base64,"] * 2
    params = body["sampling_params"]
    assert params["n"] == 3 and params["seed"] == 11 and params["max_tokens"] == 50
    assert params["temperature"] == 0.7 and params["top_p"] == 0.9 and params["top_k"] == 0
    assert params["stop"] == ["</tool_call>", "</answer>"] and params["include_stop_str_in_output"]
    banned = {str(tokenizer.convert_tokens_to_ids(t)) for t in ("<|image_pad|>", "<|vision_start|>")}
    assert banned <= set(params["logit_bias"]) and set(params["logit_bias"].values()) == {-100}
    assert body["return_token_ids"] is True
    assert [c.token_ids for c in out] == [(5, 6, 7)] * 3
    assert [c.cached_tokens for c in out] == [32, len(prefix.token_ids), len(prefix.token_ids)]
    assert out[0].logprobs == pytest.approx((-0.1, -0.2, -0.3)) and out[0].finish_reason == "stop"
    stats = engine.stats
    assert stats.requests == 3 and stats.generated_tokens == 9
    assert stats.cached_tokens == 32 + 2 * len(prefix.token_ids)  # the server's hits + siblings prefilled once
    assert stats.computed_tokens == len(prefix.token_ids) - 32 + 9


@pytest.mark.parametrize(
    ("finish", "stop_reason", "expected"),
    [("stop", "</tool_call>", "stop"), ("stop", None, "eos"), ("length", None, "length")],
)
def test_vllm_finish_reasons(tokenizer, finish, stop_reason, expected):
    prefix = make_prefix(tokenizer)
    engine = engine_with(
        tokenizer, lambda r: httpx.Response(200, json=vllm_response(prefix, 1, finish=finish, stop_reason=stop_reason))
    )
    [out] = asyncio.run(engine.generate([prefix], SamplingParams(), [0]))
    assert out.finish_reason == expected


def test_probe_asks_one_greedy_token_with_top_logprobs(tokenizer):
    prefix = make_prefix(tokenizer)
    bodies = []

    def handler(request):
        bodies.append(json.loads(request.content))
        return httpx.Response(200, json=vllm_response(prefix, 1, tokens=(9,)))

    top = asyncio.run(engine_with(tokenizer, handler).probe([prefix], top_k=20))
    params = bodies[0]["sampling_params"]
    assert params["max_tokens"] == 1 and params["temperature"] == 0 and params["logprobs"] == 20
    assert top == [(-0.05, -3.0)]


def test_routing_key_pins_a_prompt_to_one_server(tokenizer):
    hosts = []

    def handler(request):
        hosts.append(request.url.host)
        prefix = make_prefix(tokenizer, route="")
        return httpx.Response(200, json=vllm_response(prefix, 1))

    engine = engine_with(tokenizer, handler, urls=("http://s0:1", "http://s1:1", "http://s2:1"))
    routes = [f"uid-{i}" for i in range(12)]
    for route in routes:
        for _ in range(2):
            asyncio.run(engine.generate([make_prefix(tokenizer, route=route)], SamplingParams(), [0]))
    per_route = [set(hosts[2 * i : 2 * i + 2]) for i in range(len(routes))]
    assert all(len(h) == 1 for h in per_route)  # both requests of a prompt on the same server
    assert len(set().union(*per_route)) > 1  # prompts are spread over the servers
    assert engine.url_for("uid-3") == engine.url_for("uid-3")


def test_transient_failures_are_retried(tokenizer):
    prefix = make_prefix(tokenizer)
    calls = []

    def handler(request):
        calls.append(1)
        if len(calls) == 1:
            raise httpx.ConnectError("connection refused")
        if len(calls) == 2:
            return httpx.Response(503, text="overloaded")
        return httpx.Response(200, json=vllm_response(prefix, 1))

    out = asyncio.run(engine_with(tokenizer, handler, max_retries=3).generate([prefix], SamplingParams(), [0]))
    assert len(calls) == 3 and out[0].token_ids == (5, 6, 7)


@pytest.mark.parametrize(
    ("handler", "words", "tries"),
    [
        (lambda r: httpx.Response(500, text="boom"), "HTTP 500: boom", 3),  # retried, then the group fails
        (lambda r: httpx.Response(400, text="bad logprobs"), "HTTP 400: bad logprobs", 1),  # no retry on 4xx
        (lambda r: httpx.Response(200, text="<html>"), "not JSON", 1),
        (lambda r: httpx.Response(200, json={"choices": [{"index": 0}]}), "unexpected vllm response", 1),
    ],
)
def test_failures_raise_engine_errors_naming_the_server(tokenizer, handler, words, tries):
    calls = []

    def counting(request):
        calls.append(1)
        return handler(request)

    engine = engine_with(tokenizer, counting, max_retries=2)
    with pytest.raises(EngineError, match=words) as info:
        asyncio.run(engine.generate([make_prefix(tokenizer)], SamplingParams(), [0]))
    assert "http://a:1/inference/v1/generate" in str(info.value) or "response" in str(info.value)
    assert len(calls) == tries


def test_timeouts_are_bounded(tokenizer):
    def handler(request):
        raise httpx.ReadTimeout("slow")

    engine = engine_with(tokenizer, handler, max_retries=1, timeout_s=0.1)
    with pytest.raises(EngineError, match="timed out"):
        asyncio.run(engine.generate([make_prefix(tokenizer)], SamplingParams(), [0]))


def test_client_server_disagreement_on_image_tokens_fails_loudly(tokenizer):
    prefix = make_prefix(tokenizer, n_pads=(4,))
    other = make_prefix(tokenizer, n_pads=(6,))  # the server expanded the image to 6 tokens
    engine = engine_with(tokenizer, lambda r: httpx.Response(200, json=vllm_response(other, 1)))
    with pytest.raises(EngineError, match="disagree on image sizes"):
        asyncio.run(engine.generate([prefix], SamplingParams(), [0]))


def test_pad_and_image_counts_must_agree(tokenizer):
    prefix = make_prefix(tokenizer, n_pads=(4,))
    broken = Prefix(prefix.token_ids, (), (), "uid")
    engine = engine_with(tokenizer, lambda r: httpx.Response(200, json={}))
    with pytest.raises(EngineError, match="1 image blocks but 0 images"):
        asyncio.run(engine.generate([broken], SamplingParams(), [0]))


def test_sglang_translation(tokenizer):
    prefix = make_prefix(tokenizer, n_pads=(4,))
    bodies = []

    def handler(request):
        bodies.append((str(request.url), json.loads(request.content)))
        item = {
            "output_ids": [5, 6],
            "meta_info": {
                "output_token_logprobs": [[-0.3, 5, None], [-0.4, 6, None]],
                "output_top_logprobs": [[[-0.01, 9, None], [-4.0, 5, None]], []],
                "finish_reason": {"type": "stop", "matched": "</answer>"},
                "cached_tokens": 16,
            },
        }
        return httpx.Response(200, json=[item, item])

    engine = engine_with(tokenizer, handler, backend="sglang", urls=("http://g:30000",))
    out = asyncio.run(engine.generate([prefix] * 2, SamplingParams(max_new_tokens=20), [7, 8]))
    url, body = bodies[0]
    assert url == "http://g:30000/generate"
    assert body["return_logprob"] is True and len(body["image_data"]) == 1
    assert body["input_ids"].count(tokenizer.convert_tokens_to_ids("<|image_pad|>")) == 1
    assert body["sampling_params"]["max_new_tokens"] == 20 and body["sampling_params"]["n"] == 2
    assert body["sampling_params"]["top_k"] == -1  # sglang's "off"
    assert [c.token_ids for c in out] == [(5, 6), (5, 6)]
    assert out[0].logprobs == (-0.3, -0.4) and out[0].finish_reason == "stop"
    assert engine.stats.cached_tokens == 16 + len(prefix.token_ids)


def test_config_errors():
    with pytest.raises(ValueError, match="at least one server URL"):
        ServerConfig(urls=())
    with pytest.raises(ValueError, match="'vllm' or 'sglang'"):
        ServerConfig(urls=("http://x",), backend="tgi")
