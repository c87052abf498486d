"""How well the labels on each coarse feature grid describe the cells they stand for: the share of
cells whose label differs from the majority label of the s x s pixel block the cell covers, per
stride and per rule of ``downsample_labels`` (``nearest``, ctxseg before issue 22; ``center``, the
default; ``majority``, which agrees with the majority by construction and instead ignores the
cells below ``label_purity``).

    python benchmarks/label_grid.py [--data camvid --data-root ../shared/data/camvid] [--crop 180 240]
        [--images 64] [--small Pole SignSymbol Pedestrian Bicyclist]

Reads --images training crops as ``ctxseg train`` draws them (the dataset's train transform,
seed 0). A cell counts when its block has a valid majority label; "small" restricts to cells
whose majority label is one of --small (CamVid's thin classes by default; none on other data).
Deterministic: the numbers depend on the data only.
"""

from __future__ import annotations

import argparse

import torch

from ctxseg.config import make_config
from ctxseg.data import build_dataset, train_transform
from ctxseg.methods.ce import CEConfig
from ctxseg.methods.contrast import downsample_labels

STRIDES = (4, 8, 16, 32)


def block_majority(mask: torch.Tensor, size) -> torch.Tensor:
    """The majority valid label of each cell's block (255 where the block has none)."""
    return downsample_labels(mask, size, "majority", purity=1e-9)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="camvid")
    p.add_argument("--data-root", default="../shared/data/camvid")
    p.add_argument("--crop", type=int, nargs=2, default=(180, 240))
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--small", nargs="*", default=["Pole", "SignSymbol", "Pedestrian", "Bicyclist"])
    args = p.parse_args()
    cfg = make_config(CEConfig, args.data, data_root=args.data_root if args.data != "synthetic" else None,
                      crop=tuple(args.crop))
    tf = train_transform(cfg.crop_size, cfg.scale_range, cfg.hflip, cfg.color_jitter)
    kw = {"size": tuple(cfg.synthetic_size), "length": args.images} if args.data == "synthetic" else {}
    ds = build_dataset(args.data, "train", cfg.data_root, tf, **kw)
    n = min(args.images, len(ds))
    mask = torch.stack([ds[(i, 1000 + i)]["mask"] for i in range(n)])
    H, W = mask.shape[-2:]
    names = list(ds.info.class_names)
    small = [names.index(c) for c in args.small if c in names]
    print(f"{args.data} train, {n} crops of {H}x{W}; share of cells whose label differs from their block's "
          f"majority (small: {', '.join(args.small) if small else 'none'})")
    print(f"{'stride':>6}{'grid':>9}{'cells':>8}{'nearest':>10}{'center':>9}{'small: nearest':>16}{'center':>9}"
          f"{'majority ignores':>18}")
    for s in STRIDES:
        size = (-(-H // s), -(-W // s))
        ref = block_majority(mask, size)
        counted = ref != 255
        row = []
        for rule in ("nearest", "center"):
            lab = downsample_labels(mask, size, rule)
            wrong = (lab != ref) & counted
            row.append(wrong.sum() / counted.sum())
            sm = counted & torch.isin(ref, torch.tensor(small or [-1]))
            row.append(wrong[sm].sum() / sm.sum().clamp(min=1) if small else float("nan"))
        ignored = ((downsample_labels(mask, size, "majority") == 255) & counted).sum() / counted.sum()
        print(f"{s:>6}{f'{size[0]}x{size[1]}':>9}{int(counted.sum()):>8}{100 * row[0]:>9.1f}%{100 * row[2]:>8.1f}%"
              f"{100 * row[1]:>15.1f}%{100 * row[3]:>8.1f}%{100 * ignored:>17.1f}%")


if __name__ == "__main__":
    main()
