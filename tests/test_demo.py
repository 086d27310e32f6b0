import shutil

from visionleaf import demo


def test_demo_runs_and_prints_a_summary(tmp_path, warm_model_dir, capsys):
    shutil.copytree(warm_model_dir, tmp_path / "tiny-qwen25vl")  # skip the model build
    demo.main(["--out", str(tmp_path), "--n", "2", "--budget", "4", "--max-turns", "2", "--max-new-tokens", "48"])
    out = capsys.readouterr().out
    assert "generating 2 synthetic visual-search items" in out
    assert "leaves            8" in out  # 2 items x 4 leaves
    for line in ("reward            score", "tool              bonus rate", "prefix reuse      engine-computed"):
        assert line in out
    reuse = float(out.split("engine-computed / unique tokens = ")[1].split()[0])
    assert reuse <= 1.1
