"""How a weakly supervised run's CAMs name the classes over its checkpoints: for every
``ckpt/step_*.pt`` of a run, the tag-restricted CAM argmax on the first N val images (full
resolution, no PAMR) against the labels: per-class IoU, and for the classes asked (default sky and
ground) where their pixels go. This is how the sky / ground swap of the synthetic scenes was found
to be settled in the first 50 steps (README, weakly supervised Results).

    python -m ctxseg train --method wsss_cam --seed 1 --ckpt-every 50 --set keep_ckpts=20 --out runs/wsss-s1
    python benchmarks/cam_checkpoints.py runs/wsss-s1 [--images 32] [--classes sky ground]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from ctxseg.engine.checkpoint import list_checkpoints
from ctxseg.engine.evaluate import eval_dataset
from ctxseg.engine.metrics import SegMetrics
from ctxseg.methods.wsss import restrict_to_tags
from ctxseg.runs import open_run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", help="a weakly supervised run folder with ckpt/step_*.pt")
    p.add_argument("--images", type=int, default=32, help="first N val images (default 32)")
    p.add_argument("--classes", nargs="+", default=["sky", "ground"], help="classes whose pixels to follow")
    args = p.parse_args()
    ckpts = list_checkpoints(f"{args.run}/ckpt")
    if not ckpts:
        raise SystemExit(f"{args.run}/ckpt holds no step_*.pt (train with --ckpt-every N)")
    data = None
    for ckpt in ckpts:
        run = open_run(ckpt)
        if data is None:
            data = eval_dataset(run.cfg, "val")
        names = run.class_names
        metrics = SegMetrics(len(names), class_names=names)
        with torch.no_grad():
            for i in range(min(args.images, len(data))):
                item = data[i]
                logits = run.model(item["image"][None], with_heads=False)["logits"].float()
                logits = F.interpolate(logits, size=item["mask"].shape, mode="bilinear", align_corners=False)
                cams = restrict_to_tags(run.method.cams(logits), item["tags"][None], data.info.background)
                metrics.update(cams.argmax(1), item["mask"][None])
        result = metrics.compute()
        conf = torch.as_tensor(result["confusion"], dtype=torch.float64)
        line = [f"step {run.step:5d}  CAM mIoU {result['miou']:.3f}"]
        for name in args.classes:
            k = names.index(name)
            row = conf[k] / conf[k].sum().clamp(min=1)
            top = sorted(((float(v), names[j]) for j, v in enumerate(row) if v >= 0.05), reverse=True)
            share = ", ".join(f"{n} {v:.2f}" for v, n in top)
            line.append(f"{name}: IoU {result['per_class_iou'][name]:.2f} (its pixels -> {share})")
        print("  ".join(line), flush=True)


if __name__ == "__main__":
    main()
