"""Every shipped Hydra config composes through ``python -m visionleaf.train``'s loader and selects visionleaf."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from visionleaf.verl import algos, plugin, servers
from visionleaf.verl.agent_loop import tree_config_from
from visionleaf.verl.train import CONFIG_DIR, register_search_path

REPO = Path(__file__).resolve().parents[2]

# config -> (rollout name, adv estimator, tree mode): what each shipped config must select
EXPECTED = {
    # CPU: visionleaf's hf replica
    "tiny_cpu": ("hf", "grpo", "tree"),
    # the paper setup: visionleaf's probe-aware sglang server, not verl's stock one
    "visionleaf_qwen25vl_7b": (servers.VISIONLEAF_SGLANG, "grpo", "tree"),
    # the DeepEyes baseline: the same setup with independent chains
    "deepeyes_chain": (servers.VISIONLEAF_SGLANG, "grpo", "chain"),
    # VEPO's token selection on the paper setup
    "vepo_qwen25vl_7b": (servers.VISIONLEAF_SGLANG, "grpo", "tree"),
}

SHIPPED = sorted(path.stem for path in CONFIG_DIR.glob("*.yaml"))


def composed(name: str, *overrides: str, config_dir: Path = CONFIG_DIR) -> DictConfig:
    """Compose ``name`` as ``python -m visionleaf.train --config-name <name>`` does: the same config folder
    (``@hydra.main(config_path=CONFIG_DIR)``) and the same search-path plugin (``main`` registers it)."""
    register_search_path()
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        return compose(config_name=name, overrides=list(overrides))


def test_every_shipped_config_is_checked():
    assert sorted(EXPECTED) == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_config_selects_visionleaf(name):
    from verl.experimental.agent_loop.agent_loop import _agent_loop_registry
    from verl.trainer.ppo.v1 import AgentLoopManagerTQ, PPOTrainerSync, get_trainer_cls
    from verl.utils.import_utils import load_class_from_fqn
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    config = composed(name)
    rollout = config.actor_rollout_ref.rollout
    expected_rollout, expected_estimator, expected_mode = EXPECTED[name]

    # the trainer mode resolves (through the plugin) to visionleaf's sync trainer
    assert config.trainer.v1.trainer_mode == plugin.TRAINER_MODE
    trainer_cls = get_trainer_cls(config.trainer.v1.trainer_mode)
    assert issubclass(trainer_cls, PPOTrainerSync) and trainer_cls.__module__.startswith("visionleaf.")
    # that trainer refuses any manager but its module's counting one: the config must name exactly it
    manager_cls = load_class_from_fqn(rollout.agent.agent_loop_manager_class, "AgentLoopManager")
    counting_cls = sys.modules[trainer_cls.__module__].CountingAgentLoopManager
    assert issubclass(manager_cls, counting_cls) and issubclass(manager_cls, AgentLoopManagerTQ)

    assert rollout.agent.default_agent_loop == plugin.TREE_AGENT_LOOP
    assert plugin.TREE_AGENT_LOOP in _agent_loop_registry
    assert config.actor_rollout_ref.actor.policy_loss.loss_mode == algos.POLICY_LOSS_NAME
    assert config.algorithm.adv_estimator == expected_estimator
    assert rollout.name == expected_rollout
    assert rollout.name in RolloutReplicaRegistry._registry
    # a GPU config must pick visionleaf's probe-aware server: verl's own sglang / vllm have no entropy probe
    assert rollout.name == plugin.HF_ROLLOUT or rollout.name in servers.BASE_ROLLOUT
    assert config.reward.custom_reward_function.path == "pkg://visionleaf.reward.score"

    # the visionleaf.tree section builds a valid TreeConfig for the training and the validation budgets
    for budget in (rollout.n, rollout.val_kwargs.n):
        tree = tree_config_from(config, budget)
        assert (tree.budget, tree.mode) == (budget, expected_mode)


def test_tiny_cpu_validates_before_training_and_at_the_last_step():
    config = composed("tiny_cpu")
    trainer = config.trainer
    # verl 0.9.1's V1 fit(): val before step 1 when val_before_train; after step s when test_freq > 0 and
    # (s is the last step or s % test_freq == 0)
    assert trainer.val_before_train
    for last in (2, trainer.total_training_steps):
        validated = [
            s for s in range(1, last + 1) if trainer.test_freq > 0 and (s == last or s % trainer.test_freq == 0)
        ]
        assert validated == [last]  # the 20-step main job and a 2-step smoke run: once, at the end
    val = config.actor_rollout_ref.rollout.val_kwargs
    # a sampled tree per validation prompt (greedy leaves of one tree would all be the same)
    assert val.n > 1 and val.temperature > 0


def test_config_under_another_config_path_inherits_visionleafs(tmp_path):
    # a user's config outside the package extends the paper setup by name
    (tmp_path / "mine.yaml").write_text("defaults:\n  - visionleaf_qwen25vl_7b\n  - _self_\ntrainer:\n  nnodes: 4\n")
    config = composed("mine", config_dir=tmp_path)
    assert config.trainer.nnodes == 4
    assert config.actor_rollout_ref.rollout.agent.default_agent_loop == plugin.TREE_AGENT_LOOP


def test_deepeyes_chain_composes_on_the_command_line():
    # the README's command; --cfg job prints the composed config instead of training
    result = subprocess.run(
        [sys.executable, "-m", "visionleaf.train", "--config-name", "deepeyes_chain", "--cfg", "job"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    job = yaml.safe_load(result.stdout)
    assert job["trainer"]["experiment_name"] == "deepeyes_chain"
    assert job["visionleaf"]["tree"]["mode"] == "chain"
    assert job["trainer"]["v1"]["trainer_mode"] == plugin.TRAINER_MODE
    assert job["actor_rollout_ref"]["rollout"]["name"] == EXPECTED["deepeyes_chain"][0]
