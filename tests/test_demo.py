"""``make demo``'s job: every method trained on synthetic scenes and one self-contained report;
a second call reuses the finished runs; a bad setting fails before anything is trained."""

import re

import pytest
from conftest import run_ctxseg

from ctxseg.cli import DEMO_METHODS

pytestmark = pytest.mark.slow

TINY = ["--iters", "1", "--per-class", "10", "--no-progress", "--set", "encoder=test_resnet",
        "--set", "synthetic_size=[64, 64]", "--set", "crop=[64, 64]", "--set", "synthetic_train_len=8",
        "--set", "num_workers=0", "--set", "eval_batch_size=50"]


def test_demo_trains_every_method_and_writes_one_self_contained_report(tmp_path):
    out = tmp_path / "demo"
    res = run_ctxseg(["demo", "--out", str(out), *TINY])
    assert res.returncode == 0, res.stderr[-3000:]
    report = out / "report.html"
    assert res.stdout.strip().splitlines()[-1] == f"report: {report.resolve()}"
    assert set(DEMO_METHODS) == {"ce", "pixel_contrast", "contextrast", "wsss_cam", "dscnet"}
    text = report.read_text()
    for name in DEMO_METHODS:
        assert (out / name / "eval.json").is_file()
        assert re.search(rf"<td[^>]*>{name}</td>", text), f"no table row for {name}"
        assert f"{name:15s} synthetic val: mIoU" in res.stdout
    # Self-contained: figures inline, nothing fetched (no src= other than data: URIs).
    sources = re.findall(r'src="([^"]*)"', text)
    assert len(sources) == 4 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "Pixel embeddings (UMAP)" in text and "silhouette" in text and "pseudo" in text

    stamps = {n: (out / n / "eval.json").stat().st_mtime_ns for n in DEMO_METHODS}
    again = run_ctxseg(["demo", "--out", str(out), *TINY])
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished earlier, reusing") == len(DEMO_METHODS)
    assert stamps == {n: (out / n / "eval.json").stat().st_mtime_ns for n in DEMO_METHODS}


def test_demo_rejects_a_bad_setting_before_training(tmp_path):
    res = run_ctxseg(["demo", "--out", str(tmp_path / "demo"), "--set", "no_such_setting=1"])
    assert res.returncode == 2 and "no_such_setting" in res.stderr
    assert not (tmp_path / "demo").exists()
