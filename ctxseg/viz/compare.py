"""Comparing finished runs: find them, put their final metrics in one table, and get each one's
confusion matrix (from its eval.json, or by evaluating its saved model again)."""

from __future__ import annotations

import html
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

import numpy as np

from ctxseg.models.pretrained import describe as describe_weights
from ctxseg.runs import load_run

_METRICS = {"mIoU", "boundary IoU", "pixel acc", "CAM mIoU", "pseudo mIoU"}
_COLUMNS = ["run", "method", "variant", "data", "encoder", "weights", "length", "seed", "split", "mIoU", "boundary IoU",
            "boundary px", "pixel acc", "CAM mIoU", "pseudo mIoU"]


def find_runs(root: str | Path = "runs", pattern: str = "*") -> list[dict]:
    """Every finished run folder under ``root``, at any depth, loaded with :func:`load_run`.

    A run has finished when it holds ``eval.json`` next to its ``metrics.jsonl``; unfinished
    runs are skipped. Each run's ``name`` is its path relative to ``root`` (``demo/ce`` for
    ``runs/demo/ce``), runs are sorted by it, and only names matching the shell-style
    ``pattern`` are kept (``"*-smoke"``, ``"syn-*-s0"``).
    """
    root = Path(root)
    runs = []
    for path in sorted(p.parent for p in root.rglob("eval.json") if (p.parent / "metrics.jsonl").is_file()):
        name = path.relative_to(root).as_posix() if path != root else path.name
        if fnmatch(name, pattern):
            runs.append({**load_run(path), "name": name})
    return runs


def variant(config: dict) -> str:
    """The key settings of a run's method (``Method.key_settings``), e.g. ``"dual_stream=B"``."""
    from ctxseg.methods import METHODS

    method = METHODS.get(config.get("method"))
    keys = method.key_settings if method is not None else ()
    return ", ".join(f"{k}={config[k]}" for k in keys if k in config)


def _length(config: dict) -> str:
    if config.get("iters"):
        return f"{config['iters']} it"
    return f"{config['epochs']} ep" if config.get("epochs") else ""


def _format(value, digits: int) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


@dataclass(repr=False)
class RunTable:
    """Rows of run results that render as an HTML table in Jupyter.

    Attributes:
        columns: column names, in display order.
        rows: one dict per run, keyed by column; numbers stay numbers and a missing value is
            ``None`` (shown blank).
        caption: what the table's reader needs to know about its columns.
        digits: decimals shown for floats.
    """

    columns: list[str]
    rows: list[dict]
    caption: str = ""
    digits: int = 3

    def _cells(self, row: dict) -> list[str]:
        return [_format(row.get(c), self.digits) for c in self.columns]

    def split_constant(self, keep: Sequence[str] = ("run", "method")) -> tuple[dict[str, str], RunTable]:
        """(the settings columns whose value is the same in every row, as {column: shown value}; this
        table without them), so a report states them once and the table fits the page. Metric
        columns and ``keep`` always stay; a one-row table is returned as it is."""
        if len(self.rows) < 2:
            return {}, self
        cells = [self._cells(r) for r in self.rows]
        metric = {c for c in self.columns if c.startswith("IoU ") or c in _METRICS}
        same = {c: cells[0][i] for i, c in enumerate(self.columns)
                if c not in metric and c not in keep and all(row[i] == cells[0][i] for row in cells)}
        rest = [c for c in self.columns if c not in same]
        return same, RunTable(rest, self.rows, self.caption, self.digits)

    def to_html(self, caption: bool = True) -> str:
        numeric = {c for c in self.columns if any(isinstance(r.get(c), (int, float)) for r in self.rows)}
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.columns)
        body = "".join(
            "<tr>" + "".join(
                f'<td style="text-align:{"right" if c in numeric else "left"}">{html.escape(v)}</td>'
                for c, v in zip(self.columns, self._cells(r))
            ) + "</tr>"
            for r in self.rows
        )
        caption = f"<caption>{html.escape(self.caption)}</caption>" if self.caption and caption else ""
        return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    def _repr_html_(self) -> str:
        return self.to_html()

    def __repr__(self) -> str:
        return self.to_markdown()

    def to_markdown(self) -> str:
        lines = ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(self._cells(r)) + " |" for r in self.rows]
        return "\n".join(lines) + (f"\n\n{self.caption}" if self.caption else "")


def results_table(runs: Sequence[dict], per_class: bool = True, digits: int = 3) -> RunTable:
    """One row per finished run (as :func:`find_runs` or :func:`load_run` give them): its name,
    method and variant, data, encoder, training length, seed and evaluation split; mIoU, boundary
    IoU (at the run's ``boundary px``) and pixel accuracy; for weakly supervised runs (an
    eval.json with ``cam`` and ``pseudo`` entries) the CAM and pseudo-label mIoU, blank for the
    others; and with ``per_class`` one ``IoU <class>`` column per class.

    Runs on different datasets may share a table: the per-class columns are the union of their
    class names in order of appearance, blank for a run whose dataset lacks the class (a table
    per dataset reads better).
    """
    rows, classes, weak_splits = [], [], set()
    for run in runs:
        cfg, final = run["config"], run["final"]
        if final is None:
            raise ValueError(f"{run['name']} has not finished (no eval.json)")
        weak = "cam" in final and "pseudo" in final
        row = {
            "run": run["name"], "method": cfg.get("method"), "variant": variant(cfg), "data": cfg.get("data"),
            "encoder": cfg.get("encoder"), "weights": describe_weights(cfg.get("pretrained", False)),
            "length": _length(cfg), "seed": cfg.get("seed"),
            "split": final.get("split", cfg.get("eval_split")),
            "mIoU": final["miou"], "boundary IoU": final["boundary_iou"], "boundary px": final.get("boundary_px"),
            "pixel acc": final["pixel_acc"],
            "CAM mIoU": final["cam"]["miou"] if weak else None,
            "pseudo mIoU": final["pseudo"]["miou"] if weak else None,
        }
        if weak:
            weak_splits.add(final["cam"].get("split", "train"))
        if per_class:
            row.update({f"IoU {n}": v for n, v in final["per_class_iou"].items()})
            classes += [n for n in final["per_class_iou"] if n not in classes]
        rows.append(row)
    columns = _COLUMNS + [f"IoU {n}" for n in classes]
    caption = ""
    if weak_splits:
        caption = (f"CAM and pseudo-label mIoU are measured on the {' and '.join(sorted(weak_splits))} split "
                   "(the WSSS protocol); every other metric on the run's evaluation split.")
    return RunTable(columns, rows, caption, digits)


def run_confusion(run: dict, reevaluate: bool = True, device: str = "cpu") -> tuple[np.ndarray, list[str]]:
    """A finished run's confusion matrix (rows ground truth, columns prediction, pixel counts)
    on its evaluation split, with its class names.

    Runs evaluated before eval.json stored the matrix are evaluated again from their saved model
    on the same split when ``reevaluate`` is true (a warning tells if the mIoU then differs from
    the stored one, e.g. for a run evaluated under GPU autocast); otherwise a ``KeyError`` says
    it is missing.
    """
    final = run["final"]
    names = list(final["per_class_iou"])
    if "confusion" in final:
        return np.asarray(final["confusion"], dtype=np.int64), names
    if not reevaluate:
        raise KeyError(f"{run['name']}: eval.json holds no confusion matrix (written before it was stored); "
                       "pass reevaluate=True to compute it from the saved model")
    import torch

    from ctxseg.engine.evaluate import eval_dataset, evaluate
    from ctxseg.engine.loader import eval_loader
    from ctxseg.runs import open_run

    opened = open_run(run["path"], device=device)
    model, cfg = opened.model, opened.cfg
    dataset = eval_dataset(cfg, final.get("split", cfg.eval_split))
    loader = eval_loader(dataset, cfg.eval_batch_size, 0)
    result = evaluate(model, loader, dataset.info, torch.device(device), cfg.boundary_px, progress=False)
    if not math.isclose(result["miou"], final["miou"], abs_tol=1e-6):
        warnings.warn(f"{run['name']}: evaluated again, mIoU {result['miou']:.6f} differs from eval.json's "
                      f"{final['miou']:.6f}", stacklevel=2)
    return np.asarray(result["confusion"], dtype=np.int64), list(dataset.info.class_names)
