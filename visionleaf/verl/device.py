"""Which verl platform to use, decided before ``import verl`` (verl's plugin reads it on import)."""

from __future__ import annotations

import os

import torch

CPU_PLATFORM = "cpu"
"""Name of visionleaf's cpu platform in verl's ``PlatformRegistry`` and value of ``VERL_PLATFORM``."""


def accelerator_present() -> bool:
    """True when torch sees a CUDA (or ROCm) device."""
    return torch.cuda.is_available()


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
