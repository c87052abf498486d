"""The trainer: resume after a kill equals an uninterrupted run; checkpoints are safe; exports
and the eval CLI work. These run real (tiny) trainings in subprocesses."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY_TRAIN, run_ctxseg
from safetensors.torch import load_file

from ctxseg.data.synthetic import SYNTHETIC_INFO
from ctxseg.engine.checkpoint import list_checkpoints, load_checkpoint

pytestmark = pytest.mark.slow


def assert_same_weights(a, b):
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_killed_run_resumes_to_the_uninterrupted_weights(tmp_path):
    common = ["train", "--method", "ce", *TINY_TRAIN, "--iters", "24", "--ckpt-every", "4", "--no-progress"]
    ref = run_ctxseg([*common, "--out", str(tmp_path / "ref"), "--set", "num_workers=0"])
    assert ref.returncode == 0, ref.stderr
    losses = [json.loads(r)["loss"] for r in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines() if '"loss"' in r]
    assert sum(losses[-3:]) < sum(losses[:3]), f"the model did not learn: {losses}"

    out = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    # Different worker count on purpose: augmentation must not depend on it.
    proc = subprocess.Popen([sys.executable, "-m", "ctxseg", *common, "--out", str(out), "--set", "num_workers=2"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list_checkpoints(out / "ckpt") and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = load_checkpoint(list_checkpoints(out / "ckpt")[-1])["step"]
    assert 0 < killed_at < 24

    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 23, "lo')  # a row the kill cut short
    res = run_ctxseg([*common, "--out", str(out), "--set", "num_workers=0", "--resume"])
    assert res.returncode == 0, res.stderr
    assert_same_weights(tmp_path / "ref" / "model.safetensors", out / "model.safetensors")
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in rows if "loss" in r]
    assert train_steps == sorted(set(train_steps)), "resume duplicated log rows"
    ref_rows = [json.loads(r) for r in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    ref_loss = {r["step"]: r["loss"] for r in ref_rows if "loss" in r}
    assert {r["step"]: r["loss"] for r in rows if "loss" in r} == ref_loss


def test_truncated_checkpoint_is_a_clear_error_and_the_previous_one_survives(tmp_path):
    out = tmp_path / "run"
    common = ["train", *TINY_TRAIN, "--iters", "6", "--ckpt-every", "2", "--out", str(out),
              "--no-progress", "--set", "num_workers=0", "--set", "keep_ckpts=2"]
    assert run_ctxseg(common).returncode == 0
    ckpts = list_checkpoints(out / "ckpt")
    assert [p.name for p in ckpts] == ["step_00000004.pt", "step_00000006.pt"]  # keep_ckpts=2
    newest, previous = ckpts[-1], ckpts[0]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])

    res = run_ctxseg([*common, "--resume"])
    assert res.returncode == 2
    assert "step_00000006.pt is truncated or corrupt" in res.stderr and "step_00000004.pt" in res.stderr
    assert "Traceback" not in res.stderr
    assert load_checkpoint(previous)["step"] == 4
    res = run_ctxseg([*common, "--resume", str(previous)])
    assert res.returncode == 0, res.stderr


def test_new_run_refuses_to_overwrite_checkpoints(tmp_path):
    out = tmp_path / "run"
    args = ["train", *TINY_TRAIN, "--iters", "2", "--out", str(out), "--no-progress", "--set", "num_workers=0"]
    assert run_ctxseg(args).returncode == 0
    res = run_ctxseg(args)
    assert res.returncode == 2 and "--resume" in res.stderr


def test_checkpoint_holds_only_tensors_and_plain_types(tmp_path):
    out = tmp_path / "run"
    assert run_ctxseg(["train", *TINY_TRAIN, "--iters", "2", "--out", str(out), "--no-progress",
                       "--set", "num_workers=0"]).returncode == 0
    state = torch.load(list_checkpoints(out / "ckpt")[-1], weights_only=True)  # would raise otherwise
    assert {"model", "optimizer", "scheduler", "scaler", "step", "rng", "config", "method"} <= state.keys()
    assert state["config"]["encoder"] == "test_resnet" and state["step"] == 2


def test_eval_cli_prints_one_json_object(tmp_path):
    out = tmp_path / "run"
    assert run_ctxseg(["train", *TINY_TRAIN, "--iters", "4", "--out", str(out), "--no-progress",
                       "--set", "num_workers=0"]).returncode == 0
    for target in (out, out / "model.safetensors", list_checkpoints(out / "ckpt")[-1]):
        res = run_ctxseg(["eval", "--checkpoint", str(target), "--data", "synthetic", "--split", "val",
                          "--num-workers", "0"])
        assert res.returncode == 0, res.stderr
        lines = res.stdout.strip().splitlines()
        assert len(lines) == 1
        result = json.loads(lines[0])
        assert {"miou", "pixel_acc", "boundary_iou", "per_class_iou"} <= result.keys()
        assert result["split"] == "val" and result["num_images"] == 200
        assert list(result["per_class_iou"]) == list(SYNTHETIC_INFO.class_names)  # the 8 classes, in order
    final = json.loads((out / "eval.json").read_text())
    assert final["miou"] == pytest.approx(result["miou"])  # eval CLI reproduces the run's own number

    # The numbers against scikit-learn on this process's own predictions of the 200 val images
    # (the CLI predicts with BatchNorm folded into the convolutions: the same argmax up to float
    # rounding, so a few tied pixels may differ).
    from sklearn.metrics import confusion_matrix, jaccard_score

    from ctxseg.engine.evaluate import eval_dataset
    from ctxseg.runs import open_run

    run = open_run(out)
    val = eval_dataset(run.cfg, "val")
    preds, labels = [], []
    with torch.no_grad():
        for i in range(0, len(val), 50):
            items = [val[j] for j in range(i, min(i + 50, len(val)))]
            preds.append(run.model.eval().predict(torch.stack([t["image"] for t in items])).argmax(1).flatten())
            labels.append(torch.stack([t["mask"] for t in items]).flatten())
    y, p = torch.cat(labels).numpy(), torch.cat(preds).numpy()
    assert len(y) == result["num_pixels"] == 200 * 64 * 64
    k = SYNTHETIC_INFO.num_classes
    cm = confusion_matrix(y, p, labels=list(range(k)))
    assert abs(cm - np.asarray(result["confusion"])).sum() <= 0.001 * len(y)
    present = np.union1d(np.unique(y), np.unique(p))  # IoU is undefined (None) for the other classes
    iou = jaccard_score(y, p, labels=present, average=None)
    assert [c for c, v in result["per_class_iou"].items() if v is not None] == \
        [SYNTHETIC_INFO.class_names[c] for c in present]
    assert result["miou"] == pytest.approx(iou.mean(), abs=2e-3)
    assert result["pixel_acc"] == pytest.approx((y == p).mean(), abs=1e-3)
