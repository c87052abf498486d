"""Comparing runs: the confusion matrix every evaluation stores, finding finished runs, the results
table, and the confusion and boundary-error plots."""

import json

import matplotlib
import numpy as np
import pytest
import torch
import yaml
from conftest import TINY_TRAIN, run_ctxseg
from sklearn.metrics import confusion_matrix as sk_confusion

from ctxseg.data.base import DatasetInfo
from ctxseg.engine.evaluate import evaluate
from ctxseg.viz import (
    boundary_error_map,
    find_runs,
    plot_confusion,
    plot_per_class_iou,
    results_table,
    run_confusion,
)
from ctxseg.viz.errors import BOUNDARY_ERROR, CORRECT, IGNORED, INTERIOR_ERROR

matplotlib.use("Agg")

INFO = DatasetInfo("toy", ("a", "b", "c", "d"), ((0, 0, 0), (255, 0, 0), (0, 255, 0), (0, 0, 255)))


class FixedPredictions(torch.nn.Module):
    """A 'model' whose logits are one-hot of preset predictions, batch after batch."""

    def __init__(self, preds):
        super().__init__()
        self.preds = list(preds)
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, image, with_heads=False):
        pred = self.preds.pop(0)
        return {"logits": torch.nn.functional.one_hot(pred, INFO.num_classes).permute(0, 3, 1, 2).float()}


def test_evaluate_stores_the_confusion_matrix():
    g = torch.Generator().manual_seed(0)
    targets = [torch.randint(0, 4, (2, 9, 7), generator=g) for _ in range(3)]
    targets[0][0, :2] = 255  # ignored pixels count nowhere
    targets[1][1, :, 0] = 3
    preds = [torch.where(torch.rand(t.shape, generator=g) < 0.6, t.clamp(max=3), torch.randint(0, 3, t.shape, generator=g))
             for t in targets]
    loader = [{"image": torch.zeros(2, 3, 9, 7), "mask": t} for t in targets]
    result = evaluate(FixedPredictions(preds), loader, INFO, torch.device("cpu"), progress=False)
    result = json.loads(json.dumps(result))  # as eval.json stores it

    t = torch.cat([x.flatten() for x in targets]).numpy()
    p = torch.cat([x.flatten() for x in preds]).numpy()
    valid = t != 255
    expected = sk_confusion(t[valid], p[valid], labels=range(4))
    assert np.array_equal(np.array(result["confusion"]), expected)
    assert sum(map(sum, result["confusion"])) == result["num_pixels"] == valid.sum()

    cm = np.array(result["confusion"], dtype=float)
    iou = np.diag(cm) / (cm.sum(0) + cm.sum(1) - np.diag(cm))
    assert np.nanmean(iou) == pytest.approx(result["miou"])
    assert list(iou) == pytest.approx(list(result["per_class_iou"].values()))


# ------------------------------------------------------------------------------------------------
def _write_run(folder, config, final=None):
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    (folder / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    if final is not None:
        (folder / "eval.json").write_text(json.dumps(final))


def _final(miou, ious, **extra):
    return {"miou": miou, "boundary_iou": miou / 2, "pixel_acc": 0.9, "boundary_px": 3,
            "per_class_iou": ious, "split": "val", **extra}


@pytest.fixture
def runs_root(tmp_path):
    root = tmp_path / "runs"
    syn = {"data": "synthetic", "encoder": "test_resnet", "iters": 6, "seed": 0, "eval_split": "val"}
    _write_run(root / "b-ce", {**syn, "method": "ce"}, _final(0.5, {"sky": 0.75, "car": 0.25}))
    _write_run(root / "a-dsc", {**syn, "method": "dscnet", "dual_stream": "B", "seed": 1},
               _final(0.3, {"sky": 0.5, "car": None},
                      cam={"miou": 0.2, "split": "train"}, pseudo={"miou": 0.25, "split": "train"}))
    _write_run(root / "demo" / "ce", {**syn, "method": "contextrast", "bane": False, "fusion": True,
                                      "data": "toy", "epochs": 3, "iters": None},
               _final(0.6, {"sky": 0.6, "<b>": 0.6}))
    _write_run(root / "unfinished", {**syn, "method": "ce"})
    (root / "stray").mkdir()
    (root / "stray" / "eval.json").write_text("{}")  # no metrics.jsonl: not a run folder
    return root


def test_find_runs_lists_finished_runs_at_any_depth(runs_root):
    assert [r["name"] for r in find_runs(runs_root)] == ["a-dsc", "b-ce", "demo/ce"]
    assert [r["name"] for r in find_runs(runs_root, pattern="*-ce")] == ["b-ce"]
    run = find_runs(runs_root, pattern="demo/*")[0]
    assert run["path"] == runs_root / "demo" / "ce" and run["final"]["miou"] == 0.6
    assert find_runs(runs_root / "unfinished") == []


def test_results_table(runs_root):
    table = results_table(find_runs(runs_root))
    rows = {r["run"]: r for r in table.rows}
    dsc, ce, ctx = rows["a-dsc"], rows["b-ce"], rows["demo/ce"]
    assert dsc["variant"] == "dual_stream=B" and ctx["variant"] == "bane=False, fusion=True" and ce["variant"] == ""
    assert (dsc["CAM mIoU"], dsc["pseudo mIoU"]) == (0.2, 0.25)
    assert ce["CAM mIoU"] is None and ce["pseudo mIoU"] is None
    assert (ce["mIoU"], ce["boundary IoU"], ce["IoU car"], ce["seed"]) == (0.5, 0.25, 0.25, 0)
    assert dsc["IoU car"] is None and dsc["seed"] == 1
    assert (ce["length"], ctx["length"]) == ("6 it", "3 ep")
    # Per-class columns: the union of the class names, in order of appearance.
    assert table.columns[-3:] == ["IoU sky", "IoU car", "IoU <b>"]
    assert "IoU <b>" not in ce and "train split" in table.caption

    html = table._repr_html_()
    assert html == table.to_html() and html.startswith("<table>")
    assert html.count("<tr>") == 4 and "&lt;b&gt;" in html and "<b>" not in html
    md = table.to_markdown().splitlines()
    ce_line = next(line for line in md if line.startswith("| b-ce "))
    assert "| 0.500 | 0.250 | 3 | 0.900 |  |  | 0.750 | 0.250 |  |" in ce_line
    assert "| 0.300 | 0.150 | 3 | 0.900 | 0.200 | 0.250 | 0.500 |  |  |" in md[2]
    assert [c for c in results_table(find_runs(runs_root), per_class=False).columns if c.startswith("IoU")] == []


def test_run_confusion_from_eval_json(runs_root):
    run = find_runs(runs_root, pattern="b-ce")[0]
    with pytest.raises(KeyError, match="no confusion matrix"):
        run_confusion(run, reevaluate=False)
    run["final"]["confusion"] = [[3, 1], [0, 2]]
    cm, names = run_confusion(run, reevaluate=False)
    assert cm.tolist() == [[3, 1], [0, 2]] and names == ["sky", "car"]


@pytest.mark.slow
def test_run_confusion_reevaluates_older_runs(tmp_path):
    out = tmp_path / "runs" / "tiny"
    res = run_ctxseg(["train", *TINY_TRAIN, "--iters", "2", "--out", str(out), "--no-progress", "--set", "num_workers=0"])
    assert res.returncode == 0, res.stderr
    final = json.loads((out / "eval.json").read_text())
    assert "confusion" not in json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    stored = final.pop("confusion")
    (out / "eval.json").write_text(json.dumps(final))  # as a run from before the matrix was stored
    cm, names = run_confusion(find_runs(tmp_path / "runs")[0])
    assert cm.tolist() == stored and names == list(final["per_class_iou"])


# ------------------------------------------------------------------------------------------------
def test_plot_confusion_normalises_rows():
    cm = np.array([[3, 1, 0], [0, 0, 0], [2, 2, 4]])
    fig = plot_confusion(cm, ["x", "y", "z"])
    shown = np.ma.filled(fig.axes[0].images[0].get_array().astype(float), np.nan)
    expected = np.array([[0.75, 0.25, 0], [np.nan] * 3, [0.25, 0.25, 0.5]])
    np.testing.assert_allclose(shown, expected)
    assert sorted(t.get_text() for t in fig.axes[0].texts) == sorted(["0.75", "0.25", "0.00", "0.25", "0.25", "0.50"])
    counts = plot_confusion(cm, ["x", "y", "z"], normalize=None).axes[0].images[0].get_array()
    np.testing.assert_array_equal(counts, cm)
    assert not plot_confusion(cm, ["x", "y", "z"], annotate=False).axes[0].texts
    with pytest.raises(ValueError):
        plot_confusion(cm, ["x", "y", "z"], normalize="pred")


def test_boundary_error_map_by_hand():
    target = torch.zeros(8, 8, dtype=torch.long)
    target[:, 4:] = 1  # one vertical edge between columns 3 and 4
    target[7, 7] = 255
    pred = target.clone()
    pred[7, 7] = 0
    wrong = {(0, 3): BOUNDARY_ERROR,  # next to the edge
             (4, 4): BOUNDARY_ERROR,
             (4, 5): INTERIOR_ERROR,  # 2 px from the edge, d = 1
             (0, 0): INTERIOR_ERROR,  # the image border is not an edge
             (6, 6): BOUNDARY_ERROR}  # next to the ignored pixel: its outline is an edge
    for (y, x) in wrong:
        pred[y, x] = 1 - target[y, x]
    codes = boundary_error_map(pred, target, boundary_px=1)
    expected = np.full((8, 8), CORRECT)
    for (y, x), code in wrong.items():
        expected[y, x] = code
    expected[7, 7] = IGNORED
    np.testing.assert_array_equal(codes, expected)
    # At d = 2, column 5 lies within the band too.
    assert boundary_error_map(pred, target, boundary_px=2)[4, 5] == BOUNDARY_ERROR
    assert (boundary_error_map(pred.numpy(), target.numpy(), boundary_px=0) != BOUNDARY_ERROR).all()


def test_per_class_iou_bars_over_different_class_sets():
    fig = plot_per_class_iou({"r1": {"per_class_iou": {"a": 0.5, "b": None}},
                              "r2": {"per_class_iou": {"a": 0.25, "c": 1.0}}})
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c"]
    heights = [p.get_height() for p in ax.patches]
    np.testing.assert_array_equal(heights, [0.5, np.nan, np.nan, 0.25, np.nan, 1.0])
