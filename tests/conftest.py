import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

# Small and deterministic everywhere: 2-core CI machines, no GPU.
torch.set_num_threads(min(2, os.cpu_count() or 1))

# A tiny but complete training run (timm's test encoder, 64x64 synthetic images).
TINY_TRAIN = [
    "--encoder", "test_resnet", "--crop", "64", "64", "--batch-size", "4",
    "--set", "synthetic_size=[64, 64]", "--set", "synthetic_train_len=32",
    "--set", "eval_batch_size=50", "--set", "log_every=2",
]


def run_ctxseg(args, **kw):
    """Run ``python -m ctxseg ARGS`` in a subprocess from the repo root."""
    import subprocess

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "ctxseg", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, **kw)


@pytest.fixture
def shared_camvid():
    root = SHARED / "data" / "camvid"
    if not (root / "train").is_dir():
        pytest.skip("../shared/data/camvid is not present (only developers' checkouts have it)")
    return root
