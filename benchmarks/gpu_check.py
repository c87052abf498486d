"""GPU check: each method's training step on CUDA with bf16 autocast, next to CE; then 2-GPU DDP.

    python benchmarks/gpu_check.py [--methods ce pixel_contrast pixel_contrast:memory=true ...]
        [--steps 300] [--warmup 30] [--batch-size 16] [--data synthetic|camvid] [--data-root PATH]
        [--crop H W] [--encoder tf_efficientnet_lite0] [--ddp auto|on|off]

For each method (default: ce, pixel_contrast, pixel_contrast with the memory bank, contextrast,
wsss_cam, dscnet; a method may carry settings, ``contextrast:bane=false``, as ``study`` reads them)
it builds the Trainer as ``ctxseg train`` does (AMP: bf16 where the GPU has it, else fp16 with a
GradScaler) and times ``Trainer.train_step``, the step ``fit`` runs, on a pool of --pool batches
drawn once from the training set and kept on the GPU: so the numbers are the GPU step, not the data
loader (``benchmarks/bench_loader.py`` measures what the loader feeds). The step counter starts at
80 % of a long schedule, so every method is past its warm-up (contrast and self-training terms on);
the memory bank's queues are filled first (the steady state). Prints, per method: ms per step
(wall clock between CUDA synchronisations, mean over --steps after --warmup), images/s, peak memory
(``torch.cuda.max_memory_allocated``) and the ratio of step time and memory to CE.

With two GPUs or more visible (``--ddp auto``), it then runs the same under
``torchrun --standalone --nproc_per_node=2`` with ``sync_bn=true`` (the global batch split over the
two processes) and prints rank 0's numbers and the images/s against one GPU.

Without a CUDA GPU it prints one line and exits with status 2 (before importing anything but
torch). ``--cpu`` runs the same code on the CPU at tiny sizes, to test this script, not to measure.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_METHODS = ["ce", "pixel_contrast", "pixel_contrast:memory=true", "contextrast", "wsss_cam", "dscnet"]
NO_GPU_STATUS = 2
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    p.add_argument("--steps", type=int, default=300, help="timed steps per method (default 300)")
    p.add_argument("--warmup", type=int, default=30, help="untimed steps first (default 30)")
    p.add_argument("--pool", type=int, default=8, help="distinct batches cycled through (default 8)")
    p.add_argument("--batch-size", type=int, default=16, help="global batch (default 16)")
    p.add_argument("--data", default="synthetic", help="synthetic (default) or camvid, cityscapes, ...")
    p.add_argument("--data-root", default=None)
    p.add_argument("--crop", type=int, nargs=2, metavar=("H", "W"), help="default: the dataset's")
    p.add_argument("--encoder", default="tf_efficientnet_lite0")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a setting for every run")
    p.add_argument("--ddp", choices=("auto", "on", "off"), default="auto",
                   help="the 2-process torchrun run: auto = when two GPUs are visible")
    p.add_argument("--cpu", action="store_true", help="run on the CPU (to test the script; not a measurement)")
    p.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)  # set for the torchrun processes
    return p.parse_args(argv)


def make_trainer(spec: str, args, out: Path, ddp: bool):
    from ctxseg.config import apply_overrides, make_config, parse_set
    from ctxseg.engine.trainer import Trainer
    from ctxseg.methods import get_method
    from ctxseg.study import parse_method_spec

    parsed = parse_method_spec(spec)
    cls = get_method(parsed.name).config_class
    total = 100 * (args.warmup + args.steps)
    settings = dict(method=parsed.name, iters=total, batch_size=args.batch_size, encoder=args.encoder,
                    device="cpu" if args.cpu else "cuda", amp=True, eval_every=0, ckpt_every=total,
                    out=str(out), num_workers=0)
    if args.data_root:
        settings["data_root"] = args.data_root
    if args.crop:
        settings["crop"] = tuple(args.crop)
    if ddp:
        settings["sync_bn"] = True
    cfg = make_config(cls, args.data, **settings)
    cfg = apply_overrides(cfg, parse_set(args.set), "--set")
    cfg = apply_overrides(cfg, parsed.settings, spec)
    trainer = Trainer(cfg, get_method(cfg.method), progress=False)
    trainer.step = int(0.8 * total)  # past every warm-up: the method's full loss
    memory = getattr(trainer.method, "memory", None)
    if memory is not None:  # the steady state: every class's queues full
        import torch

        C, size, dim = memory.pixel.shape
        labels = torch.arange(C, device=memory.pixel.device).repeat_interleave(size)
        g = torch.Generator(device="cpu").manual_seed(0)
        for kind in ("pixel", "region"):
            keys = torch.nn.functional.normalize(torch.randn(C * size, dim, generator=g), dim=1)
            memory.push(kind, keys.to(memory.pixel.device), labels)
    return trainer


def batch_pool(trainer, n: int) -> list[dict]:
    """``n`` batches of this process's share, from the training set with its augmentation, on the device."""
    from ctxseg.engine.loader import train_loader

    batches = []
    for batch in train_loader(trainer.train_set, trainer.sampler, 0, False):
        batches.append({k: v.to(trainer.device) if hasattr(v, "to") else v for k, v in batch.items()})
        if len(batches) == n:
            break
    return batches


def measure(spec: str, args, out: Path, ddp: bool) -> dict:
    """{ms, images_s, peak_mib, loss, bn} of ``spec``'s training step."""
    import torch

    cuda = not args.cpu
    trainer = make_trainer(spec, args, out, ddp)
    pool = batch_pool(trainer, args.pool)
    trainer.ddp_model.train()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    for i in range(args.warmup):
        trainer.train_step(pool[i % len(pool)])
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    tic = time.perf_counter()
    for i in range(args.steps):
        loss, _ = trainer.train_step(pool[i % len(pool)])
    sync()
    seconds = (time.perf_counter() - tic) / args.steps
    sync_bn = any(isinstance(m, torch.nn.SyncBatchNorm) for m in trainer.model.modules())
    result = {
        "ms": seconds * 1e3,
        "images_s": args.batch_size / seconds,  # the global batch: every process's share
        "peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "loss": float(loss.detach()),
        "sync_bn": sync_bn,
        "amp": str(trainer.amp_dtype).replace("torch.", "") if trainer.amp_dtype else "float32",
    }
    del trainer, pool, loss
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def print_table(results: dict[str, dict]) -> None:
    base = results.get("ce")
    width = max(16, *(len(spec) + 2 for spec in results))
    row = f"{{:<{width}}}{{:>10}}{{:>11}}{{:>11}}{{:>9}}{{:>11}}"
    print(row.format("method", "ms/step", "images/s", "peak MiB", "vs ce", "mem vs ce"))
    for spec, r in results.items():
        mem = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        rt = f"{r['ms'] / base['ms']:.2f}x" if base else "-"
        rm = f"{r['peak_mib'] / base['peak_mib']:.2f}x" if base and r["peak_mib"] and base["peak_mib"] else "-"
        note = "" if r["loss"] == r["loss"] and abs(r["loss"]) != float("inf") else "  (loss not finite)"
        print(row.format(spec, f"{r['ms']:.1f}", f"{r['images_s']:.0f}", mem, rt, rm) + note)


def run_all(args, ddp: bool) -> dict[str, dict]:
    results = {}
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        for k, spec in enumerate(args.methods):
            results[spec] = measure(spec, args, Path(tmp) / str(k), ddp)
    return results


def ddp_worker(args) -> int:
    from ctxseg.engine.distributed import cleanup

    results = run_all(args, ddp=True)
    if int(os.environ.get("RANK", "0")) == 0:
        print("RESULTS " + json.dumps(results), flush=True)
    cleanup()
    return 0


def run_ddp(args, argv: list[str]) -> dict[str, dict] | None:
    """The same methods under torchrun with 2 processes; rank 0's results, or None on failure."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.abspath(__file__), *argv, "--ddp-worker"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    if args.cpu:
        env["OMP_NUM_THREADS"] = "1"
    try:
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    except subprocess.TimeoutExpired:
        print("DDP run: torchrun did not finish within an hour", file=sys.stderr)
        return None
    lines = [line for line in res.stdout.splitlines() if line.startswith("RESULTS ")]
    if res.returncode != 0 or not lines:
        print(f"DDP run failed (torchrun exit status {res.returncode}):\n{res.stderr[-3000:]}", file=sys.stderr)
        return None
    return json.loads(lines[-1][len("RESULTS "):])



def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU is visible (torch.cuda.is_available() is False), so there is nothing to "
              "measure; run it on a machine with an NVIDIA GPU (or pass --cpu to test the script)", file=sys.stderr)
        return NO_GPU_STATUS
    sys.path.insert(0, ROOT)  # runs from a checkout where ctxseg is not installed
    if args.ddp_worker:
        return ddp_worker(args)

    if args.cpu:
        device = f"CPU ({torch.get_num_threads()} threads; a test of the script, not a measurement)"
    else:
        props = torch.cuda.get_device_properties(0)
        device = f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    print(f"gpu_check: {device}, torch {torch.__version__}, encoder {args.encoder}, data {args.data}, "
          f"global batch {args.batch_size}, {args.steps} timed steps after {args.warmup}")
    results = run_all(args, ddp=False)
    first = next(iter(results.values()))
    print(f"one process, autocast {first['amp']}:")
    print_table(results)

    gpus = 0 if args.cpu else torch.cuda.device_count()
    want_ddp = args.ddp == "on" or (args.ddp == "auto" and gpus >= 2)
    if not want_ddp:
        if args.ddp == "auto":
            print(f"DDP: skipped ({gpus} GPU visible; it needs 2)")
        return 0
    if args.batch_size % 2:
        print(f"DDP: skipped (--batch-size {args.batch_size} does not split over 2 processes)")
        return 0
    ddp = run_ddp(args, [a for a in argv if a != "--ddp-worker"])
    if ddp is None:
        return 1
    sync = "on" if all(r["sync_bn"] for r in ddp.values()) else "asked, not applicable on CPU"
    print(f"DDP, torchrun 2 processes, sync_bn {sync}, global batch {args.batch_size} "
          f"({args.batch_size // 2} per process); peak memory of rank 0:")
    print_table(ddp)
    print("images/s with 2 processes / with 1: "
          + ", ".join(f"{spec} {ddp[spec]['images_s'] / results[spec]['images_s']:.2f}x" for spec in ddp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
