"""Accelerator detection before ``import verl``: the cpu platform is chosen only when torch sees none."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch

from visionleaf.verl import device


@pytest.fixture
def no_accelerator(monkeypatch):
    """torch as on this CPU machine: no CUDA/ROCm, no XPU, no torch.npu and no torch_npu to import."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch, "xpu", SimpleNamespace(is_available=lambda: False), raising=False)
    monkeypatch.delattr(torch, "npu", raising=False)
    monkeypatch.setattr(device.importlib.util, "find_spec", lambda name: None)
    monkeypatch.delenv("VERL_PLATFORM", raising=False)
    return monkeypatch


def test_nothing_found_selects_cpu(no_accelerator):
    assert not device.accelerator_present()
    assert device.select_cpu_platform_if_no_accelerator()


@pytest.mark.parametrize("name", ["cuda", "xpu", "npu"])
def test_each_accelerator_is_found(no_accelerator, name):
    # ROCm builds of torch report their GPUs through torch.cuda too
    no_accelerator.setattr(torch, name, SimpleNamespace(is_available=lambda: True), raising=False)
    assert device.accelerator_present()
    assert not device.select_cpu_platform_if_no_accelerator()


def test_npu_seen_but_unavailable(no_accelerator):
    no_accelerator.setattr(torch, "npu", SimpleNamespace(is_available=lambda: False), raising=False)
    assert not device.accelerator_present()


def test_torch_npu_is_imported_to_find_an_npu(no_accelerator, tmp_path):
    # torch_npu adds torch.npu on import (verl's NPU platform imports it the same way)
    package = tmp_path / "torch_npu"
    package.mkdir()
    (package / "__init__.py").write_text(
        "import types, torch\ntorch.npu = types.SimpleNamespace(is_available=lambda: True)\n"
    )
    no_accelerator.syspath_prepend(str(tmp_path))
    no_accelerator.setattr(device.importlib.util, "find_spec", lambda name: name == "torch_npu" or None)
    no_accelerator.delitem(sys.modules, "torch_npu", raising=False)
    try:
        assert device.accelerator_present()
        assert "torch_npu" in sys.modules
    finally:
        sys.modules.pop("torch_npu", None)
        if hasattr(torch, "npu"):
            del torch.npu
