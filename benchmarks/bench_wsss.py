"""Throughput of the weakly supervised pipeline's extra work: CAMs + PAMR pseudo labels, next to
the segmenter's forward pass that produces the logits, measured side by side.

    python benchmarks/bench_wsss.py [--size 128 128] [--batch-size 8] [--classes 8] [--device cpu]

For each setting prints ms per batch (median of --repeats, the steps taking turns) for the
forward pass, for CAMs + PAMR + pseudo labels on its logits (stride 4, the training path), and for
the same at full resolution (logits upsampled first, the most expensive evaluation one could
choose), with images per second and the ratio to the forward pass. Compare within one run only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train_step import time_interleaved  # noqa: E402

from ctxseg.config import make_config  # noqa: E402
from ctxseg.data.base import DatasetInfo  # noqa: E402
from ctxseg.engine.evaluate import build_model  # noqa: E402
from ctxseg.methods.wsss import WSSSCam, WSSSConfig  # noqa: E402
from ctxseg.models.segmenter import upsample_to  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--encoder", default="resnet18")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--size", type=int, nargs=2, default=(128, 128))
    p.add_argument("--classes", type=int, default=8)
    p.add_argument("--background", action="store_true", help="class 0 is a background class (VOC)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    names = tuple(f"class{i}" for i in range(args.classes))
    info = DatasetInfo("bench", names, ((0, 0, 0),) * args.classes, background=0 if args.background else None)
    cfg = make_config(WSSSConfig, encoder=args.encoder, iters=1)
    method = WSSSCam(cfg, info, 1)
    torch.manual_seed(0)
    model = build_model(cfg, args.classes).to(device).eval()
    images = torch.rand(args.batch_size, 3, *args.size, device=device)
    tags = (torch.rand(args.batch_size, args.classes, device=device) < 0.3).float()
    with torch.no_grad():
        logits = model(images)["logits"]

    def forward():
        with torch.no_grad():
            model(images)
        sync()

    def cam_pamr(full: bool = False):
        def run():
            with torch.no_grad():
                lg = upsample_to(logits, images.shape[-2:]) if full else logits
                method.pseudo(method.refine(images, method.cams(lg), tags))
            sync()
        return run

    ms = time_interleaved({"forward": forward, "cam_pamr": cam_pamr(), "cam_pamr_full": cam_pamr(True)},
                          args.warmup, args.repeats)
    grid = tuple(logits.shape[-2:])
    print(f"device {device}, threads {torch.get_num_threads()}, encoder {args.encoder}, batch "
          f"{args.batch_size}x3x{args.size[0]}x{args.size[1]}, {args.classes} classes, PAMR {cfg.pamr_iters} iters "
          f"dilations {cfg.pamr_dilations}")
    print(f"{'step':<34}{'ms/batch':>10}{'images/s':>10}{'vs forward':>12}")
    labels = {"forward": "segmenter forward (no grad)", "cam_pamr": f"CAM + PAMR + pseudo, {grid[0]}x{grid[1]}",
              "cam_pamr_full": f"CAM + PAMR + pseudo, {args.size[0]}x{args.size[1]}"}
    for k, v in ms.items():
        print(f"{labels[k]:<34}{v:>10.1f}{1e3 * args.batch_size / v:>10.1f}{v / ms['forward']:>11.2f}x")


if __name__ == "__main__":
    main()
