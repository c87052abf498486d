"""ctxseg.runs: opening a trained run (config -> method -> model with or without heads -> weights),
and the Trainer handed a method class or instance."""

import json

import pytest
import torch
from safetensors.torch import load_file

from ctxseg.config import make_config
from ctxseg.data.synthetic import SYNTHETIC_INFO
from ctxseg.engine.checkpoint import CheckpointError, list_checkpoints, load_checkpoint
from ctxseg.engine.resolve import resolve_config
from ctxseg.engine.trainer import Trainer
from ctxseg.methods import METHODS, get_method
from ctxseg.methods.pixel_contrast import PixelContrast, PixelContrastConfig
from ctxseg.runs import open_run, run_file, trainer

TINY = dict(encoder="test_resnet", crop=(32, 32), synthetic_size=(32, 32), synthetic_train_len=8, batch_size=4,
            iters=2, eval_every=0, ckpt_every=2, num_workers=0, eval_batch_size=50, memory=True, memory_size=10)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "pc"
    trainer(make_config(PixelContrastConfig, "synthetic", out=str(out), **TINY), progress=False).fit()
    return out


def test_open_run_without_heads_is_the_export(run_dir):
    run = open_run(run_dir)
    assert run.path == run_dir / "model.safetensors" and not run.has_heads
    assert isinstance(run.method, PixelContrast) and run.cfg.method == "pixel_contrast"
    assert run.class_names == list(SYNTHETIC_INFO.class_names) and run.step == 2
    assert not run.model.training and len(run.model.heads) == 0
    exported = load_file(str(run_dir / "model.safetensors"))
    assert set(run.model.state_dict()) == set(exported)
    assert all(torch.equal(v, exported[k]) for k, v in run.model.state_dict().items())


def test_open_run_with_heads_is_the_newest_checkpoint_and_its_method_state(run_dir):
    ckpt = list_checkpoints(run_dir / "ckpt")[-1]
    state = load_checkpoint(ckpt)
    run = open_run(run_dir, heads=True)
    assert run.path == ckpt and run.has_heads and "proj" in run.model.heads
    assert all(torch.equal(v, state["model"][k]) for k, v in run.model.state_dict().items())
    assert set(run.model.state_dict()) == set(state["model"])
    method_state = run.method.state_dict()
    assert state["method"] and all(torch.equal(method_state[k], v) for k, v in state["method"].items())
    assert run.method.memory.pixel_count.sum() > 0  # the memory bank came back, not a fresh one
    # A checkpoint path without heads: the same deployable weights as the export.
    plain = open_run(ckpt)
    assert plain.path == ckpt and not plain.has_heads and len(plain.model.heads) == 0
    exported = open_run(run_dir).model.state_dict()
    assert all(torch.equal(v, exported[k]) for k, v in plain.model.state_dict().items())


def test_run_file_choice_and_errors(run_dir, tmp_path):
    ckpt = list_checkpoints(run_dir / "ckpt")[-1]
    assert run_file(run_dir) == run_dir / "model.safetensors" and run_file(run_dir, heads=True) == ckpt
    assert run_file(ckpt) == ckpt
    with pytest.raises(CheckpointError, match="neither"):
        open_run(tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        open_run(tmp_path / "missing.safetensors")
    # An exported-only run folder: heads=True falls back to the export, without heads.
    only = tmp_path / "only"
    only.mkdir()
    (only / "model.safetensors").write_bytes((run_dir / "model.safetensors").read_bytes())
    run = open_run(only, heads=True)
    assert run.path == only / "model.safetensors" and not run.has_heads


def test_trainer_takes_a_method_class_or_instance(tmp_path):
    cfg = resolve_config(make_config(PixelContrastConfig, "synthetic", out=str(tmp_path / "a"), **TINY))
    by_class = Trainer(cfg, PixelContrast, progress=False)
    assert type(by_class.method) is PixelContrast and by_class.method.total_iters == 2
    built = PixelContrast(cfg, SYNTHETIC_INFO, total_iters=2)
    by_instance = Trainer(make_config(PixelContrastConfig, "synthetic", out=str(tmp_path / "b"), **TINY), built,
                          progress=False)
    assert by_instance.method is built and "proj" in by_instance.model.heads
    assert trainer(cfg, progress=False).method.__class__ is get_method("pixel_contrast")
    # The registry is consistent: each name's config says it is that method, so a stored run finds its class.
    for name, cls in METHODS.items():
        assert cls.config_class.method == name and get_method(name) is cls


def test_train_or_reuse_follows_the_one_reuse_rule(run_dir, capsys):
    """The notebooks' ``train_or_reuse`` reuses a finished run only with the same settings (runtime
    keys aside), by the rule demo and study use; another setting is refused, naming the folder and
    the key, and nothing in the folder changes."""
    from dataclasses import replace

    from ctxseg.runs import RunSettingsError, reusable_state, train_or_reuse

    same = make_config(PixelContrastConfig, "synthetic", out=str(run_dir), **TINY)
    stamp = (run_dir / "eval.json").stat().st_mtime_ns
    assert reusable_state(run_dir, same) == "finished"
    reused = train_or_reuse(replace(same, ckpt_every=1, num_workers=1), progress=False)  # runtime keys differ
    assert reused == json.loads((run_dir / "eval.json").read_text())
    assert "has finished: reusing it" in capsys.readouterr().out
    for key, value in (("iters", 3), ("temperature", 0.2), ("memory_size", 11)):
        with pytest.raises(RunSettingsError, match=rf"run folder {run_dir} was made with other settings: {key} \(folder: "):
            train_or_reuse(replace(same, **{key: value}), progress=False)
    assert (run_dir / "eval.json").stat().st_mtime_ns == stamp
    # The study's own exception: eval_split may differ (it evaluates on the other split instead).
    other_split = replace(same, eval_split="train")
    with pytest.raises(RunSettingsError, match="eval_split"):
        reusable_state(run_dir, other_split)
    assert reusable_state(run_dir, other_split, ignore=("eval_split",)) == "finished"
