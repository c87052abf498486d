"""torchrun on CPU (gloo): two processes train, evaluate each on half the images, and the
all-reduced metrics equal a single-process evaluation of the same weights; two processes train the
weights one process trains on the same global batches; each method trains under torchrun."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
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


def train_two_ranks(settings: dict, processes: int = 2):
    """Train ``settings`` with torchrun on 2 CPU processes (tests/ddp_worker.py) and return each
    rank's saved {model, method, step, init} state; ``processes=1``: one plain process, no torchrun."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if processes == 2 else []
    cmd = [sys.executable, *launch, str(ROOT / "tests" / "ddp_worker.py"), json.dumps(settings)]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert res.returncode == 0, res.stderr[-3000:]
    return [torch.load(Path(settings["out"]) / f"rank{r}.pt", weights_only=True) for r in range(processes)]


@pytest.mark.timeout(300)
def test_two_processes_train_the_weights_one_process_trains_on_the_global_batch(tmp_path):
    """Rank 0 after DDP training equals one process trained on the same global batches, up to
    float rounding. Exact in exact arithmetic because: the sampler gives each rank its half of
    every global batch (the same images and augmentation seeds as the single process's batch);
    CE is a mean over pixels, and with crops the size of the image (scale 1: no padding) and no
    ignored pixels both halves hold the same number, so the mean of the two ranks' losses, which
    DDP's gradient averaging differentiates, is the global batch's mean; SGD then takes the same
    step. BatchNorm would break it (each rank normalises with its own half's statistics, and
    SyncBatchNorm does not run on a CPU): every BN layer stays in eval mode here (ddp_worker's
    bn_eval). Tolerance: float32 summation order differs (gloo's all-reduce, convolutions over 2
    images instead of 4), about 1e-7 relative per step; 1e-5 after 4 steps, where the weights
    move by more than 100 times that (so a rank seeing other images, or gradients summed instead
    of averaged, fails)."""
    settings = dict(method="ce", encoder="test_resnet", crop=[32, 32], batch_size=4, synthetic_size=[32, 32],
                    synthetic_train_len=8, scale_range=[1.0, 1.0], optimizer="sgd", lr=0.02, momentum=0.9,
                    eval_batch_size=100, num_workers=0, device="cpu", iters=4, bn_eval=True)
    r0, r1 = train_two_ranks({**settings, "out": str(tmp_path / "ddp")})
    (one,) = train_two_ranks({**settings, "out": str(tmp_path / "one")}, processes=1)
    assert r0["step"] == one["step"] == 4
    assert r0["model"].keys() == one["model"].keys()
    moved = 0.0
    for k, w in one["model"].items():
        assert torch.equal(r0["init"][k], one["init"][k]), k  # the same start
        torch.testing.assert_close(r0["model"][k], w, atol=1e-5, rtol=1e-4, msg=k)
        assert torch.equal(r0["model"][k], r1["model"][k]), k
        if w.is_floating_point():
            moved = max(moved, float((w - one["init"][k]).abs().max()))
    assert moved > 1e-3, moved


@pytest.mark.timeout(300)
def test_pixel_contrast_ranks_end_with_identical_weights_and_queues(tmp_path):
    out = tmp_path / "pc"
    settings = dict(method="pixel_contrast", encoder="test_resnet", crop=[64, 64], batch_size=4,
                    synthetic_size=[64, 64], synthetic_train_len=32, eval_batch_size=50, num_workers=0,
                    device="cpu", iters=6, memory=True, memory_size=40, contrast_warmup=0.34, max_views=20,
                    out=str(out))
    r0, r1 = train_two_ranks(settings)
    assert r0["step"] == r1["step"] == 6
    for part in ("model", "method"):
        assert r0[part].keys() == r1[part].keys()
        for k in r0[part]:
            assert torch.equal(r0[part][k], r1[part][k]), (part, k)
    # The queues hold keys from both ranks: 6 steps x 4 images (2 per rank), each (image, class)
    # present pushing one region key, so more region keys than one rank's 2 images x 6 steps allow.
    counts = r0["method"]["memory.region_count"]
    assert counts.max() > 2 * 6
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("contrast", 0) > 0 for r in rows)


@pytest.mark.timeout(300)
def test_contextrast_trains_under_torchrun_with_every_head_in_the_graph(tmp_path):
    # DDP (find_unused_parameters=False) fails at the second step if any projection head's
    # parameters miss a gradient; the ranks must end with identical weights.
    out = tmp_path / "ctx"
    settings = dict(method="contextrast", encoder="test_resnet", crop=[64, 64], batch_size=4,
                    synthetic_size=[64, 64], synthetic_train_len=32, eval_batch_size=50, num_workers=0,
                    device="cpu", iters=4, out=str(out))
    r0, r1 = train_two_ranks(settings)
    assert r0["step"] == r1["step"] == 4
    assert any(k.startswith("heads.ctx_proj.nets.3") for k in r0["model"])
    for k in r0["model"]:
        assert torch.equal(r0["model"][k], r1["model"][k]), k
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["contrast"] > 0 for r in rows if "contrast" in r)


@pytest.mark.timeout(300)
def test_dscnet_trains_under_torchrun_with_the_graph_in_the_loss(tmp_path):
    # The GCN's weights are used in the loss, outside the DDP forward; they and both heads must
    # get their gradients reduced (identical weights on both ranks), variant B coupling both
    # streams. seg_warmup 0 so that PGCL is on from the first step, and no gating: an untrained
    # model's pseudo labels miss tags, which would gate every image out and leave PGCL nothing.
    out = tmp_path / "dsc"
    settings = dict(method="dscnet", dual_stream="B", seg_warmup=0.0, seg_gate=False, encoder="test_resnet", crop=[64, 64],
                    batch_size=4, synthetic_size=[64, 64], synthetic_train_len=32, eval_batch_size=50,
                    num_workers=0, device="cpu", iters=4, out=str(out))
    r0, r1 = train_two_ranks(settings)
    assert r0["step"] == r1["step"] == 4
    assert any(k.startswith("heads.sgcl_graph.gcn.1") for k in r0["model"])
    for k in r0["model"]:
        assert torch.equal(r0["model"][k], r1["model"][k]), k
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["pgcl"] > 0 for r in rows if "pgcl" in r)
