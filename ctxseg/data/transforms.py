"""Joint image + mask transforms on ``torchvision.transforms.v2`` with ``tv_tensors.Mask``.

Masks are resized with nearest-neighbour interpolation and padded with 255 (ignore) by v2 itself,
because they are typed as ``tv_tensors.Mask``; colour jitter leaves them untouched. The validity
map (``Validity``, a Mask subclass) travels with them and is padded with 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from ctxseg.data.base import IGNORE_INDEX, Validity

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class RandomScale(v2.Transform):
    """Resize image and mask by one factor drawn uniformly from ``scale_range`` (aspect kept)."""

    def __init__(self, scale_range: Sequence[float] = (0.5, 2.0)):
        super().__init__()
        lo, hi = scale_range
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must satisfy 0 < low <= high, got {tuple(scale_range)}")
        self.scale_range = (float(lo), float(hi))

    def make_params(self, flat_inputs):
        h, w = v2.query_size(flat_inputs)
        s = torch.empty(()).uniform_(*self.scale_range).item()
        return {"size": [max(1, round(h * s)), max(1, round(w * s))]}

    def transform(self, inpt, params):
        if isinstance(inpt, (tv_tensors.Image, tv_tensors.Mask)):
            return TF.resize(inpt, params["size"], antialias=True)
        return inpt


def _to_float_normalized(mean, std):
    return [
        v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
    ]


def train_transform(
    crop: Sequence[int],
    scale_range: Sequence[float] = (0.5, 2.0),
    hflip: bool = True,
    color_jitter: float = 0.2,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> v2.Compose:
    """Random scale, random crop (image padded with 0, mask with 255, validity map with 0), flip,
    colour jitter, then float conversion and normalisation. ``crop`` is (H, W)."""
    ops: list = []
    if tuple(scale_range) != (1.0, 1.0):
        ops.append(RandomScale(scale_range))
    ops.append(
        v2.RandomCrop(
            size=tuple(crop),
            pad_if_needed=True,
            fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX, Validity: 0},
        )
    )
    if hflip:
        ops.append(v2.RandomHorizontalFlip())
    if color_jitter > 0:
        j = color_jitter
        ops.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j, hue=min(j / 4, 0.5)))
    return v2.Compose(ops + _to_float_normalized(mean, std))


def eval_transform(
    size: Sequence[int] | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> v2.Compose:
    """Optional resize of the image (and its validity map) to ``size`` (H, W) (the mask keeps its
    resolution so metrics are computed at the label's resolution), then float conversion and
    normalisation."""
    ops: list = []
    if size is not None:
        ops.append(_ResizeImageOnly(size))
    return v2.Compose(ops + _to_float_normalized(mean, std))


class _ResizeImageOnly(v2.Transform):
    def __init__(self, size):
        super().__init__()
        self.size = list(size)

    def transform(self, inpt, params):
        if isinstance(inpt, (tv_tensors.Image, Validity)):
            return TF.resize(inpt, self.size, antialias=True)
        return inpt


def denormalize(image: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """Undo normalisation: (…, 3, H, W) float -> same shape in [0, 1], for display."""
    m = torch.tensor(mean, device=image.device).view(3, 1, 1)
    s = torch.tensor(std, device=image.device).view(3, 1, 1)
    return (image * s + m).clamp(0, 1)
