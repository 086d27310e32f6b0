"""Train with verl 0.9.1's own V1 trainer: a thin Hydra entry over ``verl.trainer.main_ppo``.

    python -m visionleaf.train --config-name tiny_cpu                 # CPU, tiny model, ~20 steps
    python -m visionleaf.train --config-name tiny_cpu trainer.resume_mode=auto

What it adds to ``python -m verl.trainer.main_ppo``: visionleaf's configs (``configs/``, which extend
verl's ``ppo_trainer``; the entry puts both config folders on Hydra's search path); ``VERL_PLATFORM=cpu``
when no accelerator exists; the tiny model and the synthetic data built when the config points at them and
they are missing; relative paths made absolute so every Ray worker finds them. The training itself is
verl's ``main`` unchanged.
"""

from __future__ import annotations

import os
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

TINY_WARMUP_STEPS = 400
"""Format warm-up of the tiny model, so it writes protocol-shaped turns from the first step."""

DATA_SIZES = {"train": 64, "test": 16}
"""Synthetic items per split when the data must be built."""


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

        print(f"building the tiny Qwen2.5-VL in {model_dir} ({TINY_WARMUP_STEPS} warm-up steps, ~1 min)")
        tiny.build(model_dir, vocab="bpe", seed=0, warmup_steps=TINY_WARMUP_STEPS)
    for split, files in (("train", config.data.train_files), ("test", config.data.val_files)):
        path = Path(files)
        if path.exists():
            continue
        if not options.get("build_synthetic_data"):
            raise FileNotFoundError(f"{path} does not exist; point data.{split}_files at an existing parquet file")
        if path.name != f"{split}.parquet":
            raise ValueError(f"synthetic data is written as <dir>/{split}.parquet; got data.{split}_files={path}")
        from visionleaf.data import synthetic

        print(f"writing {DATA_SIZES[split]} synthetic items to {path}")
        synthetic.generate(path.parent, DATA_SIZES[split], seed=0 if split == "train" else 1, split=split)


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


if __name__ == "__main__":
    main()
