"""Train-step and inference time of each method on the same model input, measured side by side.

    python benchmarks/bench_train_step.py [--methods ce ...] [--batch-size 8] [--size 128 128]

Prints ms per step (median of --repeats after --warmup steps) and each method's ratio to ce.
Numbers are for comparison within one run on one machine; never assert on them in tests.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ctxseg.data import SyntheticScenes, train_transform
from ctxseg.engine.evaluate import build_model
from ctxseg.methods import METHODS, get_method


def time_it(fn, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", default=sorted(METHODS))
    p.add_argument("--encoder", default="resnet18")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--size", type=int, nargs=2, default=(128, 128))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    ds = SyntheticScenes("train", length=args.batch_size, size=tuple(args.size), transform=train_transform(args.size))
    items = [ds[(i, i)] for i in range(args.batch_size)]
    batch = {k: torch.stack([it[k] for it in items]) for k in ("image", "mask", "tags")}
    print(f"device cpu, threads {torch.get_num_threads()}, encoder {args.encoder}, "
          f"batch {args.batch_size}x3x{args.size[0]}x{args.size[1]}")
    results = {}
    for name in args.methods:
        cls = get_method(name)
        torch.manual_seed(0)
        cfg = cls.config_class(method=name, iters=10_000, encoder=args.encoder)
        method = cls(cfg, ds.info, total_iters=10_000)
        model = build_model(cfg, ds.info.num_classes, heads=method.heads)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        def step():
            model.train()
            loss, _ = method(model(batch["image"]), batch, step=10_000)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        def infer():
            model.eval()
            with torch.no_grad():
                model.predict(batch["image"])

        results[name] = (time_it(step, args.warmup, args.repeats), time_it(infer, args.warmup, args.repeats))
    base = results.get("ce")
    print(f"{'method':<16}{'train ms/step':>15}{'vs ce':>8}{'infer ms':>12}{'vs ce':>8}")
    for name, (train_ms, infer_ms) in results.items():
        rt = f"{train_ms / base[0]:.2f}x" if base else "-"
        ri = f"{infer_ms / base[1]:.2f}x" if base else "-"
        print(f"{name:<16}{train_ms:>15.1f}{rt:>8}{infer_ms:>12.1f}{ri:>8}")


if __name__ == "__main__":
    main()
