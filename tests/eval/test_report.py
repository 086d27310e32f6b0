import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.eval.fixtures import RED_BOX, ScriptedVisionEngine
from tests.eval.test_runner import config, squares_items
from visionleaf.eval import evaluate
from visionleaf.eval.compare import main as compare_main
from visionleaf.eval.report import accuracy_rows, write_report

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--enable-logging=stderr",
    "--v=0",
]


def chromium() -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.fail("headless Chromium is missing: `apt-get install -y chromium` (scripts/test.sh does)")
    return binary


def open_in_chromium(page: Path, tmp_path: Path, *args: str) -> tuple[str, list[str]]:
    """(stdout, console lines) of headless Chromium on ``page`` with ``args`` (e.g. --dump-dom)."""
    run = subprocess.run(
        [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}", *args, page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout, [line for line in run.stderr.splitlines() if ":CONSOLE" in line]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, bpe_processor):
    tmp = tmp_path_factory.mktemp("report")
    chain = evaluate(
        config(tmp / "chain", crop_swap=("gt", "noise")),
        ScriptedVisionEngine(bpe_processor),
        bpe_processor,
        squares_items(4),
    )
    tree = evaluate(
        config(tmp / "tree", tree=4, branch_factor=2),
        ScriptedVisionEngine(bpe_processor, zoom_box=RED_BOX),
        bpe_processor,
        squares_items(4),
    )
    return chain, tree


def test_console_check_catches_errors(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text("<html><body><script>missingFunction();</script></body></html>")
    _, console = open_in_chromium(page, tmp_path, "--dump-dom")
    assert any("missingFunction" in line for line in console)


def test_report_renders_tables_viewer_and_tree_in_chromium(runs, tmp_path):
    chain, tree = runs
    for result in (chain, tree):
        page = write_report(Path(result.out))
        assert "http://" not in page.read_text() and "https://" not in page.read_text()  # no network
        dom, console = open_in_chromium(page, tmp_path, "--dump-dom")
        assert console == []
        table = re.search(r'<table class="accuracy">(.*?)</table>', dom, re.DOTALL).group(1)
        cells = re.findall(r"<td>(.*?)</td>", table)
        _, rows = accuracy_rows(result.summary)
        expected = [f"{v:.1f}" if isinstance(v, float) else str(v) for row in rows for v in row if v is not None]
        assert [c for c in cells if c != "–"] == expected
        assert '<img class="crop" src="data:image/png;base64,' in dom  # the viewer shows the first crop
        assert 'class="gt"' in dom and 'class="pred"' in dom  # boxes drawn on the global view
    chain_dom, _ = open_in_chromium(Path(chain.out) / "report.html", tmp_path, "--dump-dom")
    chain_table = re.search(r'<table class="accuracy">(.*?)</table>', chain_dom, re.DOTALL).group(1)
    rows = re.findall(r"<tr><td>(prediction|GT crop|noise crop)</td>.*?<td>([0-9.]+)</td></tr>", chain_table)
    assert rows == [("prediction", "0.0"), ("GT crop", "100.0"), ("noise crop", "0.0")]  # Overall, known by design
    assert '<svg id="tree"' in dom and "H=" in dom  # the last page is the tree run's


def test_report_screenshot_is_not_blank(runs, tmp_path):
    page = write_report(Path(runs[0].out))
    shot = tmp_path / "shot.png"
    _, console = open_in_chromium(page, tmp_path, f"--screenshot={shot}", "--window-size=1280,1600")
    assert console == []
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float64)
    assert pixels.std() > 10  # text, tables and images, not an empty page
    assert (pixels.reshape(-1, 3) < 128).all(axis=1).mean() > 0.005  # some dark (text / image) pixels


def test_compare_two_runs(runs, tmp_path, capsys):
    chain, tree = runs
    out = tmp_path / "compare.html"
    compare_main([str(chain.out), str(tree.out), "--out", str(out)])
    printed = capsys.readouterr().out
    a = chain.summary["variants"]["pred"]["accuracy"]["Overall"]
    b = tree.summary["variants"]["pred"]["accuracy"]["Overall"]
    assert re.search(rf"prediction\s+Overall\s+{a:.1f}\s+{b:.1f}\s+{b - a:.1f}", printed)
    html_text = out.read_text()
    assert f"Questions whose score changed ({4 if a != b else 0})" in html_text
    summary = json.loads((Path(chain.out) / "summary.json").read_text())
    assert summary["variants"]["gt"]["accuracy"]["Overall"] == 100.0
