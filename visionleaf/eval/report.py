"""Self-contained HTML report of an eval run (inline CSS/JS/SVG; images as data URLs or relative files).

    python -m visionleaf.eval.report runs/vstar          # writes runs/vstar/report.html

Tables as the papers print them (one row per crop variant), tool/turn/token/latency/IoU statistics,
SVG plots, and a per-question viewer: the global view with predicted (red) and GT (green) boxes, each
crop, each turn's text, and for trees the tree with node entropies and splits.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import mimetypes
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from visionleaf.eval.runner import _safe, read_records

EMBED_LIMIT_BYTES = 48 << 20
"""Images are embedded as data URLs while their total size stays under this; above it, relative paths."""
VARIANT_NAMES = {"pred": "prediction", "gt": "GT crop", "noise": "noise crop"}

CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
table{border-collapse:collapse;margin:8px 0 16px}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}
thead th{background:#f0f0f0}
.plots{display:flex;flex-wrap:wrap;gap:16px}
.plot{border:1px solid #ddd;padding:8px}
#viewer{display:flex;gap:16px;align-items:flex-start}
#qlist{width:260px;max-height:640px;overflow:auto;border:1px solid #ddd}
#qlist div{padding:2px 6px;cursor:pointer;font-size:13px}
#qlist div.sel{background:#def}
.ok{color:#080}.bad{color:#b00}
pre{white-space:pre-wrap;background:#f7f7f7;padding:6px;font-size:12px;max-width:760px}
.crops img{max-height:160px;margin:4px;border:1px solid #999}
.muted{color:#777;font-size:13px}
"""

JS = """
const data = JSON.parse(document.getElementById('data').textContent);
const esc = s => String(s).replace(/[&<>"]/g, c => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]));
function boxes(q, s) {
  const [w, h] = q.image_size || [1, 1];
  let out = `<svg id="view" width="640" viewBox="0 0 ${w} ${h}" style="border:1px solid #999">`;
  out += `<image href="${data.images[q.qid] || ''}" x="0" y="0" width="${w}" height="${h}" preserveAspectRatio="none"/>`;
  const sw = Math.max(w, h) / 200;
  for (const b of q.gt_boxes) out += `<rect class="gt" x="${b[0]}" y="${b[1]}" width="${b[2]-b[0]}" height="${b[3]-b[1]}" fill="none" stroke="#0a0" stroke-width="${sw}"/>`;
  for (const c of (s ? s.tool_calls : [])) if (c.box) { const b = c.box;
    out += `<rect class="pred" x="${b[0]}" y="${b[1]}" width="${b[2]-b[0]}" height="${b[3]-b[1]}" fill="none" stroke="#d00" stroke-width="${sw}"/>`; }
  return out + '</svg>';
}
function tree(q) {
  if (!q.tree) return '';
  const nodes = q.tree.nodes, kids = {}, pos = {};
  for (const n of nodes) if (n.parent !== null) (kids[n.parent] = kids[n.parent] || []).push(n.id);
  const correctLeaf = {};
  q.samples.forEach(s => { correctLeaf[s.node_path[s.node_path.length - 1]] = s.correct; });
  let col = 0;
  const place = id => { const k = kids[id] || []; if (!k.length) { pos[id] = col++; return pos[id]; }
    const xs = k.map(place); pos[id] = (xs[0] + xs[xs.length - 1]) / 2; return pos[id]; };
  place(0);
  const byId = {}; nodes.forEach(n => byId[n.id] = n);
  const W = Math.max(col, 1) * 60 + 40, H = (Math.max(...nodes.map(n => n.depth)) + 1) * 70 + 20;
  let out = `<svg id="tree" width="${W}" height="${H}">`;
  const xy = n => [20 + pos[n.id] * 60 + 10, 20 + n.depth * 70];
  for (const n of nodes) if (n.parent !== null) { const [x1, y1] = xy(byId[n.parent]), [x2, y2] = xy(n);
    out += `<line x1="${x1}" y1="${y1}" x2="${x2}" y2="${y2}" stroke="#999"/>`; }
  for (const n of nodes) { const [x, y] = xy(n);
    const fill = n.id in correctLeaf ? (correctLeaf[n.id] ? '#6c6' : '#e66') : (n.split ? '#fc3' : '#ccc');
    out += `<circle cx="${x}" cy="${y}" r="9" fill="${fill}" stroke="#333"><title>node ${n.id} depth ${n.depth} entropy ${n.entropy === null ? '-' : n.entropy.toFixed(3)}${n.split ? ' (split)' : ''}</title></circle>`;
    if (n.entropy !== null) out += `<text x="${x + 11}" y="${y + 4}" font-size="10">H=${n.entropy.toFixed(2)}</text>`; }
  return out + '</svg><div class="muted">yellow: split node; green/red: correct/wrong leaf; H: entropy of the first token after the node</div>';
}
function show(key) {
  const q = data.records.find(r => r.variant + ':' + r.qid === key);
  document.querySelectorAll('#qlist div').forEach(d => d.classList.toggle('sel', d.dataset.key === key));
  if (!q) return;
  if (q.error) { document.getElementById('detail').innerHTML = `<p class="bad">${esc(q.error)}</p>`; return; }
  let out = `<h3>${esc(q.qid)} <span class="muted">(${esc(q.variant)}, ${esc(q.category)} ${esc(q.subcategory)})</span></h3>`;
  out += `<p>${esc(q.question)}</p><ol type="A">` + q.options.map((o, i) => `<li>${esc(o)}${String.fromCharCode(65 + i) === q.answer ? ' ✔' : ''}</li>`).join('') + '</ol>';
  out += `<p>score ${q.score.toFixed(2)} · latency ${q.latency_s.toFixed(2)} s</p>`;
  out += boxes(q, q.samples[0]) + tree(q);
  q.samples.forEach((s, i) => {
    out += `<h4>sample ${i}: <span class="${s.correct ? 'ok' : 'bad'}">${s.correct ? 'correct' : 'wrong'}</span> (answer ${esc(s.pred ?? 'none')}, ${esc(s.stop_reason)}, ${s.num_turns} turns, ${s.generated_tokens} tokens${s.grounding ? ', IoU ' + s.grounding.iou.toFixed(2) : ''})</h4>`;
    s.turns.forEach((t, k) => { out += `<pre>turn ${k + 1}: ${esc(t)}</pre>`; const c = s.tool_calls[k];
      if (c) out += `<div class="muted">${esc(c.name)} ${c.ok ? 'ok' : 'failed: ' + esc(c.error)} ${c.box ? 'box ' + c.box.map(v => v.toFixed(0)).join(',') : ''}</div>`; });
    out += '<div class="crops">' + s.crops.map(c => `<img class="crop" src="${data.images[c] || c}" title="${esc(c)}">`).join('') + '</div>';
  });
  document.getElementById('detail').innerHTML = out;
}
const list = document.getElementById('qlist');
list.innerHTML = data.records.map(r => `<div data-key="${esc(r.variant + ':' + r.qid)}" class="${r.score > 0 ? 'ok' : 'bad'}">${esc(r.variant)} · ${esc(r.qid)}</div>`).join('');
list.addEventListener('click', e => { if (e.target.dataset.key) show(e.target.dataset.key); });
if (data.records.length) show(data.records[0].variant + ':' + data.records[0].qid);
"""  # noqa: E501


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def accuracy_rows(summary: Mapping[str, Any], key: str = "accuracy") -> tuple[list[str], list[list[Any]]]:
    """Header and rows of the paper-style table: one row per variant, categories then Overall."""
    variants = summary["variants"]
    columns = list(next(iter(variants.values()))[key]) if variants else ["Overall"]
    rows = [[VARIANT_NAMES.get(v, v), *(s[key].get(c) for c in columns)] for v, s in variants.items()]
    return ["setting", *columns], rows


def bar_svg(title: str, values: Mapping[str, float | None], ymax: float | None = None, unit: str = "") -> str:
    """A small bar chart as inline SVG."""
    items = [(k, float(v)) for k, v in values.items() if v is not None]
    width, height, pad = max(240, 60 * len(items) + 40), 200, 30
    top = ymax if ymax is not None else max([v for _, v in items] + [1e-9])
    bars = []
    for i, (label, value) in enumerate(items):
        h = (height - 2 * pad) * (value / top if top else 0)
        x, y = pad + i * 60, height - pad - h
        bars.append(
            f'<rect x="{x}" y="{y:.1f}" width="44" height="{h:.1f}" fill="#4a7fc1"><title>{html.escape(label)}: '
            f'{value:.2f}{unit}</title></rect><text x="{x + 22}" y="{y - 3:.1f}" font-size="10" text-anchor="middle">'
            f'{value:.1f}</text><text x="{x + 22}" y="{height - pad + 12}" font-size="10" text-anchor="middle">'
            f"{html.escape(label[:10])}</text>"
        )
    return (
        f'<div class="plot"><div>{html.escape(title)}</div><svg width="{width}" height="{height}">'
        f'<line x1="{pad - 4}" y1="{height - pad}" x2="{width}" y2="{height - pad}" stroke="#333"/>'
        f"{''.join(bars)}</svg></div>"
    )


def _histogram(values: Sequence[float], bins: int = 10) -> dict[str, float]:
    counts = [0] * bins
    for v in values:
        counts[min(int(v * bins), bins - 1)] += 1
    return {f"{i / bins:.1f}": float(c) for i, c in enumerate(counts)}


def _images(out: Path, records: Sequence[Mapping[str, Any]], embed: bool | None) -> dict[str, str]:
    files: dict[str, Path] = {}
    for record in records:
        thumb = out / "images" / f"{_safe(record['qid'])}.jpg"
        if thumb.exists():
            files[record["qid"]] = thumb
        for sample in record.get("samples", []):
            for crop in sample["crops"]:
                files[crop] = out / crop
    total = sum(p.stat().st_size for p in files.values() if p.exists())
    if embed is None:
        embed = total <= EMBED_LIMIT_BYTES
    urls = {}
    for key, path in files.items():
        if embed and path.exists():
            mime = mimetypes.guess_type(path.name)[0] or "image/png"
            urls[key] = f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"
        else:
            urls[key] = str(path.relative_to(out))
    return urls


def render(summary: Mapping[str, Any], records: Sequence[Mapping[str, Any]], images: Mapping[str, str]) -> str:
    """The report's HTML text."""
    cfg = summary["config"]
    order = f"shuffled (seed {cfg['seed']})" if cfg["shuffle"] else "in release order"
    parts = [
        f"<h1>visionleaf eval: {html.escape(summary['benchmark'])}</h1>",
        f'<p class="muted">{summary["questions"]} questions · options {order}'
        f" · temperature {cfg['temperature']} · {cfg['samples']} sample(s)"
        f"{' · tree of ' + str(cfg['tree']) + ' leaves' if cfg['tree'] else ''} · max {cfg['max_turns']} turns"
        f" · global view ≤ {cfg['global_max_pixels'] or 'processor'} px</p>",
        "<h2>Accuracy (%)</h2>",
    ]
    header, rows = accuracy_rows(summary)
    parts.append(_table(header, rows, "accuracy"))
    if cfg["samples"] > 1 or cfg["tree"]:
        for key, name in (("pass_at_k", "pass@k"), ("majority_at_k", "majority of samples/leaves")):
            header, rows = accuracy_rows(summary, key)
            parts += [f"<h3>{name}</h3>", _table(header, rows)]
    stats_rows = []
    for v, s in summary["variants"].items():
        g = s["grounding"]
        stats_rows.append(
            [
                VARIANT_NAMES.get(v, v),
                s["questions"],
                s["tool_calls_ok"],
                s["tool_calls_failed"],
                (s["turns"] or {}).get("mean"),
                (s["generated_tokens"] or {}).get("mean"),
                (s["latency_s"] or {}).get("mean"),
                None if s["no_answer_rate"] is None else 100 * s["no_answer_rate"],
                (g["iou"] or {}).get("mean"),
                (g["coverage"] or {}).get("mean"),
            ]
        )
    parts += [
        "<h2>Tools, turns, tokens, latency, grounding</h2>",
        _table(
            [
                "setting",
                "questions",
                "ok calls/sample",
                "failed calls/sample",
                "turns",
                "generated tokens",
                "latency s",
                "no answer %",
                "IoU (GT)",
                "coverage (GT)",
            ],
            stats_rows,
            "stats",
        ),
    ]
    pred = summary["variants"].get("pred")
    if pred and pred["subcategories"]:
        parts += [
            "<h2>Accuracy by subcategory (%)</h2>",
            _table(["subcategory", "accuracy"], list(pred["subcategories"].items())),
        ]
    if summary["crop_swap"]["no_gt_boxes"]:
        no_gt = summary["crop_swap"]["no_gt_boxes"]
        names = ", ".join(html.escape(q) for q in no_gt[:50])
        parts.append(f'<p class="muted">{len(no_gt)} questions without GT boxes (no GT-crop run): {names}</p>')
    if summary["load_issues"]:
        items = "".join(
            f"<li>row {html.escape(i['index'])}: {html.escape(i['field'])}: {html.escape(i['reason'])}</li>"
            for i in summary["load_issues"]
        )
        parts.append(f"<h3>Skipped rows ({len(summary['load_issues'])})</h3><ul>{items}</ul>")
    if pred:
        plots = [
            bar_svg("accuracy by category (%)", pred["accuracy"], ymax=100),
            bar_svg("tool calls per sample (count)", {k: float(v) for k, v in pred["tool_call_histogram"].items()}),
            bar_svg("accuracy vs successful calls (%)", pred["accuracy_by_ok_calls"], ymax=100),
            bar_svg("IoU of crops with GT (count)", _histogram(pred["grounding"]["iou_values"])),
        ]
        parts += ['<h2>Plots</h2><div class="plots">', *plots, "</div>"]
    parts += ['<h2>Questions</h2><div id="viewer"><div id="qlist"></div><div id="detail"></div></div>']
    payload = json.dumps({"records": list(records), "images": dict(images)}).replace("</", "<\\/")
    return (
        '<!DOCTYPE html><html><head><meta charset="utf-8"><title>visionleaf eval</title>'
        f"<style>{CSS}</style></head><body>{''.join(parts)}"
        f'<script id="data" type="application/json">{payload}</script><script>{JS}</script></body></html>'
    )


def write_report(out: Path, embed: bool | None = None) -> Path:
    """Write ``out/report.html`` from ``out/summary.json`` and ``out/results.jsonl``."""
    summary = json.loads((out / "summary.json").read_text())
    order = {v: i for i, v in enumerate(summary["variants"])}
    records = sorted(read_records(out / "results.jsonl"), key=lambda r: (order.get(r["variant"], 99), r["qid"]))
    path = out / "report.html"
    path.write_text(render(summary, records, _images(out, records, embed)), encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="an eval --out folder")
    parser.add_argument("--relative-images", action="store_true", help="link images instead of embedding them")
    args = parser.parse_args(argv)
    print(write_report(args.run, embed=False if args.relative_images else None))


if __name__ == "__main__":
    main()
