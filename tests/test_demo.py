"""``make demo``'s job: every method trained on synthetic scenes and one self-contained report;
a second call reuses the finished runs, and only those with the same settings; a bad setting
fails before anything is trained."""

import json
import re
from html.parser import HTMLParser

import pytest
from conftest import run_ctxseg

from ctxseg.methods import METHODS

DEMO_METHODS = [name for name, method in METHODS.items() if method.in_demo]

pytestmark = pytest.mark.slow


class _Tables(HTMLParser):
    """Every <table> of a page as a list of rows, each a list of cell texts (th and td alike)."""

    def __init__(self):
        super().__init__()
        self.tables, self._cell = [], None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = ""

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append(self._cell.strip())
            self._cell = None


def results_rows(text: str) -> dict[str, dict[str, str]]:
    """The report's results table (the one with a ``run`` and an ``mIoU`` column): {run: {column: cell}}."""
    parser = _Tables()
    parser.feed(text)
    tables = [t for t in parser.tables if t and {"run", "mIoU"} <= set(t[0])]
    assert len(tables) == 1, [t[0] for t in parser.tables]
    head, *rows = tables[0]
    return {row[head.index("run")]: dict(zip(head, row)) for row in rows}

TINY = ["--iters", "1", "--per-class", "10", "--no-progress", "--set", "encoder=test_resnet",
        "--set", "synthetic_size=[64, 64]", "--set", "crop=[64, 64]", "--set", "synthetic_train_len=8",
        "--set", "num_workers=0", "--set", "eval_batch_size=50"]


def test_demo_trains_every_method_and_writes_one_self_contained_report(tmp_path):
    out = tmp_path / "demo"
    res = run_ctxseg(["demo", "--out", str(out), *TINY])
    assert res.returncode == 0, res.stderr[-3000:]
    report = out / "report.html"
    assert res.stdout.strip().splitlines()[-1] == f"report: {report.resolve()}"
    assert DEMO_METHODS == list(METHODS)  # every registered method is in the demo
    text = report.read_text()
    table = results_rows(text)
    assert sorted(table) == sorted(DEMO_METHODS)
    for name in DEMO_METHODS:
        # The report's and the command's numbers are the run's eval.json, at 3 decimals.
        final = json.loads((out / name / "eval.json").read_text())
        row = table[name]
        assert (row["method"], row["mIoU"], row["boundary IoU"], row["pixel acc"]) == \
            (name, f"{final['miou']:.3f}", f"{final['boundary_iou']:.3f}", f"{final['pixel_acc']:.3f}")
        assert {k[4:]: v for k, v in row.items() if k.startswith("IoU ")} == \
            {c: "" if v is None else f"{v:.3f}" for c, v in final["per_class_iou"].items()}
        weak = "cam" in final
        assert row["CAM mIoU"] == (f"{final['cam']['miou']:.3f}" if weak else "")
        assert row["pseudo mIoU"] == (f"{final['pseudo']['miou']:.3f}" if weak else "")
        assert f"{name:15s} synthetic val: mIoU {final['miou']:.3f}, boundary IoU {final['boundary_iou']:.3f}" \
            in res.stdout
    # Self-contained: figures inline, nothing fetched (no src= other than data: URIs).
    sources = re.findall(r'src="([^"]*)"', text)
    assert len(sources) == 4 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "Pixel embeddings (UMAP)" in text and "silhouette" in text and "pseudo" in text

    stamps = {n: (out / n / "eval.json").stat().st_mtime_ns for n in DEMO_METHODS}
    again = run_ctxseg(["demo", "--out", str(out), *TINY])
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished earlier with the same settings, reusing") == len(DEMO_METHODS)
    assert stamps == {n: (out / n / "eval.json").stat().st_mtime_ns for n in DEMO_METHODS}

    # Other settings: refused before anything is trained, naming the folder and the keys.
    longer = run_ctxseg(["demo", "--out", str(out), *TINY, "--iters", "2"])
    assert longer.returncode == 2 and "Traceback" not in longer.stderr
    assert f"run folder {out / DEMO_METHODS[0]} was made with other settings" in longer.stderr
    assert "iters (folder: 1, asked: 2)" in longer.stderr and "eval_every" not in longer.stderr  # 1 // 2 -> 1 both
    other = run_ctxseg(["demo", "--out", str(out), "--methods", "ce", *TINY, "--set", "lr=0.5"])
    assert other.returncode == 2 and f"{out / 'ce'} was made with other settings: lr (folder: " in other.stderr
    assert "asked: 0.5)" in other.stderr
    # A runtime key is not a setting: the runs are reused.
    runtime = run_ctxseg(["demo", "--out", str(out), "--methods", "ce", *TINY, "--set", "ckpt_every=7"])
    assert runtime.returncode == 0 and "finished earlier with the same settings, reusing" in runtime.stdout
    assert stamps == {n: (out / n / "eval.json").stat().st_mtime_ns for n in DEMO_METHODS}


def test_demo_rejects_a_bad_setting_before_training(tmp_path):
    res = run_ctxseg(["demo", "--out", str(tmp_path / "demo"), "--set", "no_such_setting=1"])
    assert res.returncode == 2 and "no_such_setting" in res.stderr
    assert not (tmp_path / "demo").exists()
