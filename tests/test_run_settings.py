"""Settings resolved when a run starts and stored in its config.yaml: ``sync_bn`` (SyncBatchNorm
under torchrun on CUDA), ``num_workers`` (from the CPUs each process gets) and ``tensorboard``."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import ROOT, TINY_TRAIN
from torch import nn

from ctxseg.config import make_config, to_plain
from ctxseg.engine import distributed as D
from ctxseg.engine.distributed import DistInfo, default_num_workers, maybe_sync_bn, resolve_sync_bn
from ctxseg.engine.resolve import resolve_config
from ctxseg.engine.trainer import Trainer
from ctxseg.methods.ce import CEConfig, CrossEntropy
from ctxseg.models.segmenter import Segmenter

TINY = dict(encoder="test_resnet", crop=(32, 32), batch_size=2, synthetic_size=(32, 32), synthetic_train_len=4,
            eval_batch_size=50, log_every=1, num_workers=0, device="cpu")


def batch_norms(model):
    return [type(m) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


# ------------------------------------------------------------------------------------------------
# sync_bn
@pytest.mark.parametrize("asked, world, device, expected", [
    (None, 1, "cpu", False), (None, 2, "cpu", False), (True, 2, "cpu", False), (True, 1, "cpu", False),
    (None, 1, "cuda", False), (None, 2, "cuda", True), (True, 1, "cuda", True), (False, 2, "cuda", False),
])
def test_sync_bn_resolution_rule(asked, world, device, expected):
    assert resolve_sync_bn(asked, world, device) is expected


def test_config_resolves_sync_bn_from_the_device_and_torchrun_world_size(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for asked in (None, True, False):  # CPU processes (gloo): never on
        assert resolve_config(make_config(CEConfig, iters=1, device="cpu", sync_bn=asked)).sync_bn is False
    # CUDA is named, not used: resolution does not touch the device.
    assert resolve_config(make_config(CEConfig, iters=1, device="cuda:1")).sync_bn is True
    assert resolve_config(make_config(CEConfig, iters=1, device="cuda", sync_bn=False)).sync_bn is False
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert resolve_config(make_config(CEConfig, iters=1, device="cuda")).sync_bn is False
    assert resolve_config(make_config(CEConfig, iters=1, device="cuda", sync_bn=True)).sync_bn is True


def test_maybe_sync_bn_converts_every_batch_norm_on_cuda_multiprocess_and_keeps_the_function():
    torch.manual_seed(0)
    # tf_efficientnet_lite0 fuses BN and ReLU6 in timm's BatchNormAct2d; the decoder has plain BN.
    model = Segmenter(4, encoder="tf_efficientnet_lite0", pretrained=False)
    original = copy.deepcopy(model)
    cfg = make_config(CEConfig, iters=1)  # sync_bn None: auto
    assert maybe_sync_bn(model, cfg, DistInfo(0, 2, 0), torch.device("cpu")) is model
    assert maybe_sync_bn(model, cfg, DistInfo(0, 1, 0), torch.device("cuda")) is model
    assert nn.SyncBatchNorm not in map(type, model.modules())

    converted = maybe_sync_bn(model, cfg, DistInfo(0, 2, 0), torch.device("cuda"))
    kinds = batch_norms(converted)
    assert kinds and all(issubclass(k, nn.SyncBatchNorm) for k in kinds), set(kinds)
    assert len(kinds) == len(batch_norms(original))
    assert converted.state_dict().keys() == original.state_dict().keys()  # checkpoints load either way
    # Without a process group SyncBatchNorm normalises like BatchNorm, on CPU too: the converted
    # model computes the same function (PyTorch's own converter drops the fused activation).
    x = torch.randn(2, 3, 64, 64)
    for mode in ("eval", "train"):
        getattr(converted, mode)(), getattr(original, mode)()
        assert torch.allclose(converted(x)["logits"], original(x)["logits"], atol=1e-5), mode
    assert torch.equal(converted.decoder.fuse[1].running_mean, original.decoder.fuse[1].running_mean)

    forced_off = make_config(CEConfig, iters=1, sync_bn=False)
    plain = Segmenter(4, encoder="test_resnet", pretrained=False)
    assert maybe_sync_bn(plain, forced_off, DistInfo(0, 2, 0), torch.device("cuda")) is plain


def test_sync_bn_true_on_cpu_is_a_one_line_note_and_plain_batch_norm(tmp_path, capsys):
    cfg = make_config(CEConfig, iters=1, out=str(tmp_path / "run"), sync_bn=True, **TINY)
    trainer = Trainer(cfg, CrossEntropy, progress=False)
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if "sync_bn" in line]
    assert notes == [D.SYNC_BN_CPU_NOTE], err
    assert "does not apply on CPU" in notes[0]
    assert trainer.cfg.sync_bn is False
    kinds = set(batch_norms(trainer.model))
    assert kinds == {nn.BatchNorm2d}, kinds

    auto = Trainer(make_config(CEConfig, iters=1, out=str(tmp_path / "auto"), **TINY), CrossEntropy, progress=False)
    assert "sync_bn" not in capsys.readouterr().err  # auto is simply off
    assert auto.cfg.sync_bn is False and set(batch_norms(auto.model)) == {nn.BatchNorm2d}


# ------------------------------------------------------------------------------------------------
# num_workers
@pytest.mark.parametrize("cpus, local_world, expected", [
    (1, 1, 1), (2, 1, 2), (4, 1, 4), (9, 1, 8), (64, 1, 8), (16, 2, 8), (16, 8, 2), (16, 32, 1), (64, 4, 8), (12, 4, 3),
])
def test_num_workers_rule(cpus, local_world, expected):
    assert default_num_workers(cpus, local_world) == expected


def test_training_workers_run_at_the_lowest_priority(tmp_path):
    """The training loader's workers yield the cores to the step (nice 19); the loader's data
    does not depend on it."""

    from ctxseg.engine.loader import TrainBatchSampler, train_loader

    class Niceness(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, key):
            return torch.tensor([os.nice(0), key[0]])

    base = os.nice(0)
    loader = train_loader(Niceness(), TrainBatchSampler(4, 2, seed=0), num_workers=1, pin_memory=False)
    rows = torch.cat(list(loader))
    assert rows[:, 0].tolist() == [min(19, base + 19)] * 4
    assert sorted(rows[:, 1].tolist()) == [0, 1, 2, 3]
    assert os.nice(0) == base  # the training process itself keeps its priority


def test_config_resolves_num_workers_from_the_cpus_of_each_local_process(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(12)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert resolve_config(make_config(CEConfig, iters=1)).num_workers == 8  # 12 cores, at most 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun, 2 processes on this machine
    assert resolve_config(make_config(CEConfig, iters=1)).num_workers == 6
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "5")
    assert resolve_config(make_config(CEConfig, iters=1)).num_workers == 2  # 12 // 5
    for explicit in (0, 3):  # an explicit count is kept, 0 included
        assert resolve_config(make_config(CEConfig, iters=1, num_workers=explicit)).num_workers == explicit
    with pytest.raises(ValueError, match="num_workers must be >= 0"):
        make_config(CEConfig, iters=1, num_workers=-1).validate()
    resolved = resolve_config(make_config(CEConfig, iters=1))
    assert to_plain(resolve_config(resolved)) == to_plain(resolved)  # what training stores resolves to itself


# ------------------------------------------------------------------------------------------------
# tensorboard, and the resolved values in config.yaml
def hide_tensorboard_and_run(args):
    """``python -m ctxseg ARGS`` in a subprocess in which ``import tensorboard`` fails."""
    code = ("import sys; sys.modules['tensorboard'] = None; from ctxseg.cli import main; "
            f"sys.exit(main({args!r}))")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def test_tensorboard_without_the_package_is_a_one_line_error_before_training(tmp_path):
    out = tmp_path / "run"
    res = hide_tensorboard_and_run(["train", *TINY_TRAIN, "--iters", "2", "--out", str(out), "--no-progress",
                                    "--set", "num_workers=0", "--set", "tensorboard=true"])
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: tensorboard=true needs the tensorboard package"), res.stderr
    assert "pip install 'ctxseg[tensorboard]'" in lines[0]
    assert not out.exists()  # nothing trained, no run folder


def test_config_yaml_holds_the_resolved_values(tmp_path, monkeypatch, capsys):
    """What a run stores is the resolved config, each automatic value as this machine resolved it
    (by hand below: 12 cores, no torchrun, a CPU, timm's test encoder), no tensorboard needed."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(12)), raising=False)
    for var in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    out = tmp_path / "run"
    cfg = make_config(CEConfig, iters=1, out=str(out), **{**TINY, "num_workers": None}, sync_bn=True)
    assert (cfg.num_workers, cfg.sync_bn, cfg.gather_contrast, cfg.pretrained, cfg.norm_mean) == (None, True, None,
                                                                                                   None, None)
    trainer = Trainer(cfg, CrossEntropy, progress=False)
    assert "sync_bn=true does not apply on CPU" in capsys.readouterr().err
    trainer._start_run_folder()  # what fit() writes first
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["num_workers"] == 8  # min(8, 12 cores // 1 process)
    assert saved["sync_bn"] is False  # asked, but never on a CPU
    assert saved["gather_contrast"] is False  # one process
    assert saved["pretrained"] is False  # test_resnet's weights do not ship with ctxseg
    assert saved["norm_mean"] == [0.485, 0.456, 0.406] and saved["norm_std"] == [0.229, 0.224, 0.225]  # ImageNet's
    assert saved["crop"] == [32, 32] and saved["method"] == "ce" and saved["out"] == str(out)
    assert saved == to_plain(trainer.cfg)


@pytest.mark.slow
def test_config_yaml_holds_the_resolved_values_and_tensorboard_the_metrics(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install 'ctxseg[tensorboard]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    cfg = make_config(CEConfig, iters=4, eval_every=2, ckpt_every=2, out=str(out), tensorboard=True,
                      **{**TINY, "num_workers": None})
    Trainer(cfg, CrossEntropy, progress=False).fit()
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["num_workers"] == default_num_workers() and saved["sync_bn"] is False
    # Resumed from step 2: the events of steps 3 and 4 are written again, and each step shows once.
    Trainer(cfg, CrossEntropy, resume=str(out / "ckpt" / "step_00000002.pt"), progress=False).fit()

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows, eval_rows = [r for r in rows if "loss" in r], [r for r in rows if "miou" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4] and [r["step"] for r in eval_rows] == [2, 4]
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    tags = set(events.Tags()["scalars"])

    def numeric(row):
        return [k for k, v in row.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)]

    expected = {f"train/{k}" for r in train_rows for k in numeric(r)}
    expected |= {f"val/{k}" for r in eval_rows for k in numeric(r)}
    assert {"train/loss", "train/lr", "val/miou", "val/boundary_iou"} <= expected
    assert tags == expected, tags ^ expected
    for prefix, kind_rows, key in (("train", train_rows, "loss"), ("val", eval_rows, "miou")):
        scalars = events.Scalars(f"{prefix}/{key}")
        assert [s.step for s in scalars] == [r["step"] for r in kind_rows]
        assert [s.value for s in scalars] == pytest.approx([r[key] for r in kind_rows], rel=1e-6)


def test_run_folders_made_with_another_worker_count_or_tensorboard_are_reused(tmp_path, monkeypatch):
    from ctxseg.runs import settings_diff as config_diff

    monkeypatch.delenv("WORLD_SIZE", raising=False)

    asked = make_config(CEConfig, iters=4, out=str(tmp_path / "run"), device="cpu")  # num_workers None: auto
    saved = to_plain(resolve_config(asked))
    assert config_diff(saved, asked) == []
    # A folder from before the automatic count (num_workers: 2), or written with TensorBoard on.
    assert config_diff({**saved, "num_workers": default_num_workers() + 1, "tensorboard": True}, asked) == []
    # sync_bn changes what is computed: a folder trained with it (on one GPU, forced) is another run.
    on_gpu = make_config(CEConfig, iters=4, out=str(tmp_path / "run"), device="cuda")
    assert config_diff({**to_plain(resolve_config(on_gpu)), "sync_bn": True}, on_gpu) == [("sync_bn", True, False)]


# ------------------------------------------------------------------------------------------------
# cpu_amp
def test_cpu_amp_runs_the_network_in_bf16_and_the_loss_in_float32(tmp_path, monkeypatch):
    """With cpu_amp on a CPU with native bf16 the forward pass runs under bf16 autocast (the
    logits the method reads are bf16), the loss stays float32 and the weights float32."""
    from ctxseg.engine import trainer as T

    monkeypatch.setattr(T, "cpu_has_native_bf16", lambda: True)
    seen = {}

    class Spy(CrossEntropy):
        def forward(self, out, batch, step):
            seen["logits"] = out["logits"].dtype
            loss, terms = super().forward(out, batch, step)
            seen["loss"] = loss.dtype
            return loss, terms

    cfg = make_config(CEConfig, iters=2, out=str(tmp_path / "amp"), cpu_amp=True, **TINY)
    trainer = Trainer(cfg, Spy, progress=False)
    assert trainer.amp_dtype == torch.bfloat16
    trainer.fit()
    assert seen == {"logits": torch.bfloat16, "loss": torch.float32}
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())

    off = Trainer(make_config(CEConfig, iters=1, out=str(tmp_path / "off"), **TINY), Spy, progress=False)
    assert off.amp_dtype is None  # the default: float32


def test_cpu_amp_trains_as_float32_does_up_to_bf16_rounding(tmp_path):
    """The AMP path for real (no stand-in for the CPU check): two runs from the same weights on the
    same batches, one with cpu_amp. The bf16 forward pass changes the losses by bf16's rounding
    (about 1 %), not more, and not by nothing; SGD's updates follow those of float32."""
    from ctxseg.engine.trainer import cpu_has_native_bf16

    if not cpu_has_native_bf16():
        pytest.skip("this CPU computes no bf16 natively (AVX512-BF16 or AMX): cpu_amp trains in float32 here")
    runs = {}
    for name, amp in (("float32", False), ("bf16", True)):
        cfg = make_config(CEConfig, iters=3, out=str(tmp_path / name), cpu_amp=amp, optimizer="sgd", lr=0.05, **TINY)
        trainer = Trainer(cfg, CrossEntropy, progress=False)
        assert trainer.amp_dtype == (torch.bfloat16 if amp else None)
        init = {k: v.clone() for k, v in trainer.model.state_dict().items() if v.is_floating_point()}
        trainer.fit()
        losses = [json.loads(r)["loss"] for r in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
                  if '"loss"' in r]
        moved = {k: trainer.model.state_dict()[k] - v for k, v in init.items()}
        assert all(v.dtype == torch.float32 for v in trainer.model.state_dict().values() if v.is_floating_point())
        runs[name] = init, losses, moved
    (init32, loss32, moved32), (init16, loss16, moved16) = runs["float32"], runs["bf16"]
    assert all(torch.equal(init32[k], init16[k]) for k in init32)  # the same start
    assert len(loss32) == len(loss16) == 3
    assert loss16 != loss32 and loss16 == pytest.approx(loss32, rel=3e-2)
    step32 = torch.cat([v.flatten() for v in moved32.values()])
    step16 = torch.cat([v.flatten() for v in moved16.values()])
    assert step32.norm() > 0 and (step16 - step32).norm() < 0.2 * step32.norm()


def test_cpu_amp_without_native_bf16_says_so_and_trains_in_float32(tmp_path, monkeypatch, capsys):
    from ctxseg.engine import trainer as T

    monkeypatch.setattr(T, "cpu_has_native_bf16", lambda: False)
    trainer = Trainer(make_config(CEConfig, iters=1, out=str(tmp_path / "r"), cpu_amp=True, **TINY), CrossEntropy,
                      progress=False)
    assert trainer.amp_dtype is None
    assert "cpu_amp=true needs a CPU with native bf16" in capsys.readouterr().err
