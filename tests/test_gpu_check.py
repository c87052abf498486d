"""benchmarks/gpu_check.py: without a GPU one line and a non-zero status, at once; its measuring
code, run on the CPU at a tiny size (the numbers are not looked at, only the report)."""

import os
import subprocess
import sys

import pytest
from conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def run_check(*args, env=None, timeout=60):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_without_a_gpu_it_says_so_in_one_line_and_fails():
    res = run_check(env={"CUDA_VISIBLE_DEVICES": ""})  # no GPU even on a machine that has one
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no CUDA GPU is visible"), res.stderr


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_on_cpu_it_reports_each_method_against_ce_and_a_two_process_run():
    methods = ["ce", "pixel_contrast:memory=true,memory_size=20", "contextrast", "wsss_cam", "dscnet"]
    res = run_check("--cpu", "--encoder", "test_resnet", "--crop", "32", "32", "--batch-size", "4", "--steps", "1",
                    "--warmup", "1", "--pool", "2", "--set", "synthetic_size=[32, 32]",
                    "--set", "synthetic_train_len=8", "--ddp", "on", "--methods", *methods, timeout=280)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    ddp_at = next(i for i, line in enumerate(lines) if line.startswith("DDP, torchrun 2 processes"))
    for part in (lines[:ddp_at], lines[ddp_at:]):
        rows = {line.split()[0]: line for line in part if line.split() and line.split()[0] in methods}
        assert list(rows) == methods, part
        assert rows["ce"].split()[4] == "1.00x" and all(r.split()[4].endswith("x") for r in rows.values())
    assert lines[-1].startswith("images/s with 2 processes / with 1: ce ")
