"""Browsing finished runs side by side (notebook 06): per-class IoU bars, confusion matrices, the
same images through several models and where each model's errors lie, each an ipywidgets
``interactive`` over a set of runs. Models, evaluation sets and confusion matrices are loaded
once, when first shown."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import ipywidgets as widgets


class RunBrowser:
    """Widgets over ``runs`` (dicts from ``find_runs``/``load_run``, finished: with ``final``).

    ``max_models``: columns of the prediction grid; ``rows``: images shown at a time."""

    def __init__(self, runs: Sequence[dict], max_models: int = 4, rows: int = 2):
        if not runs:
            raise ValueError("no finished run to browse")
        self.runs = list(runs)
        self.by_name = {r["name"]: r for r in self.runs}
        self.max_models, self.rows = max_models, rows
        # Caches per browser (not per process): each holds models or datasets.
        self.model = functools.cache(self._model)
        self.confusion = functools.cache(self._confusion)
        self._eval_sets = {}

    # --------------------------------------------------------------------------------------------
    def _model(self, name: str):
        """The deployable model of run ``name`` (``open_run``)."""
        from ctxseg.runs import open_run

        return open_run(self.by_name[name]["path"])

    def _confusion(self, name: str):
        from ctxseg.viz.compare import run_confusion

        return run_confusion(self.by_name[name])

    def eval_key(self, name: str) -> tuple:
        """What identifies the images run ``name`` was evaluated on."""
        run = self.by_name[name]
        c = run["config"]
        return (c["data"], c.get("data_root"), tuple(c.get("synthetic_size") or ()),
                run["final"].get("split", c.get("eval_split")))

    def eval_set(self, name: str):
        """The evaluation images of run ``name`` (shared by every run evaluated on the same ones)."""
        from ctxseg.engine.evaluate import eval_dataset

        key = self.eval_key(name)
        if key not in self._eval_sets:
            self._eval_sets[key] = eval_dataset(self.model(name).cfg, key[-1])
        return self._eval_sets[key]

    def default_grid(self) -> tuple[str, ...]:
        """One run per method among those evaluated on the first run's images (up to ``max_models``)."""
        first = self.eval_key(self.runs[0]["name"])
        per_method = {}
        for name, run in self.by_name.items():
            if self.eval_key(name) == first:
                per_method.setdefault(run["config"]["method"], name)
        return tuple(per_method.values())[: self.max_models]

    def _pick_runs(self, value) -> widgets.SelectMultiple:
        return widgets.SelectMultiple(options=list(self.by_name), value=tuple(value),
                                      rows=min(10, len(self.by_name)), description="runs")

    def _image_slider(self, name: str) -> widgets.IntSlider:
        return widgets.IntSlider(0, 0, len(self.eval_set(name)) - 1, description="image")

    # --------------------------------------------------------------------------------------------
    def per_class_iou(self, chosen: Sequence[str] | None = None) -> widgets.interactive:
        """Per-class IoU bars of the chosen runs (default: the first four)."""
        import matplotlib.pyplot as plt

        from ctxseg.viz.curves import plot_per_class_iou

        def bars(chosen):
            if not chosen:
                print("choose at least one run")
                return
            plot_per_class_iou({name: self.by_name[name]["final"] for name in chosen})
            plt.show()

        return widgets.interactive(bars, chosen=self._pick_runs(chosen or tuple(self.by_name)[:4]))

    def confusions(self, run: str | None = None) -> widgets.interactive:
        """One run's confusion matrix, as recall (rows normalised) or pixel counts. Default run: the
        first whose eval.json stores its matrix (others are evaluated again when picked)."""
        import matplotlib.pyplot as plt

        from ctxseg.viz.errors import plot_confusion

        def show(run, view):
            cm, names = self.confusion(run)
            fig = plot_confusion(cm, names, normalize="true" if view == "recall" else None)
            fig.axes[0].set_title(f"{run}: {'recall view' if view == 'recall' else 'pixel counts'}", fontsize=9)
            plt.show()

        run = run or next((n for n, r in self.by_name.items() if "confusion" in r["final"]), self.runs[0]["name"])
        return widgets.interactive(show, run=widgets.Dropdown(options=list(self.by_name), value=run, description="run"),
                                   view=widgets.ToggleButtons(options=["recall", "counts"]))

    def prediction_grid(self, chosen: Sequence[str] | None = None) -> widgets.interactive:
        """``rows`` images through the chosen runs (default: ``default_grid``); runs evaluated on
        other images than the first chosen one are left out, with a note."""
        import matplotlib.pyplot as plt

        from ctxseg.viz.errors import show_prediction_grid

        chosen = tuple(chosen or self.default_grid())

        def grid(chosen, first_image):
            if not chosen:
                print("choose at least one run")
                return
            key = self.eval_key(chosen[0])
            shown = [n for n in chosen if self.eval_key(n) == key][: self.max_models]
            if len(shown) < len(chosen):
                print(f"not drawn (other images, or beyond {self.max_models} runs): "
                      f"{[n for n in chosen if n not in shown]}")
            dataset = self.eval_set(chosen[0])
            indices = [i % len(dataset) for i in range(first_image, first_image + self.rows)]
            show_prediction_grid({n: self.model(n).model for n in shown}, dataset, indices)
            plt.show()

        return widgets.interactive(grid, chosen=self._pick_runs(chosen),
                                   first_image=self._image_slider(self.runs[0]["name"]))

    def boundary_errors(self, run: str | None = None, boundary_px: int = 3) -> widgets.interactive:
        """One run's errors on ``rows`` images, split into those within ``boundary_px`` of an edge
        and those inside regions."""
        import matplotlib.pyplot as plt

        from ctxseg.viz.errors import show_boundary_errors

        def errors(run, first_image, boundary_px):
            dataset = self.eval_set(run)
            indices = [i % len(dataset) for i in range(first_image, first_image + self.rows)]
            show_boundary_errors(self.model(run).model, dataset, indices, boundary_px)
            plt.show()

        run = run or self.runs[0]["name"]
        return widgets.interactive(errors, run=widgets.Dropdown(options=list(self.by_name), value=run, description="run"),
                                   first_image=self._image_slider(run),
                                   boundary_px=widgets.IntSlider(boundary_px, 1, 8, description="band (px)"))
