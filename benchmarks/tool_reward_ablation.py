"""DeepEyes' tool-reward ablation on a laptop: the tiny CPU job (``tiny_cpu``) under three reward regimes.

    gated    tool bonus only for a successful call whose answer is right (the default, SPEC §4)
    none     no tool bonus (reward.custom_reward_function.reward_kwargs.tool_weight=0)
    ungated  tool bonus for every successful call (reward_kwargs.gate_tool_on_acc=false)

One regime per command (each is a full training run, ~5 min on 2 cores), then ``--plot`` reads the saved
step metrics and draws successful tool calls per leaf and training accuracy per step for the regimes run::

    python benchmarks/tool_reward_ablation.py --regime gated
    python benchmarks/tool_reward_ablation.py --regime none
    python benchmarks/tool_reward_ablation.py --regime ungated
    python benchmarks/tool_reward_ablation.py --plot      # -> <out>/ablation.png and <out>/ablation.json

Every regime starts from the same model and data (``tiny_cpu``'s, built on first use) with the same seed;
``--out`` (default ``outputs/tool_reward_ablation``) holds ``<regime>/train.log`` and
``<regime>/metrics.json`` (verl's console step metrics, parsed). Extra arguments are passed to the trainer
as Hydra overrides (e.g. ``trainer.total_training_steps=10``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REGIMES: dict[str, tuple[str, ...]] = {
    "gated": (),
    "none": ("+reward.custom_reward_function.reward_kwargs.tool_weight=0.0",),
    "ungated": ("+reward.custom_reward_function.reward_kwargs.gate_tool_on_acc=false",),
}
"""Hydra overrides of each regime on top of ``tiny_cpu``."""
CALLS = "tool/calls_ok_per_leaf"
ACC = "reward/acc/mean"
VAL_ACC = "val-core/visionleaf/synthetic/acc/mean@4"
CURVES = {CALLS: "successful tool calls per leaf", ACC: "training accuracy (leaf mean)"}


def step_metrics(log: str) -> list[dict[str, float]]:
    """verl's console lines ``step:N - key:value - ...`` as dicts of the numeric values, in log order."""
    steps = []
    for line in re.findall(r"step:\d+ - .*", log):
        metrics: dict[str, float] = {}
        for item in line.split(" - "):
            key, _, value = item.partition(":")
            wrapped = re.fullmatch(r"np\.\w+\((.*)\)", value.strip())  # validation values: np.float64(0.5)
            try:
                metrics[key.strip()] = float(wrapped.group(1) if wrapped else value)
            except ValueError:
                continue
        steps.append(metrics)
    return steps


def run(regime: str, out: Path, overrides: Sequence[str], from_log: Path | None = None) -> Path:
    """Train ``regime`` (or take the log of a finished ``tiny_cpu`` run of it, ``from_log``); write the log
    and the parsed metrics under ``out/regime``; return the metrics file."""
    folder = out / regime
    folder.mkdir(parents=True, exist_ok=True)
    if from_log is not None:
        (folder / "train.log").write_text(from_log.read_text())
        return _save_metrics(regime, folder, overrides)
    command = [
        sys.executable,
        "-m",
        "visionleaf.train",
        "--config-name",
        "tiny_cpu",
        f"trainer.default_local_dir={folder / 'checkpoints'}",
        f"trainer.experiment_name=tool_reward_{regime}",
        "trainer.save_freq=-1",
        "trainer.logger=[console]",
        "visionleaf.report.enabled=false",
        *REGIMES[regime],
        *overrides,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TENSORBOARD_DIR": str(folder / "tensorboard")}
    with (folder / "train.log").open("w") as log:
        code = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    if code.returncode != 0:
        tail = (folder / "train.log").read_text()[-3000:]
        raise SystemExit(f"regime {regime} failed (rc {code.returncode}); see {folder / 'train.log'}:\n{tail}")
    return _save_metrics(regime, folder, overrides)


def _save_metrics(regime: str, folder: Path, overrides: Sequence[str]) -> Path:
    steps = step_metrics((folder / "train.log").read_text())
    train = [s for s in steps if CALLS in s]
    vals = [s[VAL_ACC] for s in steps if VAL_ACC in s]
    result = {
        "regime": regime,
        "overrides": [*REGIMES[regime], *overrides],
        "steps": [int(s["step"]) for s in train],
        **{key: [s[key] for s in train] for key in CURVES},
        "val_acc_before_after": vals,
    }
    path = folder / "metrics.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    return path


def plot(out: Path) -> Path:
    """Plot every regime with a ``metrics.json`` under ``out``; write ``ablation.png`` and ``ablation.json``."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise SystemExit("--plot needs matplotlib: pip install matplotlib") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = {
        r: json.loads((out / r / "metrics.json").read_text()) for r in REGIMES if (out / r / "metrics.json").exists()
    }
    if not results:
        raise SystemExit(f"no <regime>/metrics.json under {out}; run --regime first")
    fig, axes = plt.subplots(1, len(CURVES), figsize=(5 * len(CURVES), 3.6))
    for ax, (key, label) in zip(axes, CURVES.items(), strict=True):
        for regime, result in results.items():
            ax.plot(result["steps"], result[key], marker="o", markersize=3, label=regime)
        ax.set_xlabel("training step")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    png = out / "ablation.png"
    fig.savefig(png, dpi=120)
    summary = {}
    for regime, result in results.items():
        calls, acc = result[CALLS], result[ACC]
        half = max(1, len(calls) // 2)
        summary[regime] = {
            "calls_first_half": sum(calls[:half]) / half,
            "calls_second_half": sum(calls[half:]) / max(1, len(calls) - half),
            "acc_first_half": sum(acc[:half]) / half,
            "acc_second_half": sum(acc[half:]) / max(1, len(acc) - half),
            "val_acc_before_after": result["val_acc_before_after"],
        }
    (out / "ablation.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"{'regime':<9}{'calls 1st half':>16}{'calls 2nd half':>16}{'acc 1st half':>14}{'acc 2nd half':>14}  val acc")
    for regime, row in summary.items():
        vals = " -> ".join(f"{v:.3f}" for v in row["val_acc_before_after"])
        print(
            f"{regime:<9}{row['calls_first_half']:>16.3f}{row['calls_second_half']:>16.3f}"
            f"{row['acc_first_half']:>14.3f}{row['acc_second_half']:>14.3f}  {vals}"
        )
    print(f"plot: {png}")
    return png


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--regime", choices=tuple(REGIMES), help="train one regime")
    action.add_argument("--plot", action="store_true", help="plot the regimes already run")
    parser.add_argument(
        "--from-log", type=Path, help="with --regime: parse this finished run's log instead of training"
    )
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "tool_reward_ablation", help="results folder")
    args, overrides = parser.parse_known_args(argv)
    out = args.out.resolve()
    if args.plot:
        plot(out)
    else:
        print(f"metrics: {run(args.regime, out, overrides, args.from_log)}")


if __name__ == "__main__":
    main()
