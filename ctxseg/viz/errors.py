"""Where models go wrong (notebook 06, the report): confusion matrices, errors near edges and
inside regions, the same images through several models."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from ctxseg.data.base import DatasetInfo
from ctxseg.data.transforms import denormalize
from ctxseg.viz.images import _figure, legend_handles, predict_batch


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
