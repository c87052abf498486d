"""torchrun on CPU (gloo): two processes train, evaluate each on half the images, and the
all-reduced metrics equal a single-process evaluation of the same weights."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, TINY_TRAIN, run_ctxseg

pytestmark = pytest.mark.slow


@pytest.mark.timeout(300)
def test_torchrun_two_processes_on_cpu(tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "ctxseg", "train", "--method", "ce", *TINY_TRAIN, "--iters", "6", "--out", str(out),
           "--no-progress", "--set", "num_workers=0", "--set", "device=cpu"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(res.stdout.strip().splitlines()) == 1  # only rank 0 prints its summary
    ddp_eval = json.loads((out / "eval.json").read_text())
    assert ddp_eval["num_images"] == 200  # each image counted exactly once across the ranks

    single = run_ctxseg(["eval", "--checkpoint", str(out), "--split", "val", "--num-workers", "0"])
    assert single.returncode == 0, single.stderr
    single_eval = json.loads(single.stdout)
    assert single_eval["miou"] == pytest.approx(ddp_eval["miou"], abs=1e-12)
    assert single_eval["per_class_iou"] == pytest.approx(ddp_eval["per_class_iou"], abs=1e-12)
