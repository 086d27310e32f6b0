"""verl 0.9.1 on a machine with no accelerator: a ``cpu`` platform and the narrow patches it needs.

The platform is registered with verl's ``PlatformRegistry`` by :mod:`visionleaf.verl.plugin` and chosen
with ``VERL_PLATFORM=cpu`` (:mod:`visionleaf.verl.device` sets it only where no CUDA device exists).
Ray is started with logical GPUs (``ray_kwargs.ray_init.num_gpus``), so verl's
``num_gpus`` resource requests and placement groups work unchanged; every "GPU" is one CPU process.

``current_device()`` returns ``"cpu"`` rather than an index: verl calls ``get_device_id()`` and uses
the result as a torch device (``tensor.to(get_device_id())``), which an integer would turn into
``cuda:0``.

:func:`apply_patches` fixes verl 0.9.1's remaining CPU gaps, each one narrowly and only while the cpu
platform is selected (see each patch's docstring for why), and applies the thread policy
(:func:`apply_thread_policy`) in every process of the run.
"""

from __future__ import annotations

import functools
import logging
import os
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psutil
import torch
from verl.plugin.platform import PlatformBase

from visionleaf.verl.device import CPU_PLATFORM

logger = logging.getLogger(__name__)

PLATFORM_NAME = CPU_PLATFORM

THREADS_ENV = "VISIONLEAF_CPU_THREADS"
"""Environment variable: torch threads per process of a cpu-platform run (``0``: leave torch's default)."""

PROCESSES_SHARING_CORES = 1
"""Processes of a cpu run that compute at the same time. verl's sync trainer alternates rollout and update
(the actor update, 75-85% of a tiny_cpu step, runs alone), so each process may use every core; the cap
removes only oversubscription beyond the cores (an inherited ``OMP_NUM_THREADS`` larger than the machine)."""


def _noop(*_: Any, **__: Any) -> None:
    return None


def _zero(*_: Any, **__: Any) -> int:
    return 0


def _mem_get_info(*_: Any) -> tuple[int, int]:
    """(free, total) host memory in bytes: what ``torch.cuda.mem_get_info`` reports for a GPU."""
    memory = psutil.virtual_memory()
    return memory.available, memory.total


class CPUDeviceModule(types.ModuleType):
    """``torch.cpu`` plus the ``torch.cuda`` functions verl calls on ``get_torch_device()``.

    Memory-management calls are no-ops (the host allocator has no cache to empty); allocation
    counters report 0 because torch does not track host allocations; RNG state is torch's global one.
    """

    empty_cache = staticmethod(_noop)
    ipc_collect = staticmethod(_noop)
    set_per_process_memory_fraction = staticmethod(_noop)
    reset_peak_memory_stats = staticmethod(_noop)
    manual_seed = staticmethod(torch.manual_seed)
    manual_seed_all = staticmethod(torch.manual_seed)
    get_rng_state = staticmethod(lambda *_: torch.get_rng_state())
    set_rng_state = staticmethod(lambda state, *_: torch.set_rng_state(state))
    memory_allocated = staticmethod(_zero)
    max_memory_allocated = staticmethod(_zero)
    memory_reserved = staticmethod(_zero)
    max_memory_reserved = staticmethod(_zero)
    mem_get_info = staticmethod(_mem_get_info)
    get_device_name = staticmethod(lambda *_: "cpu")
    is_available = staticmethod(lambda: True)
    device_count = staticmethod(lambda: 1)
    current_device = staticmethod(lambda: "cpu")
    set_device = staticmethod(_noop)

    def __init__(self) -> None:
        super().__init__("visionleaf.verl.cpu.device_module")

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cpu, name)


class CPUPlatform(PlatformBase):
    """verl platform for host CPUs: device ``cpu``, gloo collectives, Ray ``GPU`` slots as processes."""

    _device_module = CPUDeviceModule()

    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self) -> types.ModuleType:
        return self._device_module

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check: bool = False) -> bool:
        # Never auto-detected: the cpu platform is chosen explicitly with VERL_PLATFORM=cpu.
        return False

    def current_device(self) -> str:  # type: ignore[override]
        return "cpu"

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        return None

    def synchronize(self, device_index: int | None = None) -> None:
        return None

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        return None

    def empty_cache(self) -> None:
        return None

    def get_device_capability(self, device_index: int = 0) -> tuple[int | None, int | None]:
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        # Ray assigns its logical GPUs through this variable; verl reads it to derive local ranks.
        return "CUDA_VISIBLE_DEVICES"

    @contextmanager
    def nvtx_range(self, msg: str) -> Iterator[None]:
        yield

    def profiler_start(self) -> None:
        return None

    def profiler_stop(self) -> None:
        return None

    def ray_resource_name(self) -> str:
        return "GPU"

    def ray_noset_envvars(self) -> list[str]:
        return []

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self) -> Any:
        return None


def single_process_group_backend(original: Callable[..., None]) -> Callable[..., None]:
    """Wrap ``initialize_global_process_group_ray`` to default to ``cpu:gloo``.

    verl builds ``f"cpu:gloo,{device}:{backend}"``, which on the cpu platform is ``cpu:gloo,cpu:gloo``;
    torch rejects the duplicate device.
    """

    @functools.wraps(original)
    def wrapper(timeout_second: int | None = None, backend: str | None = None) -> None:
        return original(timeout_second=timeout_second, backend=backend or "cpu:gloo")

    return wrapper


def unpinned_offload_policy(policy_cls: type) -> type:
    """Subclass of FSDP2's ``CPUOffloadPolicy`` whose ``pin_memory`` is always False.

    verl's FSDP engine builds ``CPUOffloadPolicy(pin_memory=True)`` for forward-only models (the
    reference policy); pinning needs an accelerator and raises on a CPU-only host.
    """

    class UnpinnedCPUOffloadPolicy(policy_cls):
        def __init__(self, pin_memory: bool = False, **kwargs: Any) -> None:
            super().__init__(pin_memory=False, **kwargs)

    return UnpinnedCPUOffloadPolicy


def cpu_engine_lookup(original: Callable[..., type]) -> Callable[..., type]:
    """Wrap ``EngineRegistry.get_engine_cls`` so the cpu device finds the FSDP engines.

    verl registers its FSDP engines for ``cuda`` and ``npu`` only; the engine code itself is device
    agnostic (it asks the platform), so the cpu device reuses the ``cuda`` registration, FSDP only.
    """

    def lookup(cls: Any, model_type: str, backend: str) -> type:
        registry = cls._engines.get(model_type, {}).get(backend, {})
        if backend in ("fsdp", "fsdp2") and "cuda" in registry:
            registry.setdefault(PLATFORM_NAME, registry["cuda"])
        return original(model_type, backend)

    return lookup


def threads_per_process(cores: int, current: int, setting: str | None = None) -> int | None:
    """Torch intra-op threads for one process of a cpu run on ``cores`` cores that has ``current`` threads
    now: ``setting`` (the value of :data:`THREADS_ENV`) when given, else ``current`` capped at an equal share
    of the cores among :data:`PROCESSES_SHARING_CORES` processes (at least 1). None (``setting`` ``"0"``)
    leaves torch's threads alone."""
    if setting is not None and setting.strip():
        try:
            threads = int(setting)
        except ValueError:
            threads = -1
        if threads < 0:
            raise ValueError(f"{THREADS_ENV}={setting!r}: expected a number of threads >= 1, or 0 for torch's default")
        return threads or None
    return max(1, min(current, cores // PROCESSES_SHARING_CORES))


def apply_thread_policy() -> int | None:
    """Cap this process's torch threads at its share of the cores (:func:`threads_per_process`); return the
    thread count, or None when :data:`THREADS_ENV` is ``0``.

    Ray gives an actor with ``num_cpus=1`` one thread, but an inherited ``OMP_NUM_THREADS``, an actor with
    more CPUs, or a process Ray did not start (the driver, a server subprocess) gets more; processes that
    compute at once then oversubscribe a small machine. ``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS`` are
    lowered to the same count for child processes.
    """
    threads = threads_per_process(len(os.sched_getaffinity(0)), torch.get_num_threads(), os.environ.get(THREADS_ENV))
    if threads is None:
        return None
    torch.set_num_threads(threads)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        inherited = os.environ.get(name, "")
        if not inherited.isdigit() or int(inherited) > threads:
            os.environ[name] = str(threads)
    return threads


def apply_patches() -> None:
    """Apply the cpu-platform patches to verl 0.9.1, each in the module that uses the patched name, and the
    thread policy."""
    apply_thread_policy()
    from verl.workers import engine_workers
    from verl.workers.engine.base import EngineRegistry
    from verl.workers.engine.fsdp import transformer_impl

    engine_workers.initialize_global_process_group_ray = single_process_group_backend(
        engine_workers.initialize_global_process_group_ray
    )
    transformer_impl.CPUOffloadPolicy = unpinned_offload_policy(transformer_impl.CPUOffloadPolicy)  # type: ignore[assignment, misc]
    EngineRegistry.get_engine_cls = classmethod(cpu_engine_lookup(EngineRegistry.get_engine_cls))  # type: ignore[method-assign, assignment]
