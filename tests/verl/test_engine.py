"""VerlEngine over verl's real LLMServerClient and load balancer, served by a stand-in of verl's vLLM server."""

import asyncio
import time

import pytest

from tests.conftest import noise_image
from tests.engines.contract_verl import (
    SGLANG_SAMPLING_KEYS,
    VLLM_SAMPLING_KEYS,
    StandInServer,
    standin_engine,
    verl_client,
)
from visionleaf.engines.base import EngineError, Prefix, SamplingParams, image_key
from visionleaf.engines.sampling import BAN_BIAS, VISION_TOKENS
from visionleaf.models import tiny
from visionleaf.protocol import IMAGE_PAD, expand_image_pads
from visionleaf.verl.engine import RetryPolicy, VerlEngine, backend_for

SAMPLING = SamplingParams(max_new_tokens=6, temperature=1.0, top_k=5, stop=("</answer>",))


@pytest.fixture(scope="module")
def model_and_processor():
    tokenizer = tiny.build_tokenizer("bpe")
    return tiny.build_model(tokenizer, seed=1), tiny.build_processor(tokenizer)


def make_prefix(processor, route="uid-7", text="look"):
    image = noise_image(56, 56, seed=1)
    prompt = f"<|im_start|>user\n<|vision_start|>{IMAGE_PAD}<|vision_end|>{text}<|im_end|>\n<|im_start|>assistant\n"
    ids = processor.tokenizer.encode(expand_image_pads(prompt, [image], processor.image_processor))
    return Prefix(tuple(ids), (image,), (image_key(image),), route)


def test_cached_tokens_come_from_verls_num_cached_tokens(model_and_processor):
    server = StandInServer(*model_and_processor)
    engine = standin_engine(server)
    prefix = make_prefix(model_and_processor[1])

    async def twice():
        first = await engine.generate([prefix], SAMPLING, [1])
        return first + await engine.generate([prefix], SAMPLING, [2])

    first, second = asyncio.run(twice())
    assert (first.cached_tokens, second.cached_tokens) == (0, len(prefix.token_ids))
    assert engine.stats.cached_tokens == len(prefix.token_ids)
    assert engine.stats.computed_tokens == len(prefix.token_ids) + len(first.token_ids) + len(second.token_ids)


def test_cached_tokens_unknown_when_the_server_reports_none(model_and_processor):
    """verl's SGLang server reports no cache hits: unknown (None), not 'nothing was cached'."""
    engine = standin_engine(StandInServer(*model_and_processor, backend="sglang"))
    prefix = make_prefix(model_and_processor[1])
    (out,) = asyncio.run(engine.generate([prefix], SAMPLING, [1]))
    (probe,) = asyncio.run(engine.probe([prefix], 3))
    assert out.cached_tokens is None and probe.cached_tokens is None
    assert engine.stats.unknown_cached == 2 and engine.stats.computed_tokens == 0


def test_an_aborted_reply_is_retried_not_returned(model_and_processor):
    server = StandInServer(*model_and_processor)
    server.abort = 1  # verl aborts in-flight requests around a weight sync
    engine = standin_engine(server)
    (out,) = asyncio.run(engine.generate([make_prefix(model_and_processor[1])], SAMPLING, [1]))
    assert len(server.received) == 2 and out.token_ids and len(out.logprobs) == len(out.token_ids)


def test_aborts_that_persist_fail_the_group(model_and_processor):
    server = StandInServer(*model_and_processor)
    server.abort = 100
    engine = standin_engine(server, RetryPolicy(timeout_s=5, max_retries=2, backoff_s=0))
    with pytest.raises(EngineError, match=r"'visionleaf_vllm'.*uid-7.*3 times.*aborted"):
        asyncio.run(engine.generate([make_prefix(model_and_processor[1])], SAMPLING, [1]))
    assert len(server.received) == 3


def test_a_hung_server_times_out(model_and_processor):
    server = StandInServer(*model_and_processor)
    server.hang = True
    engine = standin_engine(server, RetryPolicy(timeout_s=0.3, max_retries=1, backoff_s=0))

    async def bounded():  # the old engine waited forever: bound the test itself
        return await asyncio.wait_for(engine.generate([make_prefix(model_and_processor[1])], SAMPLING, [1]), 10)

    start = time.monotonic()
    with pytest.raises(EngineError, match=r"uid-7.*2 times.*no reply within 0.3 s"):
        asyncio.run(bounded())
    assert time.monotonic() - start < 5 and len(server.received) == 2


def test_requests_in_vllm_names_with_vision_ban_and_top_k(model_and_processor):
    model, processor = model_and_processor
    server = StandInServer(model, processor)
    asyncio.run(standin_engine(server).generate([make_prefix(processor)], SAMPLING, [1]))
    (_, params), _ = server.received[0], None
    assert set(params) - {"logprobs"} <= VLLM_SAMPLING_KEYS
    assert params["top_k"] == 5 and params["max_tokens"] == 6 and params["include_stop_str_in_output"] is True
    vision = {processor.tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    assert vision <= set(params["logit_bias"]) and all(isinstance(k, int) for k in params["logit_bias"])
    assert all(v <= BAN_BIAS for v in params["logit_bias"].values())


def test_requests_in_sglang_names(model_and_processor):
    model, processor = model_and_processor
    server = StandInServer(model, processor, backend="sglang")
    (out,) = asyncio.run(standin_engine(server).generate([make_prefix(processor)], SAMPLING, [1]))
    params = server.received[0][1]
    assert set(params) - {"logprobs"} <= SGLANG_SAMPLING_KEYS
    assert params["no_stop_trim"] is True and params["top_k"] == 5 and "sampling_seed" in params
    vision = {str(processor.tokenizer.convert_tokens_to_ids(t)) for t in VISION_TOKENS}
    assert vision <= set(params["logit_bias"])  # str keys: SGLang's SamplingParams declares Dict[str, float]
    assert out.token_ids and out.finish_reason in ("stop", "eos", "length")


def test_rollout_name_defaults_to_the_clients_config(model_and_processor):
    model, processor = model_and_processor
    for name, backend in (("sglang", "sglang"), ("visionleaf_vllm", "vllm")):
        engine = VerlEngine(verl_client({"s": StandInServer(model, processor)}, name), processor.tokenizer)
        assert (engine.rollout_name, engine.backend) == (name, backend)
    assert VerlEngine(object(), processor.tokenizer).rollout_name == "vllm"  # a client without verl's config


def test_backend_vocabulary_per_rollout_name():
    assert [backend_for(n) for n in ("vllm", "visionleaf_vllm", "hf", "sglang", "visionleaf_sglang")] == [
        "vllm",
        "vllm",
        "vllm",
        "sglang",
        "sglang",
    ]


def test_probe_without_top_logprobs_names_the_fix(model_and_processor):
    """verl's stock servers ignore ``top_logprobs``: the probe must say which rollout to use."""

    class Stock(StandInServer):
        async def generate(self, *args, **kwargs):
            output = await super().generate(*args, **kwargs)
            output.extra_fields.pop("top_logprobs", None)
            return output

    engine = standin_engine(Stock(*model_and_processor))
    with pytest.raises(EngineError, match="visionleaf_vllm"):
        asyncio.run(engine.probe([make_prefix(model_and_processor[1])], 3))
