"""Looking inside: run logs, plots, overlays and the HTML report (matplotlib only; imports of
heavy optional tools such as UMAP stay lazy)."""

from ctxseg.viz.plots import (
    overlay,
    plot_learning_curves,
    plot_per_class_iou,
    predict_batch,
    show_predictions,
)
from ctxseg.viz.runs import load_run

__all__ = [
    "load_run",
    "overlay",
    "plot_learning_curves",
    "plot_per_class_iou",
    "predict_batch",
    "show_predictions",
]
