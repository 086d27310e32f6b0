"""Dataset rows in verl's RLHF parquet schema, their validation, and the typed :class:`Item` view.

A row::

    {"data_source": "visionleaf/synthetic",
     "prompt": [{"role": "system", "content": ...}, {"role": "user", "content": "<image>\\n..."}],
     "images": [{"image": "/abs/path.png"}],
     "ability": "visual_search",
     "reward_model": {"style": "rule", "ground_truth": "B"},
     "extra_info": {"index": 0, "split": "train", "question": ..., "options": ["red", "blue"],
                    "gt_boxes": [[x1, y1, x2, y2], ...], "original_image": "/abs/path.png",
                    "original_size": [w, h], "category": "attribute/color"}}

``gt_boxes`` are in original-image pixels (x2, y2 exclusive), smallest first, each containing the
previous one. Lists read back from parquet may be numpy arrays; everything here accepts both.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from visionleaf.boxes import Box
from visionleaf.protocol import IMAGE_PLACEHOLDER

ROLES = frozenset({"system", "user", "assistant", "tool"})
OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

ROW_ARROW_SCHEMA = pa.schema(
    [
        ("data_source", pa.string()),
        ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("images", pa.list_(pa.struct([("image", pa.string())]))),
        ("ability", pa.string()),
        ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.string())])),
        (
            "extra_info",
            pa.struct(
                [
                    ("index", pa.int64()),
                    ("split", pa.string()),
                    ("question", pa.string()),
                    ("options", pa.list_(pa.string())),
                    ("gt_boxes", pa.list_(pa.list_(pa.float64()))),
                    ("original_image", pa.string()),
                    ("original_size", pa.list_(pa.int64())),
                    ("category", pa.string()),
                ]
            ),
        ),
    ]
)
"""Arrow types of the row fields visionleaf defines (:func:`row_arrow_schema` adds a row's extra keys)."""


def multiple_choice_text(question: str, options: Sequence[str]) -> str:
    """``question`` followed by ``(A) ...`` lines and the instruction to answer with the letter."""
    if not options:
        return question
    lines = [f"({OPTION_LETTERS[i]}) {option}" for i, option in enumerate(options)]
    return "\n".join([question, *lines, "Answer with the option's letter."])


class _BadField(ValueError):
    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")


def _is_seq(value: Any) -> bool:
    return isinstance(value, (list, tuple, np.ndarray)) and not (isinstance(value, np.ndarray) and value.ndim == 0)


def _field(row: Mapping[str, Any], key: str, path: str) -> Any:
    if not isinstance(row, Mapping):
        raise _BadField(path or "row", f"expected a mapping, got {type(row).__name__}")
    if key not in row or row[key] is None:
        raise _BadField(f"{path}.{key}" if path else key, "missing")
    return row[key]


def _str(row: Mapping[str, Any], key: str, path: str = "", allow_empty: bool = False) -> str:
    value = _field(row, key, path)
    where = f"{path}.{key}" if path else key
    if not isinstance(value, str):
        raise _BadField(where, f"expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise _BadField(where, "empty string")
    return value


def _seq(row: Mapping[str, Any], key: str, path: str = "") -> Sequence[Any]:
    value = _field(row, key, path)
    if not _is_seq(value):
        raise _BadField(f"{path}.{key}" if path else key, f"expected a list, got {type(value).__name__}")
    return list(value)


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise _BadField(where, f"expected a number, got {type(value).__name__}")
    if not math.isfinite(float(value)):
        raise _BadField(where, f"non-finite number {value}")
    return float(value)


def _prompt(row: Mapping[str, Any]) -> list[dict[str, str]]:
    messages = _seq(row, "prompt")
    if not messages:
        raise _BadField("prompt", "no messages")
    out = []
    for i, message in enumerate(messages):
        role = _str(message, "role", f"prompt[{i}]")
        if role not in ROLES:
            raise _BadField(f"prompt[{i}].role", f"unknown role {role!r}; expected one of {sorted(ROLES)}")
        out.append({"role": role, "content": _str(message, "content", f"prompt[{i}]")})
    return out


def _boxes(extra: Mapping[str, Any], size: tuple[int, int]) -> list[Box]:
    width, height = size
    boxes: list[Box] = []
    for i, raw in enumerate(_seq(extra, "gt_boxes", "extra_info")):
        where = f"extra_info.gt_boxes[{i}]"
        if not _is_seq(raw) or len(raw) != 4:
            raise _BadField(where, f"expected [x1, y1, x2, y2], got {raw!r}")
        x1, y1, x2, y2 = (_number(v, f"{where}[{j}]") for j, v in enumerate(raw))
        if x1 >= x2:
            raise _BadField(where, f"x1 >= x2 ({x1} >= {x2})")
        if y1 >= y2:
            raise _BadField(where, f"y1 >= y2 ({y1} >= {y2})")
        if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
            raise _BadField(where, f"box {[x1, y1, x2, y2]} outside original_size {width}x{height}")
        if boxes:
            px1, py1, px2, py2 = boxes[-1]
            if not (x1 <= px1 and y1 <= py1 and x2 >= px2 and y2 >= py2):
                raise _BadField(where, f"box does not contain gt_boxes[{i - 1}] (boxes go smallest first, nested)")
        boxes.append((x1, y1, x2, y2))
    return boxes


def _size(extra: Mapping[str, Any]) -> tuple[int, int]:
    raw = _seq(extra, "original_size", "extra_info")
    if len(raw) != 2:
        raise _BadField("extra_info.original_size", f"expected [width, height], got {raw!r}")
    for j, v in enumerate(raw):
        if isinstance(v, bool) or not isinstance(v, Integral) or v <= 0:
            raise _BadField(f"extra_info.original_size[{j}]", f"expected a positive integer, got {v!r}")
    return int(raw[0]), int(raw[1])


def _options(extra: Mapping[str, Any]) -> list[str]:
    options = _seq(extra, "options", "extra_info")
    if len(options) > len(OPTION_LETTERS):
        raise _BadField("extra_info.options", f"{len(options)} options, at most {len(OPTION_LETTERS)}")
    for j, option in enumerate(options):
        if not isinstance(option, str) or not option.strip():
            raise _BadField(f"extra_info.options[{j}]", f"expected a non-empty string, got {option!r}")
    return [str(o) for o in options]


def _parse(row: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Check ``row`` in field order; return the :class:`Item` fields but ``image``, and the image paths.

    Raises ``_BadField`` at the first fault.
    """
    if not isinstance(row, Mapping):
        raise _BadField("row", f"expected a mapping, got {type(row).__name__}")
    data_source = _str(row, "data_source")
    messages = _prompt(row)
    images = _seq(row, "images")
    if not images:
        raise _BadField("images", "no images")
    paths = [_str(image, "image", f"images[{i}]") for i, image in enumerate(images)]
    placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
    if placeholders != len(paths):
        raise _BadField("prompt", f"{placeholders} {IMAGE_PLACEHOLDER} placeholders but {len(paths)} images")
    ability = _str(row, "ability")
    reward = _field(row, "reward_model", "")
    style = _str(reward, "style", "reward_model")
    if style != "rule":
        raise _BadField("reward_model.style", f"expected 'rule', got {style!r}")
    ground_truth = _str(reward, "ground_truth", "reward_model")
    extra = _field(row, "extra_info", "")
    index = _field(extra, "index", "extra_info")
    if isinstance(index, bool) or not isinstance(index, Integral) or index < 0:
        raise _BadField("extra_info.index", f"expected a non-negative integer, got {index!r}")
    split = _str(extra, "split", "extra_info")
    question = _str(extra, "question", "extra_info")
    options = _options(extra)
    if options and ground_truth not in OPTION_LETTERS[: len(options)]:
        raise _BadField(
            "reward_model.ground_truth",
            f"{ground_truth!r} is not an option letter; with {len(options)} options it must be one of "
            f"{list(OPTION_LETTERS[: len(options)])}",
        )
    original_image = _str(extra, "original_image", "extra_info")
    size = _size(extra)
    boxes = _boxes(extra, size)
    category = _str(extra, "category", "extra_info")
    fields = dict(
        data_source=data_source,
        messages=tuple(messages),
        ground_truth=ground_truth,
        options=tuple(options),
        gt_boxes=tuple(boxes),
        original_image=original_image,
        original_size=size,
        question=question,
        category=category,
        index=int(index),
        split=split,
        ability=ability,
    )
    return fields, paths


def validate_row(row: Mapping[str, Any]) -> None:
    """Raise ``ValueError("<dotted.path>: <reason>")`` for the first bad field of ``row``.

    Fields are checked in schema order (data_source, prompt, images, ability, reward_model,
    extra_info); extra keys are allowed.
    """
    _parse(row)


@dataclass(frozen=True)
class Item:
    """One validated dataset item (a row of the verl RLHF parquet, typed)."""

    data_source: str
    """Dataset name, e.g. ``visionleaf/synthetic``; selects the reward function in verl."""
    messages: tuple[dict[str, str], ...]
    """Chat messages (role, content); the user turn holds one ``<image>`` placeholder."""
    image: str
    """Path of the global view shown to the model (may be a downsampled copy of the original)."""
    ground_truth: str
    """Correct answer: the option letter for multiple choice, else the free-form answer."""
    options: tuple[str, ...]
    """Multiple-choice options in the order shown (A, B, ...); empty for free-form questions."""
    gt_boxes: tuple[Box, ...]
    """Hierarchical ground-truth boxes in original-image pixels, smallest first, each in the next."""
    original_image: str
    """Path of the full-resolution original; crops are cut from it."""
    original_size: tuple[int, int]
    """(width, height) of the original image in pixels."""
    question: str
    """Question text as shown to the model (with the options listed, for multiple choice)."""
    category: str
    """Question type, e.g. ``attribute/color`` or ``position/relative``."""
    index: int
    """Position of the item in its split."""
    split: str
    """Split name, e.g. ``train`` or ``test``."""
    ability: str = "visual_search"
    """verl's ``ability`` column (a free tag)."""

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Item:
        """Validate ``row`` (lists may be numpy arrays, as pandas reads parquet) and build the item.

        The row must hold exactly one image (the global view).
        """
        fields, paths = _parse(row)
        if len(paths) != 1:
            raise ValueError(f"images: an Item holds exactly one global view, got {len(paths)} images")
        return cls(image=paths[0], **fields)

    def to_row(self) -> dict[str, Any]:
        """The verl RLHF parquet row of this item (plain Python lists and dicts)."""
        return {
            "data_source": self.data_source,
            "prompt": [dict(m) for m in self.messages],
            "images": [{"image": self.image}],
            "ability": self.ability,
            "reward_model": {"style": "rule", "ground_truth": self.ground_truth},
            "extra_info": {
                "index": self.index,
                "split": self.split,
                "question": self.question,
                "options": list(self.options),
                "gt_boxes": [list(box) for box in self.gt_boxes],
                "original_image": self.original_image,
                "original_size": list(self.original_size),
                "category": self.category,
            },
        }


def _holds_empty_struct(kind: pa.DataType) -> bool:
    """True when ``kind`` is or contains a struct without fields, which parquet cannot store."""
    if pa.types.is_struct(kind):
        return kind.num_fields == 0 or any(_holds_empty_struct(kind.field(i).type) for i in range(kind.num_fields))
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        return _holds_empty_struct(kind.value_type)
    return False


def _extra_fields(mappings: Sequence[Mapping[str, Any]], known: Sequence[str], where: str) -> list[pa.Field]:
    """Arrow fields for the keys of ``mappings`` not in ``known``, in first-seen order, types inferred from
    the values of all rows (a row without the key reads back as None)."""
    fields = []
    for key in dict.fromkeys(k for m in mappings for k in m if k not in known):
        name = f"{where}{key}"
        try:
            kind = pa.array([m.get(key) for m in mappings]).type
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise ValueError(
                f"{name}: rows disagree on the value type, one parquet column cannot hold both: {exc}"
            ) from exc
        if _holds_empty_struct(kind):
            raise ValueError(
                f"{name}: parquet cannot store an empty mapping; drop the key or give the mapping an entry"
            )
        fields.append(pa.field(key, kind))
    return fields


def row_arrow_schema(rows: Sequence[Mapping[str, Any]]) -> pa.Schema:
    """:data:`ROW_ARROW_SCHEMA` plus the extra keys of ``rows`` (top level and in ``extra_info``), e.g.
    verl's ``agent_name`` and ``extra_info.tools_kwargs``; raises ``ValueError`` naming a key parquet cannot hold."""
    info = ROW_ARROW_SCHEMA.field("extra_info").type
    known_info = [info.field(i) for i in range(info.num_fields)]
    info_extra = _extra_fields([row["extra_info"] for row in rows], [f.name for f in known_info], "extra_info.")
    fields = [
        pa.field("extra_info", pa.struct(known_info + info_extra)) if field.name == "extra_info" else field
        for field in ROW_ARROW_SCHEMA
    ]
    return pa.schema(fields + _extra_fields(rows, ROW_ARROW_SCHEMA.names, ""))


def write_parquet(rows: Sequence[Mapping[str, Any]], path: str | Path) -> None:
    """Validate every row and write them to ``path`` with :func:`row_arrow_schema` (deterministic bytes).

    Extra keys are kept with types inferred from their values."""
    for i, row in enumerate(rows):
        try:
            validate_row(row)
        except ValueError as exc:
            raise ValueError(f"row {i}: {exc}") from exc
    table = pa.Table.from_pylist([dict(row) for row in rows], schema=row_arrow_schema(rows))
    pq.write_table(table, path)
