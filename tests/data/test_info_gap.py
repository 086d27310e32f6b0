"""LFPC's resolution selection: the level where a scripted engine's answer flips; the floor; resume; the CLI."""

import json

import pytest

from tests.data.scripted import ScriptedEngine
from visionleaf.data import Item, generate, load_image
from visionleaf.data.info_gap import InfoGapConfig, main, select_resolutions

N = 6
LADDER = (200704, 100352, 50176, 25088)  # 256, 128, 64, 32 visual tokens


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    rows = generate(root, N, seed=2, min_size=512, max_size=640)  # 262k-410k pixels: above every level
    return root / "train.parquet", rows


def pixels(prefix) -> int:
    return prefix.images[0].width * prefix.images[0].height


def test_level_is_the_highest_budget_where_the_answer_flips(data, bpe_processor, tmp_path):
    path, rows = data
    engine = ScriptedEngine(bpe_processor.tokenizer, lambda p: "A" if pixels(p) >= 60000 else "B")
    result = select_resolutions(path, tmp_path / "out", engine, bpe_processor, InfoGapConfig(LADDER, progress=False))
    assert len(result.rows) == N and not result.dropped
    for row, before in zip(result.rows, rows, strict=True):
        extra = row["extra_info"]
        assert extra["info_gap_level"] == 50176 and extra["info_gap_flipped"] is True
        assert extra["original_image"] == before["extra_info"]["original_image"]
        view = load_image(row["images"][0]["image"])
        assert 25088 < view.width * view.height <= 50176
        Item.from_row(row)
    assert engine.rows == 3 * N  # reference, 100352 (same answer), 50176 (flips): the ladder stops there
    assert result.summary["histogram"] == {"100352": 0, "50176": N, "25088": 0, "25088 (floor, no flip)": 0}
    assert (tmp_path / "out" / "train.parquet").exists()


def test_floor_when_nothing_flips(data, bpe_processor, tmp_path):
    path, _ = data
    engine = ScriptedEngine(bpe_processor.tokenizer, lambda p: "A")
    result = select_resolutions(path, tmp_path / "out", engine, bpe_processor, InfoGapConfig(LADDER, progress=False))
    assert {r["extra_info"]["info_gap_level"] for r in result.rows} == {25088}
    assert not any(r["extra_info"]["info_gap_flipped"] for r in result.rows)
    assert result.summary["histogram"]["25088 (floor, no flip)"] == N
    assert engine.rows == len(LADDER) * N


def test_same_view_is_not_asked_twice(data, bpe_processor, tmp_path):
    path, _ = data
    engine = ScriptedEngine(bpe_processor.tokenizer, lambda p: "A")
    ladder = (10**7, 5 * 10**6, 25088)  # both upper budgets leave the original as it is
    select_resolutions(path, tmp_path / "out", engine, bpe_processor, InfoGapConfig(ladder, progress=False))
    assert engine.rows == 2 * N


def test_bad_rows_are_dropped_and_a_rerun_resumes(data, bpe_processor, tmp_path):
    _, rows = data
    edited = [json.loads(json.dumps(r)) for r in rows]
    edited[1]["extra_info"]["original_image"] = str(tmp_path / "missing.png")
    edited[2]["reward_model"]["ground_truth"] = "Z"
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in edited))

    class Crashing(ScriptedEngine):
        async def generate(self, prefixes, sampling, seeds):
            if self.rows >= 5:
                raise RuntimeError("killed")
            return await super().generate(prefixes, sampling, seeds)

    out, config = tmp_path / "out", InfoGapConfig(LADDER, progress=False, concurrency=1)
    with pytest.raises(RuntimeError, match="killed"):
        select_resolutions(src, out, Crashing(bpe_processor.tokenizer, lambda p: "A"), bpe_processor, config)
    finished = {json.loads(line)["uid"] for line in (out / "records.jsonl").read_text().splitlines()}
    assert 0 < len(finished) < N
    with pytest.raises(ValueError, match="different settings"):
        select_resolutions(src, out, ScriptedEngine(bpe_processor.tokenizer, lambda p: "A"), bpe_processor)
    engine = ScriptedEngine(bpe_processor.tokenizer, lambda p: "A")
    result = select_resolutions(src, out, engine, bpe_processor, config)
    assert {route.rsplit(":", 1)[0] for route in engine.routes}.isdisjoint(finished)
    assert sorted(d["uid"] for d in result.dropped) == ["rows.jsonl:1", "rows.jsonl:2"]
    reasons = [d["reason"] for d in result.dropped]
    assert "no such file" in reasons[0] and "ground_truth" in reasons[1]
    assert len(result.rows) == N - 2 and result.summary["pending"] == 0


def test_cli_on_the_tiny_model(tiny_model_dir, data, tmp_path):
    path, _ = data
    out = tmp_path / "out"
    argv = ["--model", str(tiny_model_dir), "--in", str(path), "--out", str(out)]
    argv += ["--ladder", ",".join(map(str, LADDER)), "--max-new-tokens", "16", "--no-progress"]
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["selected"] == N and sum(summary["histogram"].values()) == N
    with pytest.raises(SystemExit):  # a rerun has nothing left to do
        main(argv)
    assert json.loads((out / "summary.json").read_text())["resumed_records"] == N
