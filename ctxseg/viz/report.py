"""A self-contained HTML report of one or more runs: results table, learning curves, per-class
IoU, example predictions. Figures are embedded as base64 PNGs so the file can be mailed around."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from ctxseg.viz.plots import plot_learning_curves, plot_per_class_iou, show_predictions
from ctxseg.viz.runs import load_run


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def write_report(run_dirs, out: str | Path, examples: int = 4, title: str = "ctxseg report") -> Path:
    """Write ``out`` (HTML) for the finished runs in ``run_dirs``; returns its path."""
    from ctxseg.engine.evaluate import eval_dataset, load_trained

    runs = [load_run(d) for d in run_dirs]
    runs = [r for r in runs if r["final"] is not None]
    if not runs:
        raise ValueError(f"none of {list(map(str, run_dirs))} has finished (no eval.json)")
    rows = []
    for r in runs:
        c, f = r["config"], r["final"]
        rows.append(
            f"<tr><td>{html.escape(r['name'])}</td><td>{c.get('method')}</td><td>{c.get('data')}</td>"
            f"<td>{c.get('encoder')}</td><td>{c.get('iters') or c.get('epochs')} {'iters' if c.get('iters') else 'epochs'}</td>"
            f"<td>{c.get('seed')}</td><td>{f['miou']:.3f}</td><td>{f['boundary_iou']:.3f}</td>"
            f"<td>{f['pixel_acc']:.3f}</td><td>{f['num_images']}</td></tr>"
        )
    parts = [
        f"<h1>{html.escape(title)}</h1>",
        "<p>Evaluated on the config's <code>eval_split</code> at full label resolution; boundary IoU "
        f"at {runs[0]['final']['boundary_px']} px (Cheng et al., CVPR 2021).</p>",
        "<table><tr><th>run</th><th>method</th><th>data</th><th>encoder</th><th>length</th><th>seed</th>"
        "<th>mIoU</th><th>boundary IoU</th><th>pixel acc</th><th>images</th></tr>" + "".join(rows) + "</table>",
        "<h2>Learning curves</h2>",
        _png(plot_learning_curves(runs)),
        "<h2>Per-class IoU</h2>",
        _png(plot_per_class_iou({r["name"]: r["final"] for r in runs})),
    ]
    for r in runs:
        model, cfg, _ = load_trained(r["path"])
        ds = eval_dataset(cfg, cfg.eval_split)
        n = min(examples, len(ds))
        parts += [f"<h2>Predictions: {html.escape(r['name'])} ({cfg.eval_split})</h2>",
                  _png(show_predictions(model, ds, list(range(n))))]
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}img{max-width:100%}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                   f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")
    return out
