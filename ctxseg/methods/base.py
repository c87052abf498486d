"""What a method is: a config dataclass, the training-only heads it adds to the segmenter, and a
loss over the segmenter's output dict. The trainer knows nothing else about methods.

A method is an ``nn.Module`` so that state it keeps across steps (a memory bank, say) lives in
buffers and travels with checkpoints and ``--resume``; learnable training-only modules belong in
``heads`` so that they sit inside the (DDP-wrapped) model and are dropped at inference.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ctxseg.config import TrainConfig
from ctxseg.data.base import IGNORE_INDEX, DatasetInfo
from ctxseg.models.segmenter import upsample_to


class Method(nn.Module):
    """Base class. Subclasses set ``config_class`` and implement ``forward``.

    Args:
        cfg: the resolved config (an instance of ``config_class``).
        info: class metadata of the training dataset.
        total_iters: length of the run in steps, for schedules given as a fraction of the run.
    """

    config_class: type[TrainConfig] = TrainConfig
    # What the rest of ctxseg reads about a method (no module outside ctxseg/methods keeps a table
    # of method names; README, "Add a method"):
    # whether training reads label maps (False: weakly supervised, it learns from image tags);
    needs_masks: bool = True
    # whether ``ctxseg demo`` trains it when no --methods are given;
    in_demo: bool = True
    # the config fields that tell its variants apart (the "variant" column of comparison tables).
    key_settings: tuple[str, ...] = ()

    def __init__(self, cfg: TrainConfig, info: DatasetInfo, total_iters: int = 0):
        super().__init__()
        self.cfg = cfg
        self.info = info
        self.total_iters = total_iters

    @classmethod
    def embedding_feature(cls, config: Mapping) -> str:
        """The feature its loss shapes, which figures and embedding scores show by default: a name
        from ``ctxseg.viz.embeddings.feature_names`` (``"decoder"``, the map the classifier reads,
        or one a training head offers through ``embedding_features``). ``config``: the run's
        settings as config.yaml stores them."""
        return "decoder"

    def prepare(self, train_set) -> None:
        """Read what the method needs to know about the training set before its first step
        (weakly supervised methods: the tag frequencies); nothing by default."""

    def heads(self, model) -> dict[str, nn.Module]:
        """Training-only heads to add to ``model`` (a Segmenter); none by default."""
        return {}

    def forward(
        self, out: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor], step: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return (total loss, named terms to log). Terms are tensors; the trainer reads them
        only on logging steps so that a GPU run does not synchronise every step."""
        raise NotImplementedError

    def eval_metrics(self, model, device, dist, seg: dict, progress: bool = True) -> dict:
        """Metrics beyond the segmentation evaluation ``seg``, merged into it at every evaluation
        (weakly supervised methods: CAM and pseudo-label quality and classification AP on the
        training images). Called on every rank (it may all-reduce); none by default."""
        return {}

    def log_scalars(self, metrics: dict) -> dict[str, float]:
        """The numbers of ``eval_metrics``'s result that go into an evaluation's metrics.jsonl row."""
        return {}


def cross_entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Pixel cross-entropy with ignore 255 after upsampling logits to the mask, in float32.

    A batch whose pixels are all ignored gives 0 connected to the graph (not the NaN that
    ``F.cross_entropy``'s mean over zero pixels returns)."""
    logits = upsample_to(logits, mask.shape[-2:]).float()
    if not (mask != IGNORE_INDEX).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits, mask, ignore_index=IGNORE_INDEX)
