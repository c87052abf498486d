"""Throughput of ``SegMetrics.update`` (confusion matrix + Boundary IoU counts).

Prints images/s for a CamVid-like setting (360x480, 11 classes) and an ADE20K-like one
(512x512, 150 classes). No assertions; run with ``python benchmarks/bench_metrics.py``
(``--device cuda`` to time a GPU).
"""

from __future__ import annotations

import argparse
import time

import torch

from ctxseg.engine.metrics import SegMetrics


def _synthetic(n: int, h: int, w: int, num_classes: int, device: torch.device, seed: int = 0):
    """Blocky label maps (upsampled coarse noise) so boundaries look like real segments."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, num_classes, (n, 1, h // 16, w // 16), generator=g)
    target = torch.nn.functional.interpolate(coarse.float(), size=(h, w), mode="nearest").long()[:, 0]
    pred = target.clone()
    flip = torch.rand(n, h, w, generator=g) < 0.1
    pred[flip] = torch.randint(0, num_classes, (int(flip.sum()),), generator=g)
    target[:, :8] = 255
    return pred.to(device), target.to(device)


def bench(h: int, w: int, num_classes: int, batch: int, iters: int, boundary_px: int, device) -> float:
    pred, target = _synthetic(batch, h, w, num_classes, device)
    m = SegMetrics(num_classes, boundary_px=boundary_px, device=device)
    m.update(pred, target)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        m.update(pred, target)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * iters / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--boundary-px", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}")
    for h, w, c in [(360, 480, 11), (512, 512, 150)]:
        ips = bench(h, w, c, args.batch, args.iters, args.boundary_px, device)
        print(f"{h}x{w}, {c:3d} classes, d={args.boundary_px}: {ips:8.1f} images/s")


if __name__ == "__main__":
    main()
