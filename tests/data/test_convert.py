import json

import pyarrow.parquet as pq
import pytest

from tests.data.fixtures import deepeyes_row, write_deepeyes_parquet
from tests.eval.fixtures import HR_COLUMNS, b64, hrbench_rows, png_bytes, two_squares, write_tsv, write_vstar_release
from visionleaf.data import Item
from visionleaf.data.benchmarks import BadRow
from visionleaf.data.convert import (
    answer_letter,
    box_hierarchy,
    convert,
    main,
    normalize_options,
    split_options,
)


def _rows(path):
    return pq.read_table(path).to_pylist()


def _rejected(out):
    return [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]


def _why(out):
    return [(r["data_source"], r["id"], r["field"]) for r in _rejected(out)]


# normalisation ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ([" red ", "blue"], ("red", "blue")),
        (["(A) red", "(B) blue"], ("red", "blue")),  # prefixes naming their own letter go
        (["A. 3", "B: 4"], ("3", "4")),
        (["(B) red", "blue"], ("(B) red", "blue")),  # a prefix naming another letter is text
    ],
)
def test_normalize_options(options, expected):
    assert normalize_options(options) == expected


@pytest.mark.parametrize(
    ("options", "field", "reason"),
    [
        (["only"], "options", "at least 2"),
        (["red", " Red "], "options[1]", "repeats option A"),
        (["red", "  "], "options[1]", "empty"),
        (["red", 3], "options[1]", "expected a string"),
    ],
)
def test_normalize_options_rejects(options, field, reason):
    with pytest.raises(BadRow, match=reason) as info:
        normalize_options(options)
    assert info.value.field == field


@pytest.mark.parametrize(
    ("answer", "options", "letter"),
    [
        ("B", ("red", "blue"), "B"),
        ("(b)", ("red", "blue"), "B"),
        ("B.", ("red", "blue"), "B"),
        ("Blue", ("red", "blue"), "B"),  # the option's text, any case
        ("A", ("A", "B"), "A"),  # letter and text agree
    ],
)
def test_answer_letter(answer, options, letter):
    assert answer_letter(answer, options) == letter


@pytest.mark.parametrize(
    ("answer", "options", "reason"),
    [
        ("C", ("red", "blue"), "neither an option letter"),
        ("green", ("red", "blue"), "neither an option letter"),
        ("A", ("B", "A"), "option letter A and the text of option B"),
        (" ", ("red", "blue"), "non-empty"),
    ],
)
def test_answer_letter_rejects(answer, options, reason):
    with pytest.raises(BadRow, match=reason):
        answer_letter(answer, options)


def test_split_options():
    assert split_options("How many?\nChoices:\n(A) 3\n(B) 4") == ("How many?", ("3", "4"))
    assert split_options("Which?\nA. cat\nB. dog\nC. cow") == ("Which?", ("cat", "dog", "cow"))
    assert split_options("Which?\n(B) cat\n(C) dog") == ("Which?\n(B) cat\n(C) dog", ())  # not from A
    assert split_options("What colour is the car?") == ("What colour is the car?", ())
    assert split_options("(A) x\n(B) y") == ("(A) x\n(B) y", ())  # options without a question


def test_box_hierarchy():
    # tight box, then 2x and 4x around its centre, clamped to the 640x400 image; duplicates dropped
    assert box_hierarchy([(100, 100, 160, 160)], (640, 400)) == [
        (100.0, 100.0, 160.0, 160.0),
        (70.0, 70.0, 190.0, 190.0),
        (10.0, 10.0, 250.0, 250.0),
    ]
    assert box_hierarchy([(100, 100, 160, 160), (420, 240, 480, 300)], (640, 400)) == [
        (100.0, 100.0, 480.0, 300.0),
        (0.0, 0.0, 640.0, 400.0),
    ]
    assert box_hierarchy([(600, 380, 650, 410)], (640, 400))[0] == (600.0, 380.0, 640.0, 400.0)  # overshoot clamped
    with pytest.raises(BadRow, match="mostly outside"):
        box_hierarchy([(600, 380, 900, 700)], (640, 400))
    with pytest.raises(BadRow, match="normalised"):
        box_hierarchy([(0.1, 0.1, 0.2, 0.3)], (640, 400))
    with pytest.raises(BadRow, match="x1 < x2"):
        box_hierarchy([(10, 10, 5, 20)], (640, 400))


# sources --------------------------------------------------------------------------------------------------
def test_vstar_release(tmp_path):
    root = write_vstar_release(tmp_path / "vstar", n_attr=2, n_spatial=1)
    (root / "direct_attributes" / "sa_9.jpg").write_bytes(b"")  # image without its json
    (root / "direct_attributes" / "sa_8.jpg").write_bytes(b"not a jpeg")
    (root / "direct_attributes" / "sa_8.json").write_text(json.dumps({"question": "q?", "options": ["a", "b"]}))
    result = convert("vstar", root, tmp_path / "out")
    rows = _rows(tmp_path / "out" / "train.parquet")
    assert [r["extra_info"]["source_id"] for r in rows] == [
        "direct_attributes/sa_0",
        "direct_attributes/sa_1",
        "relative_position/sa_0",
    ]
    items = [Item.from_row(r) for r in rows]
    attr, spatial = items[0], items[2]
    assert attr.data_source == "vstar_bench" and attr.ground_truth == "A" and attr.options[0] == "red"
    assert attr.category == "Attribute" and spatial.category == "Spatial"
    assert attr.gt_boxes == ((100.0, 100.0, 160.0, 160.0), (70.0, 70.0, 190.0, 190.0), (10.0, 10.0, 250.0, 250.0))
    assert spatial.gt_boxes == ((100.0, 100.0, 480.0, 300.0), (0.0, 0.0, 640.0, 400.0))
    assert attr.original_size == (640, 400) and attr.original_image == attr.image
    assert "(A) red" in attr.question and attr.messages[1]["content"].startswith("<image>\nWhat is the color")
    assert [r["extra_info"]["index"] for r in rows] == [0, 1, 2]
    assert rows[0]["extra_info"]["answer"] == "red" and rows[0]["extra_info"]["subcategory"] == "direct_attributes"
    # the three jpgs hold the same bytes: one file, at full resolution, the original bytes
    images = list((tmp_path / "out" / "images").iterdir())
    assert len(images) == 1 and result.images == 1
    assert images[0].read_bytes() == (root / "direct_attributes" / "sa_0.jpg").read_bytes()
    assert _rejected(tmp_path / "out") == [
        {
            "split": "train",
            "source": "vstar",
            "data_source": "vstar_bench",
            "id": "direct_attributes/sa_9.jpg",
            "field": "json",
            "reason": "missing sa_9.json",
        },
        {
            "split": "train",
            "source": "vstar",
            "data_source": "vstar_bench",
            "id": "direct_attributes/sa_8",
            "field": "image",
            "reason": _rejected(tmp_path / "out")[1]["reason"],
        },
    ]
    assert "cannot read image" in _rejected(tmp_path / "out")[1]["reason"]
    assert result.kept == {"vstar_bench": 3} and len(result.rejected) == 2


def test_hrbench_both_resolutions(tmp_path):
    rows = hrbench_rows(2)
    rows.append({**rows[0], "index": "99", "category": "both"})
    write_tsv(tmp_path / "hr_bench_4k.tsv", rows, HR_COLUMNS)
    write_tsv(tmp_path / "hr_bench_8k.tsv", hrbench_rows(1), HR_COLUMNS)
    result = convert("hrbench", tmp_path, tmp_path / "out", split="val")
    out = _rows(tmp_path / "out" / "val.parquet")
    assert result.kept == {"hr_bench_4k": 8, "hr_bench_8k": 4}
    assert [r["extra_info"]["cycle"] for r in out[:4]] == ["cycle0", "cycle1", "cycle2", "cycle3"]
    assert all(r["extra_info"]["answer"] == "red" and r["extra_info"]["split"] == "val" for r in out)
    assert {r["extra_info"]["category"] for r in out} == {"FSP", "FCP"}
    assert all(r["extra_info"]["gt_boxes"] == [] for r in out)
    assert len(list((tmp_path / "out" / "images").iterdir())) == 1  # 12 rows, one image
    assert _why(tmp_path / "out") == [("hr_bench_4k", "8", "category")]
    assert _rejected(tmp_path / "out")[0]["split"] == "val"


def test_mme_realworld_lite_tsv(tmp_path):
    image = b64(two_squares(32, 24))
    options = str(["(A) red", "(B) blue", "(C) green", "(D) white", "(E) The image does not feature the color"])
    base = {"question": "Colour?", "category": "Perception/Remote Sensing", "l2-category": "color", "image": image}
    rows = [
        {**base, "index": "m1", "multi-choice options": options, "answer": "E"},
        {**base, "index": "m2", "multi-choice options": "['red', 'blue']", "answer": "A"},
        {**base, "index": "m3", "multi-choice options": str(["(A) red", "(B) Red"]), "answer": "A"},
    ]
    columns = ["index", "question", "multi-choice options", "answer", "category", "l2-category", "image"]
    write_tsv(tmp_path / "MME-RealWorld-Lite.tsv", rows, columns)
    result = convert("mme_rw", tmp_path / "MME-RealWorld-Lite.tsv", tmp_path / "out")
    (row,) = _rows(tmp_path / "out" / "train.parquet")
    assert row["data_source"] == "mme_realworld_lite" and row["reward_model"]["ground_truth"] == "E"
    assert row["extra_info"]["category"] == "Remote Sensing"
    assert row["extra_info"]["subcategory"] == "Perception/color"
    assert row["extra_info"]["answer"] == "The image does not feature the color"
    assert row["extra_info"]["original_size"] == [32, 24]
    assert _why(tmp_path / "out") == [
        ("mme_realworld_lite", "1", "multi-choice options[0]"),  # the loader's own check
        ("mme_realworld_lite", "m3", "options[1]"),  # normalisation: "Red" repeats "red"
    ]
    assert "repeats option A" in _rejected(tmp_path / "out")[1]["reason"]
    assert result.rejected_by_source() == {"mme_realworld_lite": 2}


def test_deepeyes_parquet(tmp_path):
    image, other = png_bytes(two_squares(64, 40)), png_bytes(two_squares(40, 64))
    rows = [
        deepeyes_row("vstar", "What is the colour of the left square?", "The square is red.", [image], 0),
        deepeyes_row("chart", "What is the value of the blue bar?", "42", [other], 1),
        deepeyes_row("thinklite_eureka", "How many squares?\nChoices:\n(A) 3\n(B) 2", "B", [image], 2),
        deepeyes_row("thinklite_eureka", "Pick one\n(A) 3\n(B) 2", "two", [image], 3, instruction=False),
        deepeyes_row("vstar", "Two images?", "no", [image, other], 4),
        deepeyes_row("vstar", "Empty truth?", " ", [image], 5),
        deepeyes_row("chart", "Broken image?", "1", [b"\x89PNG broken"], 6),
        {**deepeyes_row("vstar", "No source?", "x", [image], 7), "data_source": None},
    ]
    write_deepeyes_parquet(tmp_path / "data_0.1.2_visual_toolbox_v2.parquet", rows)
    result = convert("deepeyes", tmp_path, tmp_path / "out")
    out = _rows(tmp_path / "out" / "train.parquet")
    assert [r["data_source"] for r in out] == ["vstar", "chart", "thinklite_eureka", "thinklite_eureka"]
    free, chart, choice, unmatched = (Item.from_row(r) for r in out)
    # the question without <image> and DeepEyes' tool instruction; visionleaf's prompt adds its own
    assert free.question == "What is the colour of the left square?" and free.options == ()
    assert free.ground_truth == "The square is red." and free.category == "vstar"
    assert (
        "call **image_zoom_in_tool**" not in free.messages[1]["content"]
        and free.messages[1]["content"].count("<image>") == 1
    )
    assert chart.ground_truth == "42" and chart.original_size == (40, 64)
    assert choice.options == ("3", "2") and choice.ground_truth == "B"
    assert choice.question.startswith("How many squares?\n(A) 3\n(B) 2")
    assert unmatched.options == () and unmatched.question == "Pick one\n(A) 3\n(B) 2"  # answer in other words
    assert out[2]["ability"] == "math" and out[2]["extra_info"]["source_id"] == "data_0.1.2_visual_toolbox_v2.parquet:2"
    assert free.image == choice.image != chart.image  # one file per distinct image
    assert len(list((tmp_path / "out" / "images").iterdir())) == 2
    name = "data_0.1.2_visual_toolbox_v2.parquet"
    assert _why(tmp_path / "out") == [
        ("vstar", f"{name}:4", "images"),
        ("vstar", f"{name}:5", "reward_model.ground_truth"),
        ("chart", f"{name}:6", "image"),
        ("", f"{name}:7", "data_source"),
    ]
    assert "2 images" in _rejected(tmp_path / "out")[0]["reason"]
    assert result.kept == {"vstar": 1, "chart": 1, "thinklite_eureka": 2}


def _own_images(folder):
    (folder / "photos").mkdir(parents=True)
    two_squares().save(folder / "photos" / "a.png")
    two_squares(320, 200).save(folder / "photos" / "b.jpg")
    return folder


def test_jsonl_own_images(tmp_path):
    folder = _own_images(tmp_path / "mine")
    absolute = str(folder / "photos" / "b.jpg")
    lines = [
        {
            "image": "photos/a.png",
            "question": "Colour of the left square?",
            "options": ["blue", "red"],
            "answer": "red",
            "boxes": [[100, 100, 160, 160]],
            "category": "colour",
            "id": "q1",
        },
        {"image": absolute, "question": "What is drawn?", "answer": "two squares", "data_source": "shapes"},
        {"image": "photos/a.png", "question": "q", "answer": "B", "optoins": ["x", "y"]},
        {"image": "photos/missing.png", "question": "q", "answer": "yes"},
        {"image": "photos/a.png", "question": "q", "options": ["x", "y"], "answer": "z"},
        {"image": "photos/a.png", "question": "q", "answer": "a", "boxes": [[0.1, 0.1, 0.5, 0.5]]},
        {"image": "photos/a.png", "question": "q", "answer": "a", "boxes": [[10, 10, 20]]},
    ]
    text = "\n".join(json.dumps(line) for line in lines)
    (folder / "items.jsonl").write_text(text[: text.index("\n")] + "\n{not json\n\n" + text[text.index("\n") + 1 :])
    result = convert("jsonl", folder / "items.jsonl", tmp_path / "out", data_source="mine")
    mc, free = (Item.from_row(r) for r in _rows(tmp_path / "out" / "train.parquet"))
    assert (mc.data_source, mc.ground_truth, mc.options, mc.category) == ("mine", "B", ("blue", "red"), "colour")
    assert mc.gt_boxes[0] == (100.0, 100.0, 160.0, 160.0) and len(mc.gt_boxes) == 3
    assert (free.data_source, free.ground_truth, free.category, free.original_size) == (
        "shapes",
        "two squares",
        "shapes",
        (320, 200),
    )
    assert _why(tmp_path / "out") == [
        ("mine", "items.jsonl:2", "line"),
        ("mine", "items.jsonl:5", "optoins"),
        ("mine", "items.jsonl:6", "image"),
        ("mine", "items.jsonl:7", "answer"),
        ("mine", "items.jsonl:8", "boxes"),
        ("mine", "items.jsonl:9", "boxes[0]"),
    ]
    reasons = [r["reason"] for r in _rejected(tmp_path / "out")]
    assert reasons[0].startswith("not JSON") and "unknown key" in reasons[1] and "missing.png" in reasons[2]
    assert "normalised" in reasons[4]
    assert result.kept == {"mine": 1, "shapes": 1}


def test_rerun_replaces_cleanly_and_other_source_is_refused(tmp_path):
    folder = _own_images(tmp_path / "mine")
    line = {"image": "photos/a.png", "question": "q?", "answer": "yes"}
    (folder / "items.jsonl").write_text(json.dumps(line) + "\n")
    out = tmp_path / "out"
    convert("jsonl", folder, out)
    first = (out / "train.parquet").read_bytes()
    convert("jsonl", folder, out)
    assert (out / "train.parquet").read_bytes() == first  # same input, same bytes
    (folder / "items.jsonl").write_text(json.dumps({**line, "image": "photos/b.jpg"}) + "\n")
    convert("jsonl", folder, out)
    assert [p.suffix for p in (out / "images").iterdir()] == [".jpg"]  # a.png is no longer used: gone
    convert("jsonl", folder, out, split="val")  # another split of the same source adds to the folder
    assert json.loads((out / "convert.json").read_text())["splits"].keys() == {"train", "val"}

    vstar = write_vstar_release(tmp_path / "vstar", n_attr=1, n_spatial=0)
    with pytest.raises(FileExistsError, match=r"holds a conversion of 'jsonl'.*--overwrite"):
        convert("vstar", vstar, out)
    convert("vstar", vstar, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["convert.json", "images", "rejected.jsonl", "train.parquet"]
    assert [r["data_source"] for r in _rows(out / "train.parquet")] == ["vstar_bench"]

    foreign = tmp_path / "synthetic"
    (foreign / "images").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="files not written by the converter"):
        convert("vstar", vstar, foreign)


def test_cli_prints_counts_per_data_source(tmp_path, capsys):
    rows = hrbench_rows(1)
    rows.append({**rows[0], "index": "9", "answer": "Z"})
    write_tsv(tmp_path / "hr_bench_8k.tsv", rows, HR_COLUMNS)
    main(
        ["--from", "hrbench", "--in", str(tmp_path / "hr_bench_8k.tsv"), "--out", str(tmp_path / "o"), "--no-progress"]
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["hr_bench_8k", "4", "1"] and lines[2].split() == ["total", "4", "1"]
    with pytest.raises(SystemExit, match="holds a conversion of 'hrbench'"):
        main(["--from", "vstar", "--in", str(tmp_path), "--out", str(tmp_path / "o"), "--no-progress"])


def test_converted_rows_load_in_verls_dataset(tmp_path, bpe_processor):
    from omegaconf import OmegaConf

    from visionleaf.verl.dataset import PILImageDataset

    image = png_bytes(two_squares(64, 40))
    rows = [
        deepeyes_row("vstar", "Colour?", "red", [image], 0),
        deepeyes_row("thinklite_eureka", "How many?\n(A) 3\n(B) 2", "B", [image], 1),
    ]
    write_deepeyes_parquet(tmp_path / "d.parquet", rows)
    result = convert("deepeyes", tmp_path / "d.parquet", tmp_path / "out")
    config = OmegaConf.create(
        {"max_prompt_length": 8192, "filter_overlong_prompts": False, "cache_dir": str(tmp_path / "cache")}
    )
    data = PILImageDataset(str(result.parquet), bpe_processor.tokenizer, config, processor=bpe_processor)
    assert len(data) == 2
    for i in range(2):
        row = data[i]
        assert row["extra_info"]["original_image"].endswith(".png") and row["extra_info"]["source"] == "deepeyes"
    assert list(data[1]["extra_info"]["options"]) == ["3", "2"]
