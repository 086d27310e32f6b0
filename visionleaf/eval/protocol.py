"""Evaluation protocol: option order, prompt, global-view budget, answer scoring and aggregation.

- Options are shuffled per question with a fixed seed (``random.Random(f"{seed}:{qid}")``), so a run is
  reproducible and a model cannot score by always answering A. ``shuffle=False`` keeps the release's
  order: DeepEyes' V* protocol, where the correct option is always A (inflated, PR #66).
- HR-Bench rows already hold every question under each of its option cycles (``cycle_category``), so its
  default is no shuffle; accuracy is the mean over cycles of the per-cycle accuracy, overall and per
  category, as lmms-eval's ``hrbench_aggregate_results`` computes it.
- A question scores the mean correctness of its samples (Avg@k; k = 1 is plain accuracy). A sample
  without an ``<answer>`` (max turns, length, no action) is wrong.
"""

from __future__ import annotations

import random
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from visionleaf.data.schema import OPTION_LETTERS, multiple_choice_text
from visionleaf.eval.loaders import EvalItem
from visionleaf.reward.accuracy import MAX_ANSWER_CHARS, choice_index
from visionleaf.tools.crop import resize_to_budget

VISUAL_TOKEN_PIXELS = 28 * 28
"""Pixels per visual token of Qwen2.5-VL (14 px patches, 2x2 merge)."""

TABLE_COLUMNS: dict[str, tuple[str, ...]] = {
    "vstar": ("Attribute", "Spatial"),
    "hrbench4k": ("FSP", "FCP"),
    "hrbench8k": ("FSP", "FCP"),
    "synthetic": ("Attribute", "Position"),
}
"""Category columns in the order the papers print them (Overall follows); other benchmarks: sorted."""


def default_shuffle(benchmark: str) -> bool:
    """HR-Bench's rows already rotate the options (cycles); every other benchmark is shuffled."""
    return not benchmark.startswith("hrbench")


@dataclass(frozen=True)
class Presented:
    """A question as the model sees it."""

    order: tuple[int, ...]
    """``order[i]`` = index in the release's options of the option shown as letter i."""
    options: tuple[str, ...]
    """Option texts in the shown order."""
    answer_letter: str
    """Letter of the correct option in the shown order."""
    text: str
    """Question with ``(A) ...`` lines and the instruction to answer with the letter."""


def present(item: EvalItem, shuffle: bool, seed: int) -> Presented:
    """Option order and prompt text of ``item`` (same ``seed`` -> same order)."""
    order = list(range(len(item.options)))
    if shuffle:
        random.Random(f"{seed}:{item.qid}").shuffle(order)
    options = tuple(item.options[i] for i in order)
    letter = OPTION_LETTERS[order.index(item.answer)]
    return Presented(tuple(order), options, letter, multiple_choice_text(item.question, options))


def global_view(
    original: Image.Image, max_pixels: int | None, min_pixels: int = 4 * VISUAL_TOKEN_PIXELS
) -> Image.Image:
    """The global view: ``original`` downsampled to at most ``max_pixels`` by the processor's rule (None: as is).

    Crops are always cut from ``original`` (LFPC's information gap).
    """
    if max_pixels is None or original.width * original.height <= max_pixels:
        return original
    return resize_to_budget(original, min_pixels, max_pixels)


def predicted_letter(answer: str | None, options: Sequence[str]) -> str | None:
    """The option letter an ``<answer>`` names (by letter or option text), or None."""
    if answer is None or len(answer) > MAX_ANSWER_CHARS:
        return None
    index = choice_index(answer, options)
    return OPTION_LETTERS[index] if index is not None and index < len(options) else None


def _mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return statistics.fmean(values) if values else None


def cycle_accuracy(records: Sequence[Mapping[str, Any]]) -> float | None:
    """Mean over ``cycle`` of the mean ``score`` within the cycle (lmms-eval's HR-Bench aggregation)."""
    by_cycle: dict[str, list[float]] = defaultdict(list)
    for record in records:
        by_cycle[str(record["cycle"])].append(float(record["score"]))
    return _mean(statistics.fmean(scores) for scores in by_cycle.values())


def accuracy_table(benchmark: str, records: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    """Accuracy (0-100) per category column and ``Overall``, as the papers print them.

    ``records`` need ``category``, ``score`` (mean correctness of the samples) and, for HR-Bench, ``cycle``.
    """
    columns = TABLE_COLUMNS.get(benchmark) or tuple(sorted({str(r["category"]) for r in records}))
    agg = cycle_accuracy if benchmark.startswith("hrbench") else (lambda rs: _mean(float(r["score"]) for r in rs))
    table: dict[str, float | None] = {}
    for column in columns:
        value = agg([r for r in records if r["category"] == column])
        table[column] = None if value is None else 100 * value
    overall = agg(records)
    table["Overall"] = None if overall is None else 100 * overall
    return table


def subcategory_table(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Plain accuracy (0-100) per ``subcategory`` (MME-RW task/l2-category, synthetic question type)."""
    groups: dict[str, list[float]] = defaultdict(list)
    for record in records:
        if record.get("subcategory"):
            groups[str(record["subcategory"])].append(float(record["score"]))
    return {k: 100 * statistics.fmean(v) for k, v in sorted(groups.items())}
