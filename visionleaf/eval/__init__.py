"""Offline evaluation on V*, HR-Bench 4K/8K, MME-RealWorld(-Lite) and the synthetic set (SPEC §8).

python -m visionleaf.eval --benchmark vstar --data DIR --model CKPT --out runs/vstar
python -m visionleaf.eval.compare runs/a runs/b --out compare.html
"""

from visionleaf.eval.loaders import BENCHMARKS, EvalItem, Loaded, LoadIssue, load_benchmark
from visionleaf.eval.protocol import Presented, accuracy_table, cycle_accuracy, present
from visionleaf.eval.runner import CropSwapImage, EvalConfig, EvalResult, evaluate, evaluate_async

__all__ = [
    "BENCHMARKS",
    "CropSwapImage",
    "EvalConfig",
    "EvalItem",
    "EvalResult",
    "LoadIssue",
    "Loaded",
    "Presented",
    "accuracy_table",
    "cycle_accuracy",
    "evaluate",
    "evaluate_async",
    "load_benchmark",
    "present",
]
