import random
import re
from collections import defaultdict

import pytest
from PIL import Image

from visionleaf.eval.loaders import EvalItem
from visionleaf.eval.protocol import accuracy_table, cycle_accuracy, global_view, predicted_letter, present


def item(qid: str, n: int = 4, answer: int = 0) -> EvalItem:
    return EvalItem(qid, b"", "Q?", tuple(f"opt{i}" for i in range(n)), answer, "Attribute")


def test_shuffle_is_per_question_and_reproducible():
    a, b = present(item("q1"), True, seed=0), present(item("q1"), True, seed=0)
    assert a == b
    assert present(item("q1"), True, seed=1).order != a.order or present(item("q2"), True, seed=0).order != a.order
    assert a.options[a.order.index(0)] == "opt0" and a.answer_letter == "ABCD"[a.order.index(0)]
    assert "(A) " + a.options[0] in a.text and a.text.startswith("Q?\n")
    plain = present(item("q1"), False, seed=0)
    assert plain.order == (0, 1, 2, 3) and plain.answer_letter == "A"


def test_always_a_scores_one_over_k_shuffled_and_one_unshuffled():
    items = [item(f"q{i}", n=4, answer=0) for i in range(400)]
    shuffled = [float(present(it, True, 0).answer_letter == "A") for it in items]
    assert 0.19 < sum(shuffled) / len(shuffled) < 0.31
    assert all(present(it, False, 0).answer_letter == "A" for it in items)


def test_global_view_budget_keeps_aspect_and_small_images():
    image = Image.new("RGB", (4000, 3000))
    view = global_view(image, 1024 * 28 * 28)
    assert view.width * view.height <= 1024 * 28 * 28 and view.width % 28 == 0 and view.height % 28 == 0
    assert abs(view.width / view.height - 4 / 3) < 0.05
    assert global_view(image, None) is image
    small = Image.new("RGB", (100, 80))
    assert global_view(small, 1024 * 28 * 28) is small


# lmms-eval 0.7.3 as a test-only reference. lmms_eval cannot be imported here (it pulls loguru, openai,
# datasets, ...), so its functions are re-implemented from reading lmms_eval/tasks/hrbench/utils.py
# (hrbench_aggregate_results) and lmms_eval/tasks/vstar_bench/utils.py (extract_answer_letter).
def lmms_hrbench_aggregate(results):
    by_cycle = defaultdict(list)
    for result in results:
        by_cycle[result["cycle_category"]].append(result["gpt_score"])
    averages = {c: sum(s) / len(s) for c, s in by_cycle.items()}
    return sum(averages.values()) / len(averages)


def lmms_vstar_letter(response):
    response = response.strip().upper()
    patterns = [
        r"^([A-D])\s*[\.)\]]*",
        r"(?:THE\s+)?(?:ANSWER|CHOICE|OPTION)(?:\s+IS)?[\s:]+([A-D])",
        r"\(([A-D])\)",
        r"([A-D])\s*(?:\.|\)|])",
        r"(?:^|\s)([A-D])(?:\s|$)",
    ]
    for pattern in patterns:
        match = re.search(pattern, response, re.IGNORECASE)
        if match:
            return match.group(1).upper()
    letters = re.findall(r"[A-D]", response)
    if len(letters) == 1:
        return letters[0]
    return response[0] if response and response[0] in "ABCD" else None


def test_hrbench_aggregation_matches_lmms_eval():
    rng = random.Random(3)
    records = []
    for q in range(30):
        category = "FSP" if q % 2 else "FCP"
        for cycle in range(4 if q % 5 else 3):  # uneven cycle sizes make the mean of means differ
            records.append({"category": category, "cycle": f"c{cycle}", "score": float(rng.random() < 0.6)})
    table = accuracy_table("hrbench8k", records)
    lmms = {
        c: lmms_hrbench_aggregate(
            [
                {"cycle_category": r["cycle"], "gpt_score": r["score"]}
                for r in records
                if c is None or r["category"] == c
            ]
        )
        for c in ("FSP", "FCP", None)
    }
    assert table["FSP"] == pytest.approx(100 * lmms["FSP"])
    assert table["FCP"] == pytest.approx(100 * lmms["FCP"])
    assert table["Overall"] == pytest.approx(100 * lmms[None])
    plain = sum(r["score"] for r in records) / len(records)
    assert cycle_accuracy(records) != pytest.approx(plain)  # the cycle mean is not the plain mean here


def test_hand_computed_cycle_accuracy():
    records = [
        {"category": "FSP", "cycle": "c0", "score": 1.0},
        {"category": "FSP", "cycle": "c0", "score": 0.0},
        {"category": "FSP", "cycle": "c1", "score": 1.0},
    ]
    assert accuracy_table("hrbench4k", records) == {"FSP": 75.0, "FCP": None, "Overall": 75.0}


OPTIONS = ("red", "blue", "green", "white")


@pytest.mark.parametrize("answer", ["A", "(B)", "C.", "D)", "The answer is B", "b", " (D) ", "B. blue"])
def test_letter_extraction_agrees_with_lmms_eval(answer):
    assert predicted_letter(answer, OPTIONS) == lmms_vstar_letter(answer)


@pytest.mark.parametrize(
    ("answer", "ours", "theirs"),
    [
        ("red", "A", "D"),  # option text: lmms-eval finds the lone letter D inside "RED"
        ("blue", "B", "B"),
        ("I think it is a cat", None, "A"),  # lmms-eval reads the standalone word "a" as option A
        ("A cat", None, "A"),  # lmms-eval takes a leading letter even without a delimiter
        ("Answer: C", "C", "A"),  # lmms-eval's first pattern reads the "A" of "Answer"
    ],
)
def test_letter_extraction_deliberate_differences(answer, ours, theirs):
    assert predicted_letter(answer, OPTIONS) == ours
    assert lmms_vstar_letter(answer) == theirs
