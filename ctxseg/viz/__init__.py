"""Looking inside: run logs, plots, overlays and the HTML report (matplotlib only; imports of
heavy optional tools such as UMAP stay lazy)."""

from ctxseg.viz.plots import (
    legend_handles,
    overlay,
    plot_anchor_similarity,
    plot_class_frequencies,
    plot_group_centres,
    plot_learning_curves,
    plot_loss_terms,
    plot_memory_occupancy,
    plot_per_class_iou,
    plot_semantic_graph,
    predict_batch,
    show_anchors,
    show_augmentations,
    show_bane,
    show_cams,
    show_context_crops,
    show_palette,
    show_predictions,
    show_samples,
)
from ctxseg.viz.runs import load_run

__all__ = [
    "legend_handles",
    "load_run",
    "overlay",
    "plot_anchor_similarity",
    "plot_class_frequencies",
    "plot_group_centres",
    "plot_learning_curves",
    "plot_loss_terms",
    "plot_memory_occupancy",
    "plot_per_class_iou",
    "plot_semantic_graph",
    "predict_batch",
    "show_anchors",
    "show_augmentations",
    "show_bane",
    "show_cams",
    "show_context_crops",
    "show_palette",
    "show_predictions",
    "show_samples",
]
