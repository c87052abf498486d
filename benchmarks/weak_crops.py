"""How often a training crop loses a class its image is tagged with (the tag then names nothing in
the crop), and how much of a crop is padding, for the supervised scale range and the one the
weakly supervised methods use by default. Per class: the share of its tags that the crop loses.

    python benchmarks/weak_crops.py                            # synthetic defaults
    python benchmarks/weak_crops.py --data voc --data-root data/VOCdevkit --samples 300
"""

from __future__ import annotations

import argparse

import torch

from ctxseg.config import make_config
from ctxseg.data import build_dataset, train_transform
from ctxseg.data.base import tags_from_mask
from ctxseg.methods.ce import CEConfig
from ctxseg.methods.wsss import WSSSConfig


def lost_tags(cfg, samples: int, seed: int = 0) -> dict:
    """Per class: (tags, tags the crop lost); and the mean padded share of the crops."""
    tf = train_transform(cfg.crop_size, cfg.scale_range, cfg.hflip, cfg.color_jitter)
    kw = {"size": tuple(cfg.synthetic_size), "length": cfg.synthetic_train_len} if cfg.data == "synthetic" else {}
    data = build_dataset(cfg.data, "train", cfg.data_root, tf, **kw)
    c = data.info.num_classes
    tagged, lost, padding = torch.zeros(c), torch.zeros(c), 0.0
    g = torch.Generator().manual_seed(seed)
    for k in range(samples):
        i = int(torch.randint(len(data), (), generator=g))
        item = data[(i, seed * 100_000 + k)]
        in_crop = tags_from_mask(item["mask"][item["valid"]], c)
        tagged += item["tags"]
        lost += item["tags"] * (1 - in_crop)
        padding += 1.0 - item["valid"].float().mean().item()
    return {"names": data.info.class_names, "tagged": tagged, "lost": lost, "padding": padding / samples}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="synthetic")
    p.add_argument("--data-root", default=None)
    p.add_argument("--samples", type=int, default=400, help="augmented crops per setting")
    args = p.parse_args()
    root = {"data_root": args.data_root} if args.data_root else {}
    settings = {
        "supervised (CE)": make_config(CEConfig, args.data, **root),
        "weakly supervised": make_config(WSSSConfig, args.data, **root),
    }
    rows = {}
    for label, cfg in settings.items():
        r = lost_tags(cfg, args.samples)
        rows[label] = r
        share = r["lost"].sum() / r["tagged"].sum().clamp_min(1)
        print(f"{label}: crop {cfg.crop_size}, scale {cfg.scale_range}: {share:.1%} of tags name a class the crop "
              f"lost; {r['padding']:.1%} of crop pixels are padding ({args.samples} crops)")
    names = next(iter(rows.values()))["names"]
    print("\nshare of each class's tags lost by the crop")
    print(f"{'class':<14}" + "".join(f"{label:>22}" for label in rows))
    for k, name in enumerate(names):
        cells = []
        for r in rows.values():
            t = int(r["tagged"][k])
            cells.append(f"{r['lost'][k] / t:.1%} of {t}" if t else "-")
        print(f"{name:<14}" + "".join(f"{cell:>22}" for cell in cells))


if __name__ == "__main__":
    main()
