"""The visionleaf_vllm / visionleaf_sglang rollouts: registration, request ids, admission, LoRA, probe translation.

The servers themselves need GPUs; what they add to verl's is tested here against stand-ins that behave like
verl's classes in the respect tested (verl's vLLM admission gate, vLLM's duplicate-id check)."""

import asyncio
from types import SimpleNamespace

import pytest
from verl.workers.rollout import base as rollout_base
from verl.workers.rollout import replica as verl_replica
from verl.workers.rollout.replica import RolloutReplicaRegistry, TokenOutput

from tests.engines.contract_verl import StandInServer, verl_client
from tests.verl.test_engine import make_prefix
from visionleaf.engines.base import SamplingParams
from visionleaf.engines.sampling import BAN_BIAS
from visionleaf.models import tiny
from visionleaf.verl import plugin  # noqa: F401  (registers, as `import verl` does in every process)
from visionleaf.verl.engine import RetryPolicy, VerlEngine
from visionleaf.verl.servers import (
    TOP_LOGPROBS_KEY,
    VISIONLEAF_SGLANG,
    VISIONLEAF_VLLM,
    InFlightIds,
    probe_aware,
    probe_params,
    sglang_probe_request,
    sglang_probe_result,
    vllm_admitted,
    vllm_lora,
    vllm_probe_result,
)


def test_verls_own_rollouts_stay_verls():
    """Installing visionleaf must not change a verl job that asks for rollout.name=vllm or sglang."""
    assert RolloutReplicaRegistry._registry["vllm"] is verl_replica._load_vllm
    assert RolloutReplicaRegistry._registry["sglang"] is verl_replica._load_sglang
    for name, base in ((VISIONLEAF_VLLM, "vllm"), (VISIONLEAF_SGLANG, "sglang")):
        assert name in RolloutReplicaRegistry._registry
        assert rollout_base._ROLLOUT_REGISTRY[(name, "async")] == rollout_base._ROLLOUT_REGISTRY[(base, "async")]


def test_in_flight_ids_are_distinct_and_released():
    ids = InFlightIds()
    with ids.claim("uid") as a, ids.claim("uid") as b, ids.claim("uid") as c:
        assert (a, b, c) == ("uid", "uid#1", "uid#2")
    with ids.claim("uid") as again:
        assert again == "uid"
    assert not ids._running


@pytest.fixture(scope="module")
def model_and_processor():
    tokenizer = tiny.build_tokenizer("bpe")
    return tiny.build_model(tokenizer, seed=1), tiny.build_processor(tokenizer)


async def no_probe(*_):
    raise AssertionError("not a probe")


def test_sibling_requests_of_a_tree_get_distinct_ids_under_full_determinism(model_and_processor):
    """verl passes the tree's id through to the engine under full_determinism; vLLM refuses a second running
    request with one id. verl's own server collides; visionleaf's gives each request its own id."""
    model, processor = model_and_processor
    prefix = make_prefix(processor)
    sampling = SamplingParams(max_new_tokens=4, stop=())
    retry = RetryPolicy(timeout_s=30, max_retries=0, backoff_s=0)

    def siblings(server):
        client = verl_client({"s": server}, full_determinism=True)
        engine = VerlEngine(client, processor.tokenizer, "vllm", retry)
        return asyncio.run(engine.generate([prefix] * 3, sampling, [1, 2, 3]))

    with pytest.raises(Exception, match="already running"):
        siblings(StandInServer(model, processor))
    server = probe_aware(StandInServer, no_probe)(model, processor)
    assert len(siblings(server)) == 3
    assert sorted(rid for rid, _ in server.received) == ["uid-7", "uid-7#1", "uid-7#2"]


class GatedServer:
    """verl's vLLMHttpServer admission gate (``_park_until_admitted`` and the ``_admitting`` count)."""

    def __init__(self):
        self._submission_paused = False
        self._rejecting = False
        self._resume_event = asyncio.Event()
        self._admitting = 0
        self.started = []

    async def _park_until_admitted(self, request_id):
        while self._submission_paused:
            if self._rejecting:
                return TokenOutput(token_ids=[], stop_reason="aborted", extra_fields={"global_steps": None})
            await self._resume_event.wait()
        self._admitting += 1
        return None

    def outputs(self, request_id):
        async def stream():
            self.started.append(request_id)
            for step in range(2):
                yield step

        return stream


def test_probe_waits_at_verls_admission_gate():
    async def scenario():
        server = GatedServer()
        server._submission_paused = True  # a weight sync is under way
        task = asyncio.create_task(vllm_admitted(server, "r1", server.outputs("r1")))
        await asyncio.sleep(0.05)
        assert not server.started and not task.done()  # parked, never reached the engine
        server._submission_paused = False
        server._resume_event.set()
        final = await task
        return server, final

    server, final = asyncio.run(scenario())
    assert final == 1 and server.started == ["r1"] and server._admitting == 0


def test_a_rejecting_gate_aborts_the_probe():
    async def scenario():
        server = GatedServer()
        server._submission_paused = server._rejecting = True
        return server, await vllm_admitted(server, "r1", server.outputs("r1"))

    server, final = asyncio.run(scenario())
    assert final.stop_reason == "aborted" and not server.started and server._admitting == 0


@pytest.mark.parametrize(
    ("adapter", "loaded", "expected"), [(True, [123], True), (True, [], False), (False, [123], False)]
)
def test_probe_uses_the_lora_adapter_when_verl_would(adapter, loaded, expected):
    async def list_loras():
        return loaded

    server = SimpleNamespace(lora_as_adapter=adapter, engine=SimpleNamespace(list_loras=list_loras))
    assert asyncio.run(vllm_lora(server, 123)) is expected


def test_probe_params_keep_the_ban():
    sent = {"temperature": 0.0, "max_tokens": 1, "logprobs": True, "logit_bias": {151655: BAN_BIAS}, "top_k": 0}
    assert probe_params(sent, "max_tokens") == {
        "temperature": 0.0,
        "max_tokens": 1,
        "logit_bias": {151655: BAN_BIAS},
        "top_k": 0,
    }


def test_sglang_probe_round_trip():
    params = {"max_new_tokens": 1, "temperature": 0.0, "logprobs": True, "logit_bias": {"151655": BAN_BIAS}}
    request = sglang_probe_request("uid-3", [1, 2, 3], ["<image>"], 5, params, lora="verl_actor_lora_name")
    assert request["sampling_params"] == {"max_new_tokens": 1, "temperature": 0.0, "logit_bias": {"151655": BAN_BIAS}}
    assert request["return_logprob"] is True and request["top_logprobs_num"] == 5 and request["rid"] == "uid-3"
    assert request["lora_path"] == "verl_actor_lora_name"
    assert "lora_path" not in sglang_probe_request("u", [1], None, 5, params, lora=None)
    output = {
        "output_ids": [42],
        "meta_info": {
            "finish_reason": {"type": "length"},
            "output_token_logprobs": [(-0.1, 42, None)],
            "output_top_logprobs": [[(-0.1, 42, None), (-2.5, 7, None), (-3.0, 9, None)]],
            "cached_tokens": 96,
        },
    }
    result = sglang_probe_result(output, global_steps=4)
    assert result["token_ids"] == [42] and result["log_probs"] == [-0.1] and result["stop_reason"] == "completed"
    assert result["extra_fields"] == {TOP_LOGPROBS_KEY: [-0.1, -2.5, -3.0], "global_steps": 4}  # cache hits: unknown
    aborted = sglang_probe_result({"meta_info": {"finish_reason": {"type": "abort"}}}, global_steps=4)
    assert aborted["stop_reason"] == "aborted" and aborted["token_ids"] == []


def test_vllm_probe_result_orders_by_rank_and_keeps_k():
    lp = lambda value, rank: SimpleNamespace(logprob=value, rank=rank)  # noqa: E731
    first = {9: lp(-3.0, 3), 5: lp(-0.2, 1), 7: lp(-1.9, 2), 11: lp(-4.0, 4)}
    completion = SimpleNamespace(token_ids=[5], logprobs=[first], finish_reason="length")
    result = vllm_probe_result(SimpleNamespace(outputs=[completion], num_cached_tokens=64), top_k=3, global_steps=2)
    assert result["extra_fields"][TOP_LOGPROBS_KEY] == pytest.approx([-0.2, -1.9, -3.0])
    assert result["log_probs"] == [-0.2] and result["extra_fields"]["num_cached_tokens"] == 64
    assert result["extra_fields"]["global_steps"] == 2 and result["stop_reason"] == "completed"
    aborted = vllm_probe_result(SimpleNamespace(outputs=[], num_cached_tokens=None), top_k=3, global_steps=2)
    assert aborted["stop_reason"] == "aborted" and aborted["token_ids"] == []


class StubVLLMServer:
    """verl's vLLMHttpServer in the respects the probe relies on: the admission gate, ``lora_as_adapter``,
    ``engine.list_loras`` / ``engine.generate`` (an async stream of ``RequestOutput``), ``global_steps``."""

    def __init__(self):
        self._submission_paused = False
        self._rejecting = False
        self._resume_event = asyncio.Event()
        self._admitting = 0
        self.lora_as_adapter = True
        self.model_config = SimpleNamespace(processor=None)
        self.global_steps = 5
        self.calls = []
        self.engine = SimpleNamespace(list_loras=self._list_loras, generate=self._engine_generate)

    async def _park_until_admitted(self, request_id):
        return await GatedServer._park_until_admitted(self, request_id)

    async def _list_loras(self):
        return [123]

    async def _engine_generate(self, prompt, sampling_params, request_id, lora_request=None):
        self.calls.append(("engine", request_id, sampling_params, lora_request, self._admitting))
        lp = lambda value, rank: SimpleNamespace(logprob=value, rank=rank)  # noqa: E731
        completion = SimpleNamespace(token_ids=[7], logprobs=[{7: lp(-0.1, 1), 8: lp(-2.4, 2)}], finish_reason="length")
        yield SimpleNamespace(outputs=[completion], num_cached_tokens=32)

    async def generate(self, prompt_ids, sampling_params, request_id, **kwargs):
        self.calls.append(("verl", request_id, sampling_params))
        return TokenOutput(token_ids=[1], log_probs=[-0.5], stop_reason="completed")


def test_vllm_replica_class_wires_probe_gate_lora_and_ids(monkeypatch):
    """The GPU-only factory, run with vllm's and verl's vLLM modules replaced by stand-ins."""
    import sys
    import types

    from verl.workers.rollout import utils as rollout_utils

    from visionleaf.verl import servers

    def module(name, **attrs):
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, mod)

    module("vllm", SamplingParams=lambda **kw: kw, TokensPrompt=lambda **kw: kw)
    module("vllm.lora.request", LoRARequest=lambda **kw: kw)
    module("verl.workers.rollout.vllm_rollout.utils", VLLM_LORA_INT_ID=123, VLLM_LORA_NAME="n", VLLM_LORA_PATH="p")
    module("verl.workers.rollout.vllm_rollout.vllm_async_server", vLLMHttpServer=StubVLLMServer)
    monkeypatch.setitem(RolloutReplicaRegistry._registry, "vllm", lambda: "verl's vLLMReplica")
    monkeypatch.setattr(rollout_utils, "qwen2_5_vl_dedup_image_tokens", lambda ids, processor: ids)
    monkeypatch.setattr(servers, "_replica_serving", lambda replica, server: (replica, server))
    replica, server_class = servers.vllm_replica_class()
    assert replica == "verl's vLLMReplica"
    server = server_class()
    ban = {151655: BAN_BIAS}

    async def scenario():
        server._submission_paused = True  # a weight sync: the probe parks at verl's gate
        probe = asyncio.create_task(
            server.generate(
                [1, 2],
                {"max_tokens": 1, "temperature": 0.0, "logprobs": True, "logit_bias": ban, TOP_LOGPROBS_KEY: 2},
                "uid",
            )
        )
        turn = asyncio.create_task(server.generate([1, 2], {"max_tokens": 4}, "uid"))
        await asyncio.sleep(0.05)
        assert not any(call[0] == "engine" for call in server.calls)
        server._submission_paused = False
        server._resume_event.set()
        return await probe, await turn

    probe, turn = asyncio.run(scenario())
    (engine_call,) = [c for c in server.calls if c[0] == "engine"]
    (verl_call,) = [c for c in server.calls if c[0] == "verl"]
    _, probe_id, params, lora, admitting = engine_call
    assert params == {"temperature": 0.0, "logit_bias": ban, "max_tokens": 1, "logprobs": 2}
    assert lora == {"lora_name": "n", "lora_int_id": 123, "lora_path": "p"} and admitting == 1
    assert {probe_id, verl_call[1]} == {"uid", "uid#1"}  # concurrent requests of one id: distinct engine ids
    assert probe.extra_fields == {TOP_LOGPROBS_KEY: [-0.1, -2.4], "num_cached_tokens": 32, "global_steps": 5}
    assert turn.token_ids == [1] and server._admitting == 0


class StubSGLangServer:
    """verl's SGLangHttpServer in the respects the probe relies on: ``lora_as_adapter``,
    ``tokenizer_manager.generate_request`` (an async stream of output dicts), ``global_steps``."""

    def __init__(self):
        self.lora_as_adapter = True
        self.global_steps = 6
        self.requests = []
        self.tokenizer_manager = SimpleNamespace(generate_request=self._generate_request)

    async def _generate_request(self, request, http_request):
        self.requests.append(request)
        yield {
            "output_ids": [7],
            "meta_info": {
                "finish_reason": {"type": "length"},
                "output_token_logprobs": [(-0.1, 7, None)],
                "output_top_logprobs": [[(-0.1, 7, None), (-2.0, 8, None)]],
                "cached_tokens": 16,
            },
        }


def test_sglang_replica_class_wires_probe_and_lora(monkeypatch):
    """The GPU-only factory, run with sglang's and verl's SGLang modules replaced by stand-ins."""
    import sys
    import types

    from visionleaf.verl import servers

    def module(name, **attrs):
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, mod)

    module("sglang.srt.managers.io_struct", GenerateReqInput=lambda **kw: kw)
    module("verl.workers.rollout.sglang_rollout.async_sglang_server", SGLangHttpServer=StubSGLangServer)
    module("verl.workers.rollout.sglang_rollout.utils", SGLANG_LORA_NAME="verl_actor_lora_name")
    monkeypatch.setitem(RolloutReplicaRegistry._registry, "sglang", lambda: "verl's SGLangReplica")
    monkeypatch.setattr(servers, "_replica_serving", lambda replica, server: (replica, server))
    replica, server_class = servers.sglang_replica_class()
    assert replica == "verl's SGLangReplica"
    server = server_class()
    params = {"max_new_tokens": 1, "temperature": 0.0, "logprobs": True, "logit_bias": {"151655": BAN_BIAS}}
    out = asyncio.run(server.generate([1, 2], {**params, TOP_LOGPROBS_KEY: 2}, "uid", image_data=["img"]))
    (request,) = server.requests
    assert request["rid"] == "uid" and request["lora_path"] == "verl_actor_lora_name"
    assert request["image_data"] == ["img"] and request["top_logprobs_num"] == 2
    assert request["sampling_params"] == {"max_new_tokens": 1, "temperature": 0.0, "logit_bias": {"151655": BAN_BIAS}}
    assert out.extra_fields == {TOP_LOGPROBS_KEY: [-0.1, -2.0], "global_steps": 6}
