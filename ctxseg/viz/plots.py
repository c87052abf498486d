"""Plot helpers shared by the notebooks and the report. Each returns its matplotlib Figure."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from ctxseg.data.base import DatasetInfo, tags_from_mask
from ctxseg.data.transforms import denormalize


def _figure(ax, figsize):
    import matplotlib.pyplot as plt

    if ax is not None:
        return ax.figure, ax
    fig, ax = plt.subplots(figsize=figsize, layout="constrained")
    return fig, ax


def plot_learning_curves(runs: Sequence[dict], smooth: int = 5):
    """Training loss (moving average over ``smooth`` logged rows) and evaluation mIoU vs step."""
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_iou) = plt.subplots(1, 2, figsize=(10, 3.5), layout="constrained")
    for run in runs:
        steps = np.array([r["step"] for r in run["train"]])
        loss = np.array([r["loss"] for r in run["train"]])
        if len(loss) >= smooth > 1:
            loss = np.convolve(loss, np.ones(smooth) / smooth, mode="valid")
            steps = steps[smooth - 1 :]
        ax_loss.plot(steps, loss, label=run["name"])
        evals = run["evals"]
        if evals:
            ax_iou.plot([e["step"] for e in evals], [e["miou"] for e in evals], "o-", label=f"{run['name']} mIoU")
            ax_iou.plot(
                [e["step"] for e in evals], [e["boundary_iou"] for e in evals], "s--", alpha=0.7,
                label=f"{run['name']} boundary IoU",
            )
    ax_loss.set(xlabel="step", ylabel="training loss", title="loss")
    ax_iou.set(xlabel="step", ylabel="IoU", title="evaluation", ylim=(0, 1))
    for ax in (ax_loss, ax_iou):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def plot_loss_terms(run: dict, terms: Sequence[str] | None = None, smooth: int = 5, ax=None):
    """Each logged loss term of one run (``ce``, ``contrast``, ...) vs step, moving-averaged over
    ``smooth`` rows; terms default to every numeric column except step, epoch, lr, timing and the
    anchor counts (``anchors``, ``anchors/<class>``, ...), which are not losses."""
    fig, ax = _figure(ax, (7, 3.5))
    rows = run["train"]
    skip = {"step", "epoch", "lr", "sec_per_iter"}
    terms = terms or [k for k in rows[0] if k not in skip and not k.startswith("anchor")
                      and isinstance(rows[0][k], (int, float))]
    steps = np.array([r["step"] for r in rows])
    for key in terms:
        vals = np.array([r.get(key, np.nan) for r in rows], dtype=float)
        s = steps
        if len(vals) >= smooth > 1:
            vals = np.convolve(vals, np.ones(smooth) / smooth, mode="valid")
            s = steps[smooth - 1 :]
        ax.plot(s, vals, label=key)
    ax.set(xlabel="step", ylabel="loss term", title=f"{run['name']}: loss terms")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_per_class_iou(results: Mapping[str, dict], key: str = "per_class_iou", ax=None):
    """Grouped bars of per-class IoU, one group per class and one bar per result (run name ->
    eval dict as written to eval.json / printed by ``ctxseg eval``). Results over different class
    sets get the union of their classes; a class a result lacks (or an undefined IoU) has no bar."""
    names = list(dict.fromkeys(n for res in results.values() for n in res[key]))
    fig, ax = _figure(ax, (max(6, 0.9 * len(names)), 3.5))
    width = 0.8 / len(results)
    x = np.arange(len(names))
    for i, (label, res) in enumerate(results.items()):
        vals = [np.nan if res[key].get(n) is None else res[key][n] for n in names]
        ax.bar(x + (i - (len(results) - 1) / 2) * width, vals, width, label=label)
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set(ylabel=key.replace("_", " "), ylim=(0, 1))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def overlay(image: torch.Tensor, mask, info: DatasetInfo, alpha: float = 0.5) -> np.ndarray:
    """Blend a label map's colours over a normalised image tensor (3, H, W) -> (H, W, 3) float."""
    return _blend(denormalize(image.cpu()).permute(1, 2, 0).numpy(), mask, info, alpha)


def _blend(rgb: np.ndarray, mask, info: DatasetInfo, alpha: float) -> np.ndarray:
    """Blend a label map's colours over an RGB float image (H, W, 3) in [0, 1]; ignore stays."""
    colours = info.colorize(mask).astype(np.float32) / 255
    valid = (np.asarray(mask.cpu() if torch.is_tensor(mask) else mask) != info.ignore_index)[..., None]
    return np.where(valid, (1 - alpha) * rgb + alpha * colours, rgb)


@torch.no_grad()
def predict_batch(model, images: torch.Tensor) -> torch.Tensor:
    """Argmax predictions (B, H, W) at the images' resolution."""
    model.eval()
    device = next(model.parameters()).device
    return model.predict(images.to(device)).argmax(1).cpu()


def show_predictions(model, dataset, indices: Sequence[int], info: DatasetInfo | None = None):
    """A grid: image | ground truth | prediction | errors, one row per dataset index."""
    import matplotlib.pyplot as plt

    info = info or dataset.info
    samples = [dataset[i] for i in indices]
    preds = predict_batch(model, torch.stack([s["image"] for s in samples]))
    fig, axes = plt.subplots(len(indices), 4, figsize=(10, 2.6 * len(indices)), squeeze=False, layout="constrained")
    for row, (s, pred) in zip(axes, zip(samples, preds)):
        gt = s["mask"]
        err = ((pred != gt) & (gt != info.ignore_index)).numpy()
        panels = [
            (denormalize(s["image"]).permute(1, 2, 0).numpy(), f"image {s['index']}"),
            (info.colorize(gt), "ground truth"),
            (info.colorize(pred), "prediction"),
            (err, f"errors ({err.mean():.1%})"),
        ]
        for ax, (img, title) in zip(row, panels):
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, interpolation="nearest")
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    return fig


def legend_handles(info: DatasetInfo):
    """Colour patches for a class legend (``ax.legend(handles=legend_handles(info))``)."""
    from matplotlib.patches import Patch

    return [Patch(color=np.array(c) / 255, label=n) for n, c in zip(info.class_names, info.palette)]


def _tag_names(mask: np.ndarray, info: DatasetInfo) -> list[str]:
    """Names of the classes present in ``mask``: the image-level tags the trainer sees."""
    tags = tags_from_mask(torch.from_numpy(np.asarray(mask)), info.num_classes)
    return [info.class_names[k] for k in torch.nonzero(tags).flatten().tolist()]


def _ignore_handle(info: DatasetInfo):
    from matplotlib.patches import Patch

    return Patch(facecolor="black", label=f"ignore ({info.ignore_index})")


def show_samples(dataset, indices: Sequence[int], overlay: bool = False, ncols: int | None = None,
                 alpha: float = 0.5, legend: bool = True):
    """Raw samples (``dataset.load``, no transform) with colourised masks and their tags.

    Side by side, each sample is its image with its mask to the right; with ``overlay`` it is one
    panel with the mask's colours blended over the image. Each sample is titled with its index and
    its image-level tags (the classes present in its mask); ignored pixels (255) are black.

    Args:
        dataset: a ``SegmentationDataset``.
        indices: sample indices to show.
        overlay: blend the mask over the image instead of drawing it next to it.
        ncols: samples per row of the grid (default 2 side by side, 4 overlaid).
        alpha: opacity of the mask colours in overlay mode.
        legend: add a class-colour legend to the right of the grid.

    Returns:
        The matplotlib Figure.
    """
    import matplotlib.pyplot as plt

    info = dataset.info
    indices = list(indices)
    samples = [dataset.load(i) for i in indices]
    per = 1 if overlay else 2
    ncols = max(1, min(ncols or (4 if overlay else 2), len(indices)))
    nrows = math.ceil(len(indices) / ncols)
    h, w = samples[0][1].shape
    panel = 2.4
    fig, axes = plt.subplots(
        nrows, ncols * per, squeeze=False, layout="constrained",
        figsize=(panel * ncols * per + (1.6 if legend else 0), (panel * h / w + 0.45) * nrows),
    )
    for ax in axes.flat:
        ax.axis("off")
    for k, (i, (image, mask)) in enumerate(zip(indices, samples)):
        r, c = divmod(k, ncols)
        tags = textwrap.fill(", ".join(_tag_names(mask, info)), 34)
        if overlay:
            ax = axes[r, c]
            ax.imshow(_blend(image.astype(np.float32) / 255, mask, info, alpha), interpolation="nearest")
            ax.set_title(f"[{i}] {tags}", fontsize=7)
        else:
            axes[r, 2 * c].imshow(image, interpolation="nearest")
            axes[r, 2 * c].set_title(f"[{i}]", fontsize=8)
            axes[r, 2 * c + 1].imshow(info.colorize(mask), interpolation="nearest")
            axes[r, 2 * c + 1].set_title(tags, fontsize=7)
    if legend:
        fig.legend(handles=legend_handles(info) + [_ignore_handle(info)], loc="outside right upper",
                   fontsize=8)
    return fig


def show_augmentations(dataset, index: int, seeds: Sequence[int], alpha: float = 0.0):
    """One sample un-augmented and under several augmentation seeds, images above masks.

    ``dataset[(index, seed)]`` is a pure function of (index, seed), so each column is exactly what
    the trainer sees when its sampler yields that pair. Pixels padded by the random crop are 0 in
    the image and 255 (ignore) in the mask, drawn black; each mask is titled with its ignored share.

    Args:
        dataset: a ``SegmentationDataset`` whose transform ends with normalisation (as
            ``train_transform`` does).
        index: the sample to augment.
        seeds: augmentation seeds, one column each.
        alpha: if > 0, blend the masks over the augmented images in the lower row instead.

    Returns:
        The matplotlib Figure.
    """
    import matplotlib.pyplot as plt

    info = dataset.info
    seeds = list(seeds)
    image, mask = dataset.load(index)
    columns = [(image.astype(np.float32) / 255, mask, "original")]
    for seed in seeds:
        s = dataset[(index, seed)]
        rgb = denormalize(s["image"]).permute(1, 2, 0).numpy()
        columns.append((rgb, s["mask"].numpy(), f"seed {seed}"))
    fig, axes = plt.subplots(2, len(columns), squeeze=False, layout="constrained",
                             figsize=(2.1 * len(columns) + 1.6, 4.6))
    for (rgb, m, title), top, bottom in zip(columns, axes[0], axes[1]):
        top.imshow(rgb, interpolation="nearest")
        top.set_title(f"{title}\n{m.shape[1]}x{m.shape[0]}", fontsize=8)
        shown = _blend(rgb, m, info, alpha) if alpha > 0 else info.colorize(m)
        bottom.imshow(shown, interpolation="nearest")
        bottom.set_title(f"ignore {np.mean(m == info.ignore_index):.0%}", fontsize=8)
        top.axis("off")
        bottom.axis("off")
    fig.legend(handles=legend_handles(info) + [_ignore_handle(info)], loc="outside right upper",
               fontsize=8)
    return fig


def show_context_crops(dataset, classes: Sequence[str], n: int = 6, margin: float = 1.0,
                       min_pixels: int = 40):
    """Objects of a few classes alone (surroundings greyed out) and in their context.

    For each class, the first ``n`` samples holding an object of it (a connected component of at
    least ``min_pixels`` pixels; the largest one is used) give two rows: the object's bounding box
    with every other pixel grey, and the box grown by ``margin`` times its size on each side. For
    look-alike classes (car and boat in the synthetic scenes) the first rows are hard to tell
    apart and the second ones are not.

    Args:
        dataset: a ``SegmentationDataset`` (read with ``load``: no transform).
        classes: class names, one pair of rows each.
        n: objects per class.
        margin: context added around the object's box, as a multiple of the box size.
        min_pixels: smallest object considered.

    Returns:
        The matplotlib Figure.
    """
    import matplotlib.pyplot as plt
    from scipy import ndimage

    info = dataset.info
    fig, axes = plt.subplots(2 * len(classes), n, squeeze=False, layout="constrained",
                             figsize=(1.6 * n, 1.75 * 2 * len(classes)))
    for ax in axes.flat:
        ax.axis("off")
    for row, name in enumerate(classes):
        cls = info.class_names.index(name)
        found = 0
        for i in range(len(dataset)):
            if found == n:
                break
            image, mask = dataset.load(i)
            labels, count = ndimage.label(mask == cls)
            if count == 0:
                continue
            sizes = np.bincount(labels.ravel())[1:]
            if sizes.max() < min_pixels:
                continue
            obj = labels == 1 + int(sizes.argmax())
            ys, xs = np.nonzero(obj)
            cy, cx = (ys.min() + ys.max() + 1) / 2, (xs.min() + xs.max() + 1) / 2
            half = (max(ys.max() + 1 - ys.min(), xs.max() + 1 - xs.min()) + 2) / 2

            def window(r):  # square crop of half side r around the object, clipped to the image
                return (slice(max(0, int(cy - r)), int(math.ceil(cy + r))),
                        slice(max(0, int(cx - r)), int(math.ceil(cx + r))))

            alone = np.where(obj[..., None], image, 128).astype(np.uint8)
            axes[2 * row, found].imshow(alone[window(half)], interpolation="nearest")
            axes[2 * row, found].set_title(f"{name} alone [{i}]", fontsize=7)
            context = image[window(half * (1 + 2 * margin))]
            axes[2 * row + 1, found].imshow(context, interpolation="nearest")
            axes[2 * row + 1, found].set_title(f"{name} in context", fontsize=7)
            found += 1
    return fig


def plot_class_frequencies(values: Mapping[str, Sequence[float]], info: DatasetInfo,
                           ylabel: str = "pixel share", log: bool = False, ax=None):
    """Bars of a per-class quantity (e.g. pixel share), one group per class, one bar per series.

    With a single series the bars take the class colours of ``info.palette``.

    Args:
        values: series name -> one value per class, in label order.
        info: the dataset's class metadata.
        ylabel: what the values are.
        log: logarithmic y axis (rare classes become visible).
        ax: draw into this Axes instead of a new figure.

    Returns:
        The matplotlib Figure.
    """
    fig, ax = _figure(ax, (max(6, 0.55 * info.num_classes), 3.2))
    x = np.arange(info.num_classes)
    width = 0.8 / len(values)
    for k, (label, vals) in enumerate(values.items()):
        vals = np.asarray(vals, dtype=float)
        if len(vals) != info.num_classes:
            raise ValueError(f"series {label!r} has {len(vals)} values, expected {info.num_classes}")
        colour = np.asarray(info.palette) / 255 if len(values) == 1 else None
        ax.bar(x + (k - (len(values) - 1) / 2) * width, vals, width, label=label, color=colour,
               edgecolor="black", linewidth=0.5)
    ax.set_xticks(x, info.class_names, rotation=30 if info.num_classes > 6 else 0,
                  ha="right" if info.num_classes > 6 else "center")
    ax.set(ylabel=ylabel, title=info.name)
    if log:
        ax.set_yscale("log")
    ax.grid(axis="y", alpha=0.3)
    if len(values) > 1:
        ax.legend(fontsize=8)
    return fig


def show_palette(info: DatasetInfo, ncols: int = 4):
    """A swatch table of a dataset's classes: label index, colour and name.

    Args:
        info: the dataset's class metadata (no data needed).
        ncols: columns of the table.

    Returns:
        The matplotlib Figure.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    nrows = math.ceil(info.num_classes / ncols)
    fig, ax = plt.subplots(figsize=(2.6 * ncols, 0.24 * nrows + 0.5), layout="constrained")
    for k, (name, colour) in enumerate(zip(info.class_names, info.palette)):
        c, r = divmod(k, nrows)
        ax.add_patch(Rectangle((c, r + 0.1), 0.18, 0.8, color=np.asarray(colour) / 255, ec="black", lw=0.3))
        ax.text(c + 0.22, r + 0.5, f"{k:>3} {name}", va="center", fontsize=7, family="monospace")
    ax.set(xlim=(0, ncols), ylim=(nrows, 0), title=f"{info.name}: {info.num_classes} classes, "
           f"ignore = {info.ignore_index}")
    ax.axis("off")
    return fig


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


def _grid_panels(image: torch.Tensor, mask: torch.Tensor, axes, figsize):
    """A row of four panels for one sample, and what drawing a coarse grid over it needs:
    (figure, axes, the ``extent`` that stretches an (h, w) map over the (H, W) image, the image
    as RGB in [0, 1])."""
    import matplotlib.pyplot as plt

    if axes is None:
        _, axes = plt.subplots(1, 4, figsize=figsize, layout="constrained")
    H, W = mask.shape[-2:]
    extent = (-0.5, W - 0.5, H - 0.5, -0.5)
    rgb = denormalize(image).permute(1, 2, 0).clamp(0, 1).cpu().numpy()
    return axes[0].figure, axes, extent, rgb


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


def plot_confusion(cm, class_names: Sequence[str], normalize: str | None = "true", annotate: bool | None = None,
                   ax=None):
    """A confusion matrix (rows ground truth, columns prediction) as a heat map.

    Args:
        cm: (C, C) pixel counts, e.g. from :func:`ctxseg.viz.run_confusion`.
        class_names: the C class names.
        normalize: ``"true"`` divides each row by its ground-truth pixel count, so the diagonal
            is each class's recall and a row shows where its pixels went (a class absent from
            the ground truth has a blank row); ``None`` shows the counts.
        annotate: write the values in the cells (default: when C <= 12).

    Returns:
        The matplotlib Figure.
    """
    cm = np.asarray(cm, dtype=np.float64)
    if normalize == "true":
        totals = cm.sum(1, keepdims=True)
        values = np.divide(cm, totals, out=np.full_like(cm, np.nan), where=totals > 0)
    elif normalize is None:
        values = cm
    else:
        raise ValueError(f"normalize must be 'true' or None, got {normalize!r}")
    c = len(class_names)
    fig, ax = _figure(ax, (0.5 * c + 2.5, 0.45 * c + 1.5))
    im = ax.imshow(values, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    fig.colorbar(im, ax=ax, shrink=0.8, label="share of the class's pixels" if normalize else "pixels")
    if annotate if annotate is not None else c <= 12:
        top = np.nanmax(values) if np.isfinite(values).any() else 1.0
        for (i, j), v in np.ndenumerate(values):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}" if normalize else f"{int(v)}", ha="center", va="center", fontsize=7,
                        color="white" if v > 0.6 * top else "black")
    ax.set_xticks(range(c), class_names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(c), class_names, fontsize=8)
    ax.set(xlabel="prediction", ylabel="ground truth")
    return fig


# Codes of :func:`boundary_error_map`.
CORRECT, BOUNDARY_ERROR, INTERIOR_ERROR, IGNORED = 0, 1, 2, 3


def edge_band(target, boundary_px: int = 3, ignore_index: int | None = None) -> torch.Tensor:
    """The (H, W) bool mask of pixels within ``boundary_px`` pixels (the (2d+1)x(2d+1) window)
    of a ground-truth edge: a pixel whose window holds another label. The image border is not an
    edge. By default the ignore label is a label like any other, so its outline is an edge, as in
    Boundary IoU; with ``ignore_index`` its pixels are neither edges nor in the band.
    """
    target = torch.as_tensor(np.asarray(target)).long()
    if boundary_px <= 0:
        return torch.zeros(target.shape, dtype=torch.bool)
    labels, index = target.unique(return_inverse=True)
    onehot = torch.nn.functional.one_hot(index, len(labels)).permute(2, 0, 1).float()
    inside = torch.ones_like(target, dtype=torch.bool)
    if ignore_index is not None:
        onehot, inside = onehot[labels != ignore_index], target != ignore_index
    d = boundary_px
    present = torch.nn.functional.max_pool2d(onehot[None], 2 * d + 1, stride=1, padding=d)[0]  # labels in the window
    return (present.sum(0) > 1) & inside


def boundary_error_map(pred, target, boundary_px: int = 3, ignore_index: int = 255) -> np.ndarray:
    """Classify each pixel of one prediction: ``CORRECT`` (0), ``BOUNDARY_ERROR`` (1: wrong and in
    the :func:`edge_band` of the ground truth), ``INTERIOR_ERROR`` (2: wrong, farther from every
    edge) or ``IGNORED`` (3: ground truth ``ignore_index``).

    Args:
        pred, target: (H, W) integer label maps (tensors or arrays).
    """
    pred, target = torch.as_tensor(np.asarray(pred)).long(), torch.as_tensor(np.asarray(target)).long()
    band = edge_band(target, boundary_px)
    out = torch.where(pred != target, torch.where(band, BOUNDARY_ERROR, INTERIOR_ERROR), CORRECT)
    return torch.where(target == ignore_index, IGNORED, out).numpy()


def show_boundary_errors(model, dataset, indices: Sequence[int], boundary_px: int = 3,
                         info: DatasetInfo | None = None):
    """Where a model's errors lie: image | ground truth | prediction | error map, one row per
    dataset index. The map marks errors within ``boundary_px`` of a ground-truth edge in orange
    and interior errors in red over the greyed image (edge band lightly shaded, ignored pixels
    black); each title gives both shares of the labelled pixels (:func:`boundary_error_map`)."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    info = info or dataset.info
    samples = [dataset[i] for i in indices]
    preds = predict_batch(model, torch.stack([s["image"] for s in samples]))
    colours = {BOUNDARY_ERROR: (1.0, 0.6, 0.0), INTERIOR_ERROR: (0.85, 0.0, 0.0), IGNORED: (0.0, 0.0, 0.0)}
    fig, axes = plt.subplots(len(samples), 4, figsize=(11, 2.7 * len(samples)), squeeze=False, layout="constrained")
    for row, s, pred in zip(axes, samples, preds):
        gt = s["mask"]
        codes = boundary_error_map(pred, gt, boundary_px, info.ignore_index)
        rgb = denormalize(s["image"]).permute(1, 2, 0).clamp(0, 1).numpy()
        shown = np.repeat(0.35 + 0.5 * rgb.mean(-1, keepdims=True), 3, -1)
        shown[edge_band(gt, boundary_px).numpy()] *= 0.75
        for code, colour in colours.items():
            shown[codes == code] = colour
        labelled = max(1, int((codes != IGNORED).sum()))
        panels = [
            (rgb, f"image {s['index']}"),
            (info.colorize(gt), "ground truth"),
            (info.colorize(pred), "prediction"),
            (shown, f"errors: {(codes == BOUNDARY_ERROR).sum() / labelled:.1%} at edges, "
                    f"{(codes == INTERIOR_ERROR).sum() / labelled:.1%} inside"),
        ]
        for ax, (img, title) in zip(row, panels):
            ax.imshow(img, interpolation="nearest")
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    handles = [Patch(color=colours[BOUNDARY_ERROR], label=f"error within {boundary_px} px of an edge"),
               Patch(color=colours[INTERIOR_ERROR], label="interior error"),
               Patch(color=colours[IGNORED], label="ignored")]
    fig.legend(handles=handles, loc="outside lower center", ncols=3, fontsize=8)
    return fig


def show_prediction_grid(models: Mapping[str, torch.nn.Module], dataset, indices: Sequence[int],
                         info: DatasetInfo | None = None):
    """Several models on the same images: one row per dataset index, columns image | ground
    truth | each model's prediction, titled with its pixel accuracy on that image."""
    import matplotlib.pyplot as plt

    info = info or dataset.info
    samples = [dataset[i] for i in indices]
    images = torch.stack([s["image"] for s in samples])
    preds = {name: predict_batch(m, images) for name, m in models.items()}
    ncols = 2 + len(models)
    fig, axes = plt.subplots(len(samples), ncols, figsize=(2.4 * ncols, 2.5 * len(samples)), squeeze=False,
                             layout="constrained")
    for r, (row, s) in enumerate(zip(axes, samples)):
        gt = s["mask"]
        valid = gt != info.ignore_index
        panels = [(denormalize(s["image"]).permute(1, 2, 0).clamp(0, 1).numpy(), f"image {s['index']}"),
                  (info.colorize(gt), "ground truth")]
        for name, p in preds.items():
            acc = float((p[r] == gt)[valid].float().mean()) if valid.any() else float("nan")
            panels.append((info.colorize(p[r]), f"{name}\n{acc:.1%} correct"))
        for ax, (img, title) in zip(row, panels):
            ax.imshow(img, interpolation="nearest")
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.legend(handles=legend_handles(info), loc="outside right upper", fontsize=8)
    return fig
