"""Images/s of the training loader (the Trainer's dataset, default train transform, sampler and
DataLoader) with 0, 1, 2 ... worker processes, and the GPU step time that rate could feed.

    python benchmarks/bench_loader.py [--data synthetic|camvid] [--data-root ../shared/data/camvid]
        [--workers 0 1 2] [--batches 40] [--batch-size 16] [--crop H W] [--set KEY=VALUE ...]

For each worker count it starts the loader, discards the first --warmup batches (the workers
starting), then times --batches batches: images/s in total and per worker (0 workers: the main
process loads), and 1000 * batch / (images/s), the shortest training step in ms that this loader
keeps busy (a GPU step faster than that waits for data). With 0 workers it also prints the
process-CPU rate, the cost of one image on one core whatever else the machine runs. The transform
is ``train_transform`` with the dataset's defaults (crop, scale range, flip, colour jitter), as
``ctxseg train`` builds it. Wall-clock numbers count other processes' turns on the cores: the
1-minute load average is printed first.

``--train-step`` then measures what the loader costs a CPU training step: the default segmenter
(CE, as ``ctxseg train`` builds it, channels_last as configured) trains on --step-batch-size
images from the loader, for each worker count and torch thread count of --step-workers and
--step-threads, and, interleaved with those, on one batch held in memory (no loader). It prints the
ms per step, the share of each step spent waiting for the next batch (``waits``: time blocked in
the loader's ``next``), and the step's slowdown against the in-memory batch (``vs no loader``:
what the workers' CPU time takes from the step's threads as well as the waits). E.g.

    python benchmarks/bench_loader.py --data camvid --data-root ../shared/data/camvid --crop 180 240 \
        --workers 0 --train-step --step-workers 0 1 --step-threads 2
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="synthetic")
    p.add_argument("--data-root", default=None)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batches", type=int, default=40, help="timed batches per worker count (default 40)")
    p.add_argument("--warmup", type=int, default=3, help="batches discarded first (default 3)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--crop", type=int, nargs=2, metavar=("H", "W"), help="default: the dataset's")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--train-step", action="store_true", help="also time training steps fed by the loader")
    p.add_argument("--step-workers", type=int, nargs="+", default=[0, 1])
    p.add_argument("--step-threads", type=int, nargs="+", default=[2])
    p.add_argument("--step-nice", type=int, nargs="+", default=[19],
                   help="niceness of the loader's workers (19: the trainer's; 0: normal priority)")
    p.add_argument("--step-batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=12, help="timed steps per setting (default 12)")
    return p.parse_args()


def time_train_steps(cfg, ds, args) -> None:
    """ms per CE training step fed by the loader against one batch in memory (see the module)."""
    import statistics

    import torch

    from ctxseg.engine.evaluate import build_model
    from ctxseg.engine.loader import TrainBatchSampler, train_loader
    from ctxseg.methods.base import cross_entropy

    torch.manual_seed(0)
    model = build_model(cfg, ds.info.num_classes).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step(batch):
        loss = cross_entropy(model(batch["image"])["logits"], batch["mask"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    print(f"\ntraining steps: {cfg.encoder} (pretrained={cfg.pretrained}), CE, batch {args.step_batch_size}, "
          f"channels_last {cfg.channels_last}; median of {args.steps} steps after 3")
    print(f"{'workers':>7}{'nice':>6}{'threads':>8}{'ms/step':>9}{'waits':>8}{'in memory':>11}{'vs no loader':>14}")
    settings = [(t, w, n) for t in args.step_threads for w in args.step_workers for n in args.step_nice]
    for threads, workers, nice in settings:
        torch.set_num_threads(threads)
        sampler = TrainBatchSampler(len(ds), args.step_batch_size, cfg.seed)
        stream = endless(train_loader(ds, sampler, workers, pin_memory=False, worker_nice=nice), sampler)
        held = next(stream)
        for _ in range(3):
            step(next(stream))
            step(held)
        fed, waits, mem = [], [], []
        for _ in range(args.steps):  # loader-fed and in-memory steps take turns
            t0 = time.perf_counter()
            batch = next(stream)
            t1 = time.perf_counter()
            step(batch)
            t2 = time.perf_counter()
            step(held)
            mem.append(time.perf_counter() - t2)
            fed.append(t2 - t0)
            waits.append((t1 - t0) / (t2 - t0))
        del stream
        f, m = statistics.median(fed) * 1e3, statistics.median(mem) * 1e3
        print(f"{workers:>7}{nice:>6}{threads:>8}{f:>9.0f}{100 * statistics.mean(waits):>7.1f}%{m:>11.0f}"
              f"{100 * (f / m - 1):>+13.1f}%")


def endless(loader, sampler):
    """The loader's batches, epoch after epoch (a small set is read more than once)."""
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def main() -> None:
    args = _parse()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import torch

    from ctxseg.config import apply_overrides, make_config, parse_set
    from ctxseg.data import build_dataset, train_transform
    from ctxseg.engine.loader import TrainBatchSampler, train_loader
    from ctxseg.engine.resolve import resolve_config
    from ctxseg.methods.ce import CEConfig

    torch.set_num_threads(args.threads)
    over = {"data_root": args.data_root} if args.data_root else {}
    if args.crop:
        over["crop"] = tuple(args.crop)
    cfg = apply_overrides(make_config(CEConfig, args.data, batch_size=args.batch_size, **over),
                          parse_set(args.set), "--set")
    tf = train_transform(cfg.crop_size, cfg.scale_range, cfg.hflip, cfg.color_jitter)
    kw = {"size": tuple(cfg.synthetic_size), "length": cfg.synthetic_train_len} if cfg.data == "synthetic" else {}
    ds = build_dataset(cfg.data, "train", cfg.data_root, tf, **kw)
    needed = (args.warmup + args.batches) * args.batch_size
    if len(ds) < needed:
        print(f"note: {len(ds)} training images, fewer than the {needed} this measurement reads: it reads some twice")

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    h, w = cfg.crop_size
    print(f"{cfg.data} train loader, {len(ds)} images, crop {h}x{w}, scale {tuple(cfg.scale_range)}, "
          f"hflip {cfg.hflip}, colour jitter {cfg.color_jitter}, batch {args.batch_size}, {args.threads} torch "
          f"thread(s) per process; {cores} cores, load average {os.getloadavg()[0]:.2f}")
    print(f"{'workers':>7}{'images/s':>10}{'per worker':>12}{'cpu img/s':>11}{'feeds a step of':>17}")
    for workers in args.workers:
        sampler = TrainBatchSampler(len(ds), args.batch_size, cfg.seed)
        loader = train_loader(ds, sampler, workers, pin_memory=False)
        stream = endless(loader, sampler)
        for _ in range(args.warmup):
            next(stream)
        wall, cpu, images = time.perf_counter(), time.process_time(), 0
        for _ in range(args.batches):
            images += next(stream)["image"].shape[0]
        wall = time.perf_counter() - wall
        cpu = time.process_time() - cpu
        del stream, loader  # stops the workers
        rate = images / wall
        cpu_rate = f"{images / cpu:.0f}" if workers == 0 else "-"
        print(f"{workers:>7}{rate:>10.0f}{rate / max(1, workers):>12.0f}{cpu_rate:>11}"
              f"{1000 * args.batch_size / rate:>14.0f} ms")
    print("'feeds a step of': 1000 * batch / (images/s), the training step this loader keeps busy")
    if args.train_step:
        time_train_steps(resolve_config(cfg), ds, args)


if __name__ == "__main__":
    main()
