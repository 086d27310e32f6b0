"""scripts/launch_*.sh: the command each launcher runs, checked with stand-in ``ray``/``python`` executables
that record their arguments, and their dry runs, which print that command instead of running it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

OVERRIDES = ["data.train_files=/data/deep eyes/train.parquet", "trainer.experiment_name='it''s'"]
"""Overrides a user passes through (one with a space and quotes, to check the quoting)."""


@pytest.fixture
def fake_bin(tmp_path: Path) -> Path:
    """A PATH folder whose ``ray`` and ``python`` write their arguments (NUL-separated) to ``$RECORD``."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for name in ("ray", "python"):
        script = folder / name
        script.write_text(f'#!/usr/bin/env bash\nprintf \'%s\\0\' {name} "$@" > "$RECORD"\n')
        script.chmod(0o755)
    return folder


def launch(script: str, fake_bin: Path, record: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {
        **{k: v for k, v in os.environ.items() if k not in ("DRY_RUN", "RAY_ADDRESS", "NNODES", "GPUS_PER_NODE")},
        "PATH": f"{fake_bin}:{os.environ['PATH']}",
        "RECORD": str(record),
        **env,
    }
    return subprocess.run(
        ["bash", str(REPO / "scripts" / script), *args], env=environment, capture_output=True, text=True, timeout=60
    )


def recorded(record: Path) -> list[str]:
    return record.read_text().split("\0")[:-1]


def rerun_printed(line: str, fake_bin: Path, record: Path) -> list[str]:
    """Run a dry run's printed command line with the stand-ins; return what they recorded."""
    env = {**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}", "RECORD": str(record)}
    subprocess.run(["bash", "-c", line], env=env, check=True, timeout=60)
    return recorded(record)


def test_multinode_submits_the_job(fake_bin, tmp_path):
    record = tmp_path / "ray.args"
    result = launch(
        "launch_multinode.sh",
        fake_bin,
        record,
        "deepeyes_chain",
        *OVERRIDES,
        RAY_ADDRESS="http://head:8265",
        NNODES="4",
    )
    assert result.returncode == 0, result.stderr
    args = recorded(record)
    assert args[:6] == ["ray", "job", "submit", "--address", "http://head:8265", "--runtime-env-json"]
    runtime_env = json.loads(args[6])
    assert runtime_env["working_dir"] == str(REPO)
    assert {".venv", ".venv-vllm", "outputs", ".git"} <= set(runtime_env["excludes"])
    assert runtime_env["env_vars"] == {"HF_HUB_OFFLINE": "1"}
    assert args[7:] == [
        "--",
        "python",
        "-m",
        "visionleaf.train",
        "--config-name",
        "deepeyes_chain",
        "trainer.nnodes=4",
        "trainer.n_gpus_per_node=8",
        *OVERRIDES,
    ]


def test_multinode_dry_run_prints_the_same_command(fake_bin, tmp_path):
    record = tmp_path / "ray.args"
    launch("launch_multinode.sh", fake_bin, record, "deepeyes_chain", *OVERRIDES, RAY_ADDRESS="http://head:8265")
    submitted = recorded(record)
    record.unlink()

    result = launch(
        "launch_multinode.sh",
        fake_bin,
        record,
        "deepeyes_chain",
        *OVERRIDES,
        RAY_ADDRESS="http://head:8265",
        DRY_RUN="1",
    )
    assert result.returncode == 0, result.stderr
    assert not record.exists()  # nothing was submitted
    env_line, command_line = result.stdout.strip().split("\n")
    assert json.loads(env_line.removeprefix("runtime env: ")) == json.loads(submitted[6])
    assert rerun_printed(command_line, fake_bin, record) == submitted


def test_multinode_needs_the_ray_address(fake_bin, tmp_path):
    result = launch("launch_multinode.sh", fake_bin, tmp_path / "ray.args", DRY_RUN="1")
    assert result.returncode != 0
    assert "set RAY_ADDRESS" in result.stderr


def test_single_node_runs_the_entry(fake_bin, tmp_path):
    record = tmp_path / "python.args"
    result = launch("launch_single_node.sh", fake_bin, record, "visionleaf_qwen25vl_7b", *OVERRIDES)
    assert result.returncode == 0, result.stderr
    ran = recorded(record)
    assert ran == ["python", "-m", "visionleaf.train", "--config-name", "visionleaf_qwen25vl_7b", *OVERRIDES]

    record.unlink()
    result = launch("launch_single_node.sh", fake_bin, record, "visionleaf_qwen25vl_7b", *OVERRIDES, DRY_RUN="1")
    assert result.returncode == 0, result.stderr
    assert not record.exists()
    assert rerun_printed(result.stdout.strip(), fake_bin, record) == ran


def test_single_node_default_config(fake_bin, tmp_path):
    record = tmp_path / "python.args"
    assert launch("launch_single_node.sh", fake_bin, record).returncode == 0
    assert recorded(record) == ["python", "-m", "visionleaf.train", "--config-name", "visionleaf_qwen25vl_7b"]
