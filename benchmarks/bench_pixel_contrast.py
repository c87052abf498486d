"""Pixel-contrast loss, forward + backward, from the projection head's hidden map to the loss
(sampling, embedding of the anchors, loss): ctxseg's loop-free version vs the deliberately simple
loop oracle of the tests ("loop": a Python loop over images x classes for sampling, each class
gathering from the full embedding map, and over anchors and their positives for the loss), and the
public reference's split ("loop-sampling": the same sampling loop, then a matrix loss).

    python benchmarks/bench_pixel_contrast.py [--batch-size 8] [--dim 256] [--hidden 128] [--size 128 128]
        [--classes 19] [--variants vectorised loop-sampling loop] [--baseline REV] [--threads 2]

The input is what the head's last 1x1 conv reads, a (B, hidden, h*w) map (128 = the decoder's
width), and that conv's weight and bias. ctxseg projects and normalises only the anchors
(``project_rows``); the loops, like the public code, project and normalise the whole map, then
gather. Each variant runs in its own process so that its peak memory (resident set, above the
inputs) can be read; times are medians. Prints the ratio. Never assert on these numbers in tests.

Then the breakdown of ctxseg's version (and, with ``--baseline REV``, of the module as it was at git
revision REV, interleaved with it in one process): sampling, embedding of the anchors (forward +
backward: gather of the anchors from the hidden map and their projection; a module without
``project_rows`` projects and normalises the whole map, then gathers), the loss on the anchors
(forward + backward), each timed on its own, and the whole timed end to end; "from the map" times
sampling + gather + loss from an already projected (B, dim, h*w) embedding map, the stage as the
module without ``project_rows`` had it. For scale: allocating one zeroed gradient of the hidden
map's size, which any backward into the map pays.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

MODULE = "ctxseg/methods/contrast.py"
OLD_MODULE = "ctxseg/methods/pixel_contrast.py"  # where the machinery lived before contrast.py


def make_inputs(B, D, c, H, W, C, seed=0):
    """Hidden map (B, c, H*W) after a ReLU, the last conv's (weight (D, c), bias (D,)), labels and
    predictions (B, H*W)."""
    g = torch.Generator().manual_seed(seed)
    # Piecewise-constant labels (16x16-pixel blocks) with 5% ignore; predictions 30% wrong.
    coarse = torch.randint(0, C, (B, 1, H // 16, W // 16), generator=g).float()
    labels = F.interpolate(coarse, size=(H, W), mode="nearest")[:, 0].long().flatten(1)
    labels[torch.rand(labels.shape, generator=g) < 0.05] = 255
    preds = labels.clamp(max=C - 1).clone()
    flip = torch.rand(labels.shape, generator=g) < 0.3
    preds[flip] = torch.randint(0, C, (int(flip.sum()),), generator=g)
    hidden = torch.randn(B, c, H * W, generator=g).relu_()
    proj = (torch.randn(D, c, generator=g) / c**0.5, torch.randn(D, generator=g) * 0.1)
    return hidden, proj, labels, preds


def project_map(hidden, proj):
    """The whole (B, D, P) normalised embedding map, as the head's conv and F.normalize compute it."""
    w, b = proj
    return F.normalize(F.conv1d(hidden, w[:, :, None], b), dim=1)


def _index_gather(emb, index):
    """The gather before ``gather_anchors`` existed: advanced indexing, autograd's backward."""
    P = emb.shape[2]
    return emb[index // P, :, index % P]


def parts(module):
    """(sample, embed, loss) of the module with pixel contrast's sampler and loss (``MODULE``, or
    ``OLD_MODULE`` at a revision before it), current or from an earlier revision:
    ``embed(hidden, proj, index)`` gives the anchors' normalised embeddings."""
    gather = getattr(module, "gather_anchors", _index_gather)
    if hasattr(module, "project_rows"):
        def embed(hidden, proj, index):
            return module.project_rows(gather(hidden, index), proj)
    else:
        def embed(hidden, proj, index):
            return gather(project_map(hidden, proj), index)
    return module.sample_anchors, embed, module.contrast_loss, gather


def module_at(rev):
    if rev is None:
        import ctxseg.methods.contrast as module

        return module
    from baseline import load_module_at

    try:
        return load_module_at(rev, MODULE)
    except subprocess.CalledProcessError:  # a revision before contrast.py
        return load_module_at(rev, OLD_MODULE)


def vectorised(hidden, proj, labels, preds, C, rev=None):
    sample, embed, loss, _ = parts(module_at(rev))
    a = sample(labels, preds, C, 1024, 100)
    return loss(embed(hidden, proj, a.index), a.label), len(a)


def loop(hidden, proj, labels, preds, C, rev=None):
    import pixel_contrast_oracle as oracle

    feats, y = oracle.sample_anchors(project_map(hidden, proj), labels, preds, C, 1024, 100)
    return oracle.contrast_loss(feats, y), len(y)


def loop_sampling(hidden, proj, labels, preds, C, rev=None):
    """The public reference's split: loops for sampling, one matrix formulation for the loss."""
    import pixel_contrast_oracle as oracle

    from ctxseg.methods.contrast import contrast_loss

    feats, y = oracle.sample_anchors(project_map(hidden, proj), labels, preds, C, 1024, 100)
    return contrast_loss(feats, y), len(y)


VARIANTS = {"vectorised": vectorised, "loop-sampling": loop_sampling, "loop": loop}


def leaves(hidden0, proj0):
    return hidden0.clone().requires_grad_(), tuple(t.clone().requires_grad_() for t in proj0)


def worker(name, args, queue):
    torch.set_num_threads(args.threads)
    hidden0, proj0, labels, preds = make_inputs(args.batch_size, args.dim, args.hidden, *args.size, args.classes)
    base_name, _, rev = name.partition("@")
    fn = VARIANTS[base_name]
    fast = base_name == "vectorised"
    warmup, repeats = (args.warmup, args.repeats) if fast else (0, 1)  # the loop takes a minute
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for i in range(warmup + repeats):
        hidden, proj = leaves(hidden0, proj0)
        torch.manual_seed(i)
        t = time.perf_counter()
        loss, m = fn(hidden, proj, labels, preds, args.classes, rev or None)
        loss.backward()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024  # ru_maxrss is KiB on Linux
    queue.put((statistics.median(times) * 1e3, peak_mb, m, loss.item()))


def breakdown(args, queue):
    """Median ms of each stage, forward + backward, of each implementation, taking turns."""
    torch.set_num_threads(args.threads)
    hidden0, proj0, labels, preds = make_inputs(args.batch_size, args.dim, args.hidden, *args.size, args.classes)
    with torch.no_grad():
        emb0 = project_map(hidden0, proj0)  # for "from the map"
    impls = {"ctxseg": parts(module_at(None))}
    if args.baseline:
        from baseline import short

        impls[f"ctxseg@{short(args.baseline)}"] = parts(module_at(args.baseline))
    stages = ("sampling", "embed", "loss", "whole", "from the map")
    times = {name: {s: [] for s in stages} for name in impls}
    zeroed = []
    now = time.perf_counter
    for i in range(args.warmup + args.repeats):
        keep = i >= args.warmup
        for name, (sample, embed, loss_fn, gather) in impls.items():
            torch.manual_seed(i)
            t0 = now()
            a = sample(labels, preds, args.classes, 1024, 100)
            t1 = now()
            hidden, proj = leaves(hidden0, proj0)
            t2 = now()
            feats = embed(hidden, proj, a.index)
            t3 = now()
            anchors = feats.detach().requires_grad_()
            t4 = now()
            loss_fn(anchors, a.label).backward()
            t5 = now()
            feats.backward(anchors.grad)
            t6 = now()
            del hidden, proj, feats, anchors
            hidden, proj = leaves(hidden0, proj0)
            torch.manual_seed(i)
            t7 = now()
            a = sample(labels, preds, args.classes, 1024, 100)
            loss_fn(embed(hidden, proj, a.index), a.label).backward()
            t8 = now()
            del hidden, proj
            emb = emb0.clone().requires_grad_()
            torch.manual_seed(i)
            t9 = now()
            a = sample(labels, preds, args.classes, 1024, 100)
            loss_fn(gather(emb, a.index), a.label).backward()
            t10 = now()
            del emb
            if keep:
                for stage, dt in zip(stages, (t1 - t0, (t3 - t2) + (t6 - t5), t5 - t4, t8 - t7, t10 - t9)):
                    times[name][stage].append(dt)
        t = now()
        z = torch.zeros_like(hidden0)
        if keep:
            zeroed.append(now() - t)
        del z
    med = {name: {s: statistics.median(v) * 1e3 for s, v in st.items()} for name, st in times.items()}
    queue.put((med, statistics.median(zeroed) * 1e3, len(a)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--hidden", type=int, default=128, help="width of the head's hidden map (the decoder's)")
    p.add_argument("--size", type=int, nargs=2, default=(128, 128))
    p.add_argument("--classes", type=int, default=19)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS),
                   help="variants timed in their own process (the loops take minutes); none: breakdown only")
    p.add_argument("--baseline", default=None, metavar="REV",
                   help=f"also time {MODULE} ({OLD_MODULE} before it existed) as it was at this git revision")
    args = p.parse_args()
    print(f"cpu, {args.threads} threads: B={args.batch_size}, {args.dim}-d embeddings from a {args.hidden}-d hidden "
          f"map at {args.size[0]}x{args.size[1]}, {args.classes} classes, max_samples 1024, max_views 100")
    ctx = mp.get_context("spawn")

    def in_process(target, *a):
        queue = ctx.Queue()
        proc = ctx.Process(target=target, args=(*a, args, queue))
        proc.start()
        out = queue.get()
        proc.join()
        return out

    names = list(args.variants)
    if args.baseline and "vectorised" in names:
        from baseline import short

        names.insert(names.index("vectorised") + 1, f"vectorised@{short(args.baseline)}")
    results = {name: in_process(worker, name) for name in names}
    if results:
        first = next(iter(results.values()))
        print(f"{'variant':<20}{'ms fwd+bwd':>12}{'vs ' + names[0]:>18}{'peak MB':>10}{'anchors':>9}{'loss':>9}")
        for name, (ms, mb, m, loss) in results.items():
            print(f"{name:<20}{ms:>12.1f}{ms / first[0]:>17.2f}x{mb:>10.0f}{m:>9d}{loss:>9.3f}")

    med, zeroed, m = in_process(breakdown)
    print(f"\nbreakdown, ms forward + backward (median of {args.repeats}, implementations taking turns), "
          f"{m} anchors:")
    print(f"{'':<18}{'sampling':>10}{'embed':>10}{'loss':>10}{'sum':>10}{'whole':>10}{'from the map':>14}")
    for name, st in med.items():
        total = st["sampling"] + st["embed"] + st["loss"]
        print(f"{name:<18}{st['sampling']:>10.1f}{st['embed']:>10.1f}{st['loss']:>10.1f}{total:>10.1f}"
              f"{st['whole']:>10.1f}{st['from the map']:>14.1f}")
    if len(med) == 2:
        (new, a), (old, b) = med.items()
        print(f"{old} / {new}: " + ", ".join(f"{s} {b[s] / a[s]:.2f}x" for s in a))
    shape = (args.batch_size, args.hidden, args.size[0] * args.size[1])
    print(f"a zeroed {tuple(shape)} float32 tensor (the gradient of the hidden map any backward into it allocates): "
          f"{zeroed:.1f} ms")


if __name__ == "__main__":
    main()
