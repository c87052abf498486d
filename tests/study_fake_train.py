"""A stand-in for a study's training function (module level, so that ``--jobs`` can pickle it into
its worker processes): it writes the run folder's config.yaml and eval.json, or raises ``error`` for
the runs in ``fail`` ({(method, seed)}): FloatingPointError as a diverged training does (the
trainer's non-finite loss), or an input error such as DatasetError."""

import json
from pathlib import Path

import yaml

from ctxseg.config import to_plain


def fake_train(cfg, fail=frozenset(), error=FloatingPointError):
    if (cfg.method, cfg.seed) in fail:
        raise error(f"boom in {cfg.method} seed {cfg.seed}")
    run = Path(cfg.out)
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(yaml.safe_dump(to_plain(cfg), sort_keys=False))
    miou = 0.5 + cfg.seed / 100 + (0.02 if cfg.method != "ce" else 0.0)
    (run / "eval.json").write_text(json.dumps({"miou": miou, "boundary_iou": 0.3, "pixel_acc": 0.8,
                                               "per_class_iou": {"sky": 0.9}, "split": cfg.eval_split}))
