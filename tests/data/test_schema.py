from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from visionleaf.data.schema import Item, multiple_choice_text, validate_row, write_parquet

_MISSING = object()


def good_row() -> dict[str, Any]:
    return {
        "data_source": "visionleaf/synthetic",
        "prompt": [
            {"role": "system", "content": "You are a careful visual assistant."},
            {"role": "user", "content": "<image>\nWhat colour is the cup?\n(A) red\n(B) blue"},
        ],
        "images": [{"image": "/data/img.png"}],
        "ability": "visual_search",
        "reward_model": {"style": "rule", "ground_truth": "B"},
        "extra_info": {
            "index": 3,
            "split": "train",
            "question": "What colour is the cup?\n(A) red\n(B) blue",
            "options": ["red", "blue"],
            "gt_boxes": [[10, 20, 30, 40], [5.0, 10.0, 60.0, 80.0], [0, 0, 100, 90]],
            "original_image": "/data/img.png",
            "original_size": [100, 90],
            "category": "attribute/color",
        },
    }


def _set(row: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """Copy of ``row`` with the dotted ``path`` (``a.b.0``) set to ``value`` (or deleted for _MISSING)."""
    row = copy.deepcopy(row)
    *parents, last = path.split(".")
    node: Any = row
    for key in parents:
        node = node[int(key)] if key.isdigit() else node[key]
    key_or_index: Any = int(last) if last.isdigit() else last
    if value is _MISSING:
        del node[key_or_index]
    else:
        node[key_or_index] = value
    return row


# (dotted path to change, new value, expected start of the error message)
BAD_ROWS = [
    ("data_source", _MISSING, "data_source: missing"),
    ("data_source", "", "data_source: empty string"),
    ("data_source", 7, "data_source: expected a string, got int"),
    ("prompt", "hello", "prompt: expected a list, got str"),
    ("prompt", [], "prompt: no messages"),
    ("prompt.1.role", "robot", "prompt[1].role: unknown role 'robot'"),
    ("prompt.1", "just text", "prompt[1]: expected a mapping"),
    ("prompt.0.content", _MISSING, "prompt[0].content: missing"),
    # two placeholders, one image
    ("prompt.1.content", "<image><image> what?", "prompt: 2 <image> placeholders but 1 images"),
    ("prompt.1.content", "no placeholder", "prompt: 0 <image> placeholders but 1 images"),
    ("images", [], "images: no images"),
    ("images.0.image", None, "images[0].image: missing"),
    ("ability", _MISSING, "ability: missing"),
    ("reward_model", _MISSING, "reward_model: missing"),
    ("reward_model.style", "model", "reward_model.style: expected 'rule'"),
    ("reward_model.ground_truth", _MISSING, "reward_model.ground_truth: missing"),
    # a letter beyond the two options
    ("reward_model.ground_truth", "C", "reward_model.ground_truth: 'C' is not an option letter"),
    ("extra_info", "{}", "extra_info: expected a mapping"),
    ("extra_info.index", -1, "extra_info.index: expected a non-negative integer"),
    ("extra_info.index", True, "extra_info.index: expected a non-negative integer"),
    ("extra_info.index", 1.0, "extra_info.index: expected a non-negative integer"),
    ("extra_info.split", _MISSING, "extra_info.split: missing"),
    ("extra_info.question", "  ", "extra_info.question: empty string"),
    ("extra_info.options", "red,blue", "extra_info.options: expected a list"),
    ("extra_info.options.1", "", "extra_info.options[1]: expected a non-empty string"),
    ("extra_info.original_image", _MISSING, "extra_info.original_image: missing"),
    ("extra_info.original_size", [100], "extra_info.original_size: expected [width, height]"),
    ("extra_info.original_size", [100, 0], "extra_info.original_size[1]: expected a positive integer"),
    ("extra_info.original_size", [100.5, 90], "extra_info.original_size[0]: expected a positive integer"),
    ("extra_info.gt_boxes", None, "extra_info.gt_boxes: missing"),
    ("extra_info.gt_boxes.0", [1, 2, 3], "extra_info.gt_boxes[0]: expected [x1, y1, x2, y2]"),
    ("extra_info.gt_boxes.0", [30, 20, 30, 40], "extra_info.gt_boxes[0]: x1 >= x2"),
    ("extra_info.gt_boxes.0", [10, 50, 30, 40], "extra_info.gt_boxes[0]: y1 >= y2"),
    ("extra_info.gt_boxes.0", [10, math.nan, 30, 40], "extra_info.gt_boxes[0][1]: non-finite number nan"),
    ("extra_info.gt_boxes.0", [10, 20, math.inf, 40], "extra_info.gt_boxes[0][2]: non-finite number inf"),
    ("extra_info.gt_boxes.0", [10, "20", 30, 40], "extra_info.gt_boxes[0][1]: expected a number, got str"),
    # the largest box pokes out of the 100 x 90 image
    ("extra_info.gt_boxes.2", [0, 0, 100, 91], "extra_info.gt_boxes[2]: box [0.0, 0.0, 100.0, 91.0] outside"),
    (
        "extra_info.gt_boxes.0",
        [-1, 20, 30, 40],
        "extra_info.gt_boxes[0]: box [-1.0, 20.0, 30.0, 40.0] outside",
    ),
    # the middle box is smaller than the first: hierarchy broken
    ("extra_info.gt_boxes.1", [12, 22, 28, 38], "extra_info.gt_boxes[1]: box does not contain gt_boxes[0]"),
    ("extra_info.category", _MISSING, "extra_info.category: missing"),
]


@pytest.mark.parametrize(("path", "value", "expected"), BAD_ROWS)
def test_bad_row_names_first_bad_field(path: str, value: Any, expected: str) -> None:
    with pytest.raises(ValueError) as info:
        validate_row(_set(good_row(), path, value))
    assert str(info.value).startswith(expected), str(info.value)


def test_first_bad_field_wins() -> None:
    row = _set(_set(good_row(), "extra_info.category", _MISSING), "reward_model.ground_truth", _MISSING)
    with pytest.raises(ValueError, match=r"^reward_model\.ground_truth: missing"):
        validate_row(row)


def test_not_a_mapping() -> None:
    with pytest.raises(ValueError, match=r"^row: expected a mapping, got list"):
        validate_row([1, 2])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("extra_info.gt_boxes", []),  # no boxes: fine
        ("extra_info.options", []),  # free-form: any ground truth
        ("reward_model.ground_truth", "A"),
        ("extra_info.tools_kwargs", {"x": 1}),  # extra keys are allowed (verl adds its own)
        ("extra_info.gt_boxes.0", [5.0, 10.0, 60.0, 80.0]),  # equal to the next box: still contained
    ],
)
def test_good_rows_pass(path: str, value: Any) -> None:
    validate_row(good_row())
    validate_row(_set(good_row(), path, value))


def test_free_form_ground_truth_needs_no_letter() -> None:
    row = _set(_set(good_row(), "extra_info.options", []), "reward_model.ground_truth", "a red cup")
    assert Item.from_row(row).ground_truth == "a red cup"


def test_item_round_trip() -> None:
    item = Item.from_row(good_row())
    assert item.image == "/data/img.png"
    assert item.options == ("red", "blue")
    assert item.gt_boxes == ((10.0, 20.0, 30.0, 40.0), (5.0, 10.0, 60.0, 80.0), (0.0, 0.0, 100.0, 90.0))
    assert item.original_size == (100, 90)
    assert item.index == 3 and item.split == "train" and item.category == "attribute/color"
    assert Item.from_row(item.to_row()) == item
    assert item.to_row() == good_row()  # ints in boxes compare equal to the floats they became


def test_item_needs_exactly_one_image() -> None:
    row = _set(good_row(), "images", [{"image": "/a.png"}, {"image": "/b.png"}])
    row = _set(row, "prompt.1.content", "<image><image> which?")
    validate_row(row)  # two images are a valid row ...
    with pytest.raises(ValueError, match=r"^images: an Item holds exactly one global view, got 2"):
        Item.from_row(row)  # ... but not an Item


def test_parquet_round_trip(tmp_path: Path) -> None:
    free_form = _set(_set(good_row(), "extra_info.options", []), "reward_model.ground_truth", "cup")
    rows = [good_row(), _set(free_form, "extra_info.gt_boxes", [])]
    path = tmp_path / "train.parquet"
    write_parquet(rows, path)
    expected = [Item.from_row(row) for row in rows]

    pandas_rows = pd.read_parquet(path).to_dict("records")  # lists come back as numpy arrays
    assert isinstance(pandas_rows[0]["prompt"], np.ndarray)
    assert [Item.from_row(row) for row in pandas_rows] == expected

    arrow_rows = pq.read_table(path).to_pylist()  # lists come back as lists (what HF datasets gives)
    assert [Item.from_row(row) for row in arrow_rows] == expected
    assert arrow_rows[0] == expected[0].to_row()


def test_parquet_keeps_extra_keys(tmp_path: Path) -> None:
    # verl's agent loop reads a top-level agent_name and extra_info.tools_kwargs / need_tools_kwargs
    tools_kwargs = {"image_zoom_in_tool": {"create_kwargs": {"image": "/data/img.png"}}}
    first = _set(good_row(), "agent_name", "tool_agent")
    first = _set(first, "extra_info.tools_kwargs", tools_kwargs)
    first = _set(first, "extra_info.need_tools_kwargs", True)
    first = _set(first, "weight", 0.5)
    second = _set(good_row(), "agent_name", "visionleaf_tree")  # no tools_kwargs, no weight
    path = tmp_path / "train.parquet"
    write_parquet([first, second], path)

    back = pq.read_table(path).to_pylist()
    assert back[0] == first
    assert back[1]["agent_name"] == "visionleaf_tree"
    assert back[1]["weight"] is None and back[1]["extra_info"]["tools_kwargs"] is None
    assert Item.from_row(back[1]) == Item.from_row(second)
    assert list(pq.read_schema(path).names) == [*good_row(), "agent_name", "weight"]  # schema order, then first seen


def test_parquet_extra_keys_are_deterministic(tmp_path: Path) -> None:
    rows = [_set(_set(good_row(), "extra_info.tag", "a"), "agent_name", "tool_agent")]
    write_parquet(rows, tmp_path / "a.parquet")
    write_parquet(rows, tmp_path / "b.parquet")
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()


@pytest.mark.parametrize(
    ("key", "values", "expected"),
    [
        ("agent_name", ["tool_agent", 3], r"^agent_name: rows disagree on the value type"),
        ("extra_info.tag", [1, "one"], r"^extra_info\.tag: rows disagree on the value type"),
        ("agent_name", [{}, {}], r"^agent_name: parquet cannot store an empty mapping"),
    ],
)
def test_parquet_extra_key_errors_name_the_key(tmp_path: Path, key: str, values: list[Any], expected: str) -> None:
    rows = [_set(good_row(), key, value) for value in values]
    with pytest.raises(ValueError, match=expected):
        write_parquet(rows, tmp_path / "x.parquet")
    assert not (tmp_path / "x.parquet").exists()


def test_write_parquet_refuses_bad_row(tmp_path: Path) -> None:
    bad = _set(good_row(), "extra_info.gt_boxes.0", [30, 20, 30, 40])
    with pytest.raises(ValueError, match=r"^row 1: extra_info\.gt_boxes\[0\]: x1 >= x2"):
        write_parquet([good_row(), bad], tmp_path / "x.parquet")
    assert not (tmp_path / "x.parquet").exists()


def test_multiple_choice_text() -> None:
    assert multiple_choice_text("Colour?", ["red", "blue"]) == (
        "Colour?\n(A) red\n(B) blue\nAnswer with the option's letter."
    )
    assert multiple_choice_text("Colour?", []) == "Colour?"
