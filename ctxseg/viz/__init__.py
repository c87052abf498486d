"""Looking inside: run logs, plots, overlays, widgets and the HTML report (matplotlib and
ipywidgets; imports of heavy optional tools such as UMAP stay lazy).

One module per topic: ``images`` (overlays, predictions, legends), ``curves`` (learning curves,
loss terms, per-class IoU), ``datasets`` (a dataset's samples, augmentations, class frequencies),
``contrast`` (pixel contrast's anchors and memory bank, Contextrast's BANE and anchors), ``weak``
(CAMs, DSCNet's semantic graph and group centres), ``errors`` (confusion matrices, boundary
errors, prediction grids), ``compare`` (finding runs, results tables), ``embeddings`` (pixel
embeddings, UMAP, scores), ``explorer`` (notebook 05's embedding explorer), ``run_browser``
(notebook 06's run widgets) and ``report`` (the HTML report)."""

from ctxseg.runs import load_run
from ctxseg.viz.compare import RunTable, find_runs, results_table, run_confusion
from ctxseg.viz.contrast import plot_anchor_similarity, plot_memory_occupancy, show_anchors, show_bane
from ctxseg.viz.curves import plot_learning_curves, plot_loss_terms, plot_per_class_iou
from ctxseg.viz.datasets import plot_class_frequencies, show_augmentations, show_context_crops, show_samples
from ctxseg.viz.errors import boundary_error_map, edge_band, plot_confusion, show_boundary_errors, show_prediction_grid
from ctxseg.viz.images import legend_handles, overlay, predict_batch, show_palette, show_predictions
from ctxseg.viz.run_browser import RunBrowser
from ctxseg.viz.weak import plot_group_centres, plot_semantic_graph, show_cams

__all__ = [
    "RunBrowser",
    "RunTable",
    "boundary_error_map",
    "edge_band",
    "find_runs",
    "legend_handles",
    "load_run",
    "overlay",
    "plot_anchor_similarity",
    "plot_class_frequencies",
    "plot_confusion",
    "plot_group_centres",
    "plot_learning_curves",
    "plot_loss_terms",
    "plot_memory_occupancy",
    "plot_per_class_iou",
    "plot_semantic_graph",
    "predict_batch",
    "results_table",
    "run_confusion",
    "show_anchors",
    "show_augmentations",
    "show_bane",
    "show_boundary_errors",
    "show_cams",
    "show_context_crops",
    "show_palette",
    "show_prediction_grid",
    "show_predictions",
    "show_samples",
]
