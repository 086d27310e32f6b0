"""Benchmark loaders for evaluation: local copies in the layouts the public releases use; nothing is downloaded.

The V*, HR-Bench and MME-RealWorld parsers live in :mod:`visionleaf.data.benchmarks` (its docstring lists the
layouts), shared with the converter to training rows (``visionleaf.data.convert``); ``synthetic`` reads
visionleaf's own verl parquet (``visionleaf.data.generate``).

A malformed row is reported as a :class:`LoadIssue` (row index, field, reason), skipped and counted.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from visionleaf.data import Item
from visionleaf.data.benchmarks import (
    BadRow,
    BenchmarkItem,
    Loaded,
    LoadIssue,
    collect_items,
    find_file,
    load_hrbench,
    load_mme_rw,
    load_vstar,
)
from visionleaf.data.schema import OPTION_LETTERS, multiple_choice_text

BENCHMARKS = ("vstar", "hrbench4k", "hrbench8k", "mme_rw", "mme_rw_lite", "synthetic")

EvalItem = BenchmarkItem
"""One benchmark question as the evaluation sees it (:class:`visionleaf.data.benchmarks.BenchmarkItem`)."""

__all__ = ["BENCHMARKS", "EvalItem", "LoadIssue", "Loaded", "load_benchmark", "load_synthetic"]


# synthetic ---------------------------------------------------------------------------------------------
def _question_stem(item: Item) -> str:
    stem = item.question.split("\n(A) ", 1)[0]
    return stem if multiple_choice_text(stem, item.options) == item.question else item.question


def load_synthetic(path: Path) -> Loaded:
    file = find_file(path, ("test.parquet", "*.parquet"), "synthetic")

    def parse(index: str, row: Mapping[str, Any]) -> BenchmarkItem:
        try:
            item = Item.from_row(row)
        except ValueError as exc:
            where, _, reason = str(exc).partition(": ")
            raise BadRow(where, reason) from None
        if not item.options:
            raise BadRow("extra_info.options", "free-form item; the eval scores multiple choice only")
        return BenchmarkItem(
            qid=f"{item.split}-{item.index}",
            image=item.original_image,
            question=_question_stem(item),
            options=item.options,
            answer=OPTION_LETTERS.index(item.ground_truth),
            category=item.category.split("/")[0].capitalize(),
            subcategory=item.category,
            gt_boxes=item.gt_boxes,
            view=item.image if item.image != item.original_image else None,
        )

    return collect_items(((str(i), r) for i, r in enumerate(pq.read_table(file).to_pylist())), parse)


def load_benchmark(benchmark: str, path: str | Path) -> Loaded:
    """Items of ``benchmark`` read from ``path`` (a file or the folder holding it)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--data {path} does not exist")
    if benchmark == "vstar":
        return load_vstar(path)
    if benchmark in ("hrbench4k", "hrbench8k"):
        return load_hrbench(path, benchmark.removeprefix("hrbench"))
    if benchmark in ("mme_rw", "mme_rw_lite"):
        return load_mme_rw(path, lite=benchmark == "mme_rw_lite")
    if benchmark == "synthetic":
        return load_synthetic(path)
    raise ValueError(f"unknown benchmark {benchmark!r}; expected one of {BENCHMARKS}")
