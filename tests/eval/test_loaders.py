import json

import pyarrow.parquet as pq
import pytest

from tests.eval.fixtures import HR_COLUMNS, b64, hrbench_rows, two_squares, write_tsv, write_vstar_release
from visionleaf.data import generate
from visionleaf.data.synthetic import STRIPE_VIEW, generate_stripes
from visionleaf.eval.loaders import load_benchmark


def test_vstar_release_folders(tmp_path):
    root = write_vstar_release(tmp_path / "vstar", n_attr=2, n_spatial=1)
    (root / "direct_attributes" / "sa_9.jpg").write_bytes(b"")  # image without its json
    (root / "relative_position" / "sa_0.json").write_text(json.dumps({"question": "q", "options": ["only one"]}))
    loaded = load_benchmark("vstar", root)
    assert [it.qid for it in loaded.items] == ["direct_attributes/sa_0", "direct_attributes/sa_1"]
    item = loaded.items[0]
    assert item.options[item.answer] == "red" and item.category == "Attribute"
    assert item.gt_boxes == ((100.0, 100.0, 160.0, 160.0),)  # x, y, w, h -> x1, y1, x2, y2
    assert item.load_image().size == (640, 400)
    assert [(i.index, i.field) for i in loaded.issues] == [
        ("direct_attributes/sa_9.jpg", "json"),
        ("relative_position/sa_0.jpg", "options"),
    ]


def test_vstar_release_union_box_for_two_targets(tmp_path):
    loaded = load_benchmark("vstar", write_vstar_release(tmp_path / "v", n_attr=0, n_spatial=1))
    assert loaded.items[0].category == "Spatial"
    assert loaded.items[0].gt_boxes == ((100.0, 100.0, 480.0, 300.0),)


def test_vstar_vlmevalkit_tsv(tmp_path):
    image = b64(two_squares(32, 24))
    rows = [
        {
            "index": "0",
            "image": image,
            "question": "Colour?",
            "A": "red",
            "B": "blue",
            "answer": "B",
            "category": "direct_attributes",
        },
        {
            "index": "1",
            "image": image,
            "question": "Where?",
            "A": "left",
            "B": "right",
            "answer": "A",
            "category": "relative_position",
        },
        {
            "index": "2",
            "image": "not base64!",
            "question": "x",
            "A": "a",
            "B": "b",
            "answer": "A",
            "category": "direct_attributes",
        },
        {
            "index": "3",
            "image": image,
            "question": "x",
            "A": "a",
            "B": "b",
            "answer": "C",
            "category": "direct_attributes",
        },
    ]
    path = write_tsv(tmp_path / "VStarBench.tsv", rows, ["index", "image", "question", "A", "B", "answer", "category"])
    loaded = load_benchmark("vstar", tmp_path)
    assert [(it.qid, it.answer, it.category) for it in loaded.items] == [("0", 1, "Attribute"), ("1", 0, "Spatial")]
    assert [(i.index, i.field) for i in loaded.issues] == [("2", "image"), ("3", "answer")]
    assert load_benchmark("vstar", path).items[1].load_image().size == (32, 24)


def test_hrbench_tsv(tmp_path):
    rows = hrbench_rows(2)
    rows.append({**rows[0], "index": "99", "category": "both"})
    rows.append({**rows[0], "index": "100", "cycle_category": ""})
    write_tsv(tmp_path / "hr_bench_4k.tsv", rows, HR_COLUMNS)
    loaded = load_benchmark("hrbench4k", tmp_path)
    assert len(loaded.items) == 8
    assert {it.category for it in loaded.items} == {"FSP", "FCP"}
    assert [it.cycle for it in loaded.items[:4]] == ["cycle0", "cycle1", "cycle2", "cycle3"]
    assert all(it.options[it.answer] == "red" for it in loaded.items)
    assert [(i.index, i.field) for i in loaded.issues] == [("8", "category"), ("9", "cycle_category")]
    with pytest.raises(FileNotFoundError, match="hr_bench_8k"):
        load_benchmark("hrbench8k", tmp_path)  # the folder holds only the 4K file


def test_mme_realworld_tsv(tmp_path):
    image = b64(two_squares(32, 24))
    options = str(["(A) red", "(B) blue", "(C) green", "(D) white", "(E) The image does not feature the color"])
    rows = [
        {
            "index": "m1",
            "question": "Colour?",
            "multi-choice options": options,
            "answer": "A",
            "category": "Perception/Remote Sensing",
            "l2-category": "color",
            "image": image,
        },
        {
            "index": "m2",
            "question": "Why?",
            "multi-choice options": options,
            "answer": "E",
            "category": "Reasoning/Monitoring",
            "l2-category": "intention",
            "image": image,
        },
        {
            "index": "m3",
            "question": "Bad",
            "multi-choice options": "['red', 'blue']",
            "answer": "A",
            "category": "Perception/OCR with Complex Context",
            "l2-category": "x",
            "image": image,
        },
    ]
    columns = ["index", "question", "multi-choice options", "answer", "category", "l2-category", "image"]
    write_tsv(tmp_path / "MME-RealWorld-Lite.tsv", rows, columns)
    loaded = load_benchmark("mme_rw_lite", tmp_path)
    assert [(it.qid, it.answer, it.category, it.subcategory) for it in loaded.items] == [
        ("m1", 0, "Remote Sensing", "Perception/color"),
        ("m2", 4, "Monitoring", "Reasoning/intention"),
    ]
    assert loaded.items[0].options[4] == "The image does not feature the color"
    assert [(i.index, i.field) for i in loaded.issues] == [("2", "multi-choice options[0]")]


def test_mme_realworld_full_release_json(tmp_path):
    (tmp_path / "remote_sensing").mkdir()
    two_squares(32, 24).save(tmp_path / "remote_sensing" / "a.png")
    rows = [
        {
            "Question_id": "perception/remote_sensing/color/0001",
            "Image": "remote_sensing/a.png",
            "Text": "Colour?",
            "Question Type": "Multiple Choice",
            "Answer choices": ["(A) red", "(B) blue"],
            "Ground truth": "B",
            "Category": "color",
            "Subtask": "Remote Sensing",
            "Task": "Perception",
        },
        {
            "Question_id": "x/2",
            "Image": "remote_sensing/missing.png",
            "Text": "?",
            "Answer choices": ["(A) a", "(B) b"],
            "Ground truth": "A",
            "Category": "c",
            "Subtask": "Monitoring",
            "Task": "Reasoning",
        },
    ]
    (tmp_path / "MME_RealWorld.json").write_text(json.dumps(rows))
    loaded = load_benchmark("mme_rw", tmp_path)
    assert [(it.qid, it.answer, it.category) for it in loaded.items] == [
        ("perception/remote_sensing/color/0001", 1, "Remote Sensing")
    ]
    assert [(i.index, i.field) for i in loaded.issues] == [("1", "Image")]


def test_synthetic_parquet(tmp_path):
    rows = generate(tmp_path, 4, seed=1, split="test", min_size=256, max_size=320)
    table = pq.read_table(tmp_path / "test.parquet").to_pylist()
    table[1]["reward_model"]["ground_truth"] = "Z"  # malformed
    pq.write_table(pq.read_table(tmp_path / "test.parquet").from_pylist(table), tmp_path / "bad.parquet")
    loaded = load_benchmark("synthetic", tmp_path / "test.parquet")
    assert len(loaded.items) == 4 and not loaded.issues
    item = loaded.items[0]
    assert "(A)" not in item.question and item.options == tuple(rows[0]["extra_info"]["options"])
    assert item.gt_boxes and item.category in ("Attribute", "Position")
    bad = load_benchmark("synthetic", tmp_path / "bad.parquet")
    assert len(bad.items) == 3 and [(i.index, i.field) for i in bad.issues] == [("1", "reward_model.ground_truth")]


def test_synthetic_stripes_rows_carry_their_global_view(tmp_path):
    generate_stripes(tmp_path, 2, seed=1, split="test")
    loaded = load_benchmark("synthetic", tmp_path / "test.parquet")
    for item in loaded.items:
        view, original = item.load_view(), item.load_image()
        assert view is not None and view.size == (STRIPE_VIEW, STRIPE_VIEW) and original.width >= 1792
    (plain,) = load_benchmark("synthetic", generate_plain(tmp_path / "plain")).items
    assert plain.view is None and plain.load_view() is None


def generate_plain(out):
    generate(out, 1, seed=1, split="test", min_size=256, max_size=320)
    return out / "test.parquet"
