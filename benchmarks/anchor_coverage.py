"""How often each class can give pixel-contrast anchors: the share of augmented training crops in
which it is present, and in which it has more than ``max_views`` cells on the embedding grid
(stride 4), the condition for an (image, class) to give anchors.

    python benchmarks/anchor_coverage.py --data camvid --data-root ../shared/data/camvid --crop 240 320
"""

from __future__ import annotations

import argparse

import torch

from ctxseg.config import make_config
from ctxseg.engine.trainer import build_datasets
from ctxseg.methods.pixel_contrast import PixelContrastConfig, downsample_labels


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="synthetic")
    p.add_argument("--data-root", default=None)
    p.add_argument("--crop", type=int, nargs=2, default=None)
    p.add_argument("--max-views", type=int, default=100)
    p.add_argument("--samples", type=int, default=150)
    p.add_argument("--stride", type=int, default=4)
    args = p.parse_args()
    overrides = {k: v for k, v in (("data_root", args.data_root), ("crop", args.crop)) if v is not None}
    cfg = make_config(PixelContrastConfig, args.data, **overrides)
    train_set, _ = build_datasets(cfg)
    C = train_set.info.num_classes
    h, w = (s // args.stride for s in cfg.crop_size)
    present, qualify = torch.zeros(C), torch.zeros(C)
    for i in range(args.samples):
        mask = train_set[(i % len(train_set), i)]["mask"][None]  # sample i under augmentation seed i
        cells = downsample_labels(mask, (h, w)).flatten()
        counts = torch.bincount(cells[cells < C], minlength=C)
        present += counts > 0
        qualify += counts > args.max_views
    print(f"{args.data}: {args.samples} augmented training crops {tuple(cfg.crop_size)}, grid {h}x{w}, "
          f"max_views {args.max_views}")
    print(f"{'class':<14}{'present':>9}{'qualifies':>11}")
    for k, name in enumerate(train_set.info.class_names):
        print(f"{name:<14}{present[k] / args.samples:>9.2f}{qualify[k] / args.samples:>11.2f}")


if __name__ == "__main__":
    main()
