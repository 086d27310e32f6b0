"""ServerEngine request/response translation, routing and retries, against stand-in servers."""

import asyncio
import json

import httpx
import pytest

from tests.conftest import noise_image
from visionleaf.engines.base import EngineError, Prefix, SamplingParams, image_key
from visionleaf.engines.sampling import BAN_BIAS, banned_token_ids, eos_token_ids
from visionleaf.engines.server import ServerConfig, ServerEngine


@pytest.fixture(scope="module")
def tokenizer(bpe_processor):
    return bpe_processor.tokenizer


def ids_of(tokenizer, text):
    return tuple(tokenizer.encode(text, add_special_tokens=False))


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
    """vLLM's reply; ``cached=None`` leaves the cached-token report out (the server does not say)."""
    usage = {} if cached is None else {"prompt_tokens_details": {"cached_tokens": cached}}
    return {
        "prompt_token_ids": list(prefix.token_ids),
        "usage": usage,
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
    answer = ids_of(tokenizer, "<think>ok</think><answer>A</answer>")
    seen = []

    def handler(request):
        seen.append((str(request.url), json.loads(request.content)))
        return httpx.Response(200, json=vllm_response(prefix, 3, tokens=answer, cached=32))

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
    assert params["stop_token_ids"] == sorted(eos_token_ids(tokenizer))  # both eos tokens end a turn
    # every vision token is banned (JSON keys are strings; vLLM reads them as token ids)
    assert params["logit_bias"] == {str(t): BAN_BIAS for t in banned_token_ids(tokenizer)}
    assert len(params["logit_bias"]) == 5
    assert body["return_token_ids"] is True
    assert [c.token_ids for c in out] == [answer] * 3
    assert [c.cached_tokens for c in out] == [32, len(prefix.token_ids), len(prefix.token_ids)]
    assert out[0].logprobs == pytest.approx(tuple(-0.1 * (j + 1) for j in range(len(answer))))
    assert out[0].finish_reason == "stop"
    stats = engine.stats
    assert stats.requests == 3 and stats.generated_tokens == 3 * len(answer)
    assert stats.cached_tokens == 32 + 2 * len(prefix.token_ids)  # the server's hits + siblings prefilled once
    assert stats.computed_tokens == len(prefix.token_ids) - 32 + 3 * len(answer)


@pytest.mark.parametrize(
    ("text", "finish", "stop_reason", "expected"),
    [
        ("<think>a</think><tool_call>{}</tool_call>", "stop", "</tool_call>", "stop"),
        ("<think>a</think><answer>A</answer><|im_end|>", "stop", None, "eos"),
        ("<think>a</think><|endoftext|>", "stop", 0, "eos"),  # a stop_token_ids hit
        ("<think>and so on and", "length", None, "length"),  # max_new_tokens
        ("<think>a", "length", None, "length"),  # cut short by the server's context limit
    ],
)
def test_vllm_finish_reasons_come_from_the_one_rule(tokenizer, text, finish, stop_reason, expected):
    prefix = make_prefix(tokenizer)
    reply = vllm_response(prefix, 1, tokens=ids_of(tokenizer, text), finish=finish, stop_reason=stop_reason)
    engine = engine_with(tokenizer, lambda r: httpx.Response(200, json=reply))
    sampling = SamplingParams(max_new_tokens=len(ids_of(tokenizer, "<think>and so on and")))
    [out] = asyncio.run(engine.generate([prefix], sampling, [0]))
    assert out.finish_reason == expected


@pytest.mark.parametrize("tokens", [(5, 6), ()])
def test_aborted_or_empty_replies_are_engine_errors(tokenizer, tokens):
    prefix = make_prefix(tokenizer)
    reply = vllm_response(prefix, 1, tokens=tokens, finish="abort" if tokens else "stop", stop_reason=None)
    engine = engine_with(tokenizer, lambda r: httpx.Response(200, json=reply))
    with pytest.raises(EngineError, match=r"aborted|empty turn"):
        asyncio.run(engine.generate([prefix], SamplingParams(), [0]))


def test_unreported_cached_tokens_are_unknown_not_zero(tokenizer):
    prefix = make_prefix(tokenizer)
    reply = vllm_response(prefix, 2, tokens=ids_of(tokenizer, "<answer>A</answer>"), cached=None)
    engine = engine_with(tokenizer, lambda r: httpx.Response(200, json=reply))
    out = asyncio.run(engine.generate([prefix] * 2, SamplingParams(), [0, 1]))
    engine_one = engine_with(tokenizer, lambda r: httpx.Response(200, json=vllm_response(prefix, 1, cached=None)))
    [probe] = asyncio.run(engine_one.probe([prefix], 2))
    # the second sibling is served by the first one's prefill: known without the server's report
    assert [c.cached_tokens for c in out] == [None, len(prefix.token_ids)] and probe.cached_tokens is None
    assert engine.stats.unknown_cached == 1 and engine.stats.cached_tokens == len(prefix.token_ids)


def test_probe_asks_one_greedy_token_with_top_logprobs(tokenizer):
    prefix = make_prefix(tokenizer)
    bodies = []

    def handler(request):
        bodies.append(json.loads(request.content))
        return httpx.Response(200, json=vllm_response(prefix, 1, tokens=(9,)))

    top = asyncio.run(engine_with(tokenizer, handler).probe([prefix], top_k=20))
    params = bodies[0]["sampling_params"]
    assert params["max_tokens"] == 1 and params["temperature"] == 0 and params["logprobs"] == 20
    assert [p.top_logprobs for p in top] == [(-0.05, -3.0)] and top[0].cached_tokens == 0


def test_first_top_logprobs_ride_on_the_generate_request(tokenizer):
    prefix = make_prefix(tokenizer)
    answer = ids_of(tokenizer, "<answer>A</answer>")
    bodies = []

    def vllm(request):
        bodies.append(json.loads(request.content))
        reply = vllm_response(prefix, bodies[-1]["sampling_params"]["n"], tokens=answer)
        # vLLM lists the sampled token first (here outside the top 2), then the top ones, cut at `logprobs`
        reply["choices"][0]["logprobs"]["content"][0]["top_logprobs"] = [  # the last choice (out of order)
            {"logprob": -6.0, "rank": 9},
            {"logprob": -0.2, "rank": 1},
            {"logprob": -1.5, "rank": 2},
        ]
        return httpx.Response(200, json=reply)

    sampling = SamplingParams(max_new_tokens=8, first_top_logprobs=2)
    out = asyncio.run(engine_with(tokenizer, vllm).generate([prefix] * 2, sampling, [0, 1]))
    assert bodies[0]["sampling_params"]["logprobs"] == 3  # one more than asked: the top 2 stay whole
    assert [c.first_top_logprobs for c in out] == [(-0.05, -3.0), (-0.2, -1.5)]
    plain = asyncio.run(engine_with(tokenizer, vllm).generate([prefix], SamplingParams(), [0]))
    assert bodies[-1]["sampling_params"]["logprobs"] == 0 and plain[0].first_top_logprobs == ()

    def sglang(request):
        bodies.append(json.loads(request.content))
        return httpx.Response(200, json=[sglang_item(answer, {"type": "stop", "matched": "</answer>"}, 0)])

    [cont] = asyncio.run(engine_with(tokenizer, sglang, backend="sglang").generate([prefix], sampling, [0]))
    assert bodies[-1]["top_logprobs_num"] == 2 and cont.first_top_logprobs == (-0.01, -4.0)
    # servers report top logprobs of the distribution they sample from: the probe's only at temperature 1
    for hot in ({"temperature": 0.7}, {"top_p": 0.9}, {"top_k": 20}):
        with pytest.raises(ValueError, match=r"tree\.schedule=lockstep"):
            asyncio.run(
                engine_with(tokenizer, vllm).generate([prefix], SamplingParams(**hot, first_top_logprobs=2), [0])
            )


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
    assert str(info.value).startswith("http://a:1")
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


def sglang_item(tokens, finish, cached):
    meta = {
        "output_token_logprobs": [[-0.1 * (j + 1), t, None] for j, t in enumerate(tokens)],
        "output_top_logprobs": [[[-0.01, 9, None], [-4.0, 5, None]]] + [[]] * (len(tokens) - 1),
        "finish_reason": finish,
    }
    if cached is not None:
        meta["cached_tokens"] = cached
    return {"output_ids": list(tokens), "meta_info": meta}


def test_sglang_translation(tokenizer):
    prefix = make_prefix(tokenizer, n_pads=(4,))
    answer = ids_of(tokenizer, "<answer>A</answer>")
    bodies = []

    def handler(request):
        bodies.append((str(request.url), json.loads(request.content)))
        item = sglang_item(answer, {"type": "stop", "matched": "</answer>"}, 16)
        return httpx.Response(200, json=[item, item])

    engine = engine_with(tokenizer, handler, backend="sglang", urls=("http://g:30000",))
    out = asyncio.run(engine.generate([prefix] * 2, SamplingParams(max_new_tokens=20), [7, 8]))
    url, body = bodies[0]
    assert url == "http://g:30000/generate"
    assert body["return_logprob"] is True and len(body["image_data"]) == 1
    assert body["input_ids"].count(tokenizer.convert_tokens_to_ids("<|image_pad|>")) == 1
    params = body["sampling_params"]
    assert params["max_new_tokens"] == 20 and params["n"] == 2 and params["sampling_seed"] == 7
    assert params["top_k"] == -1  # sglang's "off"
    assert params["stop_token_ids"] == sorted(eos_token_ids(tokenizer)) and params["no_stop_trim"] is True
    assert params["logit_bias"] == {str(t): BAN_BIAS for t in banned_token_ids(tokenizer)}  # vision tokens banned
    assert not {"seed", "max_tokens", "include_stop_str_in_output"} & set(params)  # not sglang's keys
    assert [c.token_ids for c in out] == [answer, answer]
    assert out[0].finish_reason == "stop" and out[0].logprobs == pytest.approx(
        [-0.1 * (j + 1) for j in range(len(answer))]
    )
    assert [c.cached_tokens for c in out] == [16, len(prefix.token_ids)]
    assert engine.stats.cached_tokens == 16 + len(prefix.token_ids)


def test_sglang_aborts_and_unreported_cache(tokenizer):
    prefix = make_prefix(tokenizer)
    answer = ids_of(tokenizer, "<answer>A</answer><|im_end|>")
    unknown = engine_with(
        tokenizer,
        lambda r: httpx.Response(200, json=[sglang_item(answer, {"type": "stop", "matched": 7}, None)]),
        backend="sglang",
    )
    [out] = asyncio.run(unknown.generate([prefix], SamplingParams(), [0]))
    assert out.finish_reason == "eos" and out.cached_tokens is None
    aborted = engine_with(
        tokenizer,
        lambda r: httpx.Response(200, json=[sglang_item(answer[:2], {"type": "abort", "message": "x"}, 0)]),
        backend="sglang",
    )
    with pytest.raises(EngineError, match="aborted"):
        asyncio.run(aborted.generate([prefix], SamplingParams(), [0]))


def test_config_errors():
    with pytest.raises(ValueError, match="at least one server URL"):
        ServerConfig(urls=())
    with pytest.raises(ValueError, match="'vllm' or 'sglang'"):
        ServerConfig(urls=("http://x",), backend="tgi")
