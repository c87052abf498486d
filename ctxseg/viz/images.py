"""Images, label maps and predictions: overlays, class legends and palettes, a model's predictions
next to the ground truth, and the figure helpers the other plot modules share."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from ctxseg.data.base import DatasetInfo, tags_from_mask
from ctxseg.data.transforms import denormalize
from ctxseg.models.segmenter import class_argmax


def _figure(ax, figsize):
    import matplotlib.pyplot as plt

    if ax is not None:
        return ax.figure, ax
    fig, ax = plt.subplots(figsize=figsize, layout="constrained")
    return fig, ax



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
    return class_argmax(model.predict(images.to(device))).cpu()



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
