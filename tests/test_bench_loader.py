"""benchmarks/bench_loader.py still runs (tiny sizes; the numbers are not looked at, only the report)."""

import os
import subprocess
import sys

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow


def test_loader_benchmark_reports_each_worker_count_and_the_step_it_feeds():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_loader.py"), "--workers", "0", "1",
                          "--batches", "2", "--warmup", "1", "--batch-size", "4", "--crop", "32", "32",
                          "--set", "synthetic_size=[32, 32]", "--set", "synthetic_train_len=8"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.splitlines()
    assert lines[0].startswith("note: 8 training images, fewer than the 12"), res.stdout
    assert lines[1].startswith("synthetic train loader, 8 images, crop 32x32"), res.stdout
    rows = [line.split() for line in lines if line.split() and line.split()[0].isdigit()]
    assert [r[0] for r in rows] == ["0", "1"] and all(r[-1] == "ms" for r in rows), res.stdout
    assert rows[0][3] != "-" and rows[1][3] == "-"  # the CPU rate only where the main process loads


def test_loader_benchmark_times_steps_fed_by_the_loader_at_each_worker_priority():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_loader.py"), "--workers", "0",
                          "--batches", "1", "--batch-size", "2", "--crop", "32", "32", "--train-step",
                          "--step-workers", "0", "1", "--step-nice", "0", "19", "--steps", "1",
                          "--step-batch-size", "2", "--set", "synthetic_size=[32, 32]",
                          "--set", "synthetic_train_len=8", "--set", "encoder=test_resnet"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("workers  nice"))
    rows = [line.split() for line in lines[start + 1:]]
    assert [(r[0], r[1]) for r in rows] == [("0", "0"), ("0", "19"), ("1", "0"), ("1", "19")], res.stdout
    assert all(r[4].endswith("%") and r[6].endswith("%") for r in rows), res.stdout
