"""Evaluation: full-resolution predictions -> confusion matrix and boundary IoU, all-reduced
across ranks; building a config's model and exporting its deployable weights. Opening a trained
run (config, method, model, weights) is ``ctxseg.runs.open_run``, above the engine."""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ctxseg.config import TrainConfig, to_plain
from ctxseg.data import build_dataset, eval_transform
from ctxseg.data.base import DatasetInfo
from ctxseg.engine.metrics import SegMetrics
from ctxseg.models.segmenter import Segmenter, class_argmax


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
        channels_last=cfg.channels_last,
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
        metrics.update(class_argmax(logits), mask)
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
