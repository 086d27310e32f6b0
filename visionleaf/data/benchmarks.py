"""Parsers of the public benchmark releases, shared by evaluation (``visionleaf.eval.loaders``) and conversion to
training rows (``visionleaf.data.convert``). Local copies only; nothing is downloaded.

| source           | layout                                                                                  |
|------------------|-----------------------------------------------------------------------------------------|
| V*               | the release's folders ``direct_attributes/`` and ``relative_position/`` of ``*.jpg`` +   |
|                  | ``*.json`` (question, options with the correct one first, target_object, bbox as x,y,w,h) |
|                  | or VLMEvalKit's ``VStarBench.tsv`` (index, image base64, question, A.., answer, category) |
| HR-Bench 4K/8K   | ``hr_bench_4k.tsv`` / ``hr_bench_8k.tsv``: index, question, answer, category            |
|                  | (single/cross), image (base64), A-D, cycle_category                                     |
| MME-RealWorld    | tsv (or parquet) rows: index, question, ``multi-choice options`` (a list of "(A) .."    |
| (-Lite)          | strings) or A-E columns, answer, category, l2-category, image base64 (``image`` or     |
|                  | ``bytes``); or the full release's json list (Question_id, Image, Text, Answer choices, |
|                  | Ground truth, Task, Subtask, Category) next to its image folder                          |

A malformed row is reported as a :class:`LoadIssue` (row index, field, reason), skipped and counted.
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import json
import math
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from PIL import Image

from visionleaf.boxes import Box
from visionleaf.data.images import load_image
from visionleaf.data.schema import OPTION_LETTERS


@dataclass(frozen=True)
class BenchmarkItem:
    """One benchmark question, options in the release's order (``visionleaf.eval`` calls it ``EvalItem``)."""

    qid: str
    """Unique id within the benchmark (the release's index / file name)."""
    image: str | bytes = field(repr=False)
    """Image file path, or encoded image bytes (decoded base64)."""
    question: str
    """The question without its options."""
    options: tuple[str, ...]
    """Option texts in the release's order (A, B, ...)."""
    answer: int
    """Index of the correct option in ``options``."""
    category: str
    """Column of the paper table: ``Attribute``/``Spatial`` (V*), ``FSP``/``FCP`` (HR-Bench), the task (MME-RW)."""
    subcategory: str = ""
    """Finer type (MME-RW subtask / l2-category, synthetic question type)."""
    cycle: str = ""
    """HR-Bench ``cycle_category`` (the option cycle this row holds)."""
    gt_boxes: tuple[Box, ...] = ()
    """Ground-truth boxes in original pixels, smallest first (empty when the release has none)."""
    view: str | None = field(default=None, repr=False)
    """A prepared global view (a synthetic row that carries its own); None: the global view is ``image``
    downsampled to the eval's ``global_max_pixels``."""

    def load_image(self) -> Image.Image:
        """The image as RGB (:func:`visionleaf.data.load_image`)."""
        return load_image(self.image)

    def load_view(self) -> Image.Image | None:
        """The prepared global view as RGB, or None when the item has none."""
        return None if self.view is None else load_image(self.view)


@dataclass(frozen=True)
class LoadIssue:
    """A row that was skipped."""

    index: str
    """Row number or file name."""
    field: str
    reason: str

    def __str__(self) -> str:
        return f"row {self.index}: {self.field}: {self.reason}"


@dataclass
class Loaded:
    """The parsed items of one file, and the rows that were skipped."""

    items: list[BenchmarkItem]
    issues: list[LoadIssue]


class BadRow(ValueError):
    """A row a parser cannot use: the field at fault and why."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


def _text(row: Mapping[str, Any], *keys: str) -> str:
    for key in keys:
        value = row.get(key)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        text = str(value).strip()
        if text:
            return text
    raise BadRow(keys[0], "missing or empty")


def _b64(row: Mapping[str, Any], *keys: str) -> bytes:
    value: Any = None
    for key in keys:
        if row.get(key) not in (None, ""):
            value, used = row[key], key
            break
    if value is None:
        raise BadRow(keys[0], "missing image")
    if isinstance(value, bytes):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("bytes"), bytes):  # HF datasets' Image feature
        return bytes(value["bytes"])
    try:
        return base64.b64decode(str(value), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRow(used, f"not base64: {exc}") from None


def _letter(row: Mapping[str, Any], n: int, *keys: str) -> int:
    letter = _text(row, *keys).strip("() .").upper()
    if len(letter) != 1 or letter not in OPTION_LETTERS[:n]:
        raise BadRow(keys[0], f"{letter!r} is not one of the {n} option letters {list(OPTION_LETTERS[:n])}")
    return OPTION_LETTERS.index(letter)


def _letter_columns(row: Mapping[str, Any]) -> list[str]:
    options = []
    for letter in OPTION_LETTERS[:8]:
        value = row.get(letter)
        if value is None or (isinstance(value, float) and math.isnan(value)) or not str(value).strip():
            break
        options.append(str(value).strip())
    return options


def _rows_tsv(path: Path) -> Iterator[dict[str, Any]]:
    csv.field_size_limit(sys.maxsize)  # base64 images are megabytes long
    with open(path, newline="", encoding="utf-8") as f:
        yield from csv.DictReader(f, delimiter="\t")


def _rows(path: Path) -> Iterator[dict[str, Any]]:
    if path.suffix == ".parquet":
        yield from pq.read_table(path).to_pylist()
    else:
        yield from _rows_tsv(path)


def collect_items(rows: Iterator[tuple[str, Any]], parse: Callable[[str, Any], BenchmarkItem]) -> Loaded:
    """``parse(index, row)`` over ``rows``; a :class:`BadRow` or a repeated id becomes a :class:`LoadIssue`."""
    items, issues, seen = [], [], set()
    for index, row in rows:
        try:
            item = parse(index, row)
            if item.qid in seen:
                raise BadRow("index", f"duplicate id {item.qid!r}")
        except BadRow as exc:
            issues.append(LoadIssue(index, exc.field, exc.reason))
            continue
        seen.add(item.qid)
        items.append(item)
    return Loaded(items, issues)


def find_file(path: Path, patterns: Sequence[str], benchmark: str) -> Path:
    """``path`` if it is a file, else the first file in it matching ``patterns`` (in order)."""
    if path.is_file():
        return path
    for pattern in patterns:
        found = sorted(path.glob(pattern))
        if found:
            return found[0]
    raise FileNotFoundError(f"{path}: no {benchmark} file ({', '.join(patterns)}) there")


# V* ------------------------------------------------------------------------------------------------
VSTAR_FOLDERS = {"direct_attributes": "Attribute", "relative_position": "Spatial"}


def _vstar_category(raw: str) -> str:
    low = raw.lower()
    if "attribute" in low:
        return "Attribute"
    if "relative" in low or "position" in low or "spatial" in low:
        return "Spatial"
    raise BadRow("category", f"unknown V* category {raw!r}; expected direct_attributes or relative_position")


def _vstar_json(index: str, paths: tuple[Path, Path, str]) -> BenchmarkItem:
    image, annotation, folder = paths
    try:
        anno = json.loads(annotation.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BadRow("json", f"unreadable: {exc}") from None
    question = _text(anno, "question")
    options = anno.get("options")
    if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) and o for o in options):
        raise BadRow("options", f"expected a list of >= 2 non-empty strings, got {options!r}")
    boxes = []
    for i, raw in enumerate(anno.get("bbox") or []):
        if not (isinstance(raw, list) and len(raw) == 4 and all(isinstance(v, int | float) for v in raw)):
            raise BadRow(f"bbox[{i}]", f"expected [x, y, w, h], got {raw!r}")
        x, y, w, h = (float(v) for v in raw)
        if w <= 0 or h <= 0:
            raise BadRow(f"bbox[{i}]", f"non-positive size {raw!r}")
        boxes.append((x, y, x + w, y + h))
    gt: tuple[Box, ...] = ()
    if boxes:  # one box covering every target (both objects of a relative-position question)
        gt = ((min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)),)
    return BenchmarkItem(
        qid=f"{folder}/{image.stem}",
        image=str(image),
        question=question,
        options=tuple(options),
        answer=0,  # the release lists the correct option first
        category=VSTAR_FOLDERS[folder],
        subcategory=folder,
        gt_boxes=gt,
    )


def _mc_tsv_item(index: str, row: Mapping[str, Any], category: str, **extra: Any) -> BenchmarkItem:
    options = _letter_columns(row)
    if len(options) < 2:
        raise BadRow("A", f"expected option columns A, B, ..., got {len(options)}")
    return BenchmarkItem(
        qid=_text(row, "index"),
        image=_b64(row, "image", "bytes"),
        question=_text(row, "question"),
        options=tuple(options),
        answer=_letter(row, len(options), "answer"),
        category=category,
        **extra,
    )


def load_vstar(path: Path) -> Loaded:
    """V* from the release's folders (boxes included) or from VLMEvalKit's tsv (no boxes)."""
    if path.is_dir() and any((path / f).is_dir() for f in VSTAR_FOLDERS):
        entries = []
        for folder in VSTAR_FOLDERS:
            for image in sorted((path / folder).glob("*.jpg")):
                entries.append((f"{folder}/{image.name}", (image, image.with_suffix(".json"), folder)))

        def parse(index: str, entry: tuple[Path, Path, str]) -> BenchmarkItem:
            if not entry[1].exists():
                raise BadRow("json", f"missing {entry[1].name}")
            return _vstar_json(index, entry)

        return collect_items(iter(entries), parse)
    tsv = find_file(path, ("VStarBench.tsv", "*.tsv"), "V*")

    def parse_row(index: str, row: Mapping[str, Any]) -> BenchmarkItem:
        category = _text(row, "category")
        return _mc_tsv_item(index, row, _vstar_category(category), subcategory=category)

    return collect_items(((str(i), r) for i, r in enumerate(_rows(tsv))), parse_row)


# HR-Bench --------------------------------------------------------------------------------------------
HRBENCH_CATEGORIES = {"single": "FSP", "cross": "FCP"}


def find_hrbench(path: Path, resolution: str) -> Path:
    """The HR-Bench file of ``resolution`` (``4k`` / ``8k``): ``path`` itself, or the matching file in the folder."""
    return find_file(path, (f"hr_bench_{resolution}.tsv", f"*{resolution}*.tsv", f"*{resolution}*.parquet"), "HR")


def load_hrbench(path: Path, resolution: str) -> Loaded:
    """HR-Bench rows (each question under its option cycles, as the release holds them)."""
    tsv = find_hrbench(path, resolution)

    def parse(index: str, row: Mapping[str, Any]) -> BenchmarkItem:
        raw = _text(row, "category").lower()
        if raw not in HRBENCH_CATEGORIES:
            raise BadRow("category", f"{raw!r} is not 'single' (FSP) or 'cross' (FCP)")
        return _mc_tsv_item(index, row, HRBENCH_CATEGORIES[raw], subcategory=raw, cycle=_text(row, "cycle_category"))

    return collect_items(((str(i), r) for i, r in enumerate(_rows(tsv))), parse)


# MME-RealWorld ------------------------------------------------------------------------------------------
_OPTION_PREFIX = re.compile(r"\A\s*[(（]\s*([A-Z])\s*[)）]\s*")


def _option_list(value: Any) -> list[str]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                raise BadRow("multi-choice options", f"not a list: {value[:80]!r}") from None
    if not isinstance(value, list | tuple) or len(value) < 2:
        raise BadRow("multi-choice options", f"expected a list of >= 2 '(A) ...' strings, got {value!r}")
    options = []
    for i, raw in enumerate(value):
        match = _OPTION_PREFIX.match(str(raw))
        if not match or match.group(1) != OPTION_LETTERS[i]:
            raise BadRow(f"multi-choice options[{i}]", f"expected '({OPTION_LETTERS[i]}) ...', got {raw!r}")
        options.append(str(raw)[match.end() :].strip())
    return options


def _mme_task(raw: str) -> str:
    return "Perception" if "perception" in raw.lower() else "Reasoning"


def _mme_row(index: str, row: Mapping[str, Any]) -> BenchmarkItem:
    if row.get("multi-choice options") is not None:
        options = _option_list(row["multi-choice options"])
    else:
        options = _letter_columns(row)
        if len(options) < 2:
            raise BadRow("multi-choice options", "missing (and no A-E option columns)")
    category = _text(row, "category")
    subtask = category.split("/")[-1]
    l2 = str(row.get("l2-category") or "").strip()
    return BenchmarkItem(
        qid=_text(row, "index", "question_id"),
        image=_b64(row, "image", "bytes"),
        question=_text(row, "question"),
        options=tuple(options),
        answer=_letter(row, len(options), "answer"),
        category=subtask,
        subcategory=f"{_mme_task(category)}/{l2}" if l2 else _mme_task(category),
    )


def _mme_json(root: Path) -> Callable[[str, Any], BenchmarkItem]:
    def parse(index: str, row: Any) -> BenchmarkItem:
        if not isinstance(row, Mapping):
            raise BadRow("row", f"expected an object, got {type(row).__name__}")
        options = _option_list(row.get("Answer choices"))
        image = root / _text(row, "Image")
        if not image.exists():
            raise BadRow("Image", f"no such file {image}")
        return BenchmarkItem(
            qid=_text(row, "Question_id"),
            image=str(image),
            question=_text(row, "Text"),
            options=tuple(options),
            answer=_letter(row, len(options), "Ground truth"),
            category=_text(row, "Subtask"),
            subcategory=f"{_mme_task(_text(row, 'Task'))}/{row.get('Category', '')}",
        )

    return parse


def find_mme_rw(path: Path, lite: bool) -> Path:
    """The MME-RealWorld file: ``path`` itself, the full release's json when the folder has no tsv, else the tsv
    (``MME-RealWorld-Lite.tsv`` first when ``lite``) or parquet."""
    if path.is_dir() and not any(path.glob("*.tsv")) and any(path.glob("*.json")):
        return sorted(path.glob("*.json"))[0]
    name = "MME-RealWorld-Lite" if lite else "MME-RealWorld"
    return find_file(path, (f"{name}.tsv", "*.tsv", "*.parquet"), name)


def load_mme_rw(path: Path, lite: bool) -> Loaded:
    """MME-RealWorld(-Lite) from a tsv / parquet with base64 images or the full release's json + image folder."""
    file = find_mme_rw(path, lite)
    if file.suffix == ".json":
        rows = json.loads(file.read_text())
        if not isinstance(rows, list):
            raise ValueError(f"{file}: expected a JSON list of questions")
        return collect_items(((str(i), r) for i, r in enumerate(rows)), _mme_json(file.parent))
    return collect_items(((str(i), r) for i, r in enumerate(_rows(file))), _mme_row)
