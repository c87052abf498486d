"""Throughput of the synthetic scene generator, raw and through the default train transform.

    python benchmarks/bench_synthetic.py [--size 128] [--n 500] [--threads 1]

Prints images/s of ``SyntheticScenes.load(i)`` (generation only) and of ``ds[(i, seed)]`` with
``train_transform(crop=size)`` (what a training data-loader worker does per sample), each as
wall-clock and as process-CPU rate, and their ratio to the goal of 200 images/s on one core.
The CPU rate is the better number on a shared machine, where wall-clock time also counts other
processes' turns on the core.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

GOAL = 200.0  # images/s on one core at 128x128


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", type=int, nargs="+", default=[128],
                   help="image size: H (square) or H W (default 128)")
    p.add_argument("--n", type=int, default=500, help="images per measurement (default 500)")
    p.add_argument("--threads", type=int, default=1, help="torch/BLAS threads (default 1)")
    args = p.parse_args()
    if len(args.size) not in (1, 2):
        p.error("--size takes H or H W")
    return args


def _rate(fn, n: int) -> tuple[float, float]:
    """(wall, cpu) calls per second of fn(i) over i = 0..n-1, after a short warm-up."""
    for i in range(min(20, n)):
        fn(i)
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(n):
        fn(i)
    return n / (time.perf_counter() - wall), n / (time.process_time() - cpu)


def main() -> None:
    args = _parse()
    # Thread pools read these when the libraries load, so set them before importing numpy/torch.
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    # Lets the script run from a checkout where ctxseg is not installed.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import torch

    from ctxseg.data.synthetic import SyntheticScenes
    from ctxseg.data.transforms import train_transform

    torch.set_num_threads(args.threads)
    size = (args.size[0], args.size[-1])
    raw = SyntheticScenes("train", length=args.n + 20, size=size)
    aug = SyntheticScenes("train", length=args.n + 20, size=size, transform=train_transform(size))

    rows = [
        ("load(i)", _rate(raw.load, args.n)),
        ("ds[(i, seed)] + train_transform", _rate(lambda i: aug[(i, 1000 + i)], args.n)),
    ]
    print(f"synthetic scenes {size[0]}x{size[1]}, n={args.n}, threads={args.threads}")
    print(f"{'':34s}{'wall img/s':>12s}{'cpu img/s':>12s}{'cpu / goal':>12s}")
    for name, (wall, cpu) in rows:
        print(f"{name:34s}{wall:12.0f}{cpu:12.0f}{cpu / GOAL:11.1f}x")
    print(f"goal: {GOAL:.0f} img/s on one core at 128x128")


if __name__ == "__main__":
    main()
