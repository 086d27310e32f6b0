"""Train with verl 0.9.1's own V1 trainer: a thin Hydra entry over ``verl.trainer.main_ppo``.

    python -m visionleaf.train --config-name tiny_cpu                 # CPU, tiny model, ~20 steps
    python -m visionleaf.train --config-name tiny_cpu trainer.resume_mode=auto

What it adds to ``python -m verl.trainer.main_ppo``: visionleaf's configs (``configs/``, which extend
verl's ``ppo_trainer``; the entry puts both config folders on Hydra's search path); ``VERL_PLATFORM=cpu``
when no accelerator exists; the tiny model and the synthetic data built when the config points at them and
they are missing; relative paths made absolute so every Ray worker finds them; after training, when
``visionleaf.report.enabled``, a before/after table of the start model and the last checkpoint
(:func:`before_after`). The training itself is verl's ``main`` unchanged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import hydra
from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.plugins import Plugins
from hydra.plugins.search_path_plugin import SearchPathPlugin
from omegaconf import DictConfig, open_dict

from visionleaf.verl.device import select_cpu_platform_if_no_accelerator

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
"""visionleaf's Hydra configs (package data; ``configs/`` at the repository root links here)."""

SEARCH_PATH = (f"file://{CONFIG_DIR}", "pkg://verl.trainer.config")
"""Added to Hydra's search path of every run: visionleaf's configs (so a config under ``--config-path`` can
inherit them), then verl's (``ppo_trainer`` and its groups). The entry adds it through a search-path plugin,
not in the YAML: Hydra reads ``hydra.searchpath`` from the primary config only and refuses it in an
inherited one, so ``deepeyes_chain`` (which inherits ``visionleaf_qwen25vl_7b``) could not compose."""

TINY_READING_STEPS = 600
"""Reading phase of the tiny model's warm-up: every transcript zooms into the square's quadrant and reads it."""
TINY_WARMUP_STEPS = 1500
"""Format warm-up of the tiny model after its reading phase, so it writes protocol-shaped turns from the first
step, zooms into the right quadrant about half of the time and sometimes answers without zooming."""

DATA_SIZES = {"train": 64, "test": 16}
"""Synthetic items per split when the data must be built."""

SYNTHETIC_TASKS = ("search", "stripes")
"""``visionleaf.synthetic_task``: :func:`visionleaf.data.synthetic.generate` (visual search, the default) or
:func:`visionleaf.data.synthetic.generate_stripes` (the information-gap task of ``tiny_cpu``)."""


def _absolute(path: str) -> str:
    return str(Path(path).expanduser().resolve())


def prepare(config: DictConfig) -> None:
    """Build what the config asks for (``visionleaf.build_tiny_model``, ``visionleaf.build_synthetic_data``)
    when missing, and make local paths absolute so every Ray worker finds them. Hub ids stay as they are."""
    options = config.get("visionleaf") or {}
    with open_dict(config):
        model = config.actor_rollout_ref.model
        if options.get("build_tiny_model") or Path(model.path).expanduser().exists():
            model.path = _absolute(model.path)
        config.data.train_files = _absolute(config.data.train_files)
        config.data.val_files = _absolute(config.data.val_files)
        config.trainer.default_local_dir = _absolute(config.trainer.default_local_dir)
    model_dir = Path(model.path)
    if options.get("build_tiny_model") and not (model_dir / "config.json").exists():
        from visionleaf.models import tiny

        steps = TINY_READING_STEPS + TINY_WARMUP_STEPS
        print(f"building the tiny Qwen2.5-VL in {model_dir} ({steps} warm-up steps, ~3 min)")
        tiny.build(model_dir, vocab="bpe", seed=0, warmup_steps=TINY_WARMUP_STEPS, reading_steps=TINY_READING_STEPS)
    for split, files in (("train", config.data.train_files), ("test", config.data.val_files)):
        path = Path(files)
        if path.exists():
            continue
        if not options.get("build_synthetic_data"):
            raise FileNotFoundError(f"{path} does not exist; point data.{split}_files at an existing parquet file")
        if path.name != f"{split}.parquet":
            raise ValueError(f"synthetic data is written as <dir>/{split}.parquet; got data.{split}_files={path}")
        from visionleaf.data import synthetic

        task = options.get("synthetic_task", "search")
        if task not in SYNTHETIC_TASKS:
            raise ValueError(f"visionleaf.synthetic_task must be one of {SYNTHETIC_TASKS}, got {task!r}")
        size, seed = DATA_SIZES[split], 0 if split == "train" else 1
        print(f"writing {size} synthetic {task} items to {path}")
        if task == "stripes":
            synthetic.generate_stripes(path.parent, size, seed=seed, split=split)
        else:
            synthetic.generate(path.parent, size, seed=seed, split=split)


@dataclass(frozen=True)
class Measured:
    """One model on the held-out split (``visionleaf.eval``, sampled at the validation temperature)."""

    accuracy: float
    """Mean correctness of the leaves, in [0, 1]."""
    calls_ok: float
    """Successful tool calls per leaf."""
    noise_accuracy: float
    """Accuracy with every crop the tool returns replaced by noise (crop reliance: lower = reads crops)."""
    gt_accuracy: float
    """Accuracy with every crop replaced by the ground-truth box's crop (reading, localisation aside)."""
    no_call_accuracy: float | None
    """Accuracy of the leaves that made no successful call (None when every leaf zoomed)."""


def measure(model_dir: Path, processor_dir: Path, config: DictConfig, out: Path, samples: int) -> Measured:
    """Evaluate ``model_dir`` on ``data.val_files`` with the run's rollout limits: crops as cut, as the GT
    box's crop and as noise."""
    from transformers import AutoProcessor

    from visionleaf.engines.hf import HFEngine
    from visionleaf.engines.open import load_model
    from visionleaf.eval.runner import EvalConfig, evaluate

    model, _ = load_model(str(model_dir))
    processor = AutoProcessor.from_pretrained(processor_dir)
    tree = config.visionleaf.tree
    eval_config = EvalConfig(
        benchmark="synthetic",
        data=str(config.data.val_files),
        out=str(out),
        samples=samples,
        temperature=float(config.actor_rollout_ref.rollout.val_kwargs.temperature),
        max_turns=int(tree.max_turns),
        max_new_tokens=int(tree.sampling.max_new_tokens),
        max_response_tokens=int(config.data.max_response_length),
        max_context_tokens=int(config.actor_rollout_ref.rollout.max_model_len),
        crop_swap=("gt", "noise"),
        progress=False,
    )
    variants = evaluate(eval_config, HFEngine(model, processor), processor).summary["variants"]
    no_call = variants["pred"]["accuracy_by_ok_calls"].get("0")
    return Measured(
        accuracy=variants["pred"]["accuracy"]["Overall"] / 100,
        calls_ok=variants["pred"]["tool_calls_ok"],
        noise_accuracy=variants["noise"]["accuracy"]["Overall"] / 100,
        gt_accuracy=variants["gt"]["accuracy"]["Overall"] / 100,
        no_call_accuracy=None if no_call is None else no_call / 100,
    )


def before_after(config: DictConfig, samples: int = 4) -> dict[str, Measured]:
    """The model the run started from and its last checkpoint, measured by :func:`measure` (results in
    ``<default_local_dir>/../report``; a rerun with the same checkpoint step reuses them, so delete that folder
    after rebuilding the start model)."""
    start = Path(config.actor_rollout_ref.model.path)
    checkpoints = Path(config.trainer.default_local_dir)
    from visionleaf.verl.checkpoint import model_dir

    final = model_dir(checkpoints)
    out = checkpoints.parent / "report"
    step = final.parents[1].name
    return {
        "before": measure(start, start, config, out / "before", samples),
        "after": measure(final, start, config, out / f"after_{step}", samples),
    }


def before_after_table(results: dict[str, Measured]) -> str:
    """A small text table of :func:`before_after`'s results."""
    rows = [
        ("accuracy", "accuracy"),
        ("successful tool calls per leaf", "calls_ok"),
        ("accuracy, crops swapped for noise", "noise_accuracy"),
        ("accuracy, crops swapped for GT crops", "gt_accuracy"),
        ("accuracy of leaves without a call", "no_call_accuracy"),
    ]
    lines = [f"{'held-out split':<36}" + "".join(f"{name:>9}" for name in results)]
    for label, field in rows:
        values = [getattr(m, field) for m in results.values()]
        lines.append(f"{label:<36}" + "".join(f"{v:>9.3f}" if v is not None else f"{'-':>9}" for v in values))
    return "\n".join(lines)


def use_cpu_platform() -> None:
    """Make this process's verl platform the cpu one.

    ``import torch`` already imported verl (through an entry point) and verl may have resolved its
    platform before ``VERL_PLATFORM`` was set; Ray workers, started later, read the variable themselves.
    """
    from verl.plugin.platform import get_platform, set_platform

    from visionleaf.verl.cpu import CPUPlatform

    if not isinstance(get_platform(), CPUPlatform):
        set_platform(CPUPlatform())


class SearchPath(SearchPathPlugin):
    """Appends :data:`SEARCH_PATH` to Hydra's config search path (registered by :func:`main`)."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        for path in SEARCH_PATH:
            search_path.append(provider="visionleaf", path=path)


def register_search_path() -> None:
    """Register :class:`SearchPath` with Hydra in this process only (idempotent); call before composing."""
    Plugins.instance().register(SearchPath)


def main() -> None:
    """``python -m visionleaf.train``: :func:`train` with :data:`SEARCH_PATH` on Hydra's search path."""
    register_search_path()
    train()


@hydra.main(config_path=str(CONFIG_DIR), config_name="tiny_cpu", version_base=None)
def train(config: DictConfig) -> None:
    """Prepare, then run verl's own PPO ``main`` (V1 trainer) on the composed config."""
    if select_cpu_platform_if_no_accelerator():
        use_cpu_platform()
        with open_dict(config):
            config.trainer.device = "cpu"
    prepare(config)
    # verl's tensorboard logger writes to $TENSORBOARD_DIR (else ./tensorboard_log): keep it with the run
    os.environ.setdefault("TENSORBOARD_DIR", str(Path(config.trainer.default_local_dir).parent / "tensorboard"))

    from verl.trainer import main_ppo

    main_ppo.main.__wrapped__(config)
    report = (config.get("visionleaf") or {}).get("report")
    if report and report.get("enabled"):
        print(before_after_table(before_after(config, samples=int(report.get("samples", 4)))))


if __name__ == "__main__":
    main()
