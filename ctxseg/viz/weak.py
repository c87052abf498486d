"""Weakly supervised methods from inside (notebook 04): CAMs and pseudo labels, DSCNet's semantic
graph and its pixel groups' centres."""

from __future__ import annotations

import numpy as np
import torch

from ctxseg.data.base import DatasetInfo
from ctxseg.viz.images import _figure, _grid_panels, overlay


def show_cams(image: torch.Tensor, mask: torch.Tensor, cam: torch.Tensor, refined: torch.Tensor,
              pseudo: torch.Tensor, cls: int, info: DatasetInfo, threshold: float = 0.2, axes=None):
    """One image through the weakly supervised pipeline, for class ``cls``: the ground truth,
    the raw CAM, the PAMR-refined CAM (each with its ``threshold`` contour), and the pseudo label
    (ignored pixels black). Maps on the CAM grid are drawn over the full-resolution image.

    Args:
        image, mask: the sample, (3, H, W) normalised and (H, W).
        cam, refined: (C, h, w) masks (tag-restricted for ``refined``).
        pseudo: (h, w) pseudo label with 255 = ignored.
        cls: the class whose CAMs are shown.
        threshold: the level drawn as a contour.
        axes: four matplotlib axes (default: a new 1 x 4 figure).
    """
    fig, axes, extent, rgb = _grid_panels(image, mask, axes, (16, 3.8))
    H, W = mask.shape[-2:]
    name = info.class_names[cls]
    axes[0].imshow(overlay(image, mask, info, alpha=0.55))
    axes[0].set_title("ground truth (not used in training)", fontsize=9)
    for ax, maps, what in ((axes[1], cam, "raw CAM"), (axes[2], refined, "refined CAM (PAMR)")):
        m = maps[cls].detach().float().cpu().numpy()
        ax.imshow(rgb.mean(-1), cmap="gray")
        im = ax.imshow(m, cmap="jet", alpha=0.55, vmin=0, vmax=1, extent=extent)
        if m.max() > threshold > m.min():
            ys = np.linspace(0, H - 1, m.shape[0])
            xs = np.linspace(0, W - 1, m.shape[1])
            ax.contour(xs, ys, m, levels=[threshold], colors="white", linewidths=1.2)
        ax.set_title(f"{what}: {name} (max {m.max():.2f})", fontsize=9)
    fig.colorbar(im, ax=axes[1:3], shrink=0.8, label=f"mask value (contour at {threshold:.2f})")
    axes[3].imshow(rgb)
    axes[3].imshow(info.colorize(pseudo), alpha=0.75, extent=extent)
    covered = float((pseudo != 255).float().mean())
    axes[3].set_title(f"pseudo label ({100 * covered:.0f}% labelled, black: ignored)", fontsize=9)
    for ax in axes:
        ax.set_axis_off()
    return fig



def plot_semantic_graph(weights: torch.Tensor, present: torch.Tensor, num_images: int, info: DatasetInfo,
                        min_weight: float = 0.5, per_node: int = 3, ax=None):
    """The semantic graph of a batch: one node per (image, class) present, placed at column =
    image and row = class. Drawn edges: each node's ``per_node`` strongest edges whose weight
    (cosine similarity, ReLU'd) reaches ``min_weight``, darker when stronger (all of them would
    hide the structure). Green edges join the same class in two images (the positives of the node
    contrast), red edges different classes; the title counts every edge above ``min_weight``.

    Args:
        weights: (N, N) edge weights of the N = num_images * C nodes, in (image, class) order.
        present: (N,) which nodes exist.
    """
    from matplotlib.collections import LineCollection

    fig, ax = _figure(ax, (1.2 * num_images + 2.5, 0.45 * info.num_classes + 1.5))
    c = info.num_classes
    p = present.cpu().numpy().astype(bool)
    w = np.where(p[:, None] & p[None, :], weights.detach().float().cpu().numpy(), -np.inf)
    np.fill_diagonal(w, -np.inf)
    strong = w >= min_weight
    # Keep an edge when it is among the per_node strongest of either of its nodes.
    rank = np.argsort(np.argsort(-w, axis=1), axis=1)
    keep = strong & (rank < per_node)
    pairs = np.argwhere(np.triu(keep | keep.T, 1))
    xs = np.repeat(np.arange(num_images), c)
    ys = np.tile(np.arange(c), num_images)
    u, v = pairs[:, 0], pairs[:, 1]
    same = ys[u] == ys[v]
    # Curve edges within one column so they do not hide behind the nodes.
    bend = np.where(xs[u] == xs[v], 0.35 * np.abs(ys[u] - ys[v]) / c * 3, 0.0)
    mid = np.stack([(xs[u] + xs[v]) / 2 + bend, (ys[u] + ys[v]) / 2], 1)
    segments = np.stack([np.stack([xs[u], ys[u]], 1), mid, np.stack([xs[v], ys[v]], 1)], 1)
    alpha = np.clip(0.15 + 0.85 * (w[u, v] - min_weight) / max(1e-6, 1 - min_weight), 0.0, 1.0)
    import matplotlib.colors as mcolors

    rgba = np.array([mcolors.to_rgba("tab:green" if s_ else "tab:red") for s_ in same]).reshape(-1, 4)
    rgba[:, 3] = alpha
    ax.add_collection(LineCollection(segments, colors=rgba, linewidths=1.2, zorder=1))
    colours = np.asarray(info.palette, dtype=float)[ys[p]] / 255
    ax.scatter(xs[p], ys[p], s=160, c=colours, edgecolors="black", zorder=2)
    ax.set_xticks(range(num_images), [f"img {i}" for i in range(num_images)], fontsize=8)
    ax.set_yticks(range(c), info.class_names, fontsize=8)
    ax.set_xlim(-0.6, num_images + 0.2)  # room for the curved edges of the last column
    ax.set_ylim(c - 0.5, -0.5)
    n_strong = int(np.triu(strong, 1).sum())
    ax.set_title(f"{int(p.sum())} nodes; {n_strong} edges with weight >= {min_weight:.2f}, the {per_node} "
                 f"strongest per node drawn ({int(same.sum())} of {len(pairs)} same-class, green)", fontsize=9)
    return fig



def plot_group_centres(z: torch.Tensor, labels: torch.Tensor, centres: torch.Tensor, has: torch.Tensor,
                       info: DatasetInfo, max_points: int = 3000, seed: int = 0, ax=None):
    """Pixel embeddings and their group centres in 2-D (PCA of the embeddings): points are
    reliable pixels coloured by pseudo label, stars the confidence-weighted group centres."""
    from sklearn.decomposition import PCA

    fig, ax = _figure(ax, (6.5, 5))
    keep = (labels != 255).cpu()
    z, labels = z.detach().float().cpu()[keep], labels.cpu()[keep]
    if len(z) > max_points:
        idx = torch.randperm(len(z), generator=torch.Generator().manual_seed(seed))[:max_points]
        z, labels = z[idx], labels[idx]
    idx = has.nonzero().flatten().cpu()
    cen = centres.detach().float().cpu()[idx]
    if len(z) + len(cen) < 2:  # e.g. an untrained model: no pixel got a pseudo label
        ax.text(0.5, 0.5, "no reliable pixel: no pseudo label to group", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    pca = PCA(n_components=2, random_state=seed).fit(torch.cat([z, cen]).numpy())
    pz, pc = pca.transform(z.numpy()), pca.transform(cen.numpy())
    palette = np.asarray(info.palette, dtype=float) / 255
    ax.scatter(pz[:, 0], pz[:, 1], s=4, c=palette[labels.numpy()], alpha=0.4, linewidths=0)
    ax.scatter(pc[:, 0], pc[:, 1], s=320, marker="*", c=palette[idx.numpy()], edgecolors="black", linewidths=1.2)
    for (x, y), k in zip(pc, idx.tolist()):
        ax.annotate(info.class_names[k], (x, y), textcoords="offset points", xytext=(8, 6), fontsize=8)
    var = pca.explained_variance_ratio_.sum()
    ax.set_title(f"pixel embeddings and group centres (PCA, {100 * var:.0f}% of variance)", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    return fig
