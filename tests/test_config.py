
import pytest

from ctxseg.cli import build_parser, resolve_train_config
from ctxseg.config import TrainConfig, apply_overrides, from_plain, parse_set, to_plain
from ctxseg.methods.ce import CEConfig


def resolve(argv):
    return resolve_train_config(build_parser().parse_args(["train", *argv]))


def test_set_overrides_any_field_with_its_type():
    cfg = resolve(["--set", "warmup_iters=0", "--set", "lr=0.02", "--set", "crop=[64, 96]", "--set", "amp=false"])
    assert cfg.warmup_iters == 0 and cfg.lr == 0.02 and cfg.crop == (64, 96) and cfg.amp is False


def test_unknown_key_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown setting.*'bogus'.*valid keys:.*warmup_iters"):
        resolve(["--set", "bogus=1"])


def test_wrong_type_names_the_setting():
    with pytest.raises(ValueError, match="'batch_size': expected int"):
        resolve(["--set", "batch_size=abc"])
    with pytest.raises(ValueError, match="--set expects KEY=VALUE"):
        parse_set(["lr"])


def test_precedence_defaults_dataset_yaml_flags_set(tmp_path):
    yml = tmp_path / "c.yaml"
    yml.write_text("data: camvid\nlr: 0.05\nbatch_size: 4\niters: 100\nseed: 3\n")
    cfg = resolve(["--config", str(yml), "--batch-size", "6", "--set", "seed=9"])
    assert cfg.crop == (360, 480)  # dataset default for camvid
    assert cfg.lr == 0.05 and cfg.iters == 100  # from YAML
    assert cfg.batch_size == 6  # flag beats YAML
    assert cfg.seed == 9  # --set beats everything
    cfg = resolve(["--config", str(yml), "--epochs", "2"])
    assert cfg.epochs == 2 and cfg.iters is None  # a length flag replaces YAML's length


def test_bad_yaml_names_the_file(tmp_path):
    yml = tmp_path / "bad.yaml"
    yml.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="bad.yaml"):
        resolve(["--config", str(yml)])
    with pytest.raises(ValueError, match="not found"):
        resolve(["--config", str(tmp_path / "missing.yaml")])


def test_plain_round_trip_is_lossless():
    cfg = CEConfig(iters=7, crop=(32, 48), aux_weight=0.4, data_root=None)
    plain = to_plain(cfg)
    assert all(isinstance(v, (int, float, str, bool, list, type(None))) for v in plain.values())
    assert from_plain(CEConfig, plain) == cfg


def test_validate_explains_missing_length():
    with pytest.raises(ValueError, match="--iters N or --epochs N"):
        TrainConfig().validate()
    assert resolve([]).iters == 600  # the synthetic default trains without any flag
    assert resolve(["--epochs", "3"]).iters is None
    with pytest.raises(ValueError, match="optimizer"):
        apply_overrides(TrainConfig(iters=1), {"optimizer": "lamb"}, "test").validate()


def test_cli_reports_config_errors_without_traceback(capsys):
    from ctxseg.cli import main

    assert main(["train", "--set", "nope=1"]) == 2
    assert "unknown setting" in capsys.readouterr().err


def test_make_config_resolves_like_the_cli():
    from ctxseg.config import make_config

    py = make_config(CEConfig, "synthetic", iters=5, seed=2)
    cli = resolve(["--iters", "5", "--seed", "2"])
    assert py == cli
    assert py.optimizer == "adamw" and py.crop == (128, 128)  # the synthetic recipe
    camvid = make_config(CEConfig, "camvid", iters=5)
    assert camvid.optimizer == "sgd" and camvid.crop == (360, 480)
