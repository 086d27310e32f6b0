"""The model folder of a verl checkpoint, to start another run from it (LFPC stage II starts from stage I).

verl 0.9.1's trainer saves step N to ``<trainer.default_local_dir>/global_step_N/actor/`` (FSDP shards per
rank, plus ``huggingface/`` with the model config and processor) and writes N to
``latest_checkpointed_iteration.txt`` once the save is complete. ``huggingface/`` also holds the full weights,
a folder ``actor_rollout_ref.model.path`` can point at, only when ``actor_rollout_ref.actor.checkpoint.
save_contents`` includes ``hf_model`` (the ``lfpc_*`` configs set it). For a checkpoint saved without it,
``--merge-to DIR`` runs verl's merger (``python -m verl.model_merger merge --backend fsdp``) into ``DIR``.

    python -m visionleaf.verl.checkpoint outputs/lfpc_stage1/checkpoints            # latest step's folder
    python -m visionleaf.verl.checkpoint outputs/lfpc_stage1/checkpoints --step 40 --merge-to outputs/stage1_hf
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

LATEST_FILE = "latest_checkpointed_iteration.txt"
"""verl's record of the last completely saved step, in ``trainer.default_local_dir``."""

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
"""Files that make a folder a loadable model (the config alone is not)."""


class CheckpointError(ValueError):
    """The folder is not a verl checkpoint, or the step has no usable weights; the message says what to do."""


def step_dir(checkpoint_dir: Path, step: int | None = None) -> Path:
    """``global_step_<step>`` of ``checkpoint_dir`` (a run's ``trainer.default_local_dir``): the latest complete
    step when ``step`` is None. A ``global_step_N`` folder itself is returned as it is."""
    if (checkpoint_dir / "actor").is_dir() and step is None:
        return checkpoint_dir
    if step is None:
        latest = checkpoint_dir / LATEST_FILE
        if not latest.is_file():
            raise CheckpointError(
                f"{latest} not found: {checkpoint_dir} holds no complete verl checkpoint; pass the run's "
                "trainer.default_local_dir (and save one: trainer.save_freq > 0)"
            )
        step = int(latest.read_text().strip())
    path = checkpoint_dir / f"global_step_{step}"
    if not (path / "actor").is_dir():
        steps = sorted(p.name for p in checkpoint_dir.glob("global_step_*"))
        raise CheckpointError(f"{path / 'actor'} not found; saved steps in {checkpoint_dir}: {steps or 'none'}")
    return path


def has_weights(folder: Path) -> bool:
    """Whether ``folder`` holds model weights."""
    return any(next(folder.glob(pattern), None) is not None for pattern in WEIGHT_PATTERNS)


def model_dir(checkpoint_dir: Path, step: int | None = None, merge_to: Path | None = None) -> Path:
    """A model folder with the weights of ``step`` (default: the latest): the checkpoint's ``actor/huggingface``
    when it has them, else ``merge_to`` after verl's merger has written them there."""
    actor = step_dir(checkpoint_dir, step) / "actor"
    huggingface = actor / "huggingface"
    if has_weights(huggingface):
        return huggingface
    if merge_to is None:
        raise CheckpointError(
            f"{huggingface} has no weights: the run saved without hf_model in "
            "actor_rollout_ref.actor.checkpoint.save_contents; pass --merge-to DIR to merge the FSDP shards "
            f"(python -m verl.model_merger merge --backend fsdp --local_dir {actor} --target_dir DIR)"
        )
    command = [sys.executable, "-m", "verl.model_merger", "merge", "--backend", "fsdp"]
    # the merger's log goes to stderr: stdout carries only the folder, for $(python -m ...)
    subprocess.run([*command, "--local_dir", str(actor), "--target_dir", str(merge_to)], check=True, stdout=sys.stderr)
    if not has_weights(merge_to):
        raise CheckpointError(f"verl's merger wrote no weights to {merge_to}")
    return merge_to


def main(argv: list[str] | None = None) -> None:
    """``python -m visionleaf.verl.checkpoint``: print the model folder (for ``actor_rollout_ref.model.path``)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint_dir", type=Path, help="the run's trainer.default_local_dir (or a global_step_N)")
    parser.add_argument("--step", type=int, default=None, help="step to use (default: the latest complete one)")
    parser.add_argument("--merge-to", type=Path, default=None, help="merge FSDP shards here when needed")
    args = parser.parse_args(argv)
    try:
        path = model_dir(args.checkpoint_dir, args.step, args.merge_to)
    except CheckpointError as exc:
        parser.exit(2, f"error: {exc}\n")
    print(path.resolve())


if __name__ == "__main__":
    main()
