"""The data tools' shared pieces: the forced GT-crop observation, answer comparison, input reading."""

import json

import pytest

from tests.conftest import noise_image
from visionleaf.data.runs import RecordLog, canonical_answer, direct_prefix, gt_crop_prefix, read_rows
from visionleaf.protocol import build_messages
from visionleaf.tools import get_tool


def test_gt_crop_prefix_holds_the_zoom_call_and_the_crop(bpe_processor):
    original = noise_image(2000, 1500, seed=1)
    messages = build_messages("What is it?", [get_tool("image_zoom_in_tool")])
    box = (1000.0, 700.0, 1003.0, 702.0)  # smaller than one pixel of the model's view
    prefix = gt_crop_prefix(bpe_processor, messages, original, original, box, "r")
    assert len(prefix.images) == 2 and len(prefix.image_keys) == 2 and prefix.route == "r"
    text = bpe_processor.tokenizer.decode(prefix.token_ids, skip_special_tokens=False)
    call = text.split("<tool_call>\n")[1].split("\n</tool_call>")[0]
    x1, y1, x2, y2 = json.loads(call)["arguments"]["bbox_2d"]
    assert x1 < x2 and y1 < y2
    assert text.endswith("</tool_response><|im_end|>\n<|im_start|>assistant\n")
    plain = direct_prefix(bpe_processor, "What is it?", original, "r")
    plain_text = bpe_processor.tokenizer.decode(plain.token_ids, skip_special_tokens=False)
    assert len(plain.images) == 1 and "<tools>" not in plain_text and "tool_call" not in plain_text
    assert plain_text.endswith("<answer></answer>.<|im_end|>\n<|im_start|>assistant\n")


def test_canonical_answer():
    assert canonical_answer("(b)", ["red", "blue"]) == "B"
    assert canonical_answer("blue", ["red", "blue"]) == "B"
    assert canonical_answer("The Cat.", []) == canonical_answer("cat", [])
    assert canonical_answer(None, ["red"]) is None


def test_read_rows_and_the_record_log(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"x": 1}\n{"x": 2}\n')
    rows = read_rows(tmp_path / "a.jsonl")
    assert [(r.uid, r.file, r.row) for r in rows] == [
        ("a.jsonl:0", "a.jsonl", {"x": 1}),
        ("a.jsonl:1", "a.jsonl", {"x": 2}),
    ]
    with pytest.raises(ValueError, match=r"no \*\.parquet"):
        read_rows(tmp_path)  # a folder without parquet files
    log = RecordLog(tmp_path / "out", {"n": 1})
    log.write({"uid": "a", "stage": "s", "v": 1})
    log.close()
    assert RecordLog(tmp_path / "out", {"n": 1}).get("a", "s") == {"uid": "a", "stage": "s", "v": 1}
    with pytest.raises(ValueError, match="different settings"):
        RecordLog(tmp_path / "out", {"n": 2})
