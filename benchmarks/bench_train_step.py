"""Train-step and inference time of each method on the same model input, measured side by side.

    python benchmarks/bench_train_step.py [--methods ce ...] [--batch-size 8] [--size 128 128]

A method may carry settings: ``pixel_contrast:memory=true,memory_size=1000`` (values read as YAML,
parsed by ``ctxseg.study.parse_method_spec``, as ``python -m ctxseg study --methods`` reads them).

Prints ms per step (median of --repeats after --warmup steps) and each method's ratio to ce.
Numbers are for comparison within one run on one machine; never assert on them in tests.

A method with a memory bank is timed with full queues (the steady state): they are filled before
timing. For it the script also times, interleaved with the steps, the matrix products its loss
cannot do without in float32 ("GEMMs only"): the similarities of one step's M anchors (sampled
once, on this batch) to all K queue entries and the gradient back through them: 2 x M x K x r
flops for the similarities (r = the head's hidden width + 1 where the loss folds the head's last
conv, ``fold_anchors``; else D), after the keys' product with the folded basis, and 2 x M x K x D
for the gradient. ``--baseline REV`` also times every non-CE method as its module was at git revision REV
(``spec@REV``: the method's file alone, on today's model), and CE with the whole package as it was at
REV (``ce@REV``: model, layout and method; in a worker process that imports that revision, its steps
taking turns with the others): before/after in one run, e.g.

    python benchmarks/bench_train_step.py --methods ce pixel_contrast:memory=true,memory_size=5000 \
        --baseline 662de39 --threads 1
    python benchmarks/bench_train_step.py --methods ce --encoder tf_efficientnet_lite0 --size 180 240 \
        --baseline b9c8f8f --threads 2     # the default segmenter, before and after channels_last

``--set KEY=VALUE`` applies to every current method (e.g. ``--set channels_last=false``); a method spec
may carry its own (``ce:cpu_amp=true`` runs the network under bf16 autocast, as the Trainer does).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ctxseg.config import apply_overrides
from ctxseg.data import SyntheticScenes, train_transform
from ctxseg.engine.evaluate import build_model
from ctxseg.methods import METHODS, get_method
from ctxseg.study import parse_method_spec


def time_interleaved(fns: dict, warmup: int, repeats: int) -> dict[str, float]:
    """Median ms of each function, the functions taking turns so that drift in machine load
    hits them all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def make_fns(spec: str, ds, batch, encoder: str, baseline: str | None = None, sets: dict | None = None):
    """(train step, inference) closures for one method spec ``name[:key=value,...]``; with
    ``baseline``, the method's class as of that git revision."""
    parsed = parse_method_spec(spec)
    cls = get_method(parsed.name)
    if baseline is not None:
        from baseline import class_at

        cls = class_at(baseline, cls)
    torch.manual_seed(0)
    cfg = cls.config_class(method=parsed.name, iters=10_000, encoder=encoder)
    cfg = apply_overrides(cfg, {**(sets or {}), **parsed.settings}, spec)
    method = cls(cfg, ds.info, total_iters=10_000)
    memory = getattr(method, "memory", None)
    if memory is not None:  # time the steady state: every class's queues full
        C, size, dim = memory.pixel.shape
        labels = torch.arange(C).repeat_interleave(size)
        for kind in ("pixel", "region"):
            memory.push(kind, torch.nn.functional.normalize(torch.randn(C * size, dim), dim=1), labels)
            assert (getattr(memory, f"{kind}_count") == size).all(), "queues not full"
    model = build_model(cfg, ds.info.num_classes, heads=method.heads)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=getattr(cfg, "cpu_amp", False))

    def step():
        model.train()
        with amp:  # as the Trainer runs it: the network under autocast, the loss outside
            out = model(batch["image"])
        loss, _ = method(out, batch, step=10_000)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    # Inference as a user runs it: the exported weights (training-only heads dropped) loaded
    # into a plain segmenter.
    deployed = build_model(cfg, ds.info.num_classes)
    deployed.load_state_dict(model.deploy_state_dict())
    deployed.eval()

    def infer():
        with torch.no_grad():
            deployed.predict(batch["image"])

    gemms = None
    if memory is not None and baseline is None:
        from ctxseg.methods.contrast import fold_anchors

        model.train()
        with torch.no_grad():
            n_anchors = len(method.sample(model(batch["image"]), batch["mask"]))
        anchors = torch.nn.functional.normalize(torch.randn(n_anchors, dim), dim=1)
        queues = [q for c in range(C) for q in (memory.pixel[c], memory.region[c])]
        c = model.decoder_channels
        factors = fold_anchors(torch.randn(n_anchors, c), (torch.randn(dim, c), torch.randn(dim)), 2 * C * size)
        r = dim if factors is None else c + 1

        def gemms():
            coords, basis = (anchors, None) if factors is None else factors
            for q in queues:
                (coords @ (q if basis is None else q @ basis).T) @ q

        gemms.label = f"{n_anchors} anchors x {2 * C * size} keys, similarities at {r} dims, gradient at {dim}"
    return step, infer, sum(p.numel() for p in deployed.parameters()), gemms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", default=sorted(METHODS))
    p.add_argument("--encoder", default="resnet18")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--size", type=int, nargs=2, default=(128, 128))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--baseline", default=None, metavar="REV",
                   help="also time each non-ce method as it was at this git revision, and ce with the whole package")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting for every current method (e.g. channels_last=false)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    ds = SyntheticScenes("train", length=args.batch_size, size=tuple(args.size), transform=train_transform(args.size))
    items = [ds[(i, i)] for i in range(args.batch_size)]
    batch = {k: torch.stack([it[k] for it in items]) for k in ("image", "mask", "tags")}
    print(f"device cpu, threads {torch.get_num_threads()}, encoder {args.encoder}, "
          f"batch {args.batch_size}x3x{args.size[0]}x{args.size[1]}")
    from ctxseg.config import parse_set

    sets = parse_set(args.set)
    steps, infers, n_params, gemms = {}, {}, {}, {}
    workers = []
    for spec in args.methods:
        steps[spec], infers[spec], n_params[spec], floor = make_fns(spec, ds, batch, args.encoder, sets=sets)
        if floor is not None:
            gemms[spec] = floor
        if args.baseline and parse_method_spec(spec).name != "ce":
            from baseline import short

            old = f"{spec}@{short(args.baseline)}"
            steps[old], infers[old], n_params[old], _ = make_fns(spec, ds, batch, args.encoder, args.baseline, sets)
        elif args.baseline and not workers:  # CE with the whole package at REV, once
            from baseline import TreeWorker, short

            worker = TreeWorker(args.baseline, {"method": "ce", "settings": {}, "encoder": args.encoder,
                                                "size": list(args.size), "batch_size": args.batch_size,
                                                "threads": torch.get_num_threads()})
            workers.append(worker)
            print(f"ce@{short(args.baseline)}: the package at {short(args.baseline)} ({worker.origin}), "
                  "in its own process, its steps taking turns with the others")
            steps[f"ce@{short(args.baseline)}"] = worker.step
    timed = {**steps, **{("gemms", k): fn for k, fn in gemms.items()}}
    train_ms_all = time_interleaved(timed, args.warmup, args.repeats)
    for worker in workers:
        worker.close()
    infer_ms = time_interleaved(infers, args.warmup, args.repeats)
    results = {k: (train_ms_all[k], infer_ms.get(k)) for k in steps}
    base = results.get("ce")
    width = max(16, *(len(k) + 2 for k in results))
    print(f"{'method':<{width}}{'train ms/step':>15}{'vs ce':>8}{'infer ms':>12}{'vs ce':>8}{'deployed params':>17}")
    for spec, (train_ms, infer_ms) in results.items():
        rt = f"{train_ms / base[0]:.2f}x" if base else "-"
        if infer_ms is None:  # the baseline revision's CE: its step only
            print(f"{spec:<{width}}{train_ms:>15.1f}{rt:>8}{'-':>12}{'-':>8}{'-':>17}")
            continue
        ri = f"{infer_ms / base[1]:.2f}x" if base else "-"
        print(f"{spec:<{width}}{train_ms:>15.1f}{rt:>8}{infer_ms:>12.1f}{ri:>8}{n_params[spec]:>17,}")
    for spec, fn in gemms.items():
        ms = train_ms_all[("gemms", spec)]
        rt = f" = {ms / base[0]:.2f}x ce's step" if base else ""
        print(f"  GEMMs only of {spec}'s loss ({fn.label}, float32): {ms:.1f} ms{rt}")


if __name__ == "__main__":
    main()
