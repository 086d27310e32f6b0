"""verl 0.9.1's own V1 trainer, 2 GRPO steps on CPU with the tiny Qwen2.5-VL and the hf rollout."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from visionleaf.models import tiny

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def _step_metrics(log: str) -> list[dict[str, str]]:
    """``step:N - key:value - ...`` console lines of verl's tracking logger, as dicts."""
    steps = []
    for line in re.findall(r"step:\d+ - .*", log):
        steps.append(dict(item.split(":", 1) for item in line.split(" - ") if ":" in item))
    return steps


def _train(out: Path, model: Path, steps: int, *overrides: str) -> str:
    """Run ``python -m visionleaf.train --config-name tiny_cpu`` for ``steps`` steps; return its log."""
    command = [
        sys.executable,
        "-m",
        "visionleaf.train",
        "--config-name",
        "tiny_cpu",
        f"trainer.total_training_steps={steps}",
        "trainer.save_freq=2",
        f"actor_rollout_ref.model.path={model}",
        f"data.train_files={out}/data/train.parquet",
        f"data.val_files={out}/data/test.parquet",
        f"trainer.default_local_dir={out}/checkpoints",
        "trainer.logger=[console]",
        *overrides,
    ]
    env = {**os.environ, "RAY_DEDUP_LOGS": "0", "TENSORBOARD_DIR": str(out / "tensorboard")}
    try:
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    finally:
        subprocess.run([Path(sys.executable).with_name("ray"), "stop", "--force"], capture_output=True, check=False)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    return log


def test_tree_grpo_on_cpu_then_resume(tmp_path):
    out = tmp_path / "run"
    # model and data come from the entry's build-if-missing path; the model is shared across runs
    model = REPO / "outputs" / "tiny_cpu" / "model"
    log = _train(out, model, 2)

    steps = _step_metrics(log)
    assert [s["step"] for s in steps] == ["1", "2"]
    for metrics in steps:
        assert float(metrics["rollout/agent_loop_errors"]) == 0  # verl would only log and drop these
        assert "critic/score/mean" in metrics and "response_length/mean" in metrics
        # visionleaf's metrics: reward components, tool use, tree shape
        for key in ("reward/acc/mean", "reward/format/mean", "reward/tool/mean", "tool/calls_failed_per_leaf"):
            assert key in metrics, key
        assert float(metrics["tree/splits_per_group"]) > 0  # the 4 leaves of each prompt came from one tree
        assert float(metrics["tree/engine_computed_over_unique_tokens"]) < 1.5  # the prefix cache was used
    assert "Error in _run_prompt" not in log
    assert sum(float(m["reward/num_tool_calls/mean"]) for m in steps) > 0, "the crop tool was never called"

    checkpoint = out / "checkpoints" / "global_step_2" / "actor" / "huggingface"
    assert (out / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    # the in-memory names (transformers renames some on save, so not the safetensors file's)
    initial = tiny.load(model)[0].state_dict()
    trained = torch.load(
        out / "checkpoints" / "global_step_2" / "actor" / "model_world_size_1_rank_0.pt", weights_only=False
    )
    changed = [
        name
        for name, tensor in trained.items()
        if name in initial
        and not torch.equal(tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor, initial[name])
    ]
    assert checkpoint.exists()
    assert changed, "no parameter changed after 2 GRPO steps"

    # resume_mode=auto continues from the latest checkpoint (step 3), with the tree-aware advantages
    log = _train(out, model, 3, "trainer.resume_mode=auto", "algorithm.adv_estimator=visionleaf_tree_grpo")
    assert [s["step"] for s in _step_metrics(log)] == ["3"]
    assert "global_step_2" in log
