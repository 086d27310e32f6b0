"""Every shipped Hydra config composes through ``python -m visionleaf.train``'s loader and selects visionleaf."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from visionleaf.reward import RewardConfig, compute_score
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
    # LFPC's two stages on the paper setup, and their 2-step CPU variants
    "lfpc_stage1": (servers.VISIONLEAF_SGLANG, "grpo", "tree"),
    "lfpc_stage2": (servers.VISIONLEAF_SGLANG, "grpo", "tree"),
    "lfpc_stage1_tiny_cpu": ("hf", "grpo", "tree"),
    "lfpc_stage2_tiny_cpu": ("hf", "grpo", "tree"),
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


def test_tiny_cpu_actor_computes_in_fp32():
    import torch
    from verl.utils.torch_dtypes import PrecisionType

    # verl's FSDP engine defaults to bf16 params and autocast when mixed_precision is unset (~5x slower on an
    # AVX2 CPU, 21-34 s vs 2.8 s per actor update of the main job); it reads exactly these three keys
    precision = composed("tiny_cpu").actor_rollout_ref.actor.fsdp_config.get("mixed_precision")
    assert precision is not None
    for key in ("param_dtype", "reduce_dtype", "buffer_dtype"):
        assert PrecisionType.to_dtype(precision[key]) == torch.float32


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


def reward_config(config: DictConfig) -> RewardConfig:
    """The RewardConfig verl's reward loop builds: ``compute_score(**reward_kwargs)``."""
    kwargs = config.reward.custom_reward_function.get("reward_kwargs") or {}
    return RewardConfig.from_kwargs(**OmegaConf.to_container(kwargs))


def flat(config: DictConfig) -> dict[str, object]:
    """Every leaf of ``config`` by dotted key (interpolations unresolved)."""
    out: dict[str, object] = {}

    def walk(node: object, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            out[prefix[:-1]] = node

    walk(OmegaConf.to_container(config, resolve=False), "")
    return out


def stage1_model_dir(stage1: DictConfig) -> str:
    """Where stage I's last step leaves its full weights (verl: <default_local_dir>/global_step_N/actor/huggingface)."""
    return f"{stage1.trainer.default_local_dir}/global_step_{stage1.trainer.total_training_steps}/actor/huggingface"


@pytest.mark.parametrize(
    ("stage1_name", "stage2_name"), [("lfpc_stage1", "lfpc_stage2"), ("lfpc_stage1_tiny_cpu", "lfpc_stage2_tiny_cpu")]
)
def test_lfpc_stage2_starts_from_stage1s_last_checkpoint(stage1_name, stage2_name):
    stage1, stage2 = composed(stage1_name), composed(stage2_name)
    # stage I writes the full weights (save_contents hf_model) at its last step (verl saves there when save_freq > 0)
    assert "hf_model" in stage1.actor_rollout_ref.actor.checkpoint.save_contents and stage1.trainer.save_freq > 0
    assert stage2.actor_rollout_ref.model.path == stage1_model_dir(stage1)
    # the two runs keep separate checkpoints: stage II never resumes from (or overwrites) stage I's
    assert stage1.trainer.default_local_dir != stage2.trainer.default_local_dir
    # a lower learning rate for the refinement (the paper: 1e-6 then 5e-7)
    assert stage2.actor_rollout_ref.actor.optim.lr < stage1.actor_rollout_ref.actor.optim.lr
    # a missing stage-I checkpoint must not be replaced by a freshly built tiny model
    assert not stage2.get("visionleaf", {}).get("build_tiny_model", False)


@pytest.mark.parametrize("name", ["lfpc_stage1", "lfpc_stage1_tiny_cpu"])
def test_lfpc_stage1_reward_is_accuracy_format_and_gated_tool(name):
    reward = reward_config(composed(name))
    # LFPC eq. 2 with Table 12's weights; the grounding reward is logged, not paid
    assert (reward.acc_weight, reward.format_weight, reward.tool_weight) == (0.8, 0.2, 1.2)
    assert reward.gate_tool_on_acc and reward.grounding_weight == 0


@pytest.mark.parametrize("name", ["lfpc_stage2", "lfpc_stage2_tiny_cpu"])
def test_lfpc_stage2_pays_the_grounding_reward(name):
    reward = reward_config(composed(name))
    assert (reward.acc_weight, reward.format_weight, reward.tool_weight) == (0.8, 0.2, 1.2)
    assert reward.grounding_weight == 1.0 and reward.coverage_threshold == 0.9
    # through verl's call: the same correct answer with an exact crop of g_1 earns r_iou + r_l1 = 2 more
    info = {
        "options": ["a", "b"],
        "gt_boxes": [[10, 10, 60, 60]],
        "original_size": [100, 100],
        "pred_boxes": [[10, 10, 60, 60]],
    }
    answer = "<think>x</think><answer>B</answer>"
    kwargs = OmegaConf.to_container(composed(name).reward.custom_reward_function.reward_kwargs)
    stage2 = compute_score("vstar", answer, "B", info, **kwargs)["score"]
    stage1 = compute_score("vstar", answer, "B", info, grounding_weight=0.0)["score"]
    assert stage2 - stage1 == pytest.approx(2.0)


def test_lfpc_stage1_follows_the_paper():
    config = composed("lfpc_stage1")
    actor, rollout = config.actor_rollout_ref.actor, config.actor_rollout_ref.rollout
    # Table 12: batch 256, 16 rollouts, mini-batch 32, lr 1e-6, no KL, no entropy bonus, 5 turns; 80 steps
    assert (config.data.train_batch_size, rollout.n, actor.ppo_mini_batch_size) == (256, 16, 32)
    assert actor.optim.lr == 1e-6 and not actor.use_kl_loss and actor.entropy_coeff == 0
    assert config.visionleaf.tree.max_turns == 5 and config.trainer.total_training_steps == 80
    # verl stops at the first of total_epochs and total_training_steps: even at one batch per epoch the
    # epochs must not cut the 80 steps short
    assert config.trainer.total_epochs >= config.trainer.total_training_steps
    stage2 = composed("lfpc_stage2")
    assert stage2.actor_rollout_ref.actor.optim.lr == 5e-7
    # stage II is bounded by passes over its small annotated set, not stage I's 80 steps
    assert stage2.trainer.total_training_steps is None and stage2.trainer.total_epochs > 0


STAGE1_TINY_DELTAS = {
    "actor_rollout_ref.actor.checkpoint.save_contents",  # hf_model (tiny_cpu may set it too)
    "reward.custom_reward_function.reward_kwargs.grounding_weight",
    "trainer.total_training_steps",
    "trainer.experiment_name",
    "trainer.default_local_dir",
    "visionleaf.report.enabled",  # no before/after evaluation after a 2-step smoke run
}
STAGE2_TINY_DELTAS = STAGE1_TINY_DELTAS | {
    "reward.custom_reward_function.reward_kwargs.grounding_mode",
    "actor_rollout_ref.model.path",
    "actor_rollout_ref.actor.optim.lr",
    "visionleaf.build_tiny_model",
}


@pytest.mark.parametrize(
    ("name", "deltas"), [("lfpc_stage1_tiny_cpu", STAGE1_TINY_DELTAS), ("lfpc_stage2_tiny_cpu", STAGE2_TINY_DELTAS)]
)
def test_lfpc_tiny_variants_change_only_their_deltas_to_tiny_cpu(name, deltas):
    # everything else (model build, data, trainer and rollout settings) follows tiny_cpu as it changes
    base, variant = flat(composed("tiny_cpu")), flat(composed(name))
    changed = {key for key in base.keys() | variant.keys() if base.get(key, "<absent>") != variant.get(key, "<absent>")}
    assert changed <= deltas
    # its own run: 2 steps into its own checkpoint folder, never tiny_cpu's
    assert {"trainer.total_training_steps", "trainer.experiment_name", "trainer.default_local_dir"} <= changed
    assert variant["trainer.total_training_steps"] == 2
