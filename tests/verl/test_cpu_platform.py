"""visionleaf's verl plugin pieces that run without Ray: the cpu platform, its patches, the hf sampling map."""

from __future__ import annotations

import pytest
import torch

from visionleaf.engines.sampling import from_request_params
from visionleaf.verl import cpu, device, plugin
from visionleaf.verl.dataset import PILImageDataset


def test_plugin_is_a_verl_entry_point():
    from importlib.metadata import entry_points

    names = {ep.name: ep.value for ep in entry_points(group="verl.plugins")}
    assert names.get("visionleaf") == "visionleaf.verl.plugin"


def test_plugin_refuses_other_verl_versions():
    plugin.check_verl_version(plugin.SUPPORTED_VERL_VERSION)
    with pytest.raises(RuntimeError, match=r"supports verl==0\.9\.1, found verl==0\.9\.2"):
        plugin.check_verl_version("0.9.2")


def test_registrations():
    from verl.plugin.platform import PlatformRegistry
    from verl.trainer.ppo.v1 import get_trainer_cls
    from verl.workers.rollout.base import get_rollout_class
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    from visionleaf.verl import hf_replica, trainer

    assert PlatformRegistry.get("cpu") is cpu.CPUPlatform
    assert RolloutReplicaRegistry.get("hf") is hf_replica.HFReplica
    assert get_rollout_class("hf", "async") is hf_replica.HFRolloutAdapter
    assert get_trainer_cls(plugin.TRAINER_MODE) is trainer.VisionleafTrainer
    assert trainer.TRAINER_MODE == plugin.TRAINER_MODE


def test_cpu_platform_is_a_torch_device():
    platform = cpu.CPUPlatform()
    assert platform.device_name == "cpu"
    assert platform.communication_backend_name() == "gloo"
    # verl uses get_device_id() as a device: it must name the host, not an index (cuda:0)
    assert torch.ones(2).to(platform.current_device()).device.type == "cpu"
    assert platform.ray_resource_options(1) == {"num_gpus": 1}
    assert not platform.is_platform_available(use_smi_check=True)  # chosen explicitly, never detected


def test_device_module_shim():
    module = cpu.CPUPlatform().device_module
    module.empty_cache()
    module.synchronize()
    free, total = module.mem_get_info()
    assert 0 < free <= total
    assert module.memory_allocated() == 0
    state = module.get_rng_state()
    first = torch.rand(3)
    module.set_rng_state(state)
    assert torch.equal(torch.rand(3), first)
    assert module.current_device() == "cpu"


def test_select_cpu_platform_only_without_accelerator(monkeypatch):
    monkeypatch.delenv("VERL_PLATFORM", raising=False)
    monkeypatch.setattr(device, "accelerator_present", lambda: True)
    assert not device.select_cpu_platform_if_no_accelerator()
    monkeypatch.setattr(device, "accelerator_present", lambda: False)
    assert device.select_cpu_platform_if_no_accelerator()
    monkeypatch.setenv("VERL_PLATFORM", "nvidia")  # an explicit choice wins
    assert not device.select_cpu_platform_if_no_accelerator()


def test_process_group_backend_not_duplicated():
    calls = []
    wrapped = cpu.single_process_group_backend(lambda timeout_second=None, backend=None: calls.append(backend))
    wrapped()
    wrapped(backend="cpu:gloo,cuda:nccl")
    assert calls == ["cpu:gloo", "cpu:gloo,cuda:nccl"]


def test_offload_policy_never_pins():
    from torch.distributed.fsdp import CPUOffloadPolicy

    policy = cpu.unpinned_offload_policy(CPUOffloadPolicy)(pin_memory=True)
    assert isinstance(policy, CPUOffloadPolicy)
    assert policy.pin_memory is False


def test_fsdp_engine_found_for_cpu(monkeypatch):
    from verl.workers.engine.base import EngineRegistry
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    from visionleaf.verl.vepo import VepoEngine

    monkeypatch.setenv("VERL_ENGINE_DEVICE", "cpu")
    lookup = cpu.cpu_engine_lookup(EngineRegistry.get_engine_cls)
    found = lookup(EngineRegistry, "language_model", "fsdp2")
    # verl's FSDP engine, as visionleaf's plugin registers it: VEPO's subclass (verl's engine unless flagged)
    assert found is VepoEngine and issubclass(found, FSDPEngineWithLMHead)


def test_sampling_params_translation():
    request = from_request_params(
        {"temperature": 0.7, "top_p": 0.9, "top_k": -1, "logprobs": True, "repetition_penalty": 1.0}, 64
    )
    sampling = request.sampling
    assert (sampling.temperature, sampling.top_p, sampling.top_k, sampling.max_new_tokens) == (0.7, 0.9, 0, 64)
    assert sampling.stop == ()
    assert request.logprobs and request.top_logprobs == 0
    request = from_request_params({"max_tokens": 8, "top_logprobs": 5}, 64)
    assert (request.sampling.max_new_tokens, request.logprobs, request.top_logprobs) == (8, False, 5)
    with pytest.raises(ValueError, match=r"repetition_penalty=1\.0"):
        from_request_params({"repetition_penalty": 1.1}, 64)


def test_pil_dataset_reads_images(tmp_path):
    from PIL import Image

    path = tmp_path / "a.png"
    Image.new("L", (40, 30)).save(path)
    messages = [{"role": "user", "content": [{"type": "image", "image": str(path)}, {"type": "text", "text": "?"}]}]
    images, videos, audios = PILImageDataset._process_multi_modal_info(messages, 14, None)
    assert images is not None and images[0].size == (40, 30) and images[0].mode == "RGB"
    assert videos is None and audios is None
