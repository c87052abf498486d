"""The embedding explorer: the same pixels embedded by several runs, one UMAP panel per run, in an
ipympl canvas with controls; a lasso or a click rings the same pixels in every panel and shows
them in their images. ``embedding_explorer(...)`` returns the widget (notebook 05)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import ipywidgets as widgets
import numpy as np

from ctxseg.config import to_plain
from ctxseg.viz.embeddings import (
    PixelSample,
    default_feature,
    feature_names,
    nearest_point,
    pixel_embeddings,
    plot_embedding,
    points_in_lasso,
    show_pixel_locations,
    umap_2d,
    widget_figure,
)

SAME_IMAGES = ("data", "data_root", "synthetic_size", "eval_split")


def runs_on_the_same_images(root: str | Path, like: Mapping, pattern: str = "*") -> dict[str, Path]:
    """Finished runs under ``root`` (names matching ``pattern``, as ``find_runs``) whose config has
    the same data, data root, synthetic size and evaluation split as the config dict ``like``."""
    from ctxseg.viz.compare import find_runs

    def key(c):
        return tuple(list(v) if isinstance(v, (list, tuple)) else v for v in (c.get(k) for k in SAME_IMAGES))

    return {r["name"]: Path(r["path"]) for r in find_runs(root, pattern) if key(r["config"]) == key(like)}


class EmbeddingExplorer(widgets.VBox):
    """The explorer's widget: run and feature pickers above each panel, the canvas, the controls
    below it (classes shown, boundary pixels only, colouring, UMAP's ``n_neighbors``, ``min_dist``
    and mode), a status area and the selection's images. ``select(indices)`` selects pixels from
    code; ``layouts[k]`` is panel k's (xy, Embeddings)."""

    def __init__(self, runs: Mapping[str, str | Path], sample: PixelSample, dataset, panels=None,
                 features: Mapping[str, str] | None = None, boundary_px: int = 3,
                 layout_fn: Callable[..., np.ndarray] = umap_2d, figsize: tuple[float, float] | None = None):
        from matplotlib.widgets import LassoSelector

        from ctxseg.runs import open_run

        self.runs = {name: Path(p) for name, p in runs.items()}
        self.sample, self.dataset, self.info = sample, dataset, dataset.info
        self.layout_fn = layout_fn
        self.selected = np.zeros(0, dtype=np.int64)
        self.layouts: dict[int, tuple[np.ndarray, object]] = {}
        self._features: dict[str, tuple[list[str], str]] = {}
        self._open_run = open_run
        panels = list(panels or list(self.runs)[:3])
        features = dict(features or {})

        width = widgets.Layout(width="230px")
        self.run_pickers = [widgets.Dropdown(options=list(self.runs), value=name, layout=width) for name in panels]
        self.feature_pickers = [
            widgets.Dropdown(options=self.features_of(name), value=self._default_feature(name, features), layout=width)
            for name in panels
        ]
        names = list(self.info.class_names)
        self.class_picker = widgets.SelectMultiple(options=names, value=names, rows=min(8, len(names)),
                                                   description="classes")
        self.boundary_only = widgets.Checkbox(value=False, description=f"boundary pixels only ({boundary_px} px)",
                                              style={"description_width": "initial"})
        self.colour = widgets.ToggleButtons(options=["label", "pred", "correct"], description="colour")
        self.n_neighbors = widgets.IntSlider(value=15, min=5, max=100, step=5, description="n_neighbors",
                                             continuous_update=False)
        self.min_dist = widgets.FloatSlider(value=0.1, min=0.0, max=0.99, step=0.05, description="min_dist",
                                            continuous_update=False)
        self.umap_mode = widgets.ToggleButtons(options=["reproducible", "fast"], description="UMAP")
        self.status, self.below = widgets.Output(), widgets.Output()

        n = len(panels)
        self.fig, self.axes = widget_figure(n, figsize=figsize or (4.2 * n, 4.4))  # an ipympl canvas
        self._lassos = [LassoSelector(ax, self._on_lasso(k)) for k, ax in enumerate(self.axes)]
        self.fig.canvas.mpl_connect("button_release_event", self._on_click)
        for k, picker in enumerate(self.run_pickers):
            picker.observe(lambda change, k=k: self._follow(k, change["new"]), names="value")
        for w in (*self.run_pickers, *self.feature_pickers, self.class_picker, self.boundary_only, self.colour,
                  self.n_neighbors, self.min_dist, self.umap_mode):
            w.observe(self.redraw, names="value")

        pickers = widgets.HBox([widgets.VBox([r, f]) for r, f in zip(self.run_pickers, self.feature_pickers)])
        controls = widgets.HBox([self.class_picker, widgets.VBox([self.boundary_only, self.colour, self.n_neighbors,
                                                                  self.min_dist, self.umap_mode])])
        super().__init__([pickers, self.fig.canvas, controls, self.status, self.below])
        self.redraw()

    # --------------------------------------------------------------------------------------------
    def features_of(self, name: str) -> list[str]:
        """The features run ``name`` can be embedded with (its training heads decide)."""
        if name not in self._features:
            run = self._open_run(self.runs[name], heads=True)
            self._features[name] = (feature_names(run.model), default_feature(to_plain(run.cfg)))
        return self._features[name][0]

    def _default_feature(self, name: str, asked: Mapping[str, str]) -> str:
        have = self.features_of(name)
        wanted = asked.get(name) or self._features[name][1]
        return wanted if wanted in have else "decoder"

    def _follow(self, k: int, name: str) -> None:
        self.feature_pickers[k].options = self.features_of(name)

    def shown(self) -> np.ndarray:
        """Bool mask of the sample's pixels the controls let through."""
        names = list(self.info.class_names)
        keep = np.isin(self.sample.label, [names.index(c) for c in self.class_picker.value])
        return keep & self.sample.near_boundary if self.boundary_only.value else keep

    def panel(self, k: int):
        """(run name, layout, embeddings) of panel k under the current controls."""
        run, feature = self.run_pickers[k].value, self.feature_pickers[k].value
        e = pixel_embeddings(self.runs[run], self.sample, feature, dataset=self.dataset, progress=False)
        xy = self.layout_fn(e, n_neighbors=self.n_neighbors.value, min_dist=self.min_dist.value,
                            mode=self.umap_mode.value, seed=0, progress=True)
        return run, xy, e

    def redraw(self, *_) -> None:
        with self.status:
            self.status.clear_output()
            for k, ax in enumerate(self.axes):
                run, xy, e = self.panel(k)
                self.layouts[k] = (xy, e)
                ax.clear()
                plot_embedding(xy, e, self.info, show=self.shown(), color=self.colour.value, ax=ax,
                               title=f"{run} · {e.feature}", size=4, highlight=self.selected)
            self.fig.canvas.draw_idle()

    def select(self, indices) -> None:
        """Select the sample's pixels ``indices``: ringed in every panel, shown in their images."""
        import matplotlib.pyplot as plt

        self.selected = np.asarray(indices, dtype=np.int64)
        self.redraw()
        with self.below:
            self.below.clear_output(wait=True)
            preds = {self.run_pickers[k].value: self.layouts[k][1].pred for k in range(len(self.axes))}
            show_pixel_locations(self.dataset, self.sample, self.selected, self.info, preds=preds)
            plt.show()

    def _on_lasso(self, k: int):
        def done(vertices):
            if len(vertices) < 3:  # a click, not a lasso: _on_click handles it
                return
            inside = points_in_lasso(self.layouts[k][0], vertices)
            self.select(inside[self.shown()[inside]])

        return done

    def _on_click(self, event) -> None:
        for k, ax in enumerate(self.axes):
            if event.inaxes is ax and event.dblclick is False and event.button == 1:
                xy = self.layouts[k][0]
                visible = np.nonzero(self.shown())[0]
                self.select(visible[[nearest_point(xy[visible], event.xdata, event.ydata)]])


def embedding_explorer(runs: Mapping[str, str | Path], sample: PixelSample, dataset, panels=None,
                       features: Mapping[str, str] | None = None, more_runs: str | Path | None = None,
                       pattern: str = "*", boundary_px: int = 3, layout_fn: Callable[..., np.ndarray] = umap_2d,
                       figsize: tuple[float, float] | None = None) -> EmbeddingExplorer:
    """The embedding explorer for ``sample`` (pixels of ``dataset``) over ``runs`` (name -> run
    folder). One panel per name of ``panels`` (default: the first three runs), each starting on
    ``features[name]`` (default: the feature its method's loss shapes, ``default_feature``).
    ``more_runs``: a folder whose other finished runs on the same images (names matching
    ``pattern``) are offered in the run pickers too. ``layout_fn``: ``umap_2d`` or a function with
    its signature. Returns the widget; display it (last line of a cell)."""
    runs = {name: Path(p) for name, p in runs.items()}
    if more_runs is not None and runs:
        from ctxseg.runs import load_run

        like = load_run(next(iter(runs.values())))["config"]
        known = {p.resolve() for p in runs.values()}
        for name, path in runs_on_the_same_images(more_runs, like, pattern).items():
            if path.resolve() not in known:
                runs[name] = path
    return EmbeddingExplorer(runs, sample, dataset, panels, features, boundary_px, layout_fn, figsize)
