"""Contrastive methods from inside: pixel contrast's sampled anchors and memory bank (notebook 02),
Contextrast's boundary-aware negatives (BANE) and its anchors' similarities (notebook 03)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from ctxseg.data.base import DatasetInfo
from ctxseg.viz.images import _figure, _grid_panels, overlay


def show_anchors(image: torch.Tensor, mask: torch.Tensor, index: torch.Tensor, hard: torch.Tensor,
                 grid_hw: tuple[int, int], info: DatasetInfo, classes: Sequence[int] | None = None,
                 label: torch.Tensor | None = None, ax=None):
    """Sampled anchors of one image over its ground truth: hard ones (predicted wrongly) as
    crosses, easy ones as dots, each at the centre of its embedding-grid cell.

    Args:
        image, mask: the sample (3, H, W) normalised and (H, W).
        index: flat anchor indices into this image's (h * w) grid; hard: their hard flags.
        grid_hw: the embedding grid (h, w).
        classes: only draw anchors of these classes (needs ``label``, the anchors' classes).
    """
    fig, ax = _figure(ax, (5, 4))
    H, W = mask.shape[-2:]
    h, w = grid_hw
    keep = torch.ones_like(hard)
    if classes is not None and label is not None:
        keep = torch.isin(label, torch.as_tensor(list(classes)))
    index, hard = index[keep].cpu(), hard[keep].cpu()
    y = (index // w + 0.5) * H / h - 0.5
    x = (index % w + 0.5) * W / w - 0.5
    ax.imshow(overlay(image, mask, info, alpha=0.45))
    ax.scatter(x[~hard], y[~hard], s=10, c="white", edgecolors="black", linewidths=0.5,
               label=f"easy ({int((~hard).sum())})")
    ax.scatter(x[hard], y[hard], s=22, c="red", marker="x", linewidths=1.2, label=f"hard ({int(hard.sum())})")
    ax.set_axis_off()
    ax.legend(fontsize=7, loc="lower right", framealpha=0.8)
    return fig



def plot_memory_occupancy(method_state: Mapping[str, torch.Tensor], info: DatasetInfo, ax=None):
    """Filled share of each class's pixel and region queue, from a pixel-contrast method's state
    dict (``checkpoint["method"]``); the bar labels give the entry counts."""
    fig, ax = _figure(ax, (max(6, 0.9 * info.num_classes), 3.5))
    size = method_state["memory.pixel"].shape[1]
    x = np.arange(info.num_classes)
    for i, kind in enumerate(("pixel", "region")):
        count = method_state[f"memory.{kind}_count"].cpu().numpy()
        bars = ax.bar(x + (i - 0.5) * 0.4, count / size, 0.4, label=f"{kind} queue")
        ax.bar_label(bars, [str(int(c)) for c in count], fontsize=7)
    ax.set_xticks(x, info.class_names, rotation=30, ha="right")
    ax.set(ylabel=f"filled share of {size}", ylim=(0, 1.1), title="memory bank occupancy")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return fig



def show_bane(image: torch.Tensor, mask: torch.Tensor, region: torch.Tensor, distance: torch.Tensor,
              kept: torch.Tensor, cls: int, info: DatasetInfo, negatives: str = "missed", axes=None):
    """BANE on one image and stage, for the error region of class ``cls``: the image with its
    ground truth, the error region, the distance of each of its pixels to the region's edge, and
    the pixels kept as negatives. Stage-grid maps are drawn over the full-resolution image.

    Args:
        image, mask: the sample, (3, H, W) normalised and (H, W).
        region, distance, kept: this image's (h, w) maps from ``bane_select``.
        cls: the region class (the label for ``negatives="missed"``, the prediction for
            ``"false_positives"``).
        negatives: the reading, for the panel titles.
        axes: four matplotlib axes (default: a new 1 x 4 figure).
    """
    fig, axes, extent, rgb = _grid_panels(image, mask, axes, (16, 3.6))
    grey = rgb.mean(-1)
    name = info.class_names[cls]
    mine = (region == cls).cpu().numpy()
    dist = np.where(mine, distance.cpu().numpy(), np.nan)
    chosen = mine & kept.cpu().numpy()
    axes[0].imshow(overlay(image, mask, info, alpha=0.5))
    axes[0].set_title("image + ground truth")
    axes[1].imshow(grey, cmap="gray")
    other = (region.cpu().numpy() >= 0) & ~mine
    axes[1].imshow(np.ma.masked_where(~other, other), cmap="Greys", alpha=0.5, extent=extent, vmin=0, vmax=1)
    axes[1].imshow(np.ma.masked_where(~mine, mine), cmap="autumn", alpha=0.75, extent=extent, vmin=0, vmax=1)
    what = "missed" if negatives == "missed" else "falsely predicted"
    axes[1].set_title(f"error region: {name} {what} ({int(mine.sum())} cells)\n(grey: other classes' errors)")
    axes[2].imshow(grey, cmap="gray")
    im = axes[2].imshow(dist, cmap="viridis", extent=extent)
    fig.colorbar(im, ax=axes[2], shrink=0.8, label="distance to edge (cells)")
    axes[2].set_title("distance transform inside the region")
    axes[3].imshow(grey, cmap="gray")
    axes[3].imshow(np.ma.masked_where(~mine, mine), cmap="Greys", alpha=0.35, extent=extent, vmin=0, vmax=1)
    axes[3].imshow(np.ma.masked_where(~chosen, chosen), cmap="autumn", alpha=0.9, extent=extent, vmin=0, vmax=1)
    whom = f"every anchor but {name}" if negatives == "missed" else f"the {name} anchor"
    axes[3].set_title(f"kept {int(chosen.sum())} of {int(mine.sum())} (nearest the edge)\nnegatives of {whom}")
    for ax in axes:
        ax.set_axis_off()
    return fig



def plot_anchor_similarity(anchors: Sequence[torch.Tensor], present: Sequence[torch.Tensor], info: DatasetInfo,
                           title: str = "", axes=None):
    """Cosine similarity between the representative anchors of the classes present, one matrix
    per stage (``Contextrast.anchors``: per stage a (C, D) tensor and a (C,) bool)."""
    import matplotlib.pyplot as plt

    if axes is None:
        fig, axes = plt.subplots(1, len(anchors), figsize=(4 * len(anchors), 3.6), layout="constrained")
    fig = axes[0].figure
    for i, (a, p, ax) in enumerate(zip(anchors, present, axes)):
        idx = p.nonzero().squeeze(1).cpu()
        a = torch.nn.functional.normalize(a.detach().float().cpu()[idx], dim=1)
        sim = (a @ a.T).numpy()
        im = ax.imshow(sim, cmap="RdBu_r", vmin=-1, vmax=1)
        names = [info.class_names[c] for c in idx.tolist()]
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        off = sim[~np.eye(len(names), dtype=bool)]
        mean_off = f"{off.mean():.2f}" if off.size else "n/a"
        ax.set_title(f"{title}stage {i + 1}: mean off-diagonal {mean_off}", fontsize=9)
    fig.colorbar(im, ax=list(axes), shrink=0.8, label="cosine similarity")
    return fig
