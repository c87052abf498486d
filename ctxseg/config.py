"""Run configuration: one dataclass per method, all extending ``TrainConfig``.

Values are resolved in this order, later wins: dataclass defaults, the dataset's defaults
(``DATASET_DEFAULTS``), a YAML file (``--config``), explicit command-line flags, ``--set KEY=VALUE``.
The resolved config is written to the run folder as ``config.yaml`` and stored, as plain types, in
every checkpoint so a model can be rebuilt from the checkpoint alone.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import yaml


@dataclass
class TrainConfig:
    """Options shared by every method (the method's own dataclass adds its fields).

    Attributes:
        method: method name (``ce``, ...); set by the CLI.
        data: dataset name: synthetic | camvid | cityscapes | ade20k | voc | folder (your own data,
            ``ctxseg.data.folder``).
        data_root: dataset folder (default ``data/<name>``; unused for synthetic; required for folder).
        encoder: timm encoder name (``features_only=True`` must give strides 4..32).
        pretrained: encoder weights: ``true`` (ImageNet: packaged with ctxseg for the
            EfficientNet-Lite encoders, so offline; timm's hub for the others), ``false`` (from
            scratch), a path to a local ``.pth``/``.pt``/``.safetensors`` timm state dict, or None
            (auto, the default): ImageNet weights when they ship with ctxseg
            (``tf_efficientnet_lite0``, ...), else from scratch, so no default ever needs a network.
        norm_mean, norm_std: the input normalisation the encoder expects (RGB, [0, 1] units);
            None: from the weights' pretrained config (``input_normalization``; ImageNet's for a
            from-scratch encoder). Training stores the resolved values in config.yaml and every
            checkpoint, and the model applies them, so eval, export and viz normalise as training.
        encoder_lr_mult: the encoder's learning rate as a multiple of ``lr`` (the decoder, the
            classifier and the training-only heads use ``lr``); fine-tuning recipes use < 1.
        freeze_encoder_bn: keep the encoder's BatchNorm statistics frozen (affine still trained).
        decoder_channels: width of the FPN decoder.
        epochs: training length in epochs (used when ``iters`` is not set).
        iters: training length in optimizer steps (wins over ``epochs``).
        crop: training crop (H, W); None: the dataset's default (``DATASET_DEFAULTS``).
        batch_size: global batch size, split evenly across torchrun processes.
        batch_sampler: ``random`` (shuffled batches) or ``class_aware`` (images in a batch share
            classes, by runs of ``class_group_size`` images with a common tag; see
            ``ClassAwareBatchSampler``), what contrast between images of one class needs.
        class_group_size: images per run sharing a class, for ``class_aware`` batches.
        seed: seeds the model init, the data order and every augmentation.
        out: run folder (default ``runs/<method>-<data>-s<seed>``).
        ckpt_every: write a checkpoint every N steps (and always at the end).
        keep_ckpts: how many step checkpoints to keep (older ones are deleted).
        optimizer: ``sgd`` (momentum, poly LR: the recipe users know) or ``adamw``.
        lr, momentum, weight_decay, poly_power: optimizer and poly schedule settings.
        warmup_iters: linear learning-rate warm-up steps before the poly decay.
        amp: mixed precision on CUDA (bf16 where supported, else fp16 with a GradScaler).
        cpu_amp: bf16 autocast for the network on a CPU with native bf16 (AVX512-BF16 or AMX;
            elsewhere a note and float32); the losses still compute in float32. Off by default: on
            the synthetic default it was no faster than float32 with channels_last (README, Speed).
        channels_last: run the model in the NHWC memory layout (``Segmenter``): training, evaluation,
            CAMs, embeddings and plots alike. The same model and, up to float rounding, the same
            numbers; a CE training step of the default segmenter at 180x240 on 2 CPU cores took 507
            ms against 684 ms in NCHW (README, Speed). false: PyTorch's default NCHW layout. A runtime setting: a run trained in one
            layout is reused, resumed and evaluated in the other.
        deterministic: ask cuDNN / CUDA for deterministic kernels (CPU runs are deterministic).
        num_workers: DataLoader worker processes per process; None (auto, the default): the CPU
            cores this process may use (its affinity mask) divided by the processes torchrun starts
            on this machine, less one for the process itself, at least 1 and at most 8
            (``default_num_workers``); 0 loads in the main process. The data does not depend on it.
        sync_bn: normalise with the statistics of the global batch under torchrun (SyncBatchNorm:
            each BN layer exchanges its batch statistics with the other processes in every training
            step, forward and backward); None (auto, the default): on for several processes on
            CUDA; true / false force it. Never on CPU, where PyTorch's SyncBatchNorm refuses the
            tensors: an explicit true prints a note there.
        gather_contrast: contrast over the global batch under torchrun: each method gathers, with
            the gradient, what it contrasts over (Contextrast's per-class sums, counts and loss
            sums; pixel contrast's in-batch anchors; DSCNet's PGCL centres and SGCL nodes), so the
            contrastive term equals that of one process given the whole batch. None (auto, the
            default): on with several processes; false: each process contrasts its own share.
        tensorboard: also write every numeric value of metrics.jsonl to ``<run>/tensorboard/``
            (``train/<key>`` and ``<eval_split>/<key>`` tags; needs ``pip install 'ctxseg[tensorboard]'``).
        log_every: append a training row to metrics.jsonl every N steps.
        eval_every: evaluate on ``eval_split`` every N steps (0: only at the end).
        eval_split: split used for evaluation during and after training.
        eval_batch_size: batch size of evaluation (1 for datasets whose image sizes vary).
        scale_range, hflip, color_jitter: training augmentation.
        boundary_px: boundary-IoU tolerance in pixels.
        synthetic_size: (H, W) of generated synthetic images.
        synthetic_train_len: number of synthetic training images.
        device: ``auto`` (CUDA if available, else CPU), ``cpu``, ``cuda``, ``cuda:1``, ...
    """

    # A method's own per-dataset defaults, applied over ``DATASET_DEFAULTS`` (not a setting).
    dataset_defaults: ClassVar[dict[str, dict[str, Any]]] = {}
    # Settings that change how a run executes, never what it computes (the data order and every
    # augmentation do not depend on the worker count; a resumed run ends bit-identical, so where
    # the checkpoints fall does not matter either): a run folder made with other values of these
    # is still the same run.
    runtime_keys: ClassVar[tuple[str, ...]] = (
        "num_workers", "tensorboard", "ckpt_every", "keep_ckpts", "channels_last",
    )

    method: str = "ce"
    data: str = "synthetic"
    data_root: str | None = None
    encoder: str = "tf_efficientnet_lite0"
    pretrained: bool | str | None = None
    norm_mean: tuple[float, float, float] | None = None
    norm_std: tuple[float, float, float] | None = None
    encoder_lr_mult: float = 1.0
    freeze_encoder_bn: bool = False
    decoder_channels: int = 128
    epochs: int | None = None
    iters: int | None = None
    crop: tuple[int, int] | None = None
    batch_size: int = 8
    batch_sampler: str = "random"
    class_group_size: int = 2
    seed: int = 0
    out: str | None = None
    ckpt_every: int = 500
    keep_ckpts: int = 2
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    poly_power: float = 0.9
    warmup_iters: int = 0
    amp: bool = True
    cpu_amp: bool = False
    channels_last: bool = True
    deterministic: bool = False
    num_workers: int | None = None
    sync_bn: bool | None = None
    gather_contrast: bool | None = None
    tensorboard: bool = False
    log_every: int = 10
    eval_every: int = 0
    eval_split: str = "val"
    eval_batch_size: int = 4
    scale_range: tuple[float, float] = (0.5, 2.0)
    hflip: bool = True
    color_jitter: float = 0.2
    boundary_px: int = 3
    synthetic_size: tuple[int, int] = (128, 128)
    synthetic_train_len: int = 2000
    device: str = "auto"

    @property
    def crop_size(self) -> tuple[int, int]:
        """The training crop: ``crop``, or the dataset's default when it is None."""
        return tuple(self.crop) if self.crop is not None else DATASET_DEFAULTS[self.data]["crop"]

    def validate(self) -> TrainConfig:
        """Raise a ValueError naming the setting when a value cannot work."""
        if self.iters is None and self.epochs is None:
            raise ValueError("set the training length: --iters N or --epochs N")
        for name in ("iters", "epochs"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ValueError(f"{name} must be positive, got {v}")
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.batch_sampler not in ("random", "class_aware"):
            raise ValueError(f"batch_sampler must be 'random' or 'class_aware', got {self.batch_sampler!r}")
        if self.class_group_size < 1:
            raise ValueError(f"class_group_size must be >= 1, got {self.class_group_size}")
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        if self.crop is not None and (len(self.crop) != 2 or min(self.crop) <= 0):
            raise ValueError(f"crop must be two positive ints H W, got {self.crop}")
        if self.ckpt_every <= 0 or self.keep_ckpts <= 0:
            raise ValueError("ckpt_every and keep_ckpts must be positive")
        if self.encoder_lr_mult < 0:
            raise ValueError(f"encoder_lr_mult must be >= 0, got {self.encoder_lr_mult}")
        if self.num_workers is not None and self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0 (or null for the automatic count), got {self.num_workers}")
        if isinstance(self.pretrained, str) and not self.pretrained.strip():
            raise ValueError("pretrained must be true, false or a path to a weights file, got an empty string")
        return self


# Per-dataset defaults, applied before the YAML file and the command line. The real datasets use
# the recipe users know (SGD, poly LR); the synthetic scenes are for quick CPU runs, where AdamW
# learns the small classes (birds, persons) within a few hundred steps and SGD does not. The
# default encoder (``TrainConfig.encoder``) is the same for all: ImageNet-pretrained
# tf_efficientnet_lite0, whose weights ship with ctxseg (README, Results, measures the difference).
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "synthetic": {
        "iters": 600,
        "crop": (128, 128),
        "optimizer": "adamw",
        "lr": 1e-3,
        "weight_decay": 1e-4,
        "scale_range": (0.75, 1.5),
        "eval_batch_size": 16,  # one image size: larger batches evaluate ~25 % faster on a CPU
    },
    "camvid": {"crop": (360, 480)},
    "cityscapes": {"crop": (512, 1024)},
    "ade20k": {"crop": (512, 512), "eval_batch_size": 1},
    "voc": {"crop": (320, 320), "eval_batch_size": 1},  # image sizes vary (about 500x375)
    "folder": {"crop": (320, 320), "eval_batch_size": 1},  # a user's own images, of any sizes
}


def make_config(cls: type[TrainConfig], data: str = "synthetic", **overrides) -> TrainConfig:
    """A config of class ``cls`` for dataset ``data``: field defaults, then the dataset's
    defaults (a method's own ``dataset_defaults`` over ``DATASET_DEFAULTS``), then ``overrides``
    (the resolution the CLI uses, for notebooks and scripts)."""
    defaults = {**DATASET_DEFAULTS.get(data, {}), **cls.dataset_defaults.get(data, {})}
    cfg = apply_overrides(cls(data=data), defaults, f"dataset defaults for {data}")
    return apply_overrides(cfg, overrides, "make_config")


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert a YAML-parsed value to the annotated field type, or explain what was expected."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for i, a in enumerate(inner):
            try:
                return _coerce(key, value, a)
            except ValueError:
                if i == len(inner) - 1:
                    raise
    try:
        if origin is tuple:
            if isinstance(value, str):
                value = value.replace(",", " ").split()
            if not isinstance(value, (list, tuple)):
                raise TypeError
            if len(args) == 2 and args[1] is Ellipsis:  # tuple[int, ...]: any length
                args = (args[0],) * len(value)
            if len(value) != len(args):
                raise TypeError
            return tuple(_coerce(key, v, a) for v, a in zip(value, args))
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            if value in (0, 1):
                return bool(value)
            raise TypeError
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if tp is str:
            return str(value)
    except (TypeError, ValueError):
        pass
    else:
        return value
    expected = getattr(tp, "__name__", str(tp))
    raise ValueError(f"setting {key!r}: expected {expected}, got {value!r}")


def apply_overrides(cfg: TrainConfig, overrides: dict[str, Any], source: str) -> TrainConfig:
    """Return a copy of ``cfg`` with ``overrides`` applied; unknown keys are an error that lists
    the valid ones (``source`` says where they came from, e.g. the YAML path or ``--set``)."""
    types_ = _field_types(type(cfg))
    unknown = sorted(set(overrides) - set(types_))
    if unknown:
        raise ValueError(
            f"unknown setting(s) {unknown} in {source} for {type(cfg).__name__}; valid keys: "
            + ", ".join(sorted(types_))
        )
    return dataclasses.replace(cfg, **{k: _coerce(k, v, types_[k]) for k, v in overrides.items()})


def parse_set(items: list[str]) -> dict[str, Any]:
    """Parse ``KEY=VALUE`` strings; values are read as YAML (``0.1``, ``true``, ``[360, 480]``)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            raise ValueError(f"--set {item!r}: the value is not valid YAML (e.g. 0.1, true, [360, 480])") from None
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping of settings, naming the file when it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of settings, got {type(data).__name__}")
    return data


def to_plain(cfg: TrainConfig) -> dict[str, Any]:
    """The config as plain Python types (tuples become lists) for YAML, JSON and checkpoints."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def from_plain(cls, data: dict[str, Any]) -> TrainConfig:
    """Rebuild a config from ``to_plain`` output, ignoring keys a newer/older version lacks."""
    known = {f.name for f in fields(cls)}
    return apply_overrides(cls(), {k: v for k, v in data.items() if k in known}, "checkpoint")
