"""The notebooks' widgets, built from ctxseg.viz on tiny runs trained here: notebook 05's embedding
explorer and notebook 06's run browser. Each control, changed, must change what is drawn."""

import ipywidgets as widgets
import matplotlib
import numpy as np
import pytest

from ctxseg.config import make_config
from ctxseg.engine.evaluate import eval_dataset
from ctxseg.methods.ce import CEConfig
from ctxseg.methods.pixel_contrast import PixelContrastConfig
from ctxseg.runs import load_run, train_or_reuse
from ctxseg.viz import RunBrowser, find_runs
from ctxseg.viz.embeddings import sample_pixels
from ctxseg.viz.explorer import EmbeddingExplorer, embedding_explorer

matplotlib.use("Agg")

TINY = dict(encoder="test_resnet", crop=(32, 32), synthetic_size=(32, 32), synthetic_train_len=8, batch_size=4,
            iters=2, eval_every=0, ckpt_every=2, num_workers=0, eval_batch_size=50)


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    train_or_reuse(make_config(CEConfig, "synthetic", out=str(root / "ce"), **TINY), progress=False)
    train_or_reuse(make_config(PixelContrastConfig, "synthetic", out=str(root / "pc"), **TINY), progress=False)
    # A finished run on other images: never offered next to the others.
    other = dict(TINY, synthetic_size=(48, 48), crop=(48, 48))
    train_or_reuse(make_config(CEConfig, "synthetic", out=str(root / "big" / "ce"), **other), progress=False)
    return root


@pytest.fixture(scope="module")
def pixels(runs_root):
    cfg = make_config(CEConfig, "synthetic", **TINY)
    val = eval_dataset(cfg, "val")
    return val, sample_pixels(val, per_class=4, boundary_px=3, seed=0)


class FakeLayout:
    """Stands in for umap_2d (same signature): records its calls; the layout depends on n_neighbors."""

    def __init__(self):
        self.calls = []

    def __call__(self, emb, n_neighbors=15, min_dist=0.1, mode="fast", seed=0, progress=False):
        self.calls.append({"feature": emb.feature, "n_neighbors": n_neighbors, "min_dist": min_dist, "mode": mode})
        x = np.asarray(emb.x, dtype=np.float64)
        return np.stack([x[:, 0] * n_neighbors, x[:, 1] + min_dist], 1)


def offsets(ax):
    return np.asarray(ax.collections[0].get_offsets())


def test_embedding_explorer_builds_panels_and_redraws_on_each_control(runs_root, pixels):
    val, sample = pixels
    layout = FakeLayout()
    ex = embedding_explorer({"CE": runs_root / "ce", "PC": runs_root / "pc"}, sample, val, more_runs=runs_root,
                            layout_fn=layout)
    assert isinstance(ex, EmbeddingExplorer) and isinstance(ex, widgets.VBox)
    assert ex.fig.canvas in ex.children and len(ex.axes) == 2
    # The other run on the same images is offered; the one on 48x48 images is not.
    assert list(ex.run_pickers[0].options) == ["CE", "PC"]
    # Each panel starts on the feature its method's loss shapes, among those its heads give.
    assert [p.value for p in ex.feature_pickers] == ["decoder", "projection"]
    assert list(ex.feature_pickers[1].options) == ["decoder", "projection"]
    assert [c["feature"] for c in layout.calls] == ["decoder", "projection"]
    assert len(offsets(ex.axes[1])) == len(sample)

    # A UMAP knob: a new layout with the new setting, drawn.
    before = offsets(ex.axes[0]).copy()
    ex.n_neighbors.value = 30
    assert layout.calls[-1]["n_neighbors"] == 30
    assert np.allclose(offsets(ex.axes[0]), before * [2, 1])
    # Classes shown and boundary-only filter the points drawn.
    first = ex.class_picker.options[0]
    ex.class_picker.value = (first,)
    assert len(offsets(ex.axes[0])) == int((sample.label == 0).sum())
    ex.class_picker.value = tuple(ex.class_picker.options)
    ex.boundary_only.value = True
    assert len(offsets(ex.axes[0])) == int(sample.near_boundary.sum())
    ex.boundary_only.value = False
    # Colouring by correctness: grey where right, red where wrong. The 2-step CE run gets some of
    # the sample's pixels wrong and some right, so both colours are checked.
    ex.colour.value = "correct"
    colours = ex.axes[0].collections[0].get_facecolors()[:, :3]
    emb = ex.layouts[0][1]
    right = emb.pred == sample.label
    assert np.array_equal(emb.correct, right) and 0 < right.sum() < len(right)
    assert np.allclose(colours[right], [0.75, 0.75, 0.75]) and np.allclose(colours[~right], [0.85, 0.1, 0.1])
    # Another run in a panel: its features follow.
    ex.run_pickers[0].value = "PC"
    assert "projection" in ex.feature_pickers[0].options and ex.axes[0].get_title().startswith("PC")
    # A selection from code rings the same pixels in every panel.
    ex.select([0, 1, 2])
    assert np.array_equal(ex.selected, [0, 1, 2])
    for ax in ex.axes:
        assert len(ax.collections) == 2 and len(ax.collections[1].get_offsets()) == 3


def test_embedding_explorer_lasso_selects_the_points_inside(runs_root, pixels):
    val, sample = pixels
    ex = embedding_explorer({"CE": runs_root / "ce"}, sample, val, layout_fn=FakeLayout())
    xy = ex.layouts[0][0]
    lo, hi = xy.min(0) - 1, xy.max(0) + 1
    ex._on_lasso(0)([(lo[0], lo[1]), (hi[0], lo[1]), (hi[0], hi[1]), (lo[0], hi[1])])
    assert np.array_equal(ex.selected, np.arange(len(sample)))


def plotted(monkeypatch, module, name):
    calls = []
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append((a, k)))
    return calls


def test_run_browser_widgets_follow_their_controls(runs_root, monkeypatch):
    import ctxseg.viz.curves as curves
    import ctxseg.viz.errors as errors

    runs = find_runs(runs_root)
    browser = RunBrowser(runs, max_models=4, rows=2)
    assert set(browser.by_name) == {"ce", "pc", "big/ce"}
    assert browser.default_grid() == ("big/ce",)  # one run per method on the first run's images

    bars = plotted(monkeypatch, curves, "plot_per_class_iou")
    w = browser.per_class_iou()
    assert isinstance(w, widgets.interactive) and len(bars) == 1 and set(bars[0][0][0]) == {"ce", "pc", "big/ce"}
    w.children[0].value = ("pc",)
    assert list(bars[-1][0][0]) == ["pc"] and bars[-1][0][0]["pc"] == load_run(runs_root / "pc")["final"]

    cms = plotted(monkeypatch, errors, "plot_confusion")
    w = browser.confusions("ce")
    assert cms[-1][1]["normalize"] == "true"
    w.children[1].value = "counts"
    assert cms[-1][1]["normalize"] is None
    assert np.asarray(cms[-1][0][0]).sum() > 0

    grids = plotted(monkeypatch, errors, "show_prediction_grid")
    w = browser.prediction_grid(["ce", "pc", "big/ce"])
    models, _, indices = grids[-1][0]
    assert list(models) == ["ce", "pc"] and indices == [0, 1]  # big/ce was evaluated on other images
    assert models["ce"] is browser.model("ce").model
    slider = next(c for c in w.children if isinstance(c, widgets.IntSlider))
    slider.value = 1
    assert grids[-1][0][2] == [1, 2]

    shown = plotted(monkeypatch, errors, "show_boundary_errors")
    w = browser.boundary_errors("pc")
    assert shown[-1][0][0] is browser.model("pc").model and shown[-1][0][3] == 3
    band = [c for c in w.children if isinstance(c, widgets.IntSlider)][-1]
    band.value = 5
    assert shown[-1][0][3] == 5
    w.children[0].value = "big/ce"
    assert shown[-1][0][0] is browser.model("big/ce").model and shown[-1][0][1] is browser.eval_set("big/ce")
    assert browser.eval_set("big/ce")[0]["image"].shape[-1] == 48 and shown[-1][0][2] == [0, 1]
