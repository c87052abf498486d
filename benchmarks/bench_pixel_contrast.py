"""Pixel-contrast loss, forward + backward (sampling, gather, loss): ctxseg's loop-free version vs
the deliberately simple loop oracle of the tests ("loop": a Python loop over images x classes for
sampling, each class gathering from the full embedding map, and over anchors and their positives
for the loss), and the public reference's split ("loop-sampling": the same sampling loop, then a
matrix loss).

    python benchmarks/bench_pixel_contrast.py [--batch-size 8] [--dim 256] [--size 128 128] [--classes 19]

Each variant runs in its own process so that its peak memory (resident set, above the inputs)
can be read; times are medians. Prints the ratio. Never assert on these numbers in tests.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def make_inputs(B, D, H, W, C, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Piecewise-constant labels (16x16-pixel blocks) with 5% ignore; predictions 30% wrong.
    coarse = torch.randint(0, C, (B, 1, H // 16, W // 16), generator=g).float()
    labels = F.interpolate(coarse, size=(H, W), mode="nearest")[:, 0].long().flatten(1)
    labels[torch.rand(labels.shape, generator=g) < 0.05] = 255
    preds = labels.clamp(max=C - 1).clone()
    flip = torch.rand(labels.shape, generator=g) < 0.3
    preds[flip] = torch.randint(0, C, (int(flip.sum()),), generator=g)
    emb = F.normalize(torch.randn(B, D, H * W, generator=g), dim=1)
    return emb, labels, preds


def vectorised(emb, labels, preds, C):
    from ctxseg.methods.pixel_contrast import contrast_loss, sample_anchors

    P = labels.shape[1]
    a = sample_anchors(labels, preds, C, 1024, 100)
    feats = emb[a.index // P, :, a.index % P]
    return contrast_loss(feats, a.label), len(a)


def loop(emb, labels, preds, C):
    import pixel_contrast_oracle as oracle

    feats, y = oracle.sample_anchors(emb, labels, preds, C, 1024, 100)
    return oracle.contrast_loss(feats, y), len(y)


def loop_sampling(emb, labels, preds, C):
    """The public reference's split: loops for sampling, one matrix formulation for the loss."""
    import pixel_contrast_oracle as oracle

    from ctxseg.methods.pixel_contrast import contrast_loss

    feats, y = oracle.sample_anchors(emb, labels, preds, C, 1024, 100)
    return contrast_loss(feats, y), len(y)


VARIANTS = {"vectorised": vectorised, "loop-sampling": loop_sampling, "loop": loop}


def worker(name, args, queue):
    torch.set_num_threads(args.threads)
    emb0, labels, preds = make_inputs(args.batch_size, args.dim, *args.size, args.classes)
    fn = VARIANTS[name]
    warmup, repeats = (args.warmup, args.repeats) if name == "vectorised" else (0, 1)  # the loop takes a minute
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for i in range(warmup + repeats):
        emb = emb0.clone().requires_grad_()
        torch.manual_seed(i)
        t = time.perf_counter()
        loss, m = fn(emb, labels, preds, args.classes)
        loss.backward()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024  # ru_maxrss is KiB on Linux
    queue.put((statistics.median(times) * 1e3, peak_mb, m, loss.item()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--size", type=int, nargs=2, default=(128, 128))
    p.add_argument("--classes", type=int, default=19)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    print(f"cpu, {args.threads} threads: B={args.batch_size}, {args.dim}-d embeddings at "
          f"{args.size[0]}x{args.size[1]}, {args.classes} classes, max_samples 1024, max_views 100")
    ctx = mp.get_context("spawn")
    results = {}
    for name in VARIANTS:
        queue = ctx.Queue()
        proc = ctx.Process(target=worker, args=(name, args, queue))
        proc.start()
        results[name] = queue.get()
        proc.join()
    print(f"{'variant':<15}{'ms fwd+bwd':>12}{'vs vectorised':>15}{'peak MB':>10}{'anchors':>9}{'loss':>9}")
    v = results["vectorised"]
    for name, (ms, mb, m, loss) in results.items():
        print(f"{name:<15}{ms:>12.1f}{ms / v[0]:>14.1f}x{mb:>10.0f}{m:>9d}{loss:>9.3f}")


if __name__ == "__main__":
    main()
