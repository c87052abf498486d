"""UMAP layouts of pixel embeddings: ctxseg's fast and reproducible paths next to umap-learn's
defaults, each in a fresh Python process, as a user meets it in a new kernel (imports and numba's
compilation included).

    python benchmarks/bench_umap.py [--points 20000] [--dim 256] [--run runs/syn-ctx-s0 --feature stage1]

Data: by default --points unit-norm vectors in --dim dimensions around 8 centres (cosine metric),
or with --run the embeddings of that run's class-balanced val pixels (--feature). Prints the
seconds of each path's first layout (umap-learn's import and numba's compilation included), of the
whole process, and of a second layout in the same process (min_dist 0.2: what a widget change
costs in a kernel that has drawn one already), each with its ratio to the fast path.
The goal: the fast path lays out 20,000 points within 30 s on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np
args = json.loads(sys.argv[1])
if args["run"]:
    from ctxseg.engine.evaluate import eval_dataset
    from ctxseg.runs import open_run
    from ctxseg.viz.embeddings import pixel_embeddings, sample_pixels
    cfg = open_run(args["run"], heads=True).cfg
    ds = eval_dataset(cfg, cfg.eval_split)
    sample = sample_pixels(ds, per_class=-(-args["points"] // ds.info.num_classes), seed=0)
    emb = pixel_embeddings(args["run"], sample, args["feature"], dataset=ds, progress=False)
    x, metric = emb.x[: args["points"]], emb.metric
else:
    from sklearn.datasets import make_blobs
    x, _ = make_blobs(args["points"], n_features=args["dim"], centers=8, cluster_std=4.0, random_state=0)
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    metric = "cosine"
t1 = time.perf_counter()
if args["path"] == "umap-learn defaults":
    import umap
    xy = umap.UMAP(metric=metric).fit_transform(x)
else:
    from ctxseg.viz.embeddings import umap_2d
    xy = umap_2d(x, metric=metric, mode=args["path"], progress=False)
t2 = time.perf_counter()
if args["path"] == "umap-learn defaults":
    umap.UMAP(metric=metric, min_dist=0.2).fit_transform(x)
else:
    umap_2d(x, metric=metric, mode=args["path"], min_dist=0.2, progress=False)
print(json.dumps({"fit": t2 - t1, "again": time.perf_counter() - t2, "n": len(x)}))
"""


def run_child(path: str, args) -> dict:
    payload = json.dumps({"path": path, "points": args.points, "dim": args.dim, "run": args.run,
                          "feature": args.feature})
    start = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", CHILD, payload], capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{path}: failed\n{res.stderr[-3000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["process"] = time.perf_counter() - start
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--points", type=int, default=20_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--run", help="a run folder: embed its val pixels instead of synthetic vectors")
    p.add_argument("--feature", default="decoder", help="with --run: decoder, projection or stage1..4")
    p.add_argument("--paths", nargs="+", default=["fast", "reproducible", "umap-learn defaults"])
    args = p.parse_args()
    data = f"{args.run} ({args.feature})" if args.run else f"{args.dim}-d unit vectors, 8 centres"
    print(f"UMAP of {args.points} points: {data}; each path in a fresh process")
    print(f"{'path':22s} {'fit s':>7s} {'process s':>10s} {'vs fast':>8s} {'again s':>8s} {'vs fast':>8s}")
    results = {path: run_child(path, args) for path in args.paths}
    base = results.get("fast", next(iter(results.values())))
    for path, r in results.items():
        print(f"{path:22s} {r['fit']:7.1f} {r['process']:10.1f} {r['fit'] / base['fit']:7.2f}x "
              f"{r['again']:8.1f} {r['again'] / base['again']:7.2f}x")
    if "fast" in results:
        verdict = "meets" if results["fast"]["fit"] <= 30 else "misses"
        print(f"fast path {verdict} the 30 s goal at {results['fast']['n']} points")


if __name__ == "__main__":
    main()
