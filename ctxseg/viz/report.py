"""A self-contained HTML report of one or more runs: results table, learning curves, per-class
IoU, a UMAP of the same pixels embedded by each run, example predictions. Figures are embedded as
base64 PNGs so the file can be mailed around."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from ctxseg.runs import load_run, open_run, run_file
from ctxseg.viz.compare import results_table
from ctxseg.viz.curves import plot_learning_curves, plot_per_class_iou
from ctxseg.viz.errors import show_prediction_grid


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _same_data(runs: list[dict]) -> list[dict]:
    """The runs evaluated on the same images as the first one."""
    first = runs[0]["config"]
    return [r for r in runs if all(r["config"].get(k) == first.get(k) for k in ("data", "data_root", "synthetic_size",
                                                                              "eval_split"))]


def _umap_section(same: list[dict], ds, per_class: int, progress: bool) -> list[str]:
    """The same pixels of ``ds`` embedded by every run of ``same``, side by side."""
    from ctxseg.viz.embeddings import (
        default_feature,
        embedding_scores,
        pixel_embeddings,
        plot_embeddings,
        sample_pixels,
        umap_2d,
    )

    sample = sample_pixels(ds, per_class=per_class, boundary_px=3, seed=0, progress=progress)
    layouts, scores = {}, {}
    for r in same:
        # The training heads live only in the checkpoints: an exported-only run has its decoder.
        has_heads = run_file(r["path"], heads=True).suffix == ".pt"
        feature = default_feature(r["config"]) if has_heads else "decoder"
        emb = pixel_embeddings(r["path"], sample, feature, dataset=ds, progress=progress)
        layouts[r["name"]] = (umap_2d(emb, mode="reproducible", seed=0, progress=progress), emb)
        scores[r["name"]] = embedding_scores(emb.x, sample.label, metric=emb.metric)
    fig = plot_embeddings(layouts, ds.info, scores=scores)
    rows = "".join(
        f"<tr><td>{html.escape(n)}</td><td>{e.feature}</td><td>{scores[n]['silhouette']:.3f}</td>"
        f"<td>{scores[n]['knn_accuracy']:.3f}</td><td>{e.correct.mean():.3f}</td></tr>" for n, (_, e) in layouts.items()
    )
    return [
        "<h2>Pixel embeddings (UMAP)</h2>",
        f"<p>The same {len(sample)} {ds.split} pixels (up to {per_class} per class, drawn uniformly from each "
        "class's pixels) embedded by each run with the feature its loss shapes; UMAP with 15 neighbours, min_dist "
        "0.1, seeded. Colour: ground-truth class. The scores are computed in the embedding space itself "
        "(scikit-learn): silhouette, and the accuracy of a 10-nearest-neighbour vote (5-fold); seg acc is the "
        "run's own accuracy on these class-balanced pixels.</p>",
        "<table><tr><th>run</th><th>feature</th><th>silhouette</th><th>kNN acc</th><th>seg acc</th></tr>"
        + rows + "</table>",
        _png(fig),
    ]


def write_report(run_dirs, out: str | Path, examples: int = 4, title: str = "ctxseg report", umap: bool = True,
                 per_class: int = 500, progress: bool = False) -> Path:
    """Write ``out`` (HTML) for the finished runs in ``run_dirs``; returns its path.

    ``umap``: add the UMAP section (``per_class`` pixels of each class of the first run's data).
    """
    from ctxseg.engine.evaluate import eval_dataset

    runs = [load_run(d) for d in run_dirs]
    runs = [r for r in runs if r["final"] is not None]
    if not runs:
        raise ValueError(f"none of {list(map(str, run_dirs))} has finished (no eval.json)")
    table = results_table(runs)
    parts = [
        f"<h1>{html.escape(title)}</h1>",
        "<p>Evaluated on each config's <code>eval_split</code> at full label resolution; boundary IoU "
        f"at {runs[0]['final']['boundary_px']} px (Cheng et al., CVPR 2021).</p>",
        *table_html(table),
        "<h2>Learning curves</h2>",
        _png(plot_learning_curves(runs)),
        "<h2>Per-class IoU</h2>",
        _png(plot_per_class_iou({r["name"]: r["final"] for r in runs})),
    ]
    same = _same_data(runs)
    models = {r["name"]: open_run(r["path"]) for r in same}
    cfg = next(iter(models.values())).cfg
    ds = eval_dataset(cfg, cfg.eval_split)
    if umap:
        parts += _umap_section(same, ds, per_class, progress)
    parts += [f"<h2>Example predictions ({cfg.eval_split})</h2>",
              _png(show_prediction_grid({n: m.model for n, m in models.items()}, ds, list(range(min(examples, len(ds))))))]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(html_page(title, parts))
    tmp.replace(out)
    return out


# Wide tables scroll inside their box; captions are paragraphs of the page's width.
STYLE = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
         "table{border-collapse:collapse;margin:1em 0}.wide{overflow-x:auto;max-width:100%}"
         ".wide table{font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}"
         "th{white-space:normal;vertical-align:bottom}.caption{font-size:13px;color:#444}img{max-width:100%}")


def table_html(table) -> list[str]:
    """A results table that fits the page: settings shared by every row are stated once above it,
    the rest scrolls inside its own box if it is still too wide, and the caption is a paragraph of
    the page's width, so no column and no caption is ever cut off."""
    same, table = table.split_constant()
    common = " · ".join(f"{html.escape(k)}: {html.escape(v)}" for k, v in same.items() if v)
    return ([f'<p class="caption">All runs: {common}</p>'] if common else []) + [
        f'<div class="wide">{table.to_html(caption=False)}</div>',
        f'<p class="caption">{html.escape(table.caption)}</p>' if table.caption else "",
    ]


def html_page(title: str, parts: list[str]) -> str:
    """One self-contained HTML page of ``parts`` (HTML fragments) under ``title``."""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>")
