"""How pixel contrast's anchors are spread over the classes, under the old budget (``budget:
per_batch``: 1024 anchors for the process's batch, a class needs more than ``max_views`` = 100
cells of the embedding grid) and the new default (``budget: per_image``: 512 anchors per image, a
class needs more than 100 / 32768 of the image's cells), on augmented training crops grouped into
batches of the configured size. Per class: the share of crops in which it is present, in which
it qualifies under each rule, and its share of all anchors and anchors per crop under each rule.
The counts per class do not depend on the predictions (those only split hard from easy).

    python benchmarks/anchor_coverage.py                      # synthetic defaults
    python benchmarks/anchor_coverage.py --data camvid --data-root ../shared/data/camvid --crop 240 320
"""

from __future__ import annotations

import argparse

import torch

from ctxseg.config import make_config
from ctxseg.engine.trainer import build_datasets
from ctxseg.methods.contrast import anchor_counts, downsample_labels
from ctxseg.methods.pixel_contrast import PixelContrastConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="synthetic")
    p.add_argument("--data-root", default=None)
    p.add_argument("--crop", type=int, nargs=2, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="images per batch (default: the config's)")
    p.add_argument("--max-views", type=int, default=None, help="most anchors per (image, class) (default: the config's)")
    p.add_argument("--samples", type=int, default=150, help="augmented crops (the last batch may be partial)")
    p.add_argument("--stride", type=int, default=4)
    args = p.parse_args()
    overrides = {k: v for k, v in (("data_root", args.data_root), ("crop", args.crop),
                                   ("batch_size", args.batch_size), ("max_views", args.max_views)) if v is not None}
    cfg = make_config(PixelContrastConfig, args.data, **overrides)
    train_set, _ = build_datasets(cfg)
    names = train_set.info.class_names
    C, B = len(names), cfg.batch_size
    h, w = (s // args.stride for s in cfg.crop_size)
    rules = {
        "old": dict(max_samples=cfg.max_samples, max_views=cfg.max_views),
        "new": dict(max_views=cfg.max_views, per_image=cfg.anchors_per_image, min_share=cfg.min_class_share),
    }
    n = args.samples
    present = torch.zeros(C)
    qualify = {r: torch.zeros(C) for r in rules}
    anchors = {r: torch.zeros(C) for r in rules}
    for start in range(0, n, B):
        # crop i under augmentation seed i
        batch = range(start, min(start + B, n))
        masks = torch.stack([torch.as_tensor(train_set[(i % len(train_set), i)]["mask"]) for i in batch])
        labels = downsample_labels(masks, (h, w)).flatten(1)
        present += torch.stack([torch.bincount(row[row < C], minlength=C) > 0 for row in labels]).sum(0)
        for r, kw in rules.items():
            keep_hard, keep_easy, _ = anchor_counts(labels, labels, C, **kw)
            k = keep_hard + keep_easy
            qualify[r] += (k > 0).sum(0)
            anchors[r] += k.sum(0)
    print(f"{args.data}: {n} augmented training crops {tuple(cfg.crop_size)} in batches of {B}, grid {h}x{w}; "
          f"old: budget per_batch, {cfg.max_samples} anchors per batch, qualifying with > {cfg.max_views} cells; "
          f"new: budget per_image, {cfg.anchors_per_image} anchors per image, qualifying with > "
          f"{cfg.min_class_share:.5f} x {h * w} = {cfg.min_class_share * h * w:.1f} cells; "
          f"at most {cfg.max_views} per (image, class); anchors per crop: old {anchors['old'].sum() / n:.1f}, "
          f"new {anchors['new'].sum() / n:.1f}")
    print(f"{'class':<14}{'present':>9}{'qual old':>10}{'qual new':>10}{'share old':>11}{'share new':>11}"
          f"{'per crop old':>14}{'per crop new':>14}")
    total = {r: anchors[r].sum().clamp(min=1) for r in rules}
    for k, name in enumerate(names):
        print(f"{name:<14}{present[k] / n:>9.2f}{qualify['old'][k] / n:>10.2f}{qualify['new'][k] / n:>10.2f}"
              f"{anchors['old'][k] / total['old']:>11.3f}{anchors['new'][k] / total['new']:>11.3f}"
              f"{anchors['old'][k] / n:>14.1f}{anchors['new'][k] / n:>14.1f}")


if __name__ == "__main__":
    main()
