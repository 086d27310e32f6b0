"""Side-by-side comparison of two eval runs (e.g. before / after training, tree vs chain).

    python -m visionleaf.eval.compare runs/before runs/after [--out compare.html]

Prints the paper-style accuracy table of both runs and their difference, and writes a self-contained
HTML page with the tables, the statistics and the questions whose correctness changed.
"""

from __future__ import annotations

import argparse
import html
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from visionleaf.eval.report import CSS, VARIANT_NAMES, _fmt, _table
from visionleaf.eval.runner import read_records

STATS = (
    ("ok calls/sample", lambda s: s["tool_calls_ok"]),
    ("failed calls/sample", lambda s: s["tool_calls_failed"]),
    ("turns", lambda s: (s["turns"] or {}).get("mean")),
    ("generated tokens", lambda s: (s["generated_tokens"] or {}).get("mean")),
    ("latency s", lambda s: (s["latency_s"] or {}).get("mean")),
    ("IoU (GT)", lambda s: (s["grounding"]["iou"] or {}).get("mean")),
)


def _load(run: Path) -> tuple[dict[str, Any], dict[tuple[str, str], dict[str, Any]]]:
    summary = json.loads((run / "summary.json").read_text())
    records = {(r["qid"], r["variant"]): r for r in read_records(run / "results.jsonl")}
    return summary, records


def accuracy_diff(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[list[Any]]:
    """Rows (setting, column, A, B, B - A) for every variant and column both runs have."""
    rows = []
    for variant, sa in a["variants"].items():
        sb = b["variants"].get(variant)
        if sb is None:
            continue
        for column, va in sa["accuracy"].items():
            vb = sb["accuracy"].get(column)
            diff = None if va is None or vb is None else vb - va
            rows.append([VARIANT_NAMES.get(variant, variant), column, va, vb, diff])
    return rows


def render(run_a: Path, run_b: Path) -> tuple[str, list[list[Any]]]:
    (a, ra), (b, rb) = _load(run_a), _load(run_b)
    if a["benchmark"] != b["benchmark"]:
        raise ValueError(f"runs are on different benchmarks: {a['benchmark']} vs {b['benchmark']}")
    rows = accuracy_diff(a, b)
    stats = []
    for name, get in STATS:
        va, vb = get(a["variants"]["pred"]), get(b["variants"]["pred"])
        stats.append([name, va, vb, None if va is None or vb is None else vb - va])
    changed = []
    for key in sorted(set(ra) & set(rb)):
        sa, sb = ra[key].get("score", 0.0), rb[key].get("score", 0.0)
        if sa != sb:
            changed.append([f"{key[1]}:{key[0]}", sa, sb, sb - sa])
    names = (html.escape(str(run_a)), html.escape(str(run_b)))
    body = (
        f"<h1>{html.escape(a['benchmark'])}: A = {names[0]} vs B = {names[1]}</h1>"
        + "<h2>Accuracy (%)</h2>"
        + _table(["setting", "column", "A", "B", "B - A"], rows, "compare")
        + "<h2>Statistics (prediction run)</h2>"
        + _table(["", "A", "B", "B - A"], stats)
        + f"<h2>Questions whose score changed ({len(changed)})</h2>"
        + _table(["question", "A", "B", "B - A"], changed)
    )
    head = f'<head><meta charset="utf-8"><title>compare</title><style>{CSS}</style></head>'
    page = f"<!DOCTYPE html><html>{head}<body>{body}</body></html>"
    return page, rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    parser.add_argument("--out", type=Path, help="HTML page (default: RUN_B/compare.html)")
    args = parser.parse_args(argv)
    page, rows = render(args.run_a, args.run_b)
    print(f"{'setting':12s} {'column':20s} {'A':>7s} {'B':>7s} {'B-A':>7s}")
    for setting, column, va, vb, diff in rows:
        print(f"{setting:12s} {column:20s} {_fmt(va):>7s} {_fmt(vb):>7s} {_fmt(diff):>7s}")
    out = args.out or args.run_b / "compare.html"
    out.write_text(page, encoding="utf-8")
    print(f"[compare] {out}")


if __name__ == "__main__":
    main()
