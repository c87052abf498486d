"""The one segmenter every method shares: a timm encoder, a light FPN decoder, a 1x1 classifier.

``forward`` returns a dict so that methods add what they need without touching the model:

- ``logits``: (B, C, H/4, W/4) class scores at the decoder stride (upsample for full resolution);
- ``features``: (B, D, H/4, W/4) the decoder feature map (what pixel contrast projects);
- ``stages``: the encoder's four feature maps at strides 4, 8, 16, 32 (what Contextrast projects);
- one entry per training-only head (``heads``), each computed from the dict above.

Training-only heads live in ``self.heads``; ``drop_heads()`` (or ``deploy_state_dict()``) removes
them, so the deployed model of every method costs exactly what the cross-entropy baseline costs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import timm
import torch
import torch.nn.functional as F
from torch import nn

# Strides of the four stages the decoder and the contrastive methods use.
STAGE_STRIDES = (4, 8, 16, 32)


class Head(nn.Module):
    """A training-only head: reads the segmenter's output dict, returns new entries for it."""

    def forward(self, out: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError


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

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x = self.lateral[-1](feats[-1])
        levels = [self.smooth[-1](x)]
        for i in range(len(feats) - 2, -1, -1):
            x = self.lateral[i](feats[i]) + F.interpolate(
                x, size=feats[i].shape[-2:], mode="bilinear", align_corners=False
            )
            levels.append(self.smooth[i](x))
        size = feats[0].shape[-2:]
        y = sum(F.interpolate(l, size=size, mode="bilinear", align_corners=False) for l in levels[:-1])
        return self.fuse(y + levels[-1])


class Segmenter(nn.Module):
    """timm encoder + FPN decoder + classifier, with optional training-only heads.

    Args:
        num_classes: number of output classes.
        encoder: any timm model name that supports ``features_only=True``.
        pretrained: load timm's pretrained weights (needs network access; default False).
        decoder_channels: width D of the decoder feature map.
        heads: training-only heads, name -> Head (or a callable taking the Segmenter and
            returning the heads, so a head can read ``stage_channels`` / ``decoder_channels``).
        in_chans: image channels.
    """

    def __init__(
        self,
        num_classes: int,
        encoder: str = "resnet18",
        pretrained: bool = False,
        decoder_channels: int = 128,
        heads: Mapping[str, nn.Module] | Callable[[Segmenter], Mapping[str, nn.Module]] | None = None,
        in_chans: int = 3,
    ):
        super().__init__()
        self.encoder_name = encoder
        self.encoder = timm.create_model(
            encoder, features_only=True, pretrained=pretrained, in_chans=in_chans
        )
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

    def _stages(self, x: torch.Tensor) -> list[torch.Tensor]:
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
        features = self.decoder(stages)
        out: dict = {"logits": self.classifier(features), "features": features, "stages": stages}
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
