"""The tree-packed forward inside verl's FSDP engine: on the same batch, verl's own ``forward_backward_batch``
with and without ``visionleaf_tree_forward`` gives the same log-probs, entropies, loss, loss metrics and
gradients; trees that cannot be packed run per leaf and are counted; settings it cannot honour are refused.

The engine is :class:`VepoEngine` (verl's ``FSDPEngineWithLMHead`` with the tree mixin, as registered) over
the tiny random Qwen2.5-VL in float64, in-process: no Ray, no FSDP wrapping, a one-process gloo group for
verl's token count. The batch holds two trees grown by the real :class:`TreeSampler` (crops inside branches
at two levels), in the layout verl's TransferQueue agent loop writes, with the leaves of the two trees
interleaved.
"""

import asyncio
import functools
import types

import pytest
import torch
from omegaconf import OmegaConf
from verl.utils import tensordict_utils as tu
from verl.utils.metric.utils import Metric
from verl.workers.config import ActorConfig, PolicyLossConfig
from verl.workers.utils.losses import ppo_loss
from verl.workers.utils.padding import response_from_nested

from tests.algo.test_tree_forward import zoom_then_answer
from tests.conftest import noise_image
from tests.rollout.scripted import ScriptedEngine
from visionleaf.algo.tree_forward import leaf_sequence
from visionleaf.models import tiny
from visionleaf.protocol import build_messages
from visionleaf.rollout.tree import TreeConfig, TreeSampler
from visionleaf.tools import get_tool
from visionleaf.verl import algos, tree_forward
from visionleaf.verl.vepo import VepoEngine

TEMPERATURE = 0.7


@pytest.fixture(scope="module")
def model(bpe_processor):
    """The tiny model with verl's Qwen2.5-VL monkey patch, as verl's FSDP engine builds it (its forward
    ignores HF's ``logits_to_keep``); the patched class forwards are restored afterwards."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen25
    from transformers.models.qwen2_vl import modeling_qwen2_vl as qwen2
    from verl.models.transformers.monkey_patch import apply_monkey_patch

    classes = (qwen25.Qwen2_5_VLForConditionalGeneration, qwen25.Qwen2_5_VLModel)
    classes += (qwen2.Qwen2VLForConditionalGeneration, qwen2.Qwen2VLModel)
    original = [cls.forward for cls in classes]
    model = tiny.build_model(bpe_processor.tokenizer, seed=1).double()
    apply_monkey_patch(model, use_remove_padding=False)
    assert type(model).forward is not original[0]
    yield model
    for cls, forward in zip(classes, original, strict=True):
        cls.forward = forward


@pytest.fixture(scope="module", autouse=True)
def on_cpu():
    """The device verl's engine moves micro-batches to (the cpu platform's, without selecting it process-wide)."""
    from verl.workers.engine.fsdp import transformer_impl

    with pytest.MonkeyPatch.context() as patch:
        for module in (transformer_impl, tree_forward):
            patch.setattr(module, "get_device_id", lambda: "cpu")
            patch.setattr(module, "get_device_name", lambda: "cpu")
        yield


@pytest.fixture(scope="module", autouse=True)
def process_group(tmp_path_factory):
    """verl's engine all-reduces the batch's token count over the data-parallel group: one gloo process."""
    if torch.distributed.is_initialized():
        yield
        return
    store = tmp_path_factory.mktemp("pg") / "store"
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def grow(processor, image_seed):
    engine = ScriptedEngine(processor.tokenizer, zoom_then_answer)
    sampler = TreeSampler(engine, processor, TreeConfig(max_turns=3, budget=4, branch_factor=2, root_width=2))
    messages = build_messages("What is written on the sign?\n(A) stop\n(B) go", [get_tool("image_zoom_in_tool")])
    return asyncio.run(sampler.sample(messages, noise_image(640, 480, seed=image_seed), route=f"uid-{image_seed}"))


@pytest.fixture(scope="module")
def samples(model, bpe_processor):
    """Per-sample fields as verl's TransferQueue agent loop stores them, two trees with leaves interleaved."""
    trees = []
    for uid, image_seed in (("a", 3), ("b", 5)):
        leaves, record = grow(bpe_processor, image_seed)
        spans = {node.id: node.span for node in record.nodes}
        rows = []
        for k, leaf in enumerate(leaves):
            seq = leaf_sequence(model, bpe_processor, leaf)
            response_len = len(leaf.response_ids)
            generator = torch.Generator().manual_seed(len(trees) * 10 + k)
            rows.append(
                {
                    "prompts": torch.tensor(leaf.prompt_ids),
                    "responses": torch.tensor(leaf.response_ids),
                    "input_ids": seq.input_ids,
                    "position_ids": seq.position_ids,
                    "response_mask": torch.tensor(leaf.response_mask),
                    "loss_mask": torch.tensor(leaf.response_mask),
                    "old_log_probs": -torch.rand(response_len, generator=generator, dtype=torch.float64),
                    "advantages": torch.randn(1, generator=generator, dtype=torch.float64).expand(response_len),
                    "multi_modal_inputs": {"pixel_values": seq.pixel_values, "image_grid_thw": seq.image_grid_thw},
                    "uid": uid,
                    # what visionleaf.verl.agent_loop writes next to node_path
                    "extra_fields": {
                        "node_path": leaf.node_path,
                        "node_spans": [list(spans[n]) for n in leaf.node_path],
                    },
                }
            )
        trees.append(rows)
    return [row for pair in zip(*trees, strict=True) for row in pair]  # a0 b0 a1 b1 ...


def batch(samples, flag=None, **settings):
    data = tu.list_of_dict_to_tensordict(samples)
    for key, value in data.items():  # TransferQueue hands per-sample tensors back nested, equal lengths too
        if isinstance(value, torch.Tensor) and not value.is_nested:
            data[key] = torch.nested.as_nested_tensor(list(value), layout=torch.jagged)
    tu.maybe_fix_3d_position_ids(data)
    defaults = {
        "use_remove_padding": False,
        "use_dynamic_bsz": False,
        "micro_batch_size_per_gpu": 4,
        "temperature": TEMPERATURE,
        "calculate_entropy": True,
        "global_batch_size": len(samples),
    }
    tu.assign_non_tensor(data, **{**defaults, **settings})
    if flag is not None:
        tu.assign_non_tensor(data, **{tree_forward.TREE_KEY: flag})
    return data


def engine(model):
    """verl's registered FSDP engine class around a plain (unsharded) module, fp32 autocast off as verl does."""
    engine = object.__new__(VepoEngine)
    engine.module = model
    engine.engine_config = types.SimpleNamespace(entropy_checkpointing=False)
    engine._autocast_dtype = torch.float32
    engine.use_ulysses_sp = False
    engine.ulysses_sequence_parallel_size = 1
    engine.pad_to_length = None
    engine.get_data_parallel_group = lambda: None
    engine.get_data_parallel_size = lambda: 1
    return engine


def loss_function():
    algos.register()
    config = ActorConfig(
        strategy="fsdp2",
        ppo_mini_batch_size=8,
        ppo_micro_batch_size_per_gpu=4,
        rollout_n=1,
        entropy_coeff=0.01,
        policy_loss=PolicyLossConfig(loss_mode="visionleaf"),
    )
    return functools.partial(ppo_loss, config)


def responses(output, data, key):
    return [row.detach() for row in response_from_nested(output["model_output"][key], data["response_mask"]).unbind()]


def test_log_probs_and_entropy_equal_verls_forward(model, samples):
    reference_data, data = batch(samples), batch(samples, flag=True)
    with torch.no_grad():
        reference = engine(model).forward_backward_batch(reference_data, None, forward_only=True)
        out = engine(model).forward_backward_batch(data, None, forward_only=True)
    for key in ("log_probs", "entropy"):
        for got, expected in zip(responses(out, data, key), responses(reference, data, key), strict=True):
            # float64 model, but Qwen's RMSNorm computes in float32: ~1e-8 relative between two layouts
            torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-7)
    metrics = out["metrics"]
    assert metrics["tree_forward/trees_packed"] == [1, 1]  # interleaved leaves regrouped: one whole tree each
    assert all(n == 0 for reason in tree_forward.FALLBACK_REASONS for n in metrics[f"tree_forward/fallback/{reason}"])
    packed, per_leaf = sum(metrics["tree_forward/tokens_packed"]), sum(metrics["tree_forward/tokens_per_leaf"])
    assert per_leaf == sum(len(s["input_ids"]) for s in samples) and packed < 0.6 * per_leaf


def test_update_loss_metrics_and_gradients_equal_verls(model, samples):
    # verl on the batch with each tree's leaves consecutive: the micro-batches the hook forms from the interleaved one
    grouped = [samples[i] for i in tree_forward.tree_order([s["uid"] for s in samples])]
    assert [s["uid"] for s in grouped] != [s["uid"] for s in samples]
    runs = []
    for flag, rows in ((None, grouped), (True, samples)):
        model.zero_grad()
        output = engine(model).forward_backward_batch(batch(rows, flag=flag), loss_function())
        runs.append((output, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}))
    (reference, ref_grads), (out, grads) = runs
    assert out["loss"] == pytest.approx(reference["loss"], rel=1e-9)

    def numbers(values):  # per micro-batch
        return [float(v) for v in (values.values if isinstance(values, Metric) else values)]

    for key, values in reference["metrics"].items():
        assert numbers(out["metrics"][key]) == pytest.approx(numbers(values), rel=1e-7, abs=1e-12), key
    assert len(out["metrics"][tree_forward.TIME_METRIC]) == 1 and tree_forward.TIME_METRIC not in reference["metrics"]
    assert grads.keys() == ref_grads.keys() and any(name.startswith("model.visual") for name in grads)
    for name, grad in grads.items():
        scale = ref_grads[name].abs().max().item()  # RMSNorm computes in float32 even in a float64 model
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-6, atol=1e-6 * scale, msg=f"gradient of {name}")


def test_a_tree_it_cannot_pack_runs_per_leaf_and_is_counted(model, samples):
    broken = [
        dict(s, extra_fields={"node_path": s["extra_fields"]["node_path"]}) if s["uid"] == "b" else s for s in samples
    ]
    cut = dict(broken[0], input_ids=broken[0]["input_ids"][:-1])  # a response cut after the rollout
    cut.update(
        responses=cut["responses"][:-1],
        position_ids=cut["position_ids"][:, :-1],
        response_mask=cut["response_mask"][:-1],
        loss_mask=cut["loss_mask"][:-1],
        old_log_probs=cut["old_log_probs"][:-1],
        advantages=cut["advantages"][:-1],
    )
    broken[0] = cut
    data = batch(broken, flag=True)
    with torch.no_grad():
        reference = engine(model).forward_backward_batch(batch(broken), None, forward_only=True)
        out = engine(model).forward_backward_batch(data, None, forward_only=True)
    for got, expected in zip(responses(out, data, "log_probs"), responses(reference, data, "log_probs"), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-7)
    metrics = out["metrics"]
    assert metrics["tree_forward/fallback/no_tree_info"] == [0, 4]  # tree b: no node_spans
    assert metrics["tree_forward/fallback/unpackable"] == [4, 0]  # tree a: one leaf cut
    assert metrics["tree_forward/trees_packed"] == [0, 0]
    assert metrics["tree_forward/tokens_packed"] == metrics["tree_forward/tokens_per_leaf"]


def test_remove_padding_is_refused_with_what_to_set(model, samples):
    data = batch(samples, flag=True, use_remove_padding=True)
    with pytest.raises(ValueError, match=r"actor_rollout_ref\.model\.use_remove_padding=false"):
        engine(model).forward_backward_batch(data, None, forward_only=True)


def test_without_enable_the_engine_only_times_the_update(model, samples):
    data = batch(samples, flag=False)
    out = engine(model).forward_backward_batch(data, loss_function())
    assert "tree_forward/trees_packed" not in out["metrics"] and len(out["metrics"][tree_forward.TIME_METRIC]) == 1
    model.zero_grad()


class _Base:
    def __init__(self):
        self.seen = []

    def _compute_old_log_prob(self, batch, metrics):
        self.seen.append(dict(batch.extra_info))
        return batch

    _compute_ref_log_prob = _compute_old_log_prob

    def _update_actor(self, batch, metrics):
        self.seen.append(dict(batch.extra_info))
        metrics.update({"actor/tree_forward/tokens_packed": 30.0, "actor/tree_forward/tokens_per_leaf": 120.0})
        metrics["actor/pg_loss"] = 0.5
        return batch


class _Trainer(tree_forward.TreeForwardTrainerMixin, _Base):
    def __init__(self, enable):
        super().__init__()
        self.config = OmegaConf.create({"visionleaf": {"tree_forward": {"enable": enable}}})


@pytest.mark.parametrize("enable", [True, False])
def test_trainer_flags_the_three_calls_and_logs_the_ratio(enable):
    trainer, metrics = _Trainer(enable), {}
    meta = types.SimpleNamespace(extra_info={})
    for step in (trainer._compute_old_log_prob, trainer._compute_ref_log_prob, trainer._update_actor):
        step(meta, metrics)
    assert [seen[tree_forward.TREE_KEY] for seen in trainer.seen] == [enable] * 3 and meta.extra_info == {}
    assert metrics == {
        "actor/pg_loss": 0.5,
        "tree_forward/tokens_packed": 30.0,
        "tree_forward/tokens_per_leaf": 120.0,
        tree_forward.RATIO_METRIC: 0.25,
    }


def test_config_block():
    from tests.verl.test_configs import composed

    assert not tree_forward.tree_forward_config(OmegaConf.create({})).enable
    assert not tree_forward.tree_forward_config(composed("tiny_cpu")).enable
    assert tree_forward.tree_forward_config(composed("tiny_cpu", "visionleaf.tree_forward.enable=true")).enable
    assert not tree_forward.tree_forward_config(composed("visionleaf_qwen25vl_7b")).enable
    with pytest.raises(ValueError, match=r"unknown keys \['enabled'\]; valid keys: enable"):
        tree_forward.tree_forward_config(OmegaConf.create({"visionleaf": {"tree_forward": {"enabled": True}}}))


def test_tree_order_keeps_trees_together_in_first_appearance_order():
    assert tree_forward.tree_order(["a", "b", "a", "c", "b"]) == [0, 2, 1, 4, 3]


@pytest.mark.slow
def test_tree_forward_on_verls_cpu_trainer(tmp_path):
    from tests.verl.test_cpu_e2e import REPO, _step_metrics, _train

    out, model = tmp_path / "run", REPO / "outputs" / "tiny_cpu" / "model"
    overrides = ("visionleaf.tree_forward.enable=true", "trainer.val_before_train=false", "trainer.test_freq=-1")
    steps = _step_metrics(_train(out, model, 2, *overrides))
    assert [s["step"] for s in steps] == ["1", "2"]
    for metrics in steps:
        assert float(metrics["rollout/agent_loop_errors"]) == 0
        assert all(float(metrics[f"tree_forward/fallback/{reason}"]) == 0 for reason in tree_forward.FALLBACK_REASONS)
        assert float(metrics["tree_forward/trees_packed"]) == 1  # micro-batch of 4 = one tree of n = 4 leaves
        assert 0 < float(metrics[tree_forward.RATIO_METRIC]) < 1
        assert float(metrics[tree_forward.TIME_METRIC]) > 0
