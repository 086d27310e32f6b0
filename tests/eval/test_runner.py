import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.eval.fixtures import RED_BOX, ScriptedVisionEngine, png_bytes, two_squares
from visionleaf.eval import EvalConfig, EvalItem, evaluate, present
from visionleaf.eval.runner import read_records
from visionleaf.protocol import image_pixel_budget
from visionleaf.tools.crop import resize_to_budget

ROOT = Path(__file__).resolve().parents[2]


def squares_items(n: int, gt: bool = True) -> list[EvalItem]:
    image = png_bytes(two_squares())
    return [
        EvalItem(
            qid=f"q{i}",
            image=image,
            question="What colour is the square?",
            options=("red", "blue", "green"),
            answer=0,
            category="Attribute",
            subcategory="attribute/color",
            gt_boxes=(tuple(float(v) for v in RED_BOX),) if gt else (),
        )
        for i in range(n)
    ]


def config(tmp_path, **kwargs) -> EvalConfig:
    return EvalConfig(benchmark="synthetic", data="", out=str(tmp_path / "run"), progress=False, **kwargs)


def mean_rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64).reshape(-1, 3).mean(axis=0)


def test_crop_swap_replaces_what_the_model_sees(tmp_path, bpe_processor):
    engine = ScriptedVisionEngine(bpe_processor)  # zooms on the blue square, answers the crop's colour
    items = squares_items(3) + squares_items(1, gt=False)
    items[-1] = EvalItem(**{**items[-1].__dict__, "qid": "no-box"})
    result = evaluate(config(tmp_path, crop_swap=("gt", "noise")), engine, bpe_processor, items)
    acc = result.summary["crop_swap"]["accuracy"]
    assert acc["pred"]["Overall"] == 0.0  # the model's own crop shows the blue square
    assert acc["gt"]["Overall"] == 100.0  # the GT crop shows the red square
    assert acc["noise"]["Overall"] == 0.0
    assert result.summary["crop_swap"]["no_gt_boxes"] == ["no-box"]
    by_key = {(r["qid"], r["variant"]): r for r in result.records}
    assert ("no-box", "gt") not in by_key and ("no-box", "noise") in by_key
    pred, gt, noise = (by_key[("q0", v)]["samples"][0] for v in ("pred", "gt", "noise"))
    assert (pred["answer_text"], gt["answer_text"], noise["answer_text"]) == ("blue", "red", "green")
    out = Path(result.out)
    r, _, b = mean_rgb(out / pred["crops"][0])
    assert b > 2 * r
    r, _, b = mean_rgb(out / gt["crops"][0])
    assert r > 2 * b
    noise_pixels = np.asarray(Image.open(out / noise["crops"][0]))
    assert (
        noise_pixels.std() > 50 and Image.open(out / noise["crops"][0]).size == Image.open(out / pred["crops"][0]).size
    )
    # the recorded box is the model's (the swap changes the pixels, not the call)
    assert pred["tool_calls"][0]["box"] == gt["tool_calls"][0]["box"]
    assert pred["grounding"]["iou"] == 0.0


@pytest.mark.parametrize("shuffle", [True, False])
def test_always_a_scores_one_over_k_shuffled(tmp_path, bpe_processor, shuffle):
    items = squares_items(60)
    result = evaluate(
        config(tmp_path, shuffle=shuffle), ScriptedVisionEngine(bpe_processor, mode="always_a"), bpe_processor, items
    )
    expected = 100 * np.mean([present(it, shuffle, 0).answer_letter == "A" for it in items])
    assert result.summary["variants"]["pred"]["accuracy"]["Overall"] == pytest.approx(expected)
    if shuffle:
        assert 20 < expected < 50
    else:
        assert expected == 100.0
    record = result.records[0]
    assert record["options"] == [items[0].options[i] for i in record["order"]]


class InFlightEngine(ScriptedVisionEngine):
    """Records how many ``generate`` calls of distinct questions are in flight at once (the engine batches
    concurrent calls: tests/engines/test_hf.py)."""

    def __init__(self, processor, delay_s: float) -> None:
        super().__init__(processor, delay_s=delay_s)
        self.in_flight: set[str] = set()
        self.most_in_flight = 0

    async def generate(self, prefixes, sampling, seeds):
        routes = {p.route for p in prefixes}
        self.in_flight |= routes
        self.most_in_flight = max(self.most_in_flight, len(self.in_flight))
        try:
            return await super().generate(prefixes, sampling, seeds)
        finally:
            self.in_flight -= routes


def test_many_questions_are_in_flight_on_one_engine(tmp_path, bpe_processor):
    engine = InFlightEngine(bpe_processor, delay_s=0.05)
    result = evaluate(config(tmp_path, concurrency=4), engine, bpe_processor, squares_items(8))
    assert len(result.records) == 8
    assert engine.most_in_flight == 4
    assert len(engine.calls) == 16  # 8 questions x 2 turns, each its own call (the engine merges them)


def test_avg_at_k_and_tree(tmp_path, bpe_processor):
    engine = ScriptedVisionEngine(bpe_processor, zoom_box=RED_BOX)
    chains = evaluate(config(tmp_path / "k", samples=3), engine, bpe_processor, squares_items(2))
    assert all(len(r["samples"]) == 3 and r["score"] == 1.0 and r["pass"] and r["majority"] for r in chains.records)
    assert chains.summary["config"]["temperature"] == 1.0
    tree = evaluate(config(tmp_path / "t", tree=4, branch_factor=2), engine, bpe_processor, squares_items(2))
    record = tree.records[0]
    assert len(record["samples"]) == 4
    nodes = record["tree"]["nodes"]
    assert nodes[0]["parent"] is None and any(n["entropy"] is not None for n in nodes)
    assert any(n["split"] for n in nodes)
    leaves = {s["node_path"][-1] for s in record["samples"]}
    assert leaves <= {n["id"] for n in nodes if n["terminal"]}


def test_torn_last_line_is_dropped_and_rerun(tmp_path, bpe_processor):
    engine = ScriptedVisionEngine(bpe_processor)
    first = evaluate(config(tmp_path), engine, bpe_processor, squares_items(3))
    results = Path(first.out) / "results.jsonl"
    lines = results.read_text().splitlines(keepends=True)
    results.write_text("".join(lines[:2]) + lines[2][: len(lines[2]) // 2])  # killed mid-write
    calls = len(engine.calls)
    again = evaluate(config(tmp_path), engine, bpe_processor, squares_items(3))
    assert sorted(r["qid"] for r in read_records(results)) == ["q0", "q1", "q2"]
    assert len(engine.calls) - calls == 2  # only the torn question ran again (2 turns)
    assert again.summary["variants"]["pred"]["questions"] == 3


def test_a_changed_protocol_needs_a_new_out(tmp_path, bpe_processor):
    engine = ScriptedVisionEngine(bpe_processor)
    evaluate(config(tmp_path), engine, bpe_processor, squares_items(1))
    with pytest.raises(ValueError, match="different protocol"):
        evaluate(config(tmp_path, shuffle=False), engine, bpe_processor, squares_items(1))


SLOW_RUN = """
import sys
from tests.eval.fixtures import ScriptedVisionEngine
from tests.eval.test_runner import config_for, squares_items
from visionleaf.eval import evaluate
from visionleaf.models import tiny
processor = tiny.build_processor(tiny.build_tokenizer("bpe"))
engine = ScriptedVisionEngine(processor, delay_s=float(sys.argv[2]))
evaluate(config_for(sys.argv[1]), engine, processor, squares_items(12))
"""


def config_for(out: str) -> EvalConfig:
    return EvalConfig(benchmark="synthetic", data="", out=out, progress=False, concurrency=2)


def test_resume_after_kill(tmp_path, bpe_processor):
    out = tmp_path / "run"
    results = out / "results.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_RUN, str(out), "0.4"],
        cwd=ROOT,
        start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.monotonic() + 120
        while not (results.exists() and len(results.read_text().splitlines()) >= 3):
            assert proc.poll() is None, "the eval ended before it was killed"
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = read_records(results)
    assert 3 <= len(before) < 12
    engine = ScriptedVisionEngine(bpe_processor)
    result = evaluate(config_for(str(out)), engine, bpe_processor, squares_items(12))
    after = read_records(results)
    assert sorted(r["qid"] for r in after) == sorted(f"q{i}" for i in range(12))  # nothing twice, nothing lost
    assert after[: len(before)] == before
    assert len({r["qid"] for c in engine.calls for r in [{"qid": p.route.split(":", 1)[1]} for p in c]}) == 12 - len(
        before
    )
    assert json.loads((out / "summary.json").read_text())["variants"]["pred"]["questions"] == 12
    assert result.summary["questions_run"] == 12 - len(before)


class FakeJudge:
    def __init__(self) -> None:
        self.asked: list[tuple[str, str, str]] = []

    def score(self, question: str, answer: str, ground_truth: str) -> float:
        self.asked.append((question, answer, ground_truth))
        return float(answer == "the red one")


def test_the_judge_scores_answers_that_name_no_option(tmp_path, bpe_processor):
    engine = ScriptedVisionEngine(bpe_processor)
    engine._turn = lambda prefix: "<think>hm</think><answer>the red one</answer>"  # free form, no option named
    judge = FakeJudge()
    result = evaluate(config(tmp_path, shuffle=False), engine, bpe_processor, squares_items(2), judge=judge)
    assert result.summary["variants"]["pred"]["accuracy"]["Overall"] == 100.0
    assert result.summary["variants"]["pred"]["judged_samples"] == 2
    question, answer, truth = judge.asked[0]
    assert answer == "the red one" and truth == "A. red" and "(A) red" in question
    plain = evaluate(config(tmp_path / "rules"), engine, bpe_processor, squares_items(2))
    assert plain.summary["variants"]["pred"]["accuracy"]["Overall"] == 0.0


def test_global_view_budget_and_crops_from_the_original(tmp_path, bpe_processor):
    budget = 16 * 28 * 28  # 16 visual tokens for the global view
    result = evaluate(
        config(tmp_path, global_max_pixels=budget), ScriptedVisionEngine(bpe_processor), bpe_processor, squares_items(1)
    )
    record = result.records[0]
    width, height = record["view_size"]
    assert record["image_size"] == [640, 400] and width * height <= budget
    x1, y1, x2, y2 = record["samples"][0]["tool_calls"][0]["box"]  # original pixels, around the blue square
    assert x1 <= 420 + 30 and x2 >= 480 - 30 and y1 <= 240 + 30 and y2 >= 300 - 30
    saved = np.asarray(Image.open(Path(result.out) / record["samples"][0]["crops"][0]).convert("RGB"))
    cut = two_squares().crop((math.floor(x1), math.floor(y1), math.ceil(x2), math.ceil(y2)))
    expected = resize_to_budget(cut, *image_pixel_budget(bpe_processor.image_processor))
    assert np.array_equal(saved, np.asarray(expected))  # cut from the 640x400 original, not the small view


def test_a_question_that_cannot_run_is_reported_not_fatal(tmp_path, bpe_processor):
    items = squares_items(2)
    items[1] = EvalItem(**{**items[1].__dict__, "qid": "broken", "image": b"not an image"})
    result = evaluate(config(tmp_path), ScriptedVisionEngine(bpe_processor), bpe_processor, items)
    pred = result.summary["variants"]["pred"]
    assert pred["questions"] == 1 and [e["qid"] for e in pred["errors"]] == ["broken"]
    tight = evaluate(
        config(tmp_path / "tight", max_context_tokens=50), ScriptedVisionEngine(bpe_processor), bpe_processor, items[:1]
    )
    assert "max_context_tokens" in tight.summary["variants"]["pred"]["errors"][0]["error"]


def test_a_prepared_global_view_is_what_the_model_sees(tmp_path, bpe_processor):
    """An item with its own global view (a synthetic row whose image is not the original) shows that view;
    crops still come from the original."""
    view = tmp_path / "view.png"
    Image.new("RGB", (112, 56), (0, 128, 0)).save(view)
    (item,) = squares_items(1)
    item = EvalItem(**{**item.__dict__, "view": str(view)})
    result = evaluate(config(tmp_path), ScriptedVisionEngine(bpe_processor), bpe_processor, [item])
    record = result.records[0]
    assert record["view_size"] == [112, 56] and record["image_size"] == [640, 400]
    thumbnail = np.asarray(Image.open(next((Path(result.out) / "images").iterdir())).convert("RGB"), dtype=float)
    assert np.abs(thumbnail - (0, 128, 0)).max() < 8  # the report shows the view the model saw
