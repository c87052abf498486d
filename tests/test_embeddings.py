"""Pixel embeddings: class-balanced sampling against a global oracle, boundary flags against a
loop, features and predictions read at pixels against upsample-then-index, the exact kNN graph
and the scores against scikit-learn, and the on-disk caches (hits, and misses when anything in
the key changes)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ctxseg.config import make_config
from ctxseg.data.base import DatasetInfo
from ctxseg.methods import get_method
from ctxseg.viz import embeddings as E
from ctxseg.viz.errors import edge_band

INFO = DatasetInfo("toy", ("a", "b", "c", "d"), ((255, 0, 0), (0, 255, 0), (0, 0, 255), (9, 9, 9)), ignore_index=255)


class ToyDataset:
    """Random label maps (with ignored pixels and a class that never appears) and images."""

    info = INFO
    split = "val"

    def __init__(self, n=5, h=12, w=10, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.masks = torch.randint(0, 3, (n, h, w), generator=g)
        self.masks[torch.rand(n, h, w, generator=g) < 0.1] = 255
        self.masks[0, :3, :3] = 0  # a block, so some pixels are far from any boundary
        self.images = torch.rand(n, 3, h, w, generator=g)

    def __len__(self):
        return len(self.masks)

    def __getitem__(self, i):
        return {"image": self.images[i], "mask": self.masks[i]}


class OnlyImages:
    """``ds`` with every image outside ``keep`` replaced by a 1x1 image whose pixel is ignored (the
    indices unchanged)."""

    def __init__(self, ds, keep):
        self.ds, self.keep, self.info, self.split = ds, set(keep), ds.info, ds.split

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        if i in self.keep:
            return self.ds[i]
        return {"image": torch.zeros(3, 1, 1), "mask": torch.full((1, 1), 255)}


def positions(s):
    return {(int(i), int(y), int(x)) for i, y, x in zip(s.image, s.y, s.x)}


@pytest.mark.parametrize("per_class", [1, 7, 1000])
def test_sample_pixels_draws_per_class_without_replacement_and_streams_over_the_images(per_class):
    ds = ToyDataset()
    s = E.sample_pixels(ds, per_class=per_class, boundary_px=1, seed=3)
    labels = torch.stack([ds[i]["mask"] for i in range(len(ds))])
    assert np.array_equal(s.label, labels[s.image, s.y, s.x].numpy())  # labels read at the positions
    counts = torch.bincount(labels[labels != 255], minlength=4).numpy()
    assert np.array_equal(np.bincount(s.label, minlength=4), np.minimum(counts, per_class))
    assert len(s) == len(positions(s))  # without replacement
    if per_class >= counts.max():  # every labelled pixel
        assert positions(s) == {tuple(p) for p in (labels != 255).nonzero().tolist()}
    # One draw over all images, whatever the images around a pixel: a pixel drawn from the whole
    # set is also drawn from any subset of the images that holds it, the others replaced by other
    # images (a draw whose random numbers depend on the images seen before breaks this).
    for part in ({0, 1}, {2, 3, 4}, {1, 3}):
        drawn = positions(E.sample_pixels(OnlyImages(ds, part), per_class=per_class, boundary_px=1, seed=3))
        assert {p for p in positions(s) if p[0] in part} <= drawn, part


def test_sample_pixels_draws_each_pixel_of_a_class_equally_often():
    """Over 200 seeds each pixel of class c is drawn 200 * min(k, n_c) / n_c times in expectation:
    a chi-square test per class (deterministic: fixed seeds; a draw that favours some images or
    positions, as taking the first k pixels would, gives a statistic far above the bound)."""
    from scipy.stats import chi2

    ds, k, seeds = ToyDataset(), 7, 200
    labels = torch.stack([ds[i]["mask"] for i in range(len(ds))])
    hits = torch.zeros(labels.shape)
    for seed in range(seeds):
        s = E.sample_pixels(ds, per_class=k, boundary_px=0, seed=seed)
        hits[s.image, s.y, s.x] += 1
    for c in range(3):
        obs = hits[labels == c].double()
        n = len(obs)
        assert n > k and obs.sum() == seeds * k
        expected = seeds * k / n
        stat = float(((obs - expected) ** 2 / expected).sum())
        assert stat < chi2.ppf(1 - 1e-4, n - 1), (c, stat, n)
    assert hits[labels == 255].sum() == 0


def test_sample_pixels_is_seeded():
    ds = ToyDataset()
    a, b, c = (E.sample_pixels(ds, per_class=5, seed=s) for s in (0, 0, 1))
    assert np.array_equal(a.image, b.image) and np.array_equal(a.y, b.y) and np.array_equal(a.x, b.x)
    assert not (np.array_equal(a.y, c.y) and np.array_equal(a.x, c.x) and np.array_equal(a.image, c.image))


def test_sample_pixels_rejects_bad_settings():
    with pytest.raises(ValueError, match="per_class"):
        E.sample_pixels(ToyDataset(), per_class=0)
    with pytest.raises(ValueError, match="boundary_px"):
        E.sample_pixels(ToyDataset(), boundary_px=-1)


@pytest.mark.parametrize("d", [0, 1, 2])
def test_near_boundary_band_matches_a_window_loop(d):
    mask = ToyDataset(n=1, h=9, w=11, seed=4).masks[0]
    got = edge_band(mask, d, ignore_index=255)
    h, w = mask.shape
    for y in range(h):
        for x in range(w):
            lab = int(mask[y, x])
            win = mask[max(0, y - d):y + d + 1, max(0, x - d):x + d + 1]
            other = bool(((win != lab) & (win != 255)).any())
            assert bool(got[y, x]) == (lab != 255 and other), (y, x)


def test_at_pixels_equals_upsampling_then_indexing():
    maps = torch.randn(2, 5, 4, 6, dtype=torch.float64)
    up = F.interpolate(maps, size=(13, 22), mode="bilinear", align_corners=False)
    y = torch.tensor([[0, 12, 5, 7], [3, 3, 0, 12]])
    x = torch.tensor([[0, 21, 10, 3], [1, 20, 0, 7]])
    got = E.at_pixels(maps, y, x, (13, 22))
    want = torch.stack([up[b, :, y[b], x[b]].T for b in range(2)])
    torch.testing.assert_close(got, want)


def tiny_model(method="contextrast"):
    from ctxseg.engine.evaluate import build_model
    from ctxseg.methods import get_method

    cls = get_method(method)
    cfg = make_config(cls.config_class, encoder="test_resnet")
    torch.manual_seed(0)
    return build_model(cfg, INFO.num_classes, heads=cls(cfg, INFO, 1).heads).eval()


def test_embed_pixels_reads_each_feature_and_the_evaluation_prediction():
    from ctxseg.methods.contextrast import stage_embeddings

    ds = ToyDataset(n=3, h=32, w=32)
    model = tiny_model()
    assert E.feature_names(model) == ["decoder", "stage1", "stage2", "stage3", "stage4"]
    s = E.sample_pixels(ds, per_class=20, seed=0)
    images = torch.stack([ds[i]["image"] for i in range(len(ds))])
    with torch.no_grad():
        out = model(images, with_heads=True)
        stage3 = F.normalize(stage_embeddings(out)[2], dim=1)
    up = lambda t: F.interpolate(t.float(), size=(32, 32), mode="bilinear", align_corners=False)  # noqa: E731
    pred = up(out["logits"]).argmax(1)[s.image, s.y, s.x].numpy()
    for feature, maps, normalized in [("decoder", out["features"], False),
                                      ("stage3", stage3, True)]:
        emb = E.embed_pixels(model, ds, s, feature, batch_size=2)
        want = up(maps).permute(0, 2, 3, 1)[s.image, s.y, s.x]
        want = (F.normalize(want, dim=1) if normalized else want).numpy()
        np.testing.assert_allclose(emb.x, want, rtol=1e-4, atol=1e-5)
        assert np.array_equal(emb.pred, pred) and emb.normalized == normalized
        assert emb.metric == ("cosine" if normalized else "euclidean")
    with pytest.raises(ValueError, match="projection"):
        E.embed_pixels(model, ds, s, "projection")


def test_each_run_is_embedded_by_default_with_the_feature_its_loss_shapes():
    """The method declares it (``Method.embedding_feature``): Contextrast contrasting the decoder's
    maps (the default) is shown with the map the classifier reads, not its stride-4 stage head;
    with the encoder's stages (and runs older than the setting) with that head."""
    assert E.default_feature({"method": "ce"}) == "decoder"
    assert E.default_feature({"method": "pixel_contrast", "memory": True}) == "projection"
    assert E.default_feature({"method": "dscnet"}) == "projection"
    assert E.default_feature({"method": "wsss_cam"}) == "decoder"
    assert E.default_feature({"method": "contextrast", "contrast_features": "decoder"}) == "decoder"
    assert E.default_feature({"method": "contextrast", "contrast_features": "encoder"}) == "stage1"
    assert E.default_feature({"method": "contextrast"}) == "stage1"  # a config.yaml from before the setting
    from ctxseg.config import to_plain
    from ctxseg.methods.contextrast import ContextrastConfig

    assert E.default_feature(to_plain(make_config(ContextrastConfig))) == "decoder"  # today's default
    for method in ("ce", "pixel_contrast", "contextrast", "dscnet"):
        model = tiny_model(method)
        cfg = to_plain(make_config(get_method(method).config_class))
        assert E.default_feature(cfg) in E.feature_names(model)


def test_projection_feature_for_pixel_contrast_models():
    model = tiny_model("pixel_contrast")
    assert E.feature_names(model) == ["decoder", "projection"]
    ds = ToyDataset(n=2, h=32, w=32)
    emb = E.embed_pixels(model, ds, E.sample_pixels(ds, per_class=5), "projection")
    np.testing.assert_allclose(np.linalg.norm(emb.x, axis=1), 1, rtol=1e-5)  # back on the unit sphere


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_knn_graph_matches_scikit_learn(metric):
    from sklearn.neighbors import NearestNeighbors

    x = np.random.default_rng(0).normal(size=(500, 16)).astype(np.float32)
    idx, dist = E.knn_graph(x, 8, metric, chunk=64)
    d_ref, i_ref = NearestNeighbors(n_neighbors=8, metric=metric, algorithm="brute").fit(x).kneighbors(x)
    assert np.array_equal(idx[:, 0], np.arange(500)) and np.all(dist[:, 0] == 0)
    np.testing.assert_allclose(dist, d_ref, atol=1e-5)
    assert (idx == i_ref).mean() > 0.999  # ties may order differently


def test_knn_graph_puts_each_point_first_among_duplicates():
    x = np.ones((6, 3), dtype=np.float32)
    idx, dist = E.knn_graph(x, 3, "euclidean")
    assert np.array_equal(idx[:, 0], np.arange(6)) and np.all(dist == 0)


def knn_oracle(x, y, k, folds, seed, metric):
    """The pooled accuracy of a k-NN majority vote over the same stratified folds, by loops."""
    from scipy.spatial.distance import cdist
    from sklearn.model_selection import StratifiedKFold

    right = 0
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y):
        d = cdist(x[test], x[train], metric=metric)
        for row, t in zip(d, test):
            votes = y[train][np.argsort(row, kind="stable")[:k]]
            counts = np.bincount(votes, minlength=y.max() + 1)
            right += int(np.argmax(counts) == y[t])  # ties: the smallest label, as scikit-learn
    return right / len(y)


def test_embedding_scores_against_scikit_learn_and_a_knn_loop():
    from sklearn.metrics import silhouette_score

    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 120)
    x = rng.normal(size=(120, 5)) + y[:, None] * 0.8
    s = E.embedding_scores(x, y, metric="euclidean", k=5, folds=4, seed=2)
    assert s["silhouette"] == pytest.approx(silhouette_score(x, y))
    assert s["knn_accuracy"] == pytest.approx(knn_oracle(x, y, 5, 4, 2, "euclidean"))
    separated = E.embedding_scores(x + y[:, None] * 100, y, k=5)
    assert separated["knn_accuracy"] == 1.0 and separated["silhouette"] > 0.9
    with pytest.raises(ValueError, match="at least 2 classes"):
        E.embedding_scores(x, np.zeros(120, int))


def test_points_in_lasso_and_nearest_point():
    xy = np.array([[0, 0], [1, 1], [2, 2], [0.5, 0.2]])
    assert E.points_in_lasso(xy, [(-0.1, -0.1), (1.2, -0.1), (1.2, 1.2), (-0.1, 1.2)]).tolist() == [0, 1, 3]
    assert E.points_in_lasso(xy, [(0, 0), (1, 1)]).tolist() == []
    assert E.nearest_point(xy, 1.9, 2.3) == 2


def test_umap_cache_hits_and_misses(tmp_path, monkeypatch):
    calls = []

    def fake_fit(x, params, progress):
        calls.append(dict(params))
        return np.full((len(x), 2), len(calls), dtype=np.float32)

    monkeypatch.setattr(E, "_fit_umap", fake_fit)
    x = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
    a = E.umap_2d(x, cache_dir=tmp_path, progress=False)
    b = E.umap_2d(x, cache_dir=tmp_path, progress=False)
    assert len(calls) == 1 and np.array_equal(a, b)
    E.umap_2d(x, n_neighbors=5, cache_dir=tmp_path, progress=False)
    E.umap_2d(x, mode="reproducible", cache_dir=tmp_path, progress=False)
    E.umap_2d(x + 1, cache_dir=tmp_path, progress=False)
    E.umap_2d(x, progress=False)  # an array without cache_dir: never cached
    assert len(calls) == 5
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(ValueError, match="mode"):
        E.umap_2d(x, mode="quick")


@pytest.mark.slow
def test_reproducible_umap_is_repeatable_and_separates_clusters():
    from sklearn.datasets import make_blobs

    x, y = make_blobs(300, n_features=8, centers=3, random_state=0)
    a = E.umap_2d(x.astype(np.float32), n_neighbors=10, mode="reproducible", seed=1, progress=False)
    b = E.umap_2d(x.astype(np.float32), n_neighbors=10, mode="reproducible", seed=1, progress=False)
    assert a.shape == (300, 2) and np.array_equal(a, b)
    assert E.embedding_scores(a, y, k=5)["knn_accuracy"] == 1.0


@pytest.mark.slow
def test_pixel_embeddings_cache_is_keyed_by_the_checkpoint(tmp_path, monkeypatch):
    from ctxseg.engine.checkpoint import list_checkpoints, load_checkpoint
    from ctxseg.engine.trainer import Trainer
    from ctxseg.methods.pixel_contrast import PixelContrast, PixelContrastConfig
    from ctxseg.runs import open_run

    cfg = make_config(PixelContrastConfig, encoder="test_resnet", crop=(64, 64), synthetic_size=(64, 64),
                      synthetic_train_len=8, batch_size=4, iters=2, eval_every=0, num_workers=0,
                      eval_batch_size=50, out=str(tmp_path / "run"))
    Trainer(cfg, PixelContrast, progress=False).fit()
    opened = open_run(tmp_path / "run", heads=True)
    model, loaded, ckpt = opened.model, opened.cfg, opened.path
    assert E.feature_names(model) == ["decoder", "projection"] and loaded.method == "pixel_contrast"
    from ctxseg.engine.evaluate import eval_dataset

    ds = eval_dataset(loaded, "val")
    sample = E.sample_pixels(ds, per_class=3, seed=0)
    first = E.pixel_embeddings(tmp_path / "run", sample, "projection", dataset=ds, progress=False)
    monkeypatch.setattr(E, "embed_pixels", lambda *a, **k: pytest.fail("should have come from the cache"))
    again = E.pixel_embeddings(tmp_path / "run", sample, "projection", dataset=ds, progress=False)
    assert np.array_equal(first.x, again.x) and np.array_equal(first.pred, again.pred) and again.normalized
    # New weights in the checkpoint: a new key, so the embeddings are computed again.
    state = load_checkpoint(list_checkpoints(tmp_path / "run" / "ckpt")[-1])
    state["model"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in state["model"].items()}
    torch.save(state, ckpt)
    with pytest.raises(pytest.fail.Exception):
        E.pixel_embeddings(tmp_path / "run", sample, "projection", dataset=ds, progress=False)
    monkeypatch.undo()
    # Any checkpoint file, or the export (decoder features only: its heads are dropped).
    by_file = E.pixel_embeddings(ckpt, sample, "projection", dataset=ds, progress=False)
    assert not np.array_equal(by_file.x, first.x) and list((ckpt.parent / "cache").glob("emb-*.npz"))
    export = E.pixel_embeddings(tmp_path / "run" / "model.safetensors", sample, "decoder", dataset=ds, progress=False)
    assert export.x.shape == (len(sample), loaded.decoder_channels) and not export.normalized
    with pytest.raises(ValueError, match="projection"):
        E.pixel_embeddings(tmp_path / "run" / "model.safetensors", sample, "projection", dataset=ds, progress=False)


def test_widget_figure_is_an_ipympl_canvas_that_leaves_the_backend_alone():
    import ipywidgets
    import matplotlib

    before = matplotlib.get_backend()
    fig, axes = E.widget_figure(3, figsize=(6, 2))
    assert isinstance(fig.canvas, ipywidgets.DOMWidget) and len(axes) == 3
    assert matplotlib.get_backend() == before
