"""benchmarks/gpu_check.py: without a GPU one line and a non-zero status, at once; its measuring
code, run on the CPU at a tiny size (the report, and its ratios against the times it prints); the
table's arithmetic on fabricated timings."""

import importlib.util
import os
import subprocess
import sys

import pytest
from conftest import ROOT, assert_printed_ratio

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
    tables = []
    for part in (lines[:ddp_at], lines[ddp_at:]):
        rows = {line.split()[0]: line.split() for line in part if line.split() and line.split()[0] in methods}
        assert list(rows) == methods, part
        # method, ms/step, images/s, peak MiB ("-" on a CPU), ms/step vs ce, memory vs ce ("-").
        for r in rows.values():
            assert r[3] == r[5] == "-", r
            assert_printed_ratio(r[4], float(r[1]), float(rows["ce"][1]), 0.1)
        tables.append(rows)
    # The last line: each method's images/s with 2 processes over its images/s with 1.
    assert lines[-1].startswith("images/s with 2 processes / with 1: ce ")
    ratios = dict(item.split() for item in lines[-1].split(": ", 1)[1].split(", "))
    assert list(ratios) == methods
    for m in methods:
        assert_printed_ratio(ratios[m], float(tables[1][m][2]), float(tables[0][m][2]), 1.0)


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_table_divides_each_method_by_ce_on_fabricated_timings(capsys):
    gpu_check = load_script()
    row = {"images_s": 100.0, "loss": 1.0, "sync_bn": False, "amp": "bfloat16"}
    gpu_check.print_table({"ce": {**row, "ms": 20.0, "peak_mib": 400.0},
                           "pixel_contrast": {**row, "ms": 50.0, "images_s": 40.0, "peak_mib": 1000.0},
                           "dscnet": {**row, "ms": 16.0, "peak_mib": 300.0, "loss": float("nan")}})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["method", "ms/step", "images/s", "peak", "MiB", "vs", "ce", "mem", "vs", "ce"]
    assert [line.split() for line in lines[1:]] == [
        ["ce", "20.0", "100", "400", "1.00x", "1.00x"],
        ["pixel_contrast", "50.0", "40", "1000", "2.50x", "2.50x"],
        ["dscnet", "16.0", "100", "300", "0.80x", "0.75x", "(loss", "not", "finite)"],
    ]
    # Without ce in the list, or on a CPU (no memory figure), there is nothing to divide by.
    gpu_check.print_table({"dscnet": {**row, "ms": 16.0, "peak_mib": None}})
    assert capsys.readouterr().out.splitlines()[1].split() == ["dscnet", "16.0", "100", "-", "-", "-"]
