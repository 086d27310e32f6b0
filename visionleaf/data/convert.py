"""Convert the data people have into visionleaf's training rows (verl RLHF parquet, SPEC §6).

    python -m visionleaf.data.convert --from deepeyes|vstar|hrbench|mme_rw|jsonl --in PATH --out DIR [--split train]

| ``--from``  | ``--in``                                                                                   |
|-------------|--------------------------------------------------------------------------------------------|
| ``deepeyes``| a DeepEyes-Datasets-47k parquet, or the folder of them (columns data_source, prompt,      |
|             | images [{bytes, path}], ability, reward_model {ground_truth, style}, extra_info)           |
| ``vstar``   | the V* release folder (``direct_attributes/``, ``relative_position/``; boxes kept) or       |
|             | VLMEvalKit's ``VStarBench.tsv``                                                            |
| ``hrbench`` | ``hr_bench_4k.tsv`` / ``hr_bench_8k.tsv``, or a folder holding one or both                 |
| ``mme_rw``  | MME-RealWorld(-Lite) tsv / parquet, or the full release's json next to its image folder     |
| ``jsonl``   | a ``.jsonl`` file (or a folder of them) describing your own images, one question a line:   |
|             | ``{"image": "photos/a.jpg", "question": "...", "answer": "B", "options": ["..", ".."],``    |
|             | ``"boxes": [[x1, y1, x2, y2]], "category": "..", "data_source": "..", "id": ".."}``        |
|             | (``image`` relative to the file's folder or absolute; ``options``, ``boxes``, ``category``, |
|             | ``data_source``, ``id`` optional; ``answer`` is a letter or an option's text, free-form    |
|             | text without options; ``boxes`` in original-image pixels, one per target)                  |

Output in ``--out``: ``<split>.parquet`` (rows that pass :func:`visionleaf.data.schema.validate_row`), ``images/``
(each distinct image once, its original bytes at full resolution, named by their sha256), ``rejected.jsonl``
(every row that could not be converted, with its id, field and reason) and ``convert.json`` (what was converted
from where). Options are stripped of ``(A)`` prefixes and must differ; the answer of a multiple-choice item
becomes its letter. Target boxes become visionleaf's hierarchy: the box around all targets, then its 2x and 4x
enlargements, clamped to the image. Re-running replaces the split cleanly; an output folder holding another
source's conversion is refused unless ``--overwrite``. Train on the result with
``python -m visionleaf.train --config-name visionleaf_qwen25vl_7b data.train_files=DIR/train.parquet``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import re
import shutil
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from visionleaf import boxes
from visionleaf.boxes import Box
from visionleaf.data.benchmarks import (
    BadRow,
    Loaded,
    find_hrbench,
    find_mme_rw,
    load_hrbench,
    load_mme_rw,
    load_vstar,
)
from visionleaf.data.images import ImageLoadError, load_image
from visionleaf.data.schema import OPTION_LETTERS, multiple_choice_text, validate_row, write_parquet
from visionleaf.protocol import IMAGE_PLACEHOLDER, build_messages
from visionleaf.registry import Registry
from visionleaf.tools import get_tool

MANIFEST = "convert.json"
REJECTED = "rejected.jsonl"
IMAGES = "images"
DEFAULT_ABILITY = "visual_search"


@dataclass(frozen=True)
class SourceRecord:
    """One question read from a source, before its image is stored."""

    source_id: str
    """The row's id in its source (index column, file name, ``file:row``)."""
    data_source: str
    """``data_source`` of the output row."""
    image: str | bytes = field(repr=False)
    """Image file path or encoded image bytes."""
    question: str
    """The question without its options."""
    options: tuple[str, ...]
    """Option texts (A, B, ...); empty for a free-form question."""
    answer: str
    """The option letter for multiple choice, else the free-form answer."""
    category: str
    """``extra_info.category``."""
    subcategory: str = ""
    """Finer type (V* folder, HR-Bench single/cross, MME-RW task/l2-category)."""
    cycle: str = ""
    """HR-Bench ``cycle_category``."""
    boxes: tuple[Box, ...] = ()
    """Target boxes in original-image pixels (x1, y1, x2, y2), any order; the hierarchy is built from them."""
    ability: str = DEFAULT_ABILITY
    """verl's ``ability`` column (a free tag)."""


@dataclass(frozen=True)
class Rejection:
    """A source row that was not converted."""

    source_id: str
    """The row's id in its source (its row number when the id could not be read)."""
    data_source: str
    """The row's data source ("" when it could not be read)."""
    field: str
    """The field at fault."""
    reason: str


@dataclass(frozen=True)
class SourceRows:
    """What a reader yields, and how many rows it will yield (None when unknown)."""

    rows: Iterator[SourceRecord | Rejection]
    total: int | None


Reader = Callable[[Path, str], SourceRows]
"""``reader(in_path, default_data_source) -> SourceRows``; the second argument is only used by ``jsonl``."""

READERS: Registry[Reader] = Registry("converter source")
"""``--from`` names; ``@READERS.register("name")`` adds a source."""


# Normalisation ----------------------------------------------------------------------------------------
_OPTION_PREFIX = re.compile(r"\A\s*(?:\(\s*([A-Z])\s*\)|([A-Z])\s*[.:)])\s+")
_LETTER = re.compile(r"\A\s*\(?\s*([A-Z])\s*\)?\s*[.:]?\s*\Z")


def normalize_options(options: Sequence[Any]) -> tuple[str, ...]:
    """Option texts stripped of whitespace and of a leading ``(A)`` / ``A.`` that names their own letter.

    Raises :class:`BadRow` for fewer than 2 options, too many, an empty one or two equal ones (case-insensitive).
    """
    if len(options) < 2:
        raise BadRow("options", f"expected at least 2 options, got {len(options)}")
    if len(options) > len(OPTION_LETTERS):
        raise BadRow("options", f"{len(options)} options, at most {len(OPTION_LETTERS)}")
    out = []
    for i, raw in enumerate(options):
        if not isinstance(raw, str):
            raise BadRow(f"options[{i}]", f"expected a string, got {type(raw).__name__}")
        text = raw.strip()
        match = _OPTION_PREFIX.match(text)
        if match and (match.group(1) or match.group(2)) == OPTION_LETTERS[i]:
            text = text[match.end() :].strip()
        if not text:
            raise BadRow(f"options[{i}]", "empty option")
        out.append(text)
    folded = [o.casefold() for o in out]
    for i, text in enumerate(folded):
        if text in folded[:i]:
            raise BadRow(f"options[{i}]", f"{out[i]!r} repeats option {OPTION_LETTERS[folded.index(text)]}")
    return tuple(out)


def answer_letter(answer: Any, options: Sequence[str]) -> str:
    """The letter of ``answer`` among ``options``: a letter (``B``, ``(B)``, ``b.``) or an option's text.

    Raises :class:`BadRow` when it is neither, or when it is a letter and the text of a different option.
    """
    if not isinstance(answer, str) or not answer.strip():
        raise BadRow("answer", f"expected a non-empty string, got {answer!r}")
    by_text = [OPTION_LETTERS[i] for i, o in enumerate(options) if o.casefold() == answer.strip().casefold()]
    match = _LETTER.match(answer.upper()) if len(answer.strip()) <= 4 else None
    by_letter = match.group(1) if match and match.group(1) in OPTION_LETTERS[: len(options)] else None
    if by_text and by_letter and by_text[0] != by_letter:
        raise BadRow(
            "answer",
            f"{answer!r} is option letter {by_letter} and the text of option {by_text[0]}; give the option's text",
        )
    if by_text:
        return by_text[0]
    if by_letter:
        return by_letter
    raise BadRow(
        "answer",
        f"{answer!r} is neither an option letter {list(OPTION_LETTERS[: len(options)])} nor an option's text "
        f"{list(options)}",
    )


def box_hierarchy(targets: Sequence[Box], size: tuple[int, int]) -> list[Box]:
    """visionleaf's GT hierarchy for ``targets`` (original pixels) in an image of ``size`` (w, h): the box around
    all targets clamped to the image, then :func:`visionleaf.boxes.box_hierarchy` of it (the synthetic set's
    rule: its 2x and 4x enlargements, clamped, smallest first).

    Raises :class:`BadRow` for a malformed box, boxes that look normalised to [0, 1], or a box mostly outside
    the image (a sign of the wrong coordinates).
    """
    width, height = size
    for i, box in enumerate(targets):
        x1, y1, x2, y2 = box
        if not all(math.isfinite(v) for v in box) or x2 <= x1 or y2 <= y1:
            raise BadRow(f"boxes[{i}]", f"expected [x1, y1, x2, y2] with x1 < x2 and y1 < y2, got {list(box)}")
        inside = max(0.0, min(x2, width) - max(x1, 0.0)) * max(0.0, min(y2, height) - max(y1, 0.0))
        if inside < 0.5 * (x2 - x1) * (y2 - y1):
            raise BadRow(
                f"boxes[{i}]",
                f"box {list(box)} lies mostly outside the {width}x{height} image; boxes are original-image pixels",
            )
    if max(max(box) for box in targets) <= 1.0 < min(width, height):
        raise BadRow("boxes", "boxes look normalised to [0, 1]; give them in original-image pixels")
    tight = (
        max(0.0, min(b[0] for b in targets)),
        max(0.0, min(b[1] for b in targets)),
        min(float(width), max(b[2] for b in targets)),
        min(float(height), max(b[3] for b in targets)),
    )
    return boxes.box_hierarchy(tight, width, height)


# Images -----------------------------------------------------------------------------------------------
_EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif", "TIFF": "tif"}


class ImageStore:
    """Writes each distinct image once under ``root`` as ``<sha256>.<ext>`` (its original bytes)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._seen: dict[str, tuple[Path, tuple[int, int]]] = {}
        root.mkdir(parents=True, exist_ok=True)

    def put(self, image: str | bytes) -> tuple[Path, tuple[int, int]]:
        """Store ``image`` (a path or encoded bytes); return its file and (width, height) as ``load_image`` reads it.

        Raises :class:`BadRow` when the file is missing or the image cannot be decoded."""
        if isinstance(image, bytes):
            data = image
        else:
            try:
                data = Path(image).read_bytes()
            except OSError as exc:
                raise BadRow("image", f"cannot read {image}: {exc.strerror or exc}") from None
        digest = hashlib.sha256(data).hexdigest()
        if digest in self._seen:
            return self._seen[digest]
        try:
            size = load_image(data).size
            with Image.open(io.BytesIO(data)) as img:
                kind = img.format or ""
        except ImageLoadError as exc:
            raise BadRow("image", str(exc).removeprefix("<bytes>: ")) from None
        path = self.root / f"{digest}.{_EXTENSIONS.get(kind, kind.lower() or 'img')}"
        if not path.exists():
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)  # a crash never leaves a truncated image under the final name
        self._seen[digest] = (path, size)
        return path, size


# Readers ----------------------------------------------------------------------------------------------
def _from_loaded(loaded: Loaded, data_source: str) -> Iterator[SourceRecord | Rejection]:
    """The loader's skipped rows as rejections, then its items as records."""
    for issue in loaded.issues:
        yield Rejection(issue.index, data_source, issue.field, issue.reason)
    for item in loaded.items:
        yield SourceRecord(
            source_id=item.qid,
            data_source=data_source,
            image=item.image,
            question=item.question,
            options=item.options,
            answer=OPTION_LETTERS[item.answer],
            category=item.category,
            subcategory=item.subcategory,
            cycle=item.cycle,
            boxes=item.gt_boxes,
        )


def _benchmark_rows(loads: Sequence[tuple[Loaded, str]]) -> SourceRows:
    total = sum(len(loaded.items) + len(loaded.issues) for loaded, _ in loads)
    rows = (row for loaded, data_source in loads for row in _from_loaded(loaded, data_source))
    return SourceRows(rows, total)


@READERS.register("vstar")
def read_vstar(path: Path, default_data_source: str) -> SourceRows:
    """V* Bench (``data_source`` ``vstar_bench``; release folders carry the target boxes)."""
    return _benchmark_rows([(load_vstar(path), "vstar_bench")])


@READERS.register("hrbench")
def read_hrbench(path: Path, default_data_source: str) -> SourceRows:
    """HR-Bench 4K and/or 8K (``hr_bench_4k`` / ``hr_bench_8k``); every option cycle is a row."""
    if path.is_file():
        resolution = next((r for r in ("4k", "8k") if r in path.name.lower()), "")
        return _benchmark_rows([(load_hrbench(path, resolution), f"hr_bench_{resolution}".rstrip("_"))])
    loads = []
    for resolution in ("4k", "8k"):
        try:
            file = find_hrbench(path, resolution)
        except FileNotFoundError:
            continue
        loads.append((load_hrbench(file, resolution), f"hr_bench_{resolution}"))
    if not loads:
        raise FileNotFoundError(f"--in {path}: no hr_bench_4k / hr_bench_8k file (tsv or parquet) there")
    return _benchmark_rows(loads)


@READERS.register("mme_rw")
def read_mme_rw(path: Path, default_data_source: str) -> SourceRows:
    """MME-RealWorld (``mme_realworld``, or ``mme_realworld_lite`` when the file name says Lite)."""
    file = find_mme_rw(path, lite=False)
    data_source = "mme_realworld_lite" if "lite" in file.name.lower() else "mme_realworld"
    return _benchmark_rows([(load_mme_rw(file, lite=False), data_source)])


DEEPEYES_INSTRUCTION = "Think first, call **image_zoom_in_tool**"
"""Start of the tool instruction DeepEyes appends to its questions; cut, visionleaf's prompt adds its own."""
_OPTION_LINE = re.compile(r"\A\s*(?:\(([A-Z])\)|([A-Z])[.:)])\s+(\S.*)\Z")
_OPTIONS_LABEL = re.compile(r"(?:options|choices)\s*:?", re.IGNORECASE)


def split_options(text: str) -> tuple[str, tuple[str, ...]]:
    """``(stem, options)`` when ``text`` ends with option lines ``(A) ..`` / ``A. ..`` from A on, else ``(text, ())``.

    An ``Options:`` / ``Choices:`` line just above the options is dropped from the stem.
    """
    lines = text.strip().split("\n")
    start = len(lines)
    while start > 0 and _OPTION_LINE.match(lines[start - 1]):
        start -= 1
    matches = [m for m in (_OPTION_LINE.match(line) for line in lines[start:]) if m]
    letters = "".join(m.group(1) or m.group(2) for m in matches)
    stem_lines = lines[:start]
    if stem_lines and _OPTIONS_LABEL.fullmatch(stem_lines[-1].strip()):
        stem_lines = stem_lines[:-1]
    stem = "\n".join(stem_lines).strip()
    if len(matches) < 2 or letters != OPTION_LETTERS[: len(matches)] or not stem:
        return text.strip(), ()
    return stem, tuple(m.group(3).strip() for m in matches)


def _user_text(prompt: Any) -> str:
    if not isinstance(prompt, Sequence) or isinstance(prompt, str):
        raise BadRow("prompt", f"expected a list of chat messages, got {type(prompt).__name__}")
    for message in prompt:
        if isinstance(message, Mapping) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, Sequence) and not isinstance(content, str):  # [{"type": "text", "text": ..}]
                content = "".join(str(part.get("text") or "") for part in content if isinstance(part, Mapping))
            if not isinstance(content, str):
                raise BadRow("prompt", f"user content is {type(content).__name__}, not text")
            return content
    raise BadRow("prompt", "no user message")


def _deepeyes_image(images: Any, folder: Path) -> str | bytes:
    if not isinstance(images, Sequence) or isinstance(images, (str, bytes)) or not images:
        raise BadRow("images", f"expected a list with one image, got {images!r:.80}")
    if len(images) != 1:
        raise BadRow("images", f"{len(images)} images; a visionleaf row holds one global view")
    image = images[0]
    if isinstance(image, Mapping):  # HF datasets' Image feature: {"bytes": ..., "path": ...}
        if image.get("bytes"):
            return bytes(image["bytes"])
        image = image.get("path")
    if isinstance(image, bytes) and image:
        return image
    if isinstance(image, str) and image:
        return str(folder / image)
    raise BadRow("images[0]", "neither image bytes nor a path")


def _deepeyes_row(row: Mapping[str, Any], source_id: str, folder: Path) -> SourceRecord:
    data_source = row.get("data_source")
    if not isinstance(data_source, str) or not data_source.strip():
        raise BadRow("data_source", f"expected a non-empty string, got {data_source!r}")
    text = _user_text(row.get("prompt"))
    if text.count(IMAGE_PLACEHOLDER) > 1:
        raise BadRow("prompt", f"{text.count(IMAGE_PLACEHOLDER)} {IMAGE_PLACEHOLDER} placeholders; one image per row")
    text = text.replace(IMAGE_PLACEHOLDER, "").split(DEEPEYES_INSTRUCTION)[0].strip()
    if not text:
        raise BadRow("prompt", "empty question")
    reward = row.get("reward_model")
    truth = reward.get("ground_truth") if isinstance(reward, Mapping) else None
    if isinstance(truth, (int, float)) and not isinstance(truth, bool):
        truth = str(truth)
    if not isinstance(truth, str) or not truth.strip():
        raise BadRow("reward_model.ground_truth", f"expected a non-empty string, got {truth!r:.80}")
    stem, options = split_options(text)
    answer = truth.strip()
    if options:
        try:
            answer = answer_letter(answer, normalize_options(options))
        except BadRow:  # options in the text but an answer in other words: keep the question free-form
            stem, options = text, ()
    ability = row.get("ability")
    return SourceRecord(
        source_id=source_id,
        data_source=data_source.strip(),
        image=_deepeyes_image(row.get("images"), folder),
        question=stem,
        options=options,
        answer=answer,
        category=data_source.strip(),
        ability=ability.strip() if isinstance(ability, str) and ability.strip() else DEFAULT_ABILITY,
    )


def _files(path: Path, suffix: str, what: str) -> list[Path]:
    files = [path] if path.is_file() else sorted(path.glob(f"*{suffix}"))
    if not files:
        raise FileNotFoundError(f"--in {path}: no {what} ({suffix}) there")
    return files


@READERS.register("deepeyes")
def read_deepeyes(path: Path, default_data_source: str) -> SourceRows:
    """DeepEyes-Datasets-47k parquet files (``data_source`` kept: ``vstar``, ``chart``, ``thinklite_eureka``).

    Answers are mostly free-form; a question whose text ends with ``(A) ..`` lines and whose ground truth names
    one of them becomes multiple choice. Rows are read in batches, never the whole file at once."""
    files = _files(path, ".parquet", "DeepEyes parquet")
    total = sum(pq.ParquetFile(file).metadata.num_rows for file in files)

    def rows() -> Iterator[SourceRecord | Rejection]:
        for file in files:
            number = 0
            for batch in pq.ParquetFile(file).iter_batches(batch_size=64):
                for row in batch.to_pylist():
                    source_id = f"{file.name}:{number}"
                    number += 1
                    try:
                        yield _deepeyes_row(row, source_id, file.parent)
                    except BadRow as exc:
                        raw = row.get("data_source")
                        yield Rejection(source_id, raw if isinstance(raw, str) else "", exc.field, exc.reason)

    return SourceRows(rows(), total)


JSONL_KEYS = frozenset({"image", "question", "answer", "options", "boxes", "category", "data_source", "id"})


def _jsonl_row(row: Any, source_id: str, folder: Path, default_data_source: str) -> SourceRecord:
    if not isinstance(row, Mapping):
        raise BadRow("line", f"expected a JSON object, got {type(row).__name__}")
    unknown = sorted(set(row) - JSONL_KEYS)
    if unknown:
        raise BadRow(unknown[0], f"unknown key; the keys are {sorted(JSONL_KEYS)}")
    texts = {}
    for key in ("image", "question", "answer"):
        value = row.get(key)
        if not isinstance(value, str) or not value.strip():
            raise BadRow(key, f"expected a non-empty string, got {value!r}")
        texts[key] = value.strip()
    options: tuple[str, ...] = ()
    answer = texts["answer"]
    if row.get("options") is not None:
        if not isinstance(row["options"], list):
            raise BadRow("options", f"expected a list of strings, got {type(row['options']).__name__}")
        options = normalize_options(row["options"])
        answer = answer_letter(answer, options)
    boxes = []
    for i, raw in enumerate(row.get("boxes") or []):
        if not (
            isinstance(raw, list)
            and len(raw) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in raw)
        ):
            raise BadRow(f"boxes[{i}]", f"expected [x1, y1, x2, y2] in pixels, got {raw!r}")
        boxes.append((float(raw[0]), float(raw[1]), float(raw[2]), float(raw[3])))
    data_source = row.get("data_source") or default_data_source
    category = row.get("category") or data_source
    for key, value in (("data_source", data_source), ("category", category)):
        if not isinstance(value, str) or not value.strip():
            raise BadRow(key, f"expected a non-empty string, got {value!r}")
    return SourceRecord(
        source_id=str(row.get("id") or source_id),
        data_source=data_source.strip(),
        image=str(folder / texts["image"]),  # an absolute image path stays as it is
        question=texts["question"],
        options=options,
        answer=answer,
        category=category.strip(),
        boxes=tuple(boxes),
    )


@READERS.register("jsonl")
def read_jsonl(path: Path, default_data_source: str) -> SourceRows:
    """Your own images: ``.jsonl`` file(s), one question a line (module docstring); blank lines are skipped."""
    files = _files(path, ".jsonl", "jsonl file")
    lines = [(file, i, line) for file in files for i, line in enumerate(file.read_text().splitlines(), 1)]
    lines = [entry for entry in lines if entry[2].strip()]

    def rows() -> Iterator[SourceRecord | Rejection]:
        for file, number, line in lines:
            source_id = f"{file.name}:{number}"
            row: Any = None
            try:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise BadRow("line", f"not JSON: {exc}") from None
                yield _jsonl_row(row, source_id, file.parent, default_data_source)
            except BadRow as exc:
                raw = row.get("data_source") if isinstance(row, Mapping) else None
                data_source = raw if isinstance(raw, str) and raw else default_data_source
                yield Rejection(source_id, data_source, exc.field, exc.reason)

    return SourceRows(rows(), len(lines))


# Conversion -------------------------------------------------------------------------------------------
def to_row(
    record: SourceRecord, store: ImageStore, index: int, split: str, source: str, tools: Sequence[Any]
) -> dict[str, Any]:
    """The training row of ``record`` (its image stored in ``store``); raises :class:`BadRow`."""
    if not record.question.strip():
        raise BadRow("question", "empty")
    options = normalize_options(record.options) if record.options else ()
    if options and (len(record.answer) != 1 or record.answer not in OPTION_LETTERS[: len(options)]):
        raise BadRow(
            "answer", f"{record.answer!r} is not one of the option letters {list(OPTION_LETTERS[: len(options)])}"
        )
    path, size = store.put(record.image)
    boxes = box_hierarchy(record.boxes, size) if record.boxes else []
    text = multiple_choice_text(record.question.strip(), options)
    return {
        "data_source": record.data_source,
        "prompt": build_messages(text, tools),
        "images": [{"image": str(path)}],
        "ability": record.ability,
        "reward_model": {"style": "rule", "ground_truth": record.answer},
        "extra_info": {
            "index": index,
            "split": split,
            "question": text,
            "options": list(options),
            "gt_boxes": [list(box) for box in boxes],
            "original_image": str(path),
            "original_size": list(size),
            "category": record.category,
            "source": source,
            "source_id": record.source_id,
            "subcategory": record.subcategory,
            "cycle": record.cycle,
            "answer": options[OPTION_LETTERS.index(record.answer)] if options else record.answer,
        },
    }


@dataclass
class ConvertResult:
    """What one conversion wrote."""

    source: str
    split: str
    parquet: Path
    """``OUT/<split>.parquet``."""
    rejected_file: Path
    """``OUT/rejected.jsonl``."""
    kept: Counter[str]
    """Rows written, per data source."""
    rejected: list[Rejection]
    """Rows not written, in source order."""
    images: int
    """Distinct image files the split's rows point at."""

    def rejected_by_source(self) -> Counter[str]:
        return Counter(r.data_source for r in self.rejected)

    def summary(self) -> str:
        """A table of kept / rejected rows per data source, and where they went."""
        rejected = self.rejected_by_source()
        names = sorted(set(self.kept) | set(rejected))
        width = max([len("data_source"), len("total"), *(len(n) for n in names)])
        lines = [f"{'data_source':<{width}}  {'kept':>7}  {'rejected':>8}"]
        lines += [f"{n:<{width}}  {self.kept[n]:>7}  {rejected[n]:>8}" for n in names]
        lines.append(f"{'total':<{width}}  {sum(self.kept.values()):>7}  {len(self.rejected):>8}")
        lines.append(f"rows: {self.parquet}; distinct images: {self.images}, under {self.parquet.parent / IMAGES}")
        if self.rejected:
            lines.append(f"rejected rows and reasons: {self.rejected_file}")
        return "\n".join(lines)


def _prepare(out: Path, source: str, split: str, overwrite: bool) -> dict[str, Any]:
    """The manifest to extend; refuses an output folder holding another conversion unless ``overwrite``."""
    manifest_path = out / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else None
    foreign = manifest is None and any((out / name).exists() for name in (IMAGES, REJECTED, f"{split}.parquet"))
    other = manifest is not None and manifest.get("source") != source
    if (foreign or other) and not overwrite:
        what = f"a conversion of {manifest['source']!r}" if other and manifest else "files not written by the converter"
        raise FileExistsError(
            f"--out {out} holds {what}; converting {source!r} there would mix them. Pass --overwrite "
            "(overwrite=True) to replace it, or choose another --out"
        )
    if foreign or other:
        splits = manifest.get("splits", {}) if manifest else {}
        for name in [*(f"{s}.parquet" for s in splits), f"{split}.parquet", REJECTED, MANIFEST]:
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / IMAGES, ignore_errors=True)
        manifest = None
    return manifest or {"source": source, "splits": {}}


def _write_rejected(path: Path, split: str, source: str, rejected: Sequence[Rejection]) -> None:
    """Replace ``split``'s lines of ``path``, keeping the other splits'."""
    kept = []
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line).get("split") != split]
    lines = kept + [
        json.dumps(
            {
                "split": split,
                "source": source,
                "data_source": r.data_source,
                "id": r.source_id,
                "field": r.field,
                "reason": r.reason,
            },
            ensure_ascii=False,
        )
        for r in rejected
    ]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    os.replace(tmp, path)


def _collect_garbage(out: Path, splits: Sequence[str]) -> None:
    """Delete image files no split's parquet points at (left by an earlier run of a split)."""
    used: set[str] = set()
    for split in splits:
        file = out / f"{split}.parquet"
        if file.exists():
            for images in pq.read_table(file, columns=["images"]).column("images").to_pylist():
                used.update(Path(image["image"]).name for image in images)
    for file in (out / IMAGES).iterdir():
        if file.name not in used:
            file.unlink()


def convert(
    source: str,
    in_path: str | Path,
    out_dir: str | Path,
    split: str = "train",
    overwrite: bool = False,
    tool_names: Sequence[str] = ("image_zoom_in_tool",),
    data_source: str = "custom",
    progress: bool = False,
) -> ConvertResult:
    """Convert ``in_path`` (read as ``source``, a :data:`READERS` name) into ``out_dir`` (module docstring).

    ``data_source`` names ``jsonl`` rows that do not name theirs; ``tool_names`` are the registered tools the
    prompt lists; ``progress`` shows a tqdm bar. Re-running replaces the split; ``out_dir`` holding another
    source's conversion raises ``FileExistsError`` unless ``overwrite``.
    """
    reader = READERS.get(source)
    in_path, out = Path(in_path).resolve(), Path(out_dir).resolve()
    if not in_path.exists():
        raise FileNotFoundError(f"--in {in_path} does not exist")
    if not split or "/" in split or split.startswith("."):
        raise ValueError(f"--split must be a plain file name like 'train', got {split!r}")
    tools = [get_tool(name) for name in tool_names]
    out.mkdir(parents=True, exist_ok=True)
    manifest = _prepare(out, source, split, overwrite)
    source_rows = reader(in_path, data_source)
    store = ImageStore(out / IMAGES)
    rows: list[dict[str, Any]] = []
    rejected: list[Rejection] = []
    bar = tqdm(source_rows.rows, total=source_rows.total, desc=f"convert {source}", unit="row", disable=not progress)
    for record in bar:
        if isinstance(record, Rejection):
            rejected.append(record)
            continue
        try:
            row = to_row(record, store, len(rows), split, source, tools)
            validate_row(row)
        except BadRow as exc:
            rejected.append(Rejection(record.source_id, record.data_source, exc.field, exc.reason))
            continue
        except ValueError as exc:  # validate_row: "<dotted.path>: <reason>"
            where, _, reason = str(exc).partition(": ")
            rejected.append(Rejection(record.source_id, record.data_source, where, reason))
            continue
        rows.append(row)
    parquet = out / f"{split}.parquet"
    tmp = parquet.with_name(parquet.name + ".tmp")
    write_parquet(rows, tmp)
    os.replace(tmp, parquet)
    _write_rejected(out / REJECTED, split, source, rejected)
    kept = Counter(row["data_source"] for row in rows)
    result = ConvertResult(
        source, split, parquet, out / REJECTED, kept, rejected, len({r["images"][0]["image"] for r in rows})
    )
    manifest["splits"][split] = {
        "input": str(in_path),
        "kept": len(rows),
        "rejected": len(rejected),
        "kept_by_data_source": dict(sorted(kept.items())),
        "rejected_by_data_source": dict(sorted(result.rejected_by_source().items())),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    _collect_garbage(out, list(manifest["splits"]))
    return result


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", required=True, choices=list(READERS), help="what --in holds")
    parser.add_argument("--in", dest="in_path", required=True, type=Path, help="source file or folder")
    parser.add_argument("--out", required=True, type=Path, help="output folder (<split>.parquet, images/, ...)")
    parser.add_argument("--split", default="train", help="split name: file name and extra_info.split")
    parser.add_argument("--overwrite", action="store_true", help="replace another source's conversion in --out")
    parser.add_argument("--data-source", default="custom", help="data_source of jsonl rows that name none")
    parser.add_argument(
        "--tools", default="image_zoom_in_tool", help="comma-separated registered tool names for the prompt"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        result = convert(
            args.source,
            args.in_path,
            args.out,
            split=args.split,
            overwrite=args.overwrite,
            tool_names=tuple(t for t in args.tools.split(",") if t),
            data_source=args.data_source,
            progress=not args.no_progress,
        )
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        sys.exit(f"error: {exc}")
    print(result.summary())
    if not sum(result.kept.values()):
        sys.exit(f"error: no row of {args.in_path} could be converted; see {result.rejected_file}")


if __name__ == "__main__":
    main()
