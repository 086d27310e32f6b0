"""The cpu platform's thread policy (visionleaf/verl/cpu.py): each process of a cpu run gets its share of the cores."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from visionleaf.verl import cpu


@pytest.mark.parametrize(
    ("cores", "current", "expected"),
    [(1, 1, 1), (2, 2, 2), (2, 1, 1), (2, 8, 2), (3, 8, 3), (8, 8, 8), (64, 1, 1), (64, 8, 8)],
)
def test_threads_capped_at_an_equal_share_of_the_cores(cores: int, current: int, expected: int) -> None:
    assert cpu.threads_per_process(cores, current) == expected


def test_setting_overrides_the_share() -> None:
    assert cpu.threads_per_process(2, 2, "3") == 3
    assert cpu.threads_per_process(2, 8, " ") == 2  # blank: the share
    assert cpu.threads_per_process(64, 64, "0") is None  # torch's default


@pytest.mark.parametrize("setting", ["-1", "two", "1.5"])
def test_bad_setting_says_what_to_set(setting: str) -> None:
    with pytest.raises(ValueError, match=rf"^VISIONLEAF_CPU_THREADS={setting!r}: expected a number of threads >= 1"):
        cpu.threads_per_process(2, 2, setting)


def _run_policy(env: dict[str, str]) -> list[str]:
    """In a fresh interpreter: torch's threads before and after apply_thread_policy, and OMP_NUM_THREADS."""
    code = (
        "import os, torch; from visionleaf.verl import cpu; before = torch.get_num_threads(); "
        "result = cpu.apply_thread_policy(); "
        "print(before, result, torch.get_num_threads(), os.environ.get('OMP_NUM_THREADS'))"
    )
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", cpu.THREADS_ENV)}
    run = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True, check=True)
    return run.stdout.split()


def test_policy_in_a_fresh_process() -> None:
    cores = len(os.sched_getaffinity(0))
    share = max(1, cores // cpu.PROCESSES_SHARING_CORES)
    # an inherited OMP_NUM_THREADS above the cores is lowered to the share,
    # for this process's torch and for its children
    _, result, after, omp = _run_policy({"OMP_NUM_THREADS": str(2 * cores)})
    assert int(result) == int(after) == share and omp == str(share)
    # the explicit setting wins; 0 leaves torch's threads and the environment alone
    assert _run_policy({cpu.THREADS_ENV: "3"})[1:] == ["3", "3", "3"]
    before, result, after, omp = _run_policy({"OMP_NUM_THREADS": str(cores), cpu.THREADS_ENV: "0"})
    assert (result, after, omp) == ("None", before, str(cores))
