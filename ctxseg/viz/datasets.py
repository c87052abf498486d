"""Looking at a dataset (notebook 00): samples with their tags, augmentations, context crops,
class frequencies."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence

import numpy as np

from ctxseg.data.base import DatasetInfo
from ctxseg.data.transforms import denormalize
from ctxseg.viz.images import _blend, _figure, _ignore_handle, _tag_names, legend_handles


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
