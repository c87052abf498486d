"""Pixel embeddings, looked at: class-balanced pixel samples, their embeddings from any trained
run (decoder features, the pixel-contrast / DSCNet projection, any Contextrast stage), UMAP
layouts cached on disk, and the numbers that go with the pictures (silhouette score, kNN label
accuracy).

The pieces, in the order a notebook uses them::

    sample = sample_pixels(dataset, per_class=500, boundary_px=3, seed=0)   # which pixels
    emb = pixel_embeddings("runs/nb02-pixel-contrast", sample, feature="projection")  # cached
    xy = umap_2d(emb, n_neighbors=15, min_dist=0.1, mode="fast")            # cached
    embedding_scores(emb.x, emb.sample.label, metric=emb.metric)

The pixels are chosen from the labels alone, so the same ``sample`` embedded by several runs
puts the same pixels side by side. UMAP (umap-learn) is imported only when a layout is computed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ctxseg.data.base import DatasetInfo

CACHE_VERSION = 1


# ------------------------------------------------------------------------------------------------
# Which pixels
@dataclass
class PixelSample:
    """A class-balanced set of pixels of a dataset split, one entry per pixel.

    Attributes:
        image: dataset index of the pixel's image.
        y, x: its row and column at the label resolution.
        label: its ground-truth class.
        near_boundary: whether a pixel of another class lies within ``boundary_px`` pixels
            (Chebyshev distance: the (2d+1)x(2d+1) window around it; ``plots.edge_band``).
        per_class, boundary_px, seed: the sampling parameters.
        dataset: the dataset's name and size, part of the cache key.
    """

    image: np.ndarray
    y: np.ndarray
    x: np.ndarray
    label: np.ndarray
    near_boundary: np.ndarray
    per_class: int
    boundary_px: int
    seed: int
    dataset: str

    def __len__(self) -> int:
        return len(self.label)

    def key(self) -> dict:
        return {"dataset": self.dataset, "per_class": self.per_class, "boundary_px": self.boundary_px,
                "seed": self.seed, "n": len(self)}


def sample_pixels(dataset, per_class: int = 500, boundary_px: int = 3, seed: int = 0,
                  progress: bool = False) -> PixelSample:
    """Up to ``per_class`` pixels of every class, drawn uniformly without replacement from all of
    that class's pixels in ``dataset`` (ignored pixels never). Streams over the images: each pixel
    gets a random priority from a generator seeded by (seed, image index) and every class keeps
    its ``per_class`` highest, so the draw does not depend on how the loop is batched."""
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    if boundary_px < 0:
        raise ValueError(f"boundary_px must be >= 0, got {boundary_px}")
    from tqdm.auto import tqdm

    from ctxseg.viz.errors import edge_band

    info: DatasetInfo = dataset.info
    k = info.num_classes
    kept = None
    for i in tqdm(range(len(dataset)), desc="sampling pixels", disable=not progress, leave=False):
        mask = dataset[i]["mask"]
        h, w = mask.shape
        gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
        prio = torch.rand(h * w, generator=gen, dtype=torch.float64)
        flat = mask.reshape(-1)
        idx = torch.nonzero(flat != info.ignore_index)[:, 0]
        if not len(idx):
            continue
        near = edge_band(mask, boundary_px, info.ignore_index).reshape(-1)
        new = {"image": torch.full_like(idx, i), "y": idx // w, "x": idx % w, "label": flat[idx],
               "near_boundary": near[idx], "prio": prio[idx]}
        kept = new if kept is None else {n: torch.cat([kept[n], new[n]]) for n in new}
        kept = _top_per_class(kept, k, per_class)
    if kept is None:
        raise ValueError(f"{info.name}: no labelled pixel in {len(dataset)} images")
    # Rows come grouped by class, in priority order within each: a canonical order.
    return PixelSample(**{n: kept[n].numpy() for n in ("image", "y", "x", "label", "near_boundary")},
                       per_class=per_class, boundary_px=boundary_px, seed=seed,
                       dataset=_dataset_id(dataset))


def _dataset_id(dataset) -> str:
    """Name, split and length: which images a sample's indices point into."""
    return f"{dataset.info.name}:{getattr(dataset, 'split', '?')}:{len(dataset)}"


def _top_per_class(rows: dict, num_classes: int, n: int) -> dict:
    """The ``n`` rows of highest priority within each label (loop-free)."""
    order = torch.argsort(rows["prio"], descending=True)
    order = order[torch.argsort(rows["label"][order], stable=True)]
    label = rows["label"][order]
    counts = torch.bincount(label, minlength=num_classes)
    rank = torch.arange(len(order)) - (torch.cumsum(counts, 0) - counts)[label]
    keep = order[rank < n]
    return {name: v[keep] for name, v in rows.items()}


# ------------------------------------------------------------------------------------------------
# Their embeddings
@dataclass
class Embeddings:
    """Embeddings of the pixels of ``sample`` by one run: ``x`` (N, D) float32 and the run's
    prediction ``pred`` (N,) at each pixel (full-resolution logits, as evaluation computes them)."""

    sample: PixelSample
    x: np.ndarray
    pred: np.ndarray
    feature: str
    normalized: bool
    run: str = ""
    key: str = ""  # identifies checkpoint + sampling + feature (the UMAP cache key builds on it)

    @property
    def metric(self) -> str:
        """The distance UMAP and the scores use: cosine for L2-normalised embeddings."""
        return "cosine" if self.normalized else "euclidean"

    @property
    def correct(self) -> np.ndarray:
        return self.pred == self.sample.label


def feature_names(model) -> list[str]:
    """The features ``embed_pixels`` can read from ``model``: always ``"decoder"`` (the map the
    classifier reads), plus those its training heads offer (each head's ``embedding_features``:
    ``"projection"`` for pixel contrast and DSCNet, ``"stage1".."stage4"`` for Contextrast)."""
    names = ["decoder"]
    for head in getattr(model, "heads", {}).values():
        names += [n for n in getattr(head, "embedding_features", ()) if n not in names]
    return names


def default_feature(config: Mapping) -> str:
    """The feature a run's method shapes (``Method.embedding_feature``), from the run's config as
    config.yaml stores it: what a run is embedded with by default."""
    from ctxseg.methods import get_method

    return get_method(config["method"]).embedding_feature(config)


def _feature_map(model, out, feature: str) -> tuple[torch.Tensor, bool]:
    """(B, D, h, w) map of ``feature`` and whether it is L2-normalised."""
    if feature == "decoder":
        return out["features"].float(), False
    for head in getattr(model, "heads", {}).values():
        if feature in getattr(head, "embedding_features", ()):
            maps, normalized = head.feature_map(out, feature)
            return maps.float(), normalized
    raise ValueError(f"unknown feature {feature!r}; this model has {feature_names(model)}")


def at_pixels(maps: torch.Tensor, y: torch.Tensor, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear values of (B, D, h, w) ``maps`` at full-resolution pixels (y, x) of each image b:
    ``maps`` upsampled to ``size`` with ``F.interpolate(bilinear, align_corners=False)`` and read
    at (y, x), without materialising the upsampled maps. y, x: (B, P). Returns (B, P, D)."""
    h, w = size
    x, y = x.to(maps.dtype), y.to(maps.dtype)
    grid = torch.stack([(x + 0.5) / w * 2 - 1, (y + 0.5) / h * 2 - 1], -1)[:, :, None]
    v = F.grid_sample(maps, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return v[..., 0].transpose(1, 2)


@torch.no_grad()
def embed_pixels(model, dataset, sample: PixelSample, feature: str = "decoder", batch_size: int = 16,
                 device: torch.device | str = "cpu", progress: bool = False) -> Embeddings:
    """Embed the pixels of ``sample`` (drawn from ``dataset``) with ``model``'s ``feature``."""
    from tqdm.auto import tqdm

    if feature not in feature_names(model):
        raise ValueError(f"feature {feature!r} is not available from this model; choose one of {feature_names(model)}")
    model.eval().to(device)
    images = np.unique(sample.image)
    x = pred = None
    normalized = False
    for start in tqdm(range(0, len(images), batch_size), desc=f"embedding ({feature})", disable=not progress,
                      leave=False):
        ids = images[start:start + batch_size]
        batch = torch.stack([dataset[int(i)]["image"] for i in ids]).to(device)
        out = model(batch, with_heads=feature != "decoder")
        maps, normalized = _feature_map(model, out, feature)
        # Pixels of each image of the batch, padded to the longest with index 0 (dropped below).
        rows = [np.nonzero(sample.image == i)[0] for i in ids]
        p = max(len(r) for r in rows)
        pad = np.zeros((len(ids), p), dtype=np.int64)
        for j, r in enumerate(rows):
            pad[j, :len(r)] = r
        yy, xx = torch.from_numpy(sample.y[pad]).to(device), torch.from_numpy(sample.x[pad]).to(device)
        size = tuple(batch.shape[-2:])
        feats = at_pixels(maps, yy, xx, size)
        if normalized:  # a bilinear mix of unit vectors is a little shorter: back onto the sphere
            feats = F.normalize(feats, dim=-1)
        logits = at_pixels(out["logits"].float(), yy, xx, size)
        if x is None:
            x = np.zeros((len(sample), feats.shape[-1]), dtype=np.float32)
            pred = np.zeros(len(sample), dtype=np.int64)
        for j, r in enumerate(rows):
            x[r] = feats[j, :len(r)].cpu().numpy()
            pred[r] = logits[j, :len(r)].argmax(-1).cpu().numpy()
    return Embeddings(sample=sample, x=x, pred=pred, feature=feature, normalized=normalized)


@functools.lru_cache(maxsize=64)
def _file_digest_of(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _file_digest(path: Path) -> str:
    """sha256 of a file's contents, hashed once per (path, size, modification time)."""
    st = Path(path).stat()
    return _file_digest_of(str(path), st.st_size, st.st_mtime_ns)


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _save_npz(path: Path, **arrays) -> None:
    """Write atomically: a reader never sees a half-written cache file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def _cache_dir(run: str | Path) -> Path:
    """``cache/`` in a run folder, or beside a checkpoint or export file."""
    run = Path(run)
    return (run if run.is_dir() else run.parent) / "cache"


def pixel_embeddings(run: str | Path, sample: PixelSample, feature: str = "decoder", dataset=None,
                     split: str | None = None, cache: bool = True, device: torch.device | str = "cpu",
                     progress: bool = True) -> Embeddings:
    """Embeddings of ``sample``'s pixels by ``run`` (a run folder, a ``.pt`` checkpoint or a
    ``.safetensors`` export; opened by ``ctxseg.runs.open_run(run, heads=True)``), cached in the run's ``cache/`` folder (or
    beside the file) under a key of the checkpoint's contents, the sampling and the feature.

    ``dataset`` is the dataset ``sample`` was drawn from (default: the run's ``split``, which
    defaults to its ``eval_split``). A cache hit reads neither the model nor the images.
    """
    from ctxseg.engine.evaluate import eval_dataset
    from ctxseg.runs import open_run, run_file

    key = _digest({"v": CACHE_VERSION, "ckpt": _file_digest(run_file(run, heads=True)), "sample": sample.key(),
                   "feature": feature})
    path = _cache_dir(run) / f"emb-{key}.npz"
    if cache and path.is_file():
        with np.load(path) as z:
            return Embeddings(sample=sample, x=z["x"], pred=z["pred"], feature=feature,
                              normalized=bool(z["normalized"]), run=str(run), key=key)
    opened = open_run(run, heads=True, device=device)
    model, cfg = opened.model, opened.cfg
    dataset = dataset if dataset is not None else eval_dataset(cfg, split or cfg.eval_split)
    if _dataset_id(dataset) != sample.dataset:
        raise ValueError(f"the sample was drawn from {sample.dataset}, not from {_dataset_id(dataset)}; pass the "
                         "dataset it came from")
    emb = embed_pixels(model, dataset, sample, feature, device=device, progress=progress)
    emb.run, emb.key = str(run), key
    if cache:
        _save_npz(path, x=emb.x, pred=emb.pred, normalized=np.array(emb.normalized))
    return emb


# ------------------------------------------------------------------------------------------------
# UMAP layouts
def umap_2d(emb: Embeddings | np.ndarray, n_neighbors: int = 15, min_dist: float = 0.1, metric: str | None = None,
            pca: int | None = None, mode: str = "fast", seed: int = 0, cache_dir: str | Path | None = None,
            progress: bool = True) -> np.ndarray:
    """A 2-D UMAP layout (N, 2) of the embeddings.

    Args:
        emb: ``Embeddings`` (cached under its run's ``cache/`` by default) or an (N, D) array.
        metric: default: cosine for normalised embeddings, else euclidean.
        pca: reduce to this many dimensions with PCA first (faster for wide features).
        mode: ``"reproducible"`` (seeded and single-threaded: the same layout every time) or
            ``"fast"`` (unseeded, all cores).
        cache_dir: where layouts are cached, keyed by the embeddings' key (checkpoint, sampling,
            feature) and every parameter here; None with an array means no cache.
    """
    if mode not in ("fast", "reproducible"):
        raise ValueError(f"mode must be 'fast' or 'reproducible', got {mode!r}")
    if n_neighbors < 2:
        raise ValueError(f"n_neighbors must be >= 2, got {n_neighbors}")
    x = emb.x if isinstance(emb, Embeddings) else np.asarray(emb, dtype=np.float32)
    if metric is None:
        metric = emb.metric if isinstance(emb, Embeddings) else "euclidean"
    params = {"n_neighbors": n_neighbors, "min_dist": min_dist, "metric": metric, "pca": pca, "mode": mode,
              "seed": seed if mode == "reproducible" else None}
    path = None
    if isinstance(emb, Embeddings) and emb.key:
        cache_dir = Path(cache_dir) if cache_dir is not None else _cache_dir(emb.run)
        path = cache_dir / f"umap-{_digest({'emb': emb.key, **params})}.npz"
    elif cache_dir is not None:
        path = Path(cache_dir) / f"umap-{_digest({'x': hashlib.sha256(x.tobytes()).hexdigest(), **params})}.npz"
    if path is not None and path.is_file():
        with np.load(path) as z:
            return z["xy"]
    xy = _fit_umap(x, params, progress)
    if path is not None:
        _save_npz(path, xy=xy)
    return xy


EXACT_KNN_MAX = 50_000  # above this, UMAP's own approximate NN-descent instead of the exact graph


def knn_graph(x: np.ndarray, k: int, metric: str, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Exact ``k`` nearest neighbours of every row of ``x`` (itself first, at distance 0) under
    ``"cosine"`` (1 - cosine similarity) or ``"euclidean"``: (indices, distances), each (N, k).
    Chunked matrix products in torch: O(N^2 D) work, a few seconds for 20,000 points."""
    if metric not in ("cosine", "euclidean"):
        raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if metric == "cosine":
        t = F.normalize(t, dim=1)
    sq = (t * t).sum(1)
    idx, dist = [], []
    for s in range(0, len(t), chunk):
        d = -2 * (t[s:s + chunk] @ t.T) + sq[None]  # squared distance up to the row's own |a|^2
        rows = torch.arange(s, min(s + chunk, len(t)))
        d[rows - s, rows] = -float("inf")  # self first, also among duplicates
        v, i = d.topk(k, dim=1, largest=False)
        v = (v + sq[s:s + chunk, None]).clamp_min(0)
        v[:, 0] = 0
        idx.append(i)
        dist.append(v / 2 if metric == "cosine" else v.sqrt())  # |a-b|^2 / 2 = 1 - cos for unit vectors
    return torch.cat(idx).numpy(), torch.cat(dist).numpy()


def _fit_umap(x: np.ndarray, params: Mapping, progress: bool) -> np.ndarray:
    import warnings

    import umap  # lazy: umap-learn (numba) takes seconds to import
    from sklearn.decomposition import PCA

    def say(msg):
        if progress:
            print(f"UMAP [{time.perf_counter() - start:5.1f} s] {msg}", flush=True)

    start = time.perf_counter()
    reproducible = params["mode"] == "reproducible"
    metric = params["metric"]
    if params["pca"] and params["pca"] < x.shape[1]:
        say(f"PCA {x.shape[1]} -> {params['pca']} dimensions")
        x = PCA(params["pca"], random_state=0).fit_transform(x)
    k = min(params["n_neighbors"], len(x) - 1)
    knn = None
    if len(x) <= EXACT_KNN_MAX and metric in ("cosine", "euclidean"):
        say(f"exact {k}-nearest-neighbour graph of {len(x)} points ({metric})")
        knn = (*knn_graph(x, k, metric), None)
    say(f"layout ({params['mode']}{', seeded' if reproducible else ''})")
    reducer = umap.UMAP(
        n_neighbors=k, min_dist=params["min_dist"], metric=metric, precomputed_knn=knn or (None, None, None),
        random_state=params["seed"] if reproducible else None, n_jobs=1 if reproducible else -1,
        low_memory=False,  # NN-descent's fast path, when the exact graph is not used
    )
    with warnings.catch_warnings():
        # "transform will be unavailable" (no NN-descent index with a precomputed graph; unused
        # here) and "n_jobs overridden by setting random_state" (that is the reproducible mode).
        warnings.filterwarnings("ignore", message=".*(knn_search_index|n_jobs value).*", category=UserWarning)
        xy = reducer.fit_transform(x).astype(np.float32)
    say(f"done: {len(x)} points")
    return xy


# ------------------------------------------------------------------------------------------------
# Numbers next to the pictures
def embedding_scores(x: np.ndarray, labels: np.ndarray, metric: str = "euclidean", k: int = 10,
                     folds: int = 5, seed: int = 0) -> dict[str, float]:
    """How well the embeddings separate the classes, on the given points:

    * ``silhouette``: scikit-learn's mean silhouette coefficient under ``metric`` (-1 to 1);
    * ``knn_accuracy``: accuracy of a ``k``-nearest-neighbour vote (same metric) predicting each
      point's label, ``folds``-fold stratified cross-validation (seeded) so no point votes for
      itself.

    Both need at least two classes; a class with fewer points than ``folds`` lowers ``folds``.
    """
    from sklearn.metrics import silhouette_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.neighbors import KNeighborsClassifier

    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) < 2:
        raise ValueError(f"embedding scores need points of at least 2 classes, got {classes.tolist()}")
    folds = int(min(folds, counts.min()))
    silhouette = float(silhouette_score(x, labels, metric=metric))
    if folds < 2:
        return {"silhouette": silhouette, "knn_accuracy": float("nan")}
    knn = KNeighborsClassifier(n_neighbors=k, metric=metric)
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    predicted = cross_val_predict(knn, x, labels, cv=cv)  # each point voted on by the other folds
    return {"silhouette": silhouette, "knn_accuracy": float((predicted == labels).mean())}


def score_table(embs: Mapping[str, Embeddings], mask: np.ndarray | None = None) -> dict[str, dict[str, float]]:
    """``embedding_scores`` of each run's embeddings (name -> Embeddings) on the points of ``mask``
    (default: all), plus ``accuracy``: the run's own segmentation accuracy on those pixels."""
    rows = {}
    for name, e in embs.items():
        m = np.ones(len(e.x), bool) if mask is None else np.asarray(mask, bool)
        rows[name] = embedding_scores(e.x[m], e.sample.label[m], metric=e.metric)
        rows[name]["accuracy"] = float(e.correct[m].mean())
    return rows


# ------------------------------------------------------------------------------------------------
# Pictures
def points_in_lasso(xy: np.ndarray, vertices: Sequence[tuple[float, float]]) -> np.ndarray:
    """Indices of the points of ``xy`` (N, 2) inside the polygon ``vertices`` (a lasso)."""
    from matplotlib.path import Path as MplPath

    if len(vertices) < 3:
        return np.zeros(0, dtype=np.int64)
    return np.nonzero(MplPath(vertices).contains_points(xy))[0]


def nearest_point(xy: np.ndarray, x: float, y: float) -> int:
    """Index of the point of ``xy`` nearest (x, y)."""
    return int(np.argmin(((xy - np.array([x, y])) ** 2).sum(1)))


def widget_figure(ncols: int = 1, figsize: tuple[float, float] = (6.0, 4.0)):
    """(figure, axes) drawn by ipympl as a widget, ``fig.canvas`` (zoom, pan, mouse events, lasso
    selectors in JupyterLab), whatever the notebook's backend. It stays out of pyplot, so
    ``%matplotlib inline`` keeps drawing the other figures as images, and neither ``plt.show()``
    nor a backend switch (which closes pyplot's figures) touches it."""
    import matplotlib
    from matplotlib.figure import Figure

    backend = matplotlib.get_backend()
    from ipympl.backend_nbagg import Canvas, FigureManager  # importing ipympl makes itself the backend

    if matplotlib.get_backend() != backend:
        matplotlib.use(backend)  # give the notebook its own back
    fig = Figure(figsize=figsize, layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    FigureManager(Canvas(fig), 0)
    fig.canvas.header_visible = False
    return fig, axes


def plot_embedding(xy: np.ndarray, emb: Embeddings, info: DatasetInfo, show: np.ndarray | None = None,
                   color: str = "label", ax=None, title: str | None = None, size: float = 3.0,
                   highlight: np.ndarray | None = None):
    """Scatter a 2-D layout coloured by class (``color="label"`` or ``"pred"``) or by
    correctness (``"correct"``: grey right, red wrong). ``show``: bool mask of points to draw;
    ``highlight``: indices ringed in black (a selection). Returns the PathCollection."""
    import matplotlib.pyplot as plt

    from ctxseg.viz.images import legend_handles

    if ax is None:
        _, ax = plt.subplots(figsize=(5, 5))
    show = np.ones(len(xy), bool) if show is None else show
    palette = np.asarray(info.palette, dtype=np.float32) / 255
    if color == "label":
        colors = palette[emb.sample.label]
    elif color == "pred":
        colors = palette[emb.pred]
    elif color == "correct":
        colors = np.where(emb.correct[:, None], [[0.75, 0.75, 0.75]], [[0.85, 0.1, 0.1]])
    else:
        raise ValueError(f"color must be 'label', 'pred' or 'correct', got {color!r}")
    pts = ax.scatter(xy[show, 0], xy[show, 1], c=colors[show], s=size, linewidths=0, rasterized=True)
    if highlight is not None and len(highlight):
        ax.scatter(xy[highlight, 0], xy[highlight, 1], s=size * 6, facecolors="none", edgecolors="black",
                   linewidths=0.6)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=10)
    if color != "correct":
        present = set(np.unique(emb.sample.label[show]).tolist())
        handles = [h for c, h in enumerate(legend_handles(info)) if c in present]
        ax.legend(handles=handles, fontsize=7, loc="best", markerscale=0.8, framealpha=0.7)
    return pts


def plot_embeddings(layouts: Mapping[str, tuple[np.ndarray, Embeddings]], info: DatasetInfo,
                    show: np.ndarray | None = None, color: str = "label", scores: Mapping[str, dict] | None = None,
                    highlight: np.ndarray | None = None, size: float = 3.0, axes=None):
    """Side-by-side layouts of the same pixels, one panel per name (three to a row); ``scores``
    (from ``embedding_scores``) go in the titles. Returns the figure."""
    import matplotlib.pyplot as plt

    if axes is None:
        ncols = min(3, len(layouts))
        nrows = -(-len(layouts) // ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 4.8 * nrows), layout="constrained",
                                 squeeze=False)
        for ax in axes.flat[len(layouts):]:
            ax.axis("off")
        axes = axes.flat
    for ax, (name, (xy, emb)) in zip(axes, layouts.items()):
        title = f"{name} · {emb.feature}"
        if scores and name in scores:
            s = scores[name]
            title += f"\nsilhouette {s['silhouette']:.2f} · kNN acc {s['knn_accuracy']:.2f}"
        plot_embedding(xy, emb, info, show=show, color=color, ax=ax, title=title, size=size, highlight=highlight)
    return axes[0].figure


def show_pixel_locations(dataset, sample: PixelSample, indices: Sequence[int], info: DatasetInfo,
                         max_images: int = 4, preds: Mapping[str, np.ndarray] | None = None):
    """Where the selected pixels are: the images holding most of them (up to ``max_images``),
    each with its label overlay and the pixels marked (x: the pixel; colour: its class).
    ``preds`` (name -> per-pixel predictions of the sample) adds how many each run got right."""
    import matplotlib.pyplot as plt

    from ctxseg.viz.images import overlay

    indices = np.asarray(indices, dtype=np.int64)
    if not len(indices):
        fig, ax = plt.subplots(figsize=(4, 1))
        ax.axis("off")
        ax.text(0.5, 0.5, "no pixel selected", ha="center", va="center")
        return fig
    ims, counts = np.unique(sample.image[indices], return_counts=True)
    ims = ims[np.argsort(-counts, kind="stable")][:max_images]
    fig, axes = plt.subplots(1, len(ims), figsize=(3.4 * len(ims), 3.6), layout="constrained", squeeze=False)
    palette = np.asarray(info.palette, dtype=np.float32) / 255
    for ax, i in zip(axes[0], ims):
        item = dataset[int(i)]
        ax.imshow(overlay(item["image"], item["mask"], info, alpha=0.35))
        sel = indices[sample.image[indices] == i]
        ax.scatter(sample.x[sel], sample.y[sel], c=palette[sample.label[sel]], marker="x", s=28,
                   linewidths=1.4)
        ax.scatter(sample.x[sel], sample.y[sel], facecolors="none", edgecolors="white", s=60, linewidths=0.6)
        ax.set_title(f"image {int(i)}: {len(sel)} of the {len(indices)} pixels", fontsize=9)
        ax.axis("off")
    if preds:
        names = np.asarray(info.class_names)
        lines = [f"{name}: {int((p[indices] == sample.label[indices]).sum())}/{len(indices)} right"
                 for name, p in preds.items()]
        top = np.bincount(sample.label[indices], minlength=len(names))
        fig.suptitle("selected: " + ", ".join(f"{names[c]} {top[c]}" for c in np.argsort(-top)[:3] if top[c])
                     + "\n" + "  ".join(lines), fontsize=9, wrap=True)
    return fig
