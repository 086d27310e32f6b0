"""DeepEyes curation: each stage keeps exactly what a scripted engine makes predictable; resume; the CLI."""

import json
import math
from collections import Counter

import pytest

from tests.data.scripted import ScriptedEngine
from visionleaf.data import generate, load_image
from visionleaf.data.curate import CurateConfig, curate, main, standardize
from visionleaf.engines.base import image_key
from visionleaf.protocol import image_pixel_budget
from visionleaf.tools.crop import resize_to_budget

N = 8


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    rows = generate(root, N, seed=1, min_size=512, max_size=640)
    return root / "train.parquet", rows


def by_view(rows):
    """image_key of each row's global view -> row (the engine knows the item by its image)."""
    return {image_key(load_image(r["images"][0]["image"])): r for r in rows}


def wrong(truth: str) -> str:
    return "A" if truth != "A" else "B"


def truth_of(row) -> str:
    return row["reward_model"]["ground_truth"]


class Refuses:
    stats = None

    async def generate(self, *args):
        raise AssertionError("the format stage must not call the model")

    async def probe(self, *args):
        raise AssertionError("the format stage must not call the model")


def test_utility_keeps_exactly_the_items_solved_only_with_the_gt_crop(data, bpe_processor, tmp_path):
    path, rows = data
    views = by_view(rows)
    crops = {}

    def rule(prefix):
        row = views[prefix.image_keys[0]]
        if len(prefix.images) == 2:
            crops[row["extra_info"]["index"]] = prefix.images[1]
            return truth_of(row)
        needs_crop = row["extra_info"]["index"] % 2 == 0
        return wrong(truth_of(row)) if needs_crop else truth_of(row)

    engine = ScriptedEngine(bpe_processor.tokenizer, rule)
    result = curate(path, tmp_path / "out", engine, bpe_processor, CurateConfig(difficulty=False, progress=False))
    assert sorted(r["extra_info"]["index"] for r in result.kept) == [0, 2, 4, 6]
    assert sorted(d["uid"] for d in result.dropped) == [f"train.parquet:{i}" for i in (1, 3, 5, 7)]
    for d in result.dropped:
        assert d["stage"] == "utility" and d["reason"] == "right without the crop"
        assert d["with_crop"]["correct"] and d["without"]["correct"]
    assert engine.rows == 2 * N  # one greedy answer with the crop, one without
    # the observation is the tight GT box cut from the original, resized like a real crop
    min_pixels, max_pixels = image_pixel_budget(bpe_processor.image_processor)
    for index, crop in crops.items():
        x1, y1, x2, y2 = rows[index]["extra_info"]["gt_boxes"][0]
        original = load_image(rows[index]["extra_info"]["original_image"])
        box = (math.floor(x1), math.floor(y1), math.ceil(x2), math.ceil(y2))
        expected = resize_to_budget(original.crop(box), min_pixels, max_pixels)
        assert image_key(crop) == image_key(expected)
    counts = result.summary["counts"]["visionleaf/synthetic"]
    assert counts["rows"] == N and counts["utility"] == 4 and counts["kept"] == 4
    kept_file = tmp_path / "out" / "train.parquet"
    assert kept_file.exists()
    dropped = [json.loads(line) for line in (tmp_path / "out" / "dropped.jsonl").read_text().splitlines()]
    assert len(dropped) == 4


def test_difficulty_drops_items_solved_0_or_n_of_n(data, bpe_processor, tmp_path):
    path, rows = data
    views = by_view(rows)
    calls: Counter[int] = Counter()

    def rule(prefix):
        row = views[prefix.image_keys[0]]
        index = row["extra_info"]["index"]
        if index % 3 == 0:
            return truth_of(row)
        if index % 3 == 1:
            return wrong(truth_of(row))
        calls[index] += 1  # every other rollout right
        return truth_of(row) if calls[index] % 2 else wrong(truth_of(row))

    engine = ScriptedEngine(bpe_processor.tokenizer, rule)
    config = CurateConfig(samples=4, utility=False, progress=False)
    result = curate(path, tmp_path / "out", engine, bpe_processor, config)
    assert sorted(r["extra_info"]["index"] for r in result.kept) == [2, 5]
    reasons = {d["uid"]: (d["stage"], d["reason"], d["solved"]) for d in result.dropped}
    for i in (0, 3, 6):
        assert reasons[f"train.parquet:{i}"] == ("difficulty", "solved 4/4", 4)
    for i in (1, 4, 7):
        assert reasons[f"train.parquet:{i}"] == ("difficulty", "solved 0/4", 0)
    total = result.summary["counts"]["total"]
    assert (total["difficulty n/n"], total["difficulty 0/n"], total["kept"]) == (3, 3, 2)
    assert engine.rows == 4 * N
    assert "difficulty 0/n" in result.summary["table"]


def test_format_normalises_answers_and_drops_bad_rows(data, bpe_processor, tmp_path):
    _, rows = data
    edited = [json.loads(json.dumps(r)) for r in rows[:7]]
    options1 = edited[1]["extra_info"]["options"]
    edited[1]["reward_model"]["ground_truth"] = " " + options1[1] + " "  # option text -> letter B
    edited[2]["reward_model"]["ground_truth"] = "Z"
    edited[3]["images"] = [{"image": str(tmp_path / "missing.png")}]
    edited[4]["extra_info"]["options"] = [edited[4]["extra_info"]["options"][0]] * 2
    edited[4]["reward_model"]["ground_truth"] = "A"
    edited[5]["data_source"] = "other/source"
    edited[5]["reward_model"]["ground_truth"] = "(b)"
    edited[6]["extra_info"]["original_size"] = [9, 9]
    edited[6]["extra_info"]["gt_boxes"] = []
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in edited))
    config = CurateConfig(utility=False, difficulty=False, progress=False)
    result = curate(path, tmp_path / "out", Refuses(), bpe_processor, config)  # type: ignore[arg-type]
    kept = {r["extra_info"]["index"]: r for r in result.kept}
    assert sorted(kept) == [0, 1, 5]
    assert truth_of(kept[1]) == "B" and truth_of(kept[5]) == "B"
    reasons = {d["uid"]: d["reason"] for d in result.dropped}
    assert "'Z' is not among the options" in reasons["rows.jsonl:2"]
    assert reasons["rows.jsonl:3"].startswith("unreadable image:") and "no such file" in reasons["rows.jsonl:3"]
    assert "are the same" in reasons["rows.jsonl:4"]
    assert "extra_info.original_size says [9, 9]" in reasons["rows.jsonl:6"]
    assert all(d["stage"] == "format" for d in result.dropped)
    counts = result.summary["counts"]
    assert counts["other/source"]["rows"] == 1 and counts["other/source"]["kept"] == 1
    assert counts["visionleaf/synthetic"]["format"] == 4 and counts["visionleaf/synthetic"]["kept"] == 2
    assert (tmp_path / "out" / "rows.parquet").exists()


def test_standardize_reports_schema_faults():
    row, reason, _ = standardize({"extra_info": {}, "reward_model": {"style": "rule", "ground_truth": "A"}})
    assert row is None and reason.startswith("schema: data_source")


def utility_records(out):
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    return {r["uid"] for r in records if r["stage"] == "utility"}


def test_resumes_after_a_crash_and_refuses_other_settings(data, bpe_processor, tmp_path):
    path, rows = data
    views = by_view(rows)

    def rule(prefix):
        row = views[prefix.image_keys[0]]
        return truth_of(row) if len(prefix.images) == 2 or row["extra_info"]["index"] < 4 else wrong(truth_of(row))

    class Crashing(ScriptedEngine):
        async def generate(self, prefixes, sampling, seeds):
            if self.rows >= 6:
                raise RuntimeError("killed")
            return await super().generate(prefixes, sampling, seeds)

    config = CurateConfig(difficulty=False, progress=False, concurrency=2)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="killed"):
        curate(path, out, Crashing(bpe_processor.tokenizer, rule), bpe_processor, config)
    finished = utility_records(out)
    assert 0 < len(finished) < N
    with open(out / "records.jsonl", "a") as f:
        f.write('{"uid": "train.parquet:7", "sta')  # killed mid-write
    with pytest.raises(ValueError, match="different settings"):
        curate(path, out, ScriptedEngine(bpe_processor.tokenizer, rule), bpe_processor, CurateConfig(samples=3))
    engine = ScriptedEngine(bpe_processor.tokenizer, rule)
    result = curate(path, out, engine, bpe_processor, config)
    assert len(utility_records(out)) == N
    for i in range(N):  # finished items are skipped, the others run
        uid = f"train.parquet:{i}"
        assert engine.routes[f"{uid}:global"] == engine.routes[f"{uid}:crop"] == (uid not in finished)
    assert sorted(r["extra_info"]["index"] for r in result.kept) == [4, 5, 6, 7]
    assert result.summary["resumed_records"] > 0
    again = ScriptedEngine(bpe_processor.tokenizer, rule)
    assert curate(path, out, again, bpe_processor, config).summary["counts"] == result.summary["counts"]
    assert again.rows == 0


def test_cli_on_the_tiny_model(tiny_model_dir, data, tmp_path):
    path, _ = data
    out = tmp_path / "out"
    argv = ["--model", str(tiny_model_dir), "--in", str(path), "--out", str(out), "--samples", "2"]
    argv += ["--max-new-tokens", "16", "--max-turns", "2", "--limit", "4", "--no-progress"]
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 0
    summary = json.loads((out / "summary.json").read_text())
    total = summary["counts"]["total"]
    assert total["rows"] == 4 and total["pending"] == 0
    dropped = total["format"] + total["utility"] + total["difficulty 0/n"] + total["difficulty n/n"]
    assert dropped + total["kept"] == 4
    assert len((out / "dropped.jsonl").read_text().splitlines()) == dropped
