"""Worker of ``baseline.TreeWorker``: imports ctxseg from PYTHONPATH (a past revision's package), builds one method's training step from the JSON settings in argv[1], prints ``ready``
and the package's path, then answers each ``step`` line on stdin with one step's seconds.

Only calls that every revision since the first benchmarks has are used (method config classes,
``apply_overrides``, ``build_model``, ``SyntheticScenes`` and ``train_transform``)."""

import json
import sys
import time

import torch

import ctxseg
from ctxseg.config import apply_overrides
from ctxseg.data import SyntheticScenes, train_transform
from ctxseg.engine.evaluate import build_model
from ctxseg.methods import get_method

setup = json.loads(sys.argv[1])
torch.set_num_threads(setup["threads"])
size = tuple(setup["size"])
ds = SyntheticScenes("train", length=setup["batch_size"], size=size, transform=train_transform(size))
items = [ds[(i, i)] for i in range(setup["batch_size"])]
batch = {k: torch.stack([it[k] for it in items]) for k in ("image", "mask", "tags")}
cls = get_method(setup["method"])
torch.manual_seed(0)
cfg = apply_overrides(cls.config_class(method=setup["method"], iters=10_000, encoder=setup["encoder"]),
                      setup["settings"], "baseline")
method = cls(cfg, ds.info, total_iters=10_000)
model = build_model(cfg, ds.info.num_classes, heads=method.heads)
opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
print("ready", ctxseg.__file__, flush=True)
for line in sys.stdin:
    t = time.perf_counter()
    model.train()
    loss, _ = method(model(batch["image"]), batch, step=10_000)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    print(time.perf_counter() - t, flush=True)
