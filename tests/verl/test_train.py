from pathlib import Path

import pyarrow.parquet as pq
import pytest
from omegaconf import DictConfig, OmegaConf

from visionleaf.verl import train
from visionleaf.verl.checkpoint import CheckpointError


def _config(tmp_path: Path, task: str) -> DictConfig:
    config = OmegaConf.create(
        {
            "actor_rollout_ref": {"model": {"path": "org/hub-model"}},
            "data": {"train_files": str(tmp_path / "d/train.parquet"), "val_files": str(tmp_path / "d/test.parquet")},
            "trainer": {"default_local_dir": str(tmp_path / "ckpt")},
            "visionleaf": {"build_synthetic_data": True, "synthetic_task": task},
        }
    )
    assert isinstance(config, DictConfig)
    return config


def test_prepare_writes_the_configured_synthetic_task(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "DATA_SIZES", {"train": 2, "test": 1})
    config = _config(tmp_path, "stripes")
    train.prepare(config)
    rows = pq.read_table(tmp_path / "d/train.parquet").to_pylist()
    assert [r["extra_info"]["category"] for r in rows] == ["attribute/stripes"] * 2
    assert pq.read_table(tmp_path / "d/test.parquet").num_rows == 1
    assert config.actor_rollout_ref.model.path == "org/hub-model"  # a hub id stays as it is
    with pytest.raises(ValueError, match="synthetic_task"):
        train.prepare(_config(tmp_path / "other", "mazes"))


def test_before_after_needs_a_checkpoint_with_weights(tmp_path):
    config = _config(tmp_path, "stripes")
    with pytest.raises(CheckpointError, match="save_freq"):
        train.before_after(config)
    checkpoints = tmp_path / "ckpt"
    (checkpoints / "global_step_20" / "actor" / "huggingface").mkdir(parents=True)
    (checkpoints / "latest_checkpointed_iteration.txt").write_text("20")
    with pytest.raises(CheckpointError, match="hf_model"):
        train.before_after(config)


def test_before_after_table_rows():
    before = train.Measured(0.5, 0.8, 0.45, 0.9, None)
    after = train.Measured(0.75, 1.0, 0.5, 0.95, 0.25)
    lines = train.before_after_table({"before": before, "after": after}).splitlines()
    assert lines[0].split()[-2:] == ["before", "after"]
    assert lines[1].split()[-2:] == ["0.500", "0.750"]  # accuracy
    assert lines[2].split()[-2:] == ["0.800", "1.000"]  # successful tool calls per leaf
    assert lines[-1].split()[-2:] == ["-", "0.250"]  # no leaf without a call before training
