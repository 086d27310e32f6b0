"""The model folder of a verl checkpoint (visionleaf/verl/checkpoint.py), on verl 0.9.1's folder layout."""

import subprocess
import sys

import pytest

from visionleaf.verl.checkpoint import LATEST_FILE, CheckpointError, model_dir, step_dir


def save(root, step, weights=True):
    """verl's layout of one saved step: actor shards, huggingface/ (config always, weights with hf_model)."""
    actor = root / f"global_step_{step}" / "actor"
    (actor / "huggingface").mkdir(parents=True)
    (actor / "model_world_size_1_rank_0.pt").write_bytes(b"")
    (actor / "huggingface" / "config.json").write_text("{}")
    if weights:
        (actor / "huggingface" / "model.safetensors").write_bytes(b"")
    (root / LATEST_FILE).write_text(str(step))
    return actor / "huggingface"


def test_latest_step_by_verls_tracker(tmp_path):
    save(tmp_path, 1)
    latest = save(tmp_path, 2)
    assert model_dir(tmp_path) == latest
    assert model_dir(tmp_path, step=1) == tmp_path / "global_step_1" / "actor" / "huggingface"
    # a step folder itself works too
    assert model_dir(tmp_path / "global_step_2") == latest


def test_a_step_without_weights_says_how_to_merge(tmp_path):
    save(tmp_path, 2, weights=False)
    with pytest.raises(CheckpointError, match=r"hf_model.*--merge-to.*verl.model_merger merge --backend fsdp"):
        model_dir(tmp_path)


def test_not_a_checkpoint_folder(tmp_path):
    with pytest.raises(CheckpointError, match=r"trainer\.default_local_dir"):
        step_dir(tmp_path)
    save(tmp_path, 2)
    with pytest.raises(CheckpointError, match=r"global_step_3/actor not found; saved steps .*global_step_2"):
        step_dir(tmp_path, 3)


def test_cli_prints_only_the_folder(tmp_path):
    latest = save(tmp_path, 2)
    command = [sys.executable, "-m", "visionleaf.verl.checkpoint", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(latest.resolve())
    failed = subprocess.run([*command, "--step", "7"], capture_output=True, text=True, timeout=60)
    assert failed.returncode == 2 and "global_step_7/actor not found" in failed.stderr and failed.stdout == ""
