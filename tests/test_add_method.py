"""README's promise, "Add a method": a method is one module and one line registering it. A toy
method defined in a temporary module (outside the package) is registered with one line, and then
train, eval, demo (its report included), study and the embedding explorer run on it, with no
other change: nothing outside ``ctxseg/methods`` keeps a table of method names."""

import json
import sys
import textwrap

import matplotlib
import numpy as np
import pytest

from ctxseg.cli import main
from ctxseg.methods import METHODS

matplotlib.use("Agg")

TOY = '''
from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

from ctxseg.config import TrainConfig
from ctxseg.methods.base import Method, cross_entropy
from ctxseg.models.segmenter import Head


@dataclass
class ToyConfig(TrainConfig):
    method: str = "toy"
    toy_weight: float = 0.1


class ToyHead(Head):
    embedding_features = ("toy",)

    def __init__(self, channels):
        super().__init__()
        self.proj = nn.Conv2d(channels, 8, 1)

    def forward(self, out):
        return {"toy": self.proj(out["features"])}

    def feature_map(self, out, name):
        return F.normalize(out["toy"].float(), dim=1), True


class Toy(Method):
    config_class = ToyConfig
    key_settings = ("toy_weight",)
    in_demo = False

    @classmethod
    def embedding_feature(cls, config):
        return "toy"

    def heads(self, model):
        return {"toy": ToyHead(model.decoder_channels)}

    def forward(self, out, batch, step):
        ce = cross_entropy(out["logits"], batch["mask"])
        reg = out["toy"].float().pow(2).mean()
        return ce + self.cfg.toy_weight * reg, {"ce": ce.detach(), "toy": reg.detach()}
'''

TINY = ["--set", "encoder=test_resnet", "--set", "synthetic_size=[32, 32]", "--set", "crop=[32, 32]",
        "--set", "synthetic_train_len=8", "--set", "num_workers=0", "--set", "eval_batch_size=50",
        "--set", "batch_size=4"]


class FakeLayout:
    """Stands in for UMAP (its compilation is not what this test is about): 2-d points from the
    first two coordinates, recording which feature each layout was asked for."""

    def __init__(self):
        self.features = []

    def __call__(self, emb, **kw):
        self.features.append(emb.feature)
        return np.asarray(emb.x[:, :2], dtype=np.float32)


@pytest.fixture
def toy(tmp_path, monkeypatch):
    (tmp_path / "toy_method.py").write_text(textwrap.dedent(TOY))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "toy_method", raising=False)
    import toy_method

    monkeypatch.setitem(METHODS, "toy", toy_method.Toy)  # the one line: METHODS["toy"] = Toy
    return toy_method


def test_a_toy_method_registered_with_one_line_runs_everywhere(toy, tmp_path, monkeypatch, capsys):
    import ctxseg.viz.embeddings as E
    from ctxseg.data import build_dataset, eval_transform
    from ctxseg.viz.explorer import embedding_explorer

    layout = FakeLayout()
    monkeypatch.setattr(E, "umap_2d", layout)

    # train and eval
    run = tmp_path / "toy-run"
    assert main(["train", "--method", "toy", "--iters", "2", "--out", str(run), "--no-progress", *TINY,
                 "--set", "toy_weight=0.5"]) == 0
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("toy" in row for row in logged)  # the toy loss's own term was logged
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run)]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["miou"] == pytest.approx(json.loads((run / "eval.json").read_text())["miou"])

    # demo: not in the default list (in_demo = False), trained when asked for; its report embeds
    # the toy run with the feature its loss shapes and shows its key setting.
    demo = tmp_path / "demo"
    assert main(["demo", "--out", str(demo), "--methods", "ce", "toy", "--iters", "1", "--per-class", "5",
                 "--no-progress", *TINY]) == 0
    assert (demo / "toy" / "eval.json").is_file() and not (demo / "pixel_contrast").exists()
    report = (demo / "report.html").read_text()
    assert "<td>toy</td>" in report and "toy_weight=0.1" in report
    assert layout.features == ["decoder", "toy"]

    # study: trained, summarized, and paired against CE
    study = tmp_path / "study"
    assert main(["study", "--methods", "ce", "toy:toy_weight=0.2", "--seeds", "0", "1", "--iters", "1",
                 "--out", str(study), "--no-progress", *TINY]) == 0
    summary = json.loads((study / "summary.json").read_text())
    assert set(summary["methods"]) == {"ce", "toy:toy_weight=0.2"}
    assert summary["methods"]["toy:toy_weight=0.2"]["per_seed"].keys() == {"0", "1"}

    # the embedding explorer offers the toy feature and starts on it
    val = build_dataset("synthetic", "val", None, eval_transform(), size=(32, 32))
    sample = E.sample_pixels(val, per_class=5, seed=0)
    ex = embedding_explorer({"CE": demo / "ce", "toy": demo / "toy"}, sample, val, layout_fn=layout)
    assert [p.value for p in ex.feature_pickers] == ["decoder", "toy"]
    assert list(ex.feature_pickers[1].options) == ["decoder", "toy"]
