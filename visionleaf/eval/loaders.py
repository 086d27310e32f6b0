"""Benchmark loaders: local copies in the layouts the public releases use; nothing is downloaded.

| benchmark      | layout                                                                                  |
|----------------|-----------------------------------------------------------------------------------------|
| ``vstar``      | the release's folders ``direct_attributes/`` and ``relative_position/`` of ``*.jpg`` +   |
|                | ``*.json`` (question, options with the correct one first, target_object, bbox as x,y,w,h) |
|                | or VLMEvalKit's ``VStarBench.tsv`` (index, image base64, question, A.., answer, category) |
| ``hrbench4k/8k``| ``hr_bench_4k.tsv`` / ``hr_bench_8k.tsv``: index, question, answer, category            |
|                | (single/cross), image (base64), A-D, cycle_category                                     |
| ``mme_rw(_lite)``| tsv (or parquet) rows: index, question, ``multi-choice options`` (a list of "(A) .."   |
|                | strings) or A-E columns, answer, category, l2-category, image base64 (``image`` or     |
|                | ``bytes``); or the full release's json list (Question_id, Image, Text, Answer choices, |
|                | Ground truth, Task, Subtask, Category) next to its image folder                          |
| ``synthetic``  | visionleaf's verl parquet (``visionleaf.data.generate``)                                |

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
from visionleaf.data import Item, load_image
from visionleaf.data.schema import OPTION_LETTERS, multiple_choice_text

BENCHMARKS = ("vstar", "hrbench4k", "hrbench8k", "mme_rw", "mme_rw_lite", "synthetic")


@dataclass(frozen=True)
class EvalItem:
    """One benchmark question, options in the release's order."""

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

    def load_image(self) -> Image.Image:
        return load_image(self.image)


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
    items: list[EvalItem]
    issues: list[LoadIssue]


class _Bad(ValueError):
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
    raise _Bad(keys[0], "missing or empty")


def _b64(row: Mapping[str, Any], *keys: str) -> bytes:
    value: Any = None
    for key in keys:
        if row.get(key) not in (None, ""):
            value, used = row[key], key
            break
    if value is None:
        raise _Bad(keys[0], "missing image")
    if isinstance(value, bytes):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("bytes"), bytes):  # HF datasets' Image feature
        return bytes(value["bytes"])
    try:
        return base64.b64decode(str(value), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _Bad(used, f"not base64: {exc}") from None


def _letter(row: Mapping[str, Any], n: int, *keys: str) -> int:
    letter = _text(row, *keys).strip("() .").upper()
    if len(letter) != 1 or letter not in OPTION_LETTERS[:n]:
        raise _Bad(keys[0], f"{letter!r} is not one of the {n} option letters {list(OPTION_LETTERS[:n])}")
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


def _collect(rows: Iterator[tuple[str, Any]], parse: Callable[[str, Any], EvalItem]) -> Loaded:
    items, issues, seen = [], [], set()
    for index, row in rows:
        try:
            item = parse(index, row)
            if item.qid in seen:
                raise _Bad("index", f"duplicate id {item.qid!r}")
        except _Bad as exc:
            issues.append(LoadIssue(index, exc.field, exc.reason))
            continue
        seen.add(item.qid)
        items.append(item)
    return Loaded(items, issues)


def _single_file(path: Path, patterns: Sequence[str], benchmark: str) -> Path:
    if path.is_file():
        return path
    for pattern in patterns:
        found = sorted(path.glob(pattern))
        if found:
            return found[0]
    raise FileNotFoundError(f"--data {path}: no {benchmark} file ({', '.join(patterns)}) there")


# V* ------------------------------------------------------------------------------------------------
VSTAR_FOLDERS = {"direct_attributes": "Attribute", "relative_position": "Spatial"}


def _vstar_category(raw: str) -> str:
    low = raw.lower()
    if "attribute" in low:
        return "Attribute"
    if "relative" in low or "position" in low or "spatial" in low:
        return "Spatial"
    raise _Bad("category", f"unknown V* category {raw!r}; expected direct_attributes or relative_position")


def _vstar_json(index: str, paths: tuple[Path, Path, str]) -> EvalItem:
    image, annotation, folder = paths
    try:
        anno = json.loads(annotation.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise _Bad("json", f"unreadable: {exc}") from None
    question = _text(anno, "question")
    options = anno.get("options")
    if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) and o for o in options):
        raise _Bad("options", f"expected a list of >= 2 non-empty strings, got {options!r}")
    boxes = []
    for i, raw in enumerate(anno.get("bbox") or []):
        if not (isinstance(raw, list) and len(raw) == 4 and all(isinstance(v, int | float) for v in raw)):
            raise _Bad(f"bbox[{i}]", f"expected [x, y, w, h], got {raw!r}")
        x, y, w, h = (float(v) for v in raw)
        if w <= 0 or h <= 0:
            raise _Bad(f"bbox[{i}]", f"non-positive size {raw!r}")
        boxes.append((x, y, x + w, y + h))
    gt: tuple[Box, ...] = ()
    if boxes:  # one box covering every target (both objects of a relative-position question)
        gt = ((min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)),)
    return EvalItem(
        qid=f"{folder}/{image.stem}",
        image=str(image),
        question=question,
        options=tuple(options),
        answer=0,  # the release lists the correct option first
        category=VSTAR_FOLDERS[folder],
        subcategory=folder,
        gt_boxes=gt,
    )


def _mc_tsv_item(index: str, row: Mapping[str, Any], category: str, **extra: Any) -> EvalItem:
    options = _letter_columns(row)
    if len(options) < 2:
        raise _Bad("A", f"expected option columns A, B, ..., got {len(options)}")
    return EvalItem(
        qid=_text(row, "index"),
        image=_b64(row, "image", "bytes"),
        question=_text(row, "question"),
        options=tuple(options),
        answer=_letter(row, len(options), "answer"),
        category=category,
        **extra,
    )


def load_vstar(path: Path) -> Loaded:
    if path.is_dir() and any((path / f).is_dir() for f in VSTAR_FOLDERS):
        entries = []
        for folder in VSTAR_FOLDERS:
            for image in sorted((path / folder).glob("*.jpg")):
                entries.append((f"{folder}/{image.name}", (image, image.with_suffix(".json"), folder)))

        def parse(index: str, entry: tuple[Path, Path, str]) -> EvalItem:
            if not entry[1].exists():
                raise _Bad("json", f"missing {entry[1].name}")
            return _vstar_json(index, entry)

        return _collect(iter(entries), parse)
    tsv = _single_file(path, ("VStarBench.tsv", "*.tsv"), "V*")

    def parse_row(index: str, row: Mapping[str, Any]) -> EvalItem:
        category = _text(row, "category")
        return _mc_tsv_item(index, row, _vstar_category(category), subcategory=category)

    return _collect(((str(i), r) for i, r in enumerate(_rows(tsv))), parse_row)


# HR-Bench --------------------------------------------------------------------------------------------
HRBENCH_CATEGORIES = {"single": "FSP", "cross": "FCP"}


def load_hrbench(path: Path, resolution: str) -> Loaded:
    tsv = _single_file(path, (f"hr_bench_{resolution}.tsv", f"*{resolution}*.tsv", f"*{resolution}*.parquet"), "HR")

    def parse(index: str, row: Mapping[str, Any]) -> EvalItem:
        raw = _text(row, "category").lower()
        if raw not in HRBENCH_CATEGORIES:
            raise _Bad("category", f"{raw!r} is not 'single' (FSP) or 'cross' (FCP)")
        return _mc_tsv_item(index, row, HRBENCH_CATEGORIES[raw], subcategory=raw, cycle=_text(row, "cycle_category"))

    return _collect(((str(i), r) for i, r in enumerate(_rows(tsv))), parse)


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
                raise _Bad("multi-choice options", f"not a list: {value[:80]!r}") from None
    if not isinstance(value, list | tuple) or len(value) < 2:
        raise _Bad("multi-choice options", f"expected a list of >= 2 '(A) ...' strings, got {value!r}")
    options = []
    for i, raw in enumerate(value):
        match = _OPTION_PREFIX.match(str(raw))
        if not match or match.group(1) != OPTION_LETTERS[i]:
            raise _Bad(f"multi-choice options[{i}]", f"expected '({OPTION_LETTERS[i]}) ...', got {raw!r}")
        options.append(str(raw)[match.end() :].strip())
    return options


def _mme_task(raw: str) -> str:
    return "Perception" if "perception" in raw.lower() else "Reasoning"


def _mme_row(index: str, row: Mapping[str, Any]) -> EvalItem:
    if row.get("multi-choice options") is not None:
        options = _option_list(row["multi-choice options"])
    else:
        options = _letter_columns(row)
        if len(options) < 2:
            raise _Bad("multi-choice options", "missing (and no A-E option columns)")
    category = _text(row, "category")
    subtask = category.split("/")[-1]
    l2 = str(row.get("l2-category") or "").strip()
    return EvalItem(
        qid=_text(row, "index", "question_id"),
        image=_b64(row, "image", "bytes"),
        question=_text(row, "question"),
        options=tuple(options),
        answer=_letter(row, len(options), "answer"),
        category=subtask,
        subcategory=f"{_mme_task(category)}/{l2}" if l2 else _mme_task(category),
    )


def _mme_json(root: Path) -> Callable[[str, Any], EvalItem]:
    def parse(index: str, row: Any) -> EvalItem:
        if not isinstance(row, Mapping):
            raise _Bad("row", f"expected an object, got {type(row).__name__}")
        options = _option_list(row.get("Answer choices"))
        image = root / _text(row, "Image")
        if not image.exists():
            raise _Bad("Image", f"no such file {image}")
        return EvalItem(
            qid=_text(row, "Question_id"),
            image=str(image),
            question=_text(row, "Text"),
            options=tuple(options),
            answer=_letter(row, len(options), "Ground truth"),
            category=_text(row, "Subtask"),
            subcategory=f"{_mme_task(_text(row, 'Task'))}/{row.get('Category', '')}",
        )

    return parse


def load_mme_rw(path: Path, lite: bool) -> Loaded:
    if path.suffix == ".json" or (path.is_dir() and not any(path.glob("*.tsv")) and any(path.glob("*.json"))):
        file = path if path.is_file() else sorted(path.glob("*.json"))[0]
        rows = json.loads(file.read_text())
        if not isinstance(rows, list):
            raise ValueError(f"{file}: expected a JSON list of questions")
        return _collect(((str(i), r) for i, r in enumerate(rows)), _mme_json(file.parent))
    name = "MME-RealWorld-Lite" if lite else "MME-RealWorld"
    file = _single_file(path, (f"{name}.tsv", "*.tsv", "*.parquet"), name)
    return _collect(((str(i), r) for i, r in enumerate(_rows(file))), _mme_row)


# synthetic ---------------------------------------------------------------------------------------------
def _question_stem(item: Item) -> str:
    stem = item.question.split("\n(A) ", 1)[0]
    return stem if multiple_choice_text(stem, item.options) == item.question else item.question


def load_synthetic(path: Path) -> Loaded:
    file = _single_file(path, ("test.parquet", "*.parquet"), "synthetic")

    def parse(index: str, row: Mapping[str, Any]) -> EvalItem:
        try:
            item = Item.from_row(row)
        except ValueError as exc:
            where, _, reason = str(exc).partition(": ")
            raise _Bad(where, reason) from None
        if not item.options:
            raise _Bad("extra_info.options", "free-form item; the eval scores multiple choice only")
        return EvalItem(
            qid=f"{item.split}-{item.index}",
            image=item.original_image,
            question=_question_stem(item),
            options=item.options,
            answer=OPTION_LETTERS.index(item.ground_truth),
            category=item.category.split("/")[0].capitalize(),
            subcategory=item.category,
            gt_boxes=item.gt_boxes,
        )

    return _collect(((str(i), r) for i, r in enumerate(pq.read_table(file).to_pylist())), parse)


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
