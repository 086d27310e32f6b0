"""Which verl platform to use, decided before ``import verl`` (verl's plugin reads it on import)."""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Any

import torch

CPU_PLATFORM = "cpu"
"""Name of visionleaf's cpu platform in verl's ``PlatformRegistry`` and value of ``VERL_PLATFORM``."""


def accelerator_present() -> bool:
    """True when torch sees an accelerator: CUDA or ROCm (both ``torch.cuda``), an Ascend NPU (``torch.npu``,
    which importing ``torch_npu`` adds) or an Intel XPU (``torch.xpu``; verl 0.9.1 has no XPU platform of its
    own, a verl platform plugin adds one). Then the cpu platform is not selected."""
    if torch.cuda.is_available():
        return True
    if not hasattr(torch, "npu") and importlib.util.find_spec("torch_npu") is not None:
        importlib.import_module("torch_npu")  # registers torch.npu, as verl's NPU platform does
    return any(_available(getattr(torch, name, None)) for name in ("npu", "xpu"))


def _available(device_module: Any) -> bool:
    is_available = getattr(device_module, "is_available", None)
    return bool(is_available is not None and is_available())


def cpu_platform_selected() -> bool:
    """True when ``VERL_PLATFORM`` names the cpu platform."""
    return os.environ.get("VERL_PLATFORM", "").strip().lower() == CPU_PLATFORM


def select_cpu_platform_if_no_accelerator() -> bool:
    """Set ``VERL_PLATFORM=cpu`` when no accelerator exists and none was chosen; True if cpu is selected.

    Call before ``import verl`` and ``ray.init`` so this process and every Ray worker see the choice.
    """
    if not os.environ.get("VERL_PLATFORM") and not accelerator_present():
        os.environ["VERL_PLATFORM"] = CPU_PLATFORM
    return cpu_platform_selected()
