"""Evaluation: full-resolution predictions -> confusion matrix and boundary IoU, all-reduced
across ranks; and loading a trained model (checkpoint, safetensors file or run folder) for it."""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ctxseg.config import TrainConfig, apply_overrides, from_plain, to_plain
from ctxseg.data import build_dataset, eval_transform
from ctxseg.data.base import DatasetInfo
from ctxseg.engine.checkpoint import CheckpointError, list_checkpoints, load_checkpoint
from ctxseg.engine.metrics import SegMetrics
from ctxseg.models.pretrained import IMAGENET_MEAN, IMAGENET_STD
from ctxseg.models.segmenter import Segmenter


def build_model(cfg: TrainConfig, num_classes: int, heads=None, load_pretrained: bool = True) -> Segmenter:
    """The segmenter a config describes (heads: training-only heads, or None to deploy).
    ``load_pretrained=False`` skips reading the encoder's starting weights (a trained model's are
    loaded next anyway, and that must not need the hub or the original weights file)."""
    cfg = cfg.resolved()
    return Segmenter(
        num_classes,
        encoder=cfg.encoder,
        pretrained=cfg.pretrained if load_pretrained else False,
        decoder_channels=cfg.decoder_channels,
        heads=heads,
        norm=(cfg.norm_mean, cfg.norm_std),
        freeze_encoder_bn=cfg.freeze_encoder_bn,
    )


def eval_dataset(cfg: TrainConfig, split: str, data: str | None = None, root: str | None = None):
    """The evaluation set for a run's config (its dataset, root and synthetic size), optionally
    on another dataset/root with the same classes."""
    data = data or cfg.data
    kw = {"size": tuple(cfg.synthetic_size)} if data == "synthetic" else {}
    if data == "synthetic" and split == "train":
        kw["length"] = cfg.synthetic_train_len  # the images the run trained on
    root = root or (cfg.data_root if data == cfg.data else None)
    return build_dataset(data, split, root, eval_transform(), **kw)


@torch.no_grad()
def evaluate(
    model: Segmenter,
    loader,
    info: DatasetInfo,
    device: torch.device,
    boundary_px: int = 3,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> dict:
    """mIoU, pixel accuracy, boundary IoU and per-class IoU of ``model`` over ``loader``.

    Predictions are made at the image's resolution and compared with labels at theirs (the
    logits are upsampled to the label size), so numbers are those of the native label maps."""
    was_training = model.training
    model.eval()
    metrics = SegMetrics(info.num_classes, boundary_px=boundary_px, class_names=info.class_names, device=device)
    amp = (
        torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    )
    n_images = 0
    for batch in tqdm(loader, desc="eval", leave=False, disable=not progress):
        image = batch["image"].to(device, non_blocking=True)
        mask = batch["mask"].to(device, non_blocking=True)
        with amp:
            logits = model(image, with_heads=False)["logits"]
        logits = torch.nn.functional.interpolate(
            logits.float(), size=mask.shape[-2:], mode="bilinear", align_corners=False
        )
        metrics.update(logits.argmax(1), mask)
        n_images += image.shape[0]
    metrics.all_reduce()
    model.train(was_training)
    result = metrics.compute()
    counted = torch.tensor(n_images, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(counted)
    result["num_images"] = int(counted)
    return result


def export_safetensors(model: Segmenter, cfg: TrainConfig, class_names, path: str | Path, step: int) -> Path:
    """Deployable weights (training-only heads dropped) with the config in the file's metadata."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    meta = {
        "config": json.dumps(to_plain(cfg)),
        "class_names": json.dumps(list(class_names)),
        "step": str(step),
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.deploy_state_dict().items()}
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def trained_config(plain: dict) -> TrainConfig:
    """The config of a trained model from its stored plain form (checkpoint or export metadata)."""
    from ctxseg.methods import get_method

    cfg = from_plain(get_method(plain.get("method", "ce")).config_class, plain)
    if cfg.norm_mean is None or cfg.norm_std is None:
        # Runs from before the setting existed were all normalised with ImageNet's statistics.
        cfg = apply_overrides(cfg, {"norm_mean": IMAGENET_MEAN, "norm_std": IMAGENET_STD}, "checkpoint")
    if cfg.pretrained is None:
        cfg = apply_overrides(cfg, {"pretrained": False}, "checkpoint")  # its weights are loaded next
    return cfg


def load_trained(path: str | Path, device: torch.device | str = "cpu"):
    """Load a deployable Segmenter from a ``.pt`` checkpoint, a ``.safetensors`` export, or a run
    folder (its model.safetensors, else its newest checkpoint).

    Returns:
        (model in eval mode, resolved config, metadata dict with ``class_names`` and ``step``).
    """
    path = Path(path)
    if path.is_dir():
        exported = path / "model.safetensors"
        ckpts = list_checkpoints(path / "ckpt")
        if exported.is_file():
            path = exported
        elif ckpts:
            path = ckpts[-1]
        else:
            raise CheckpointError(f"{path} holds neither model.safetensors nor ckpt/step_*.pt")
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise CheckpointError(f"model file not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            weights = load_file(str(path))
            plain = json.loads(meta["config"])
            class_names = json.loads(meta["class_names"])
        except Exception as e:  # noqa: BLE001 - safetensors and json raise many types
            raise CheckpointError(f"{path} is not a readable ctxseg safetensors export ({e})") from None
        step = int(meta.get("step", -1))
    else:
        state = load_checkpoint(path)
        plain, weights = state["config"], state["model"]
        class_names, step = state["class_names"], state["step"]
    cfg = trained_config(plain)
    model = build_model(cfg, len(class_names), load_pretrained=False)
    weights = {k: v for k, v in weights.items() if not k.startswith("heads.")}
    model.load_state_dict(weights, strict=True)
    model.to(device).eval()
    return model, cfg, {"class_names": class_names, "step": step, "path": str(path)}
