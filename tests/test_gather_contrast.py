"""Contrast across processes (``gather_contrast``) and per-rank sampling streams, under torchrun
with 2 CPU processes (gloo).

One torchrun launch (tests/contrast_dist_worker.py) computes, for each method, the contrastive
term on each rank's half of a fixed batch of 4 images with the setting on and off, against one
process given the whole batch, and the gradients:

- ``term``: each rank's contrastive term equals the single-process term;
- ``rows``: each rank's gradient with respect to the embeddings / features the method reads
  (Contextrast: the four stages' hidden maps; pixel contrast: the projection head's hidden map; DSCNet:
  the decoder features and the embedding map), divided by the world size, equals the rows of the
  single-process gradient for that rank's images (every rank's term is the whole batch's, so
  the gradient each rank gets for its share is world size x the single-process one);
- ``params``: the mean over the ranks of the parameter gradients (what DDP's all-reduce gives)
  equals the single-process parameter gradient.

All three to float32 tolerance (relative to the largest single-process value: term 1e-5,
gradients 2e-4); with ``gather_contrast=false`` they differ. Sampling takes every candidate
pixel (budgets larger than the grid), so both runs contrast the same anchors.

Then: a 2-process training run killed mid-way (torchrun and its workers, SIGKILL) and resumed
ends bit-identical to the uninterrupted 2-process run (each rank's random stream is in the
checkpoint).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file

from ctxseg.engine.checkpoint import list_checkpoints, load_checkpoint

pytestmark = pytest.mark.slow

CASES = ["contextrast", "contextrast_batch_percentile", "pixel_contrast", "pixel_contrast_memory", "dscnet_A",
         "dscnet_B"]


def torchrun(args: list[str], timeout: int = 280) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-4000:]
    return res


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("gather")
    torchrun([str(ROOT / "tests" / "contrast_dist_worker.py"), str(out)])
    return json.loads((out / "results.json").read_text())


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", CASES)
def test_gathered_contrast_equals_one_process_on_the_whole_batch(results, case):
    for rank in results:
        on, off = rank[case]["on"], rank[case]["off"]
        assert on["term"] < 1e-5, (case, on)
        assert on["rows"] < 2e-4, (case, on)
        assert on["params"] < 2e-4, (case, on)
        # Off, each process contrasts its own share: another term, other gradients.
        assert off["term"] > 1e-5 and off["rows"] > 1e-2 and off["params"] > 1e-2, (case, off)
        if rank[case]["single_anchors"] is not None:  # the logged anchors: the global sample, or the own share
            assert on["anchors"] == rank[case]["single_anchors"] > off["anchors"] > 0, (case, on, off)


@pytest.mark.timeout(300)
def test_ranks_draw_from_their_own_streams(results):
    for rank in results:
        s = rank["streams"]
        assert s["rng_states_differ"], "both ranks hold the same random state after the model's init"
        assert s["same_counts"] and s["anchor_sets_differ"], "both ranks drew the same anchors from the same labels"
        assert s["params_equal"]  # the model's initialisation is the same everywhere


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


@pytest.mark.timeout(400)
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds torchrun's workers in /proc")
def test_killed_two_process_run_resumes_bit_identical(tmp_path):
    # Pixel contrast from the first step with a budget below the grid: the anchors are a random
    # sample, drawn from each rank's own stream, so rank 1 restored with rank 0's stream (or a
    # fresh one) would end elsewhere.
    common = ["-m", "ctxseg", "train", "--method", "pixel_contrast", "--encoder", "test_resnet", "--crop", "32", "32",
              "--batch-size", "4", "--iters", "12", "--ckpt-every", "3", "--no-progress",
              "--set", "synthetic_size=[32, 32]", "--set", "synthetic_train_len=16", "--set", "eval_batch_size=50",
              "--set", "log_every=1", "--set", "num_workers=0", "--set", "device=cpu", "--set", "contrast_warmup=0",
              "--set", "max_views=4", "--set", "anchors_per_image=8"]
    ref = tmp_path / "ref"
    torchrun([*common, "--out", str(ref)])

    out = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    agent = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              *common, "--out", str(out)], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 200
    while not list_checkpoints(out / "ckpt") and time.time() < deadline and agent.poll() is None:
        time.sleep(0.05)
    for pid in [*_children(agent.pid), agent.pid]:  # the workers (own sessions), then torchrun
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    agent.wait()
    assert agent.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    state = load_checkpoint(list_checkpoints(out / "ckpt")[-1])
    assert 0 < state["step"] < 12 and len(state["rng_ranks"]) == 2
    assert not torch.equal(state["rng_ranks"][0]["torch"], state["rng_ranks"][1]["torch"])

    torchrun([*common, "--out", str(out), "--resume"])
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    loss = lambda run: {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                        if "loss" in r}
    assert loss(out) == loss(ref)
