"""Cross-entropy baseline: the recipe users know (torchvision references, mmsegmentation).

CE with ignore 255 on the decoder's logits upsampled to the input, optionally plus an auxiliary
CE on a deeper encoder stage (an FCN head on stride 16, training only, weight ``aux_weight``).
Specification: ``docs/methods.md#cross-entropy-baseline``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ctxseg.config import TrainConfig
from ctxseg.methods.base import Method, cross_entropy
from ctxseg.models.segmenter import Head, conv_bn_relu


@dataclass
class CEConfig(TrainConfig):
    """Cross-entropy baseline.

    Attributes:
        aux_weight: weight of the auxiliary CE on the stride-16 stage (0 disables the head;
            0.4 is the usual value).
    """

    aux_weight: float = 0.0


class AuxHead(Head):
    """FCN-style auxiliary classifier on one encoder stage."""

    def __init__(self, in_channels: int, num_classes: int, stage: int = 2, width: int = 128):
        super().__init__()
        self.stage = stage
        self.net = nn.Sequential(conv_bn_relu(in_channels, width), nn.Conv2d(width, num_classes, 1))

    def forward(self, out):
        return {"aux_logits": self.net(out["stages"][self.stage])}


class CrossEntropy(Method):
    """The baseline every contrastive method is compared against."""

    config_class = CEConfig

    def heads(self, model):
        if self.cfg.aux_weight > 0:
            return {"aux": AuxHead(model.stage_channels[2], model.num_classes)}
        return {}

    def forward(self, out, batch, step):
        mask = batch["mask"]
        ce = cross_entropy(out["logits"], mask)
        terms = {"ce": ce.detach()}
        loss = ce
        if "aux_logits" in out:
            aux = cross_entropy(out["aux_logits"], mask)
            terms["aux"] = aux.detach()
            loss = loss + self.cfg.aux_weight * aux
        return loss, terms
