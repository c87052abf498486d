"""Training logs and scores: learning curves, a method's loss terms, per-class IoU bars, and a
study's paired differences against training length."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ctxseg.viz.images import _figure


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


def plot_paired_differences(curves: Mapping[str, Sequence[dict]], baseline: str = "the baseline", axes=None):
    """The difference to ``baseline`` against training step, mIoU (left) and boundary IoU (right):
    per method a line through the mean paired difference over seeds with its confidence interval
    as error bars (``curves``: method -> the study's ``by_step`` entries). A dashed line marks 0,
    so an interval that crosses it is visibly not distinguishable from seed noise. Draws on a
    matplotlib ``Figure`` of its own (no pyplot, no backend change) unless ``axes`` are given."""
    if axes is None:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(11, 3.8), layout="constrained")
        axes = fig.subplots(1, 2)
    fig = axes[0].figure
    offsets = np.linspace(-0.015, 0.015, len(curves)) if len(curves) > 1 else [0.0]
    for (name, curve), shift in zip(curves.items(), offsets):
        steps = np.array([e["step"] for e in curve], dtype=float)
        x = steps * (1 + shift)  # nudged apart so overlapping error bars stay readable
        for ax, metric in zip(axes, ("miou", "boundary_iou")):
            mean = np.array([np.nan if e[metric]["mean"] is None else e[metric]["mean"] for e in curve])
            lo = np.array([np.nan if e[metric]["ci_low"] is None else e[metric]["ci_low"] for e in curve])
            hi = np.array([np.nan if e[metric]["ci_high"] is None else e[metric]["ci_high"] for e in curve])
            err = np.vstack([mean - lo, hi - mean])
            ax.errorbar(x, mean, yerr=np.nan_to_num(err), fmt="o-", capsize=3, label=name)
    n = max((e["miou"]["n"] for c in curves.values() for e in c), default=0)
    for ax, label in zip(axes, ("mIoU", "boundary IoU")):
        ax.axhline(0.0, color="k", lw=0.8, ls="--")
        ax.set(xlabel="training step", ylabel=f"Δ {label} vs {baseline}",
               title=f"Δ {label}: mean of {n} seeds, 95 % paired-t CI")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig
