"""Request/response translation of the sglang/vllm server subclasses (the servers themselves need GPUs)."""

from types import SimpleNamespace

import pytest

from visionleaf.verl.servers import (
    TOP_LOGPROBS_KEY,
    sglang_probe_request,
    sglang_probe_result,
    to_sglang_params,
    vllm_probe_result,
)


def test_sampling_params_in_sglang_names():
    params = {"temperature": 1.0, "stop": ["</answer>"], "include_stop_str_in_output": True, "seed": 7, "top_k": -1}
    assert to_sglang_params(params) == {
        "temperature": 1.0,
        "stop": ["</answer>"],
        "no_stop_trim": True,
        "sampling_seed": 7,
        "top_k": -1,
    }


def test_sglang_probe_round_trip():
    request = sglang_probe_request("uid-3", [1, 2, 3], ["<image>"], top_k=5)
    assert request["sampling_params"] == {"max_new_tokens": 1, "temperature": 0.0}
    assert request["return_logprob"] is True and request["top_logprobs_num"] == 5 and request["rid"] == "uid-3"
    output = {
        "output_ids": [42],
        "meta_info": {
            "output_token_logprobs": [(-0.1, 42, None)],
            "output_top_logprobs": [[(-0.1, 42, None), (-2.5, 7, None), (-3.0, 9, None)]],
            "cached_tokens": 96,
        },
    }
    result = sglang_probe_result(output)
    assert result["token_ids"] == [42] and result["log_probs"] == [-0.1]
    assert result["extra_fields"] == {TOP_LOGPROBS_KEY: [-0.1, -2.5, -3.0], "cached_tokens": 96}


def test_vllm_probe_result_orders_by_rank():
    lp = lambda value, rank: SimpleNamespace(logprob=value, rank=rank)  # noqa: E731
    completion = SimpleNamespace(token_ids=[5], logprobs=[{9: lp(-3.0, 3), 5: lp(-0.2, 1), 7: lp(-1.9, 2)}])
    result = vllm_probe_result(SimpleNamespace(outputs=[completion], num_cached_tokens=64))
    assert result["extra_fields"][TOP_LOGPROBS_KEY] == pytest.approx([-0.2, -1.9, -3.0])
    assert result["log_probs"] == [-0.2] and result["extra_fields"]["cached_tokens"] == 64
