"""The benchmark scripts still run (tiny sizes; the numbers are not judged, but each printed ratio
must be its row's time over the baseline's); the ratio arithmetic on fabricated timings."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, assert_printed_ratio

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
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(names)}
    assert len(rows) == 8, out
    # method, train ms/step, vs ce, infer ms, vs ce, deployed params: each ratio is its row's time
    # over ce's, and every method deploys the same segmenter as ce (its heads are training-only).
    for r in rows.values():
        assert_printed_ratio(r[2], float(r[1]), float(rows["ce"][1]), 0.1)
        assert_printed_ratio(r[4], float(r[3]), float(rows["ce"][3]), 0.1)
        assert r[5] == rows["ce"][5], (r, out)


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
    rows = {line.split()[0]: line.split() for line in out.splitlines()
            if line.startswith(("fast ", "reproducible ")) and line.endswith("x")}
    assert list(rows) == ["fast", "reproducible"], out
    for r in rows.values():  # path, fit s, process s, vs fast, again s, vs fast
        assert_printed_ratio(r[3], float(r[1]), float(rows["fast"][1]), 0.1)
        assert_printed_ratio(r[5], float(r[4]), float(rows["fast"][4]), 0.1)
    assert "the 30 s goal at 300 points" in out, out


def load_bench(script):
    """A benchmark script as a module (``benchmarks/`` on sys.path, as when it runs)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location(Path(script).stem, ROOT / "benchmarks" / script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return module


def test_ratio_columns_divide_by_the_baseline_on_fabricated_timings(monkeypatch, capsys):
    # bench_umap: each path's first and second layout over the fast path's.
    umap = load_bench("bench_umap.py")
    fake = {"fast": {"fit": 2.0, "again": 0.5, "process": 9.0, "n": 300},
            "reproducible": {"fit": 5.0, "again": 0.4, "process": 12.0, "n": 300},
            "umap-learn defaults": {"fit": 3.0, "again": 1.5, "process": 10.0, "n": 300}}
    monkeypatch.setattr(umap, "run_child", lambda path, args: fake[path])
    monkeypatch.setattr(sys, "argv", ["bench_umap.py", "--points", "300"])
    umap.main()
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:5]]
    assert rows == [["fast", "2.0", "9.0", "1.00x", "0.5", "1.00x"],
                    ["reproducible", "5.0", "12.0", "2.50x", "0.4", "0.80x"],
                    ["umap-learn", "defaults", "3.0", "10.0", "1.50x", "1.5", "3.00x"]]

    # bench_train_step: each method's step and inference over ce's, and the GEMMs line over ce's
    # step. Every step and inference still runs once (a fake clock, not fake work).
    bench = load_bench("bench_train_step.py")
    pc = "pixel_contrast:memory=true,memory_size=20"
    clock = iter([{"ce": 20.0, pc: 30.0, ("gemms", pc): 5.0}, {"ce": 10.0, pc: 15.0}])  # steps, then inference
    ran = []

    def fake_clock(fns, warmup, repeats):
        times = next(clock)
        assert set(fns) == set(times)
        for k, fn in fns.items():  # a fake clock, not fake work: each step and inference runs once
            fn()
            ran.append(k)
        return times

    monkeypatch.setattr(bench, "time_interleaved", fake_clock)
    monkeypatch.setattr(sys, "argv", ["bench_train_step.py", "--encoder", "test_resnet", "--size", "32", "32",
                                      "--batch-size", "2", "--methods", "ce", pc])
    bench.main()
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split()[:5] for line in lines if line.startswith(("ce ", pc))]
    assert rows == [["ce", "20.0", "1.00x", "10.0", "1.00x"], [pc, "30.0", "1.50x", "15.0", "1.50x"]], lines
    gemms = next(line for line in lines if "GEMMs only" in line)
    assert gemms.endswith(": 5.0 ms = 0.25x ce's step"), gemms
    assert len(ran) == 5


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
    assert rows[head][3] == "-", out  # a step time and ratio, no inference
    for r in rows.values():
        assert_printed_ratio(r[2], float(r[1]), float(rows["ce"][1]), 0.1)
    # ce@HEAD is another copy of the package (exported from git into a temporary folder, imported
    # by its own process), not the tree under test timed twice.
    origin = next(line for line in out.splitlines() if line.startswith(f"{head}: the package at"))
    assert "in its own process" in origin and "/ctxseg/__init__.py" in origin, out
    assert str(ROOT / "ctxseg") not in origin and f"ctxseg-{head[3:]}-" in origin, origin


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
