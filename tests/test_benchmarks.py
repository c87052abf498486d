"""The benchmark scripts still run (tiny sizes; the numbers are not looked at, only the report)."""

import os
import subprocess
import sys

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow


def run_bench(script, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def test_train_step_benchmark_reports_every_method_against_ce():
    out = run_bench("bench_train_step.py", "--encoder", "test_resnet", "--size", "64", "64", "--batch-size", "2",
                    "--warmup", "0", "--repeats", "1", "--methods", "ce", "pixel_contrast",
                    "pixel_contrast:memory=true,memory_size=20", "contextrast", "contextrast:bane=false",
                    "wsss_cam", "dscnet", "dscnet:dual_stream=B")
    names = ("ce ", "pixel_contrast", "contextrast", "wsss_cam", "dscnet")
    rows = [line for line in out.splitlines() if line.startswith(names)]
    assert len(rows) == 8 and all(line.count("x") >= 2 for line in rows), out


def test_wsss_benchmark_reports_cam_and_pamr_against_the_forward_pass():
    out = run_bench("bench_wsss.py", "--encoder", "test_resnet", "--size", "32", "32", "--batch-size", "2",
                    "--classes", "4", "--background", "--warmup", "0", "--repeats", "1", "--threads", "1")
    rows = [line for line in out.splitlines() if line.startswith(("segmenter", "CAM"))]
    assert len(rows) == 3 and all(line.rstrip().endswith("x") for line in rows), out


def test_pixel_contrast_benchmark_compares_three_variants():
    out = run_bench("bench_pixel_contrast.py", "--batch-size", "2", "--dim", "8", "--hidden", "4", "--size", "32", "32",
                    "--classes", "4", "--repeats", "1", "--threads", "1")
    for name in ("vectorised", "loop-sampling", "loop"):
        assert any(line.startswith(name + " ") for line in out.splitlines()), out


def test_anchor_coverage_reports_every_class():
    out = run_bench("anchor_coverage.py", "--crop", "64", "64", "--samples", "3", "--max-views", "10")
    assert "grid 16x16" in out and len(out.strip().splitlines()) == 2 + 8, out


def test_umap_benchmark_times_each_path_against_the_fast_one():
    out = run_bench("bench_umap.py", "--points", "300", "--dim", "8", "--paths", "fast", "reproducible")
    rows = [line for line in out.splitlines() if line.startswith(("fast ", "reproducible ")) and line.endswith("x")]
    assert len(rows) == 2 and rows[0].rstrip().endswith("1.00x"), out
    assert "the 30 s goal at 300 points" in out, out


def test_weak_crops_reports_lost_tags_and_the_weak_default_loses_none():
    out = run_bench("weak_crops.py", "--samples", "20")
    lines = out.splitlines()
    assert lines[0].startswith("supervised (CE)") and lines[1].startswith("weakly supervised"), out
    assert ": 0.0% of tags name a class the crop lost" in lines[1], out
    assert sum(line.startswith(("sky", "bird", "person")) for line in lines) == 3, out


def test_cam_checkpoints_follows_a_weak_run_over_its_checkpoints(tmp_path):
    run = tmp_path / "wsss"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    train = [sys.executable, "-m", "ctxseg", "train", "--method", "wsss_cam", "--encoder", "test_resnet",
             "--iters", "2", "--ckpt-every", "1", "--crop", "32", "32", "--batch-size", "2", "--out", str(run),
             "--no-progress", "--set", "synthetic_size=[32, 32]", "--set", "synthetic_train_len=8",
             "--set", "num_workers=0", "--set", "pamr_iters=1"]
    res = subprocess.run(train, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = run_bench("cam_checkpoints.py", str(run), "--images", "2", "--classes", "sky").splitlines()
    assert [line.split()[:2] for line in lines] == [["step", "1"], ["step", "2"]], lines
    assert all("sky: IoU" in line and "its pixels ->" in line for line in lines), lines


def test_train_step_benchmark_times_ce_with_the_whole_package_at_a_revision():
    out = run_bench("bench_train_step.py", "--encoder", "test_resnet", "--size", "32", "32", "--batch-size", "2",
                    "--warmup", "0", "--repeats", "1", "--threads", "1", "--methods", "ce", "ce:channels_last=false",
                    "--baseline", "HEAD")
    rows = {line.split()[0]: line.split() for line in out.splitlines()
            if line.startswith("ce") and line.split()[1].replace(".", "").isdigit()}
    head = next(k for k in rows if k.startswith("ce@"))
    assert set(rows) == {"ce", "ce:channels_last=false", head}, out
    assert rows[head][2].endswith("x") and rows[head][3] == "-", out  # a step time and ratio, no inference
    assert "in its own process" in out and "/ctxseg/__init__.py" in out, out


def test_label_grid_benchmark_reports_each_stride():
    out = run_bench("label_grid.py", "--data", "synthetic", "--crop", "64", "64", "--images", "4", "--small", "bird")
    rows = [line.split() for line in out.splitlines()[2:]]
    assert [r[0] for r in rows] == ["4", "8", "16", "32"], out
    assert [r[1] for r in rows] == ["16x16", "8x8", "4x4", "2x2"], out
    assert all(r[3].endswith("%") and r[4].endswith("%") for r in rows), out


def test_command_benchmark_times_both_trees(tmp_path):
    out = run_bench("bench_command.py", "--baseline", "HEAD", "--repeats", "1", "--", "train", "--method", "ce",
                    "--encoder", "test_resnet", "--crop", "32", "32", "--batch-size", "2", "--iters", "1",
                    "--set", "synthetic_size=[32, 32]", "--set", "synthetic_train_len=4", "--set", "num_workers=0",
                    "--set", "eval_batch_size=50")
    lines = out.splitlines()
    assert sum("run 1:" in line for line in lines) == 2, out
    assert lines[-1].strip().endswith("the current tree's time)") and "median" in lines[-1], out
