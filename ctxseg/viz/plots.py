"""Plot helpers shared by the notebooks and the report. Each returns its matplotlib Figure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from ctxseg.data.base import DatasetInfo
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


def plot_per_class_iou(results: Mapping[str, dict], key: str = "per_class_iou", ax=None):
    """Grouped bars of per-class IoU, one group per class and one bar per result (run name ->
    eval dict as written to eval.json / printed by ``ctxseg eval``)."""
    fig, ax = _figure(ax, (max(6, 0.9 * len(next(iter(results.values()))[key])), 3.5))
    names = list(next(iter(results.values()))[key])
    width = 0.8 / len(results)
    x = np.arange(len(names))
    for i, (label, res) in enumerate(results.items()):
        vals = [np.nan if res[key][n] is None else res[key][n] for n in names]
        ax.bar(x + (i - (len(results) - 1) / 2) * width, vals, width, label=label)
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set(ylabel=key.replace("_", " "), ylim=(0, 1))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def overlay(image: torch.Tensor, mask, info: DatasetInfo, alpha: float = 0.5) -> np.ndarray:
    """Blend a label map's colours over a normalised image tensor (3, H, W) -> (H, W, 3) float."""
    rgb = denormalize(image.cpu()).permute(1, 2, 0).numpy()
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
