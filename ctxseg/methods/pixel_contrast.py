"""Cross-image pixel contrast (Wang et al., ICCV 2021), loop-free.

CE on the logits plus ``contrast_weight`` times a supervised contrastive loss over pixel
embeddings from a training-only projection head (1x1 conv, BN, ReLU, 1x1 conv to ``proj_dim``,
L2-normalised). The head returns its last conv unapplied (``ProjectionHead``): the method projects
and normalises only the anchors it contrasts (``project_rows``), so the embedding map is never
materialised or backpropagated through in training (the memory bank's keys are read from the whole
map computed without gradient). Per step:

1. Labels are put on the embedding grid by the ``label_grid`` rule (``downsample_labels``; by
   default each cell's block-centre pixel); predictions are the argmax of the logits on that grid.
2. Hard anchor sampling (``sample_anchors``), with the reference's budgets kept in meaning
   whatever the batch, the number of processes and the grid (``budget``, see below): an
   (image, class) qualifies when it covers more than ``min_class_share`` of the image's grid
   cells; image b gives ``n_view_b = min(anchors_per_image // q_b, max_views)`` anchors to each
   of its q_b qualifying classes (fewer where the class has fewer cells), half predicted wrongly
   ("hard"), half right ("easy"), one group filling in when the other is short.
3. The loss (``contrast_loss``): for anchor i with positives P(i) and negatives N(i),
   ``L_i = (T / T_base) * mean_{j in P(i)} log(1 + sum_{k in N(i)} exp(s_ik - s_ij))``, i.e.
   ``-(T/T_base) * mean_j [s_ij - log(exp(s_ij) + sum_k exp(s_ik))]`` with ``s = f.f' / T``. Without
   memory the anchors contrast with each other; with ``memory=True`` they contrast with a
   per-class pixel queue and region queue (``MemoryBank``), pixel-to-pixel and pixel-to-region in
   one softmax. After the loss, each (image, class) pushes its L2-normalised mean embedding into
   the region queue and up to ``pixel_update_freq`` random pixel embeddings into the pixel queue;
   under DDP the keys of all ranks are gathered first, so every rank holds the same queues.
   The loss computes its gradient with respect to the anchors in the forward (no (M, K) matrix is
   kept for the backward), class by class against the queues read in place (see "Loss" in
   ``contrast.py``): so the queues can be updated in place right after it, before the backward.

Anchor budgets. The public code samples per GPU (``max_samples`` 1024 anchors, ``max_views`` 100),
and its Cityscapes runs put 2 images on each GPU at a 128x256 embedding grid: 1024 anchors per 2
images, and a class qualifies with more than 100 of an image's 32768 cells (0.3 %). ``budget:
per_image`` (default) keeps that meaning for any batch, process count and grid: 512 anchors per
image (``anchors_per_image``) and a qualifying share of 100 / 32768 of the image's cells
(``min_class_share``). At 2 images per process on a 128x256 grid this is the reference's rule
except for one **CHOICE**: each image splits its own 512 anchors among its own qualifying classes,
where the reference splits 1024 among the (image, class) pairs of the GPU's 2 images; so an
image's anchors never depend on which images share its batch or process. ``max_views`` stays an
absolute number of anchors at any grid (**CHOICE**: like the budget it sizes the loss's sample,
not the image; scaled with the grid it would be 3 anchors on a 32x32 grid). In the reference the
cap equals the threshold, so a qualifying class can always fill its quota; here a qualifying class
with fewer cells than its quota gives all of them. ``budget: per_batch`` is the reference's rule
as written: ``max_samples`` for the process's whole batch, and a class qualifies with more than
``max_views`` cells. The in-batch contrast set is every anchor of the batch: under torchrun with
``gather_contrast`` (the default) the anchors of all processes, gathered with their gradient (each
process's anchors are the queries of its share of the loss, ``gathered_contrast_loss``), so each
anchor meets more negatives than in the reference, whose set is a GPU's own anchors (memory off);
``gather_contrast=false``: the process's own anchors.
The forward logs how many anchors each class got (``anchors/<class>``, see
``log_class_anchors``); under torchrun with ``gather_contrast``, summed over the processes (the
sample the loss contrasts over), else the logging process's own sample.

Everything is vectorised over images, classes and anchors: groups are formed with one random
permutation and one stable sort, never a Python loop. Similarities are computed in float32.

This module holds the method's config and ``PixelContrast``; the head, the label grids, the
sampler, the losses and the memory bank it puts together are in ``ctxseg.methods.contrast``
(shared with Contextrast and DSCNet). The formulas: ``docs/methods.md#pixel-contrast``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ctxseg.config import TrainConfig
from ctxseg.engine.distributed import all_gather_rows, all_sum_with_grad, contrast_gather, contrast_world
from ctxseg.methods.base import Method, cross_entropy
from ctxseg.methods.contrast import (
    BUDGETS,
    Anchors,
    MemoryBank,
    ProjectionHead,
    anchor_terms,
    blocked_contrast_loss,
    check_label_grid,
    class_counts,
    contrast_loss,
    downsample_labels,
    embedding_map,
    fold_anchors,
    gather_anchors,
    gathered_contrast_loss,
    memory_keys,
    project_rows,
    sample_anchors,
)
from ctxseg.models.segmenter import class_argmax, upsample_to


@dataclass
class PixelContrastConfig(TrainConfig):
    """Pixel contrast. Defaults follow the paper and its public code.

    Attributes:
        proj_dim: width of the projection head's L2-normalised embedding.
        temperature: T in s = f.f'/T.
        base_temperature: T_base; the loss is scaled by T / T_base.
        contrast_weight: weight of the contrastive term next to CE.
        contrast_warmup: fraction of the run trained with CE only before the contrast term
            switches on (the reference: 5000 of 40000 iterations = 0.125).
        budget: ``per_image`` (default): ``anchors_per_image`` per image, a class qualifies in
            an image with more than ``min_class_share`` of its grid cells; ``per_batch``: the
            reference's rule as it stands, ``max_samples`` for the process's batch, a class
            qualifies with more than ``max_views`` cells (the reference's numbers at any grid).
        anchors_per_image: anchor budget per image (``per_image``; the reference: 1024 per GPU of
            2 images = 512), shared equally by the image's qualifying classes.
        min_class_share: a class gives anchors in an image when it covers more than this share
            of the image's embedding-grid cells (``per_image``; the reference: 100 of 128x256).
        max_samples: anchor budget per process batch (``per_batch`` only).
        max_views: most anchors per (image, class), an absolute count at any grid (**CHOICE**);
            under ``per_batch`` also the qualifying threshold in cells. Each qualifying
            (image, class) gives at least one anchor, so a batch with more qualifying pairs than
            the budget exceeds it.
        log_class_anchors: the forward returns ``anchors/<class>`` (anchors of each class in the
            step's sample) when the dataset has at most this many classes; ``anchors`` (all) and
            ``anchor_classes`` (classes with at least one anchor) always.
        memory: contrast against class-wise pixel and region queues instead of the batch.
        memory_size: entries per class in each queue (the reference: 5000; the queues are
            2 x classes x memory_size x proj_dim floats, carried in checkpoints).
        pixel_update_freq: pixel embeddings each (image, class) pushes into the pixel queue per step.
        label_grid: how a label is put on each embedding-grid cell (``downsample_labels``;
            **CHOICE**): ``center`` (default), the pixel at the centre of the s x s block the
            cell covers; ``majority``, the block's most frequent label, ignored below
            ``label_purity`` of its valid pixels; ``nearest``, what ctxseg did before issue 22
            (a cell's top-left pixel at a pitch of H / h; the numbers in README tables older than
            that were trained with it).
        label_purity: ``majority`` only: the least share of a block's valid pixels its label must have.
    """

    method: str = "pixel_contrast"
    proj_dim: int = 256
    temperature: float = 0.1
    base_temperature: float = 0.07
    contrast_weight: float = 0.1
    contrast_warmup: float = 0.125
    budget: str = "per_image"
    anchors_per_image: int = 512
    min_class_share: float = 100 / 32768
    max_samples: int = 1024
    max_views: int = 100
    log_class_anchors: int = 40
    memory: bool = False
    memory_size: int = 5000
    pixel_update_freq: int = 10
    label_grid: str = "center"
    label_purity: float = 0.5

    def validate(self) -> PixelContrastConfig:
        super().validate()
        for name in ("proj_dim", "anchors_per_image", "max_samples", "max_views", "memory_size", "pixel_update_freq"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.budget not in BUDGETS:
            raise ValueError(f"budget must be one of {BUDGETS}, got {self.budget!r}")
        if not 0.0 <= self.min_class_share < 1.0:
            raise ValueError(f"min_class_share is a share of the grid in [0, 1), got {self.min_class_share}")
        if self.log_class_anchors < 0:
            raise ValueError(f"log_class_anchors must be >= 0, got {self.log_class_anchors}")
        if self.temperature <= 0 or self.base_temperature <= 0:
            raise ValueError("temperature and base_temperature must be positive")
        if not 0.0 <= self.contrast_warmup <= 1.0:
            raise ValueError(f"contrast_warmup is a fraction of the run in [0, 1], got {self.contrast_warmup}")
        check_label_grid(self)
        return self


# ------------------------------------------------------------------------------------------------
class PixelContrast(Method):
    """CE + pixel contrast, optionally with a memory bank (``memory=True``)."""

    config_class = PixelContrastConfig
    key_settings = ("memory",)

    @classmethod
    def embedding_feature(cls, config):
        return "projection"

    def __init__(self, cfg: PixelContrastConfig, info, total_iters: int = 0):
        super().__init__(cfg, info, total_iters)
        self.warmup_steps = round(cfg.contrast_warmup * total_iters)
        self.memory = MemoryBank(info.num_classes, cfg.memory_size, cfg.proj_dim) if cfg.memory else None

    def heads(self, model):
        return {"proj": ProjectionHead(model.decoder_channels, self.cfg.proj_dim)}

    def grid(self, out, mask):
        """The head's hidden map (B, c, P) before its last conv, labels (B, P) on its grid
        (``label_grid``) and the grid size (h, w)."""
        hidden = out["embed_hidden"]
        B, c, h, w = hidden.shape
        return hidden.flatten(2), self.grid_labels(mask, (h, w)).flatten(1), (h, w)

    def grid_labels(self, mask, size):
        return downsample_labels(mask, size, self.cfg.label_grid, self.cfg.label_purity)

    def sample(self, out, mask) -> Anchors:
        """Hard anchor sampling for one step: flat indices into the (B, h * w) embedding grid."""
        _, labels, grid_hw = self.grid(out, mask)
        return self._sample(out["logits"], labels, grid_hw)

    def _sample(self, logits, labels, grid_hw) -> Anchors:
        with torch.no_grad():
            preds = class_argmax(upsample_to(logits.detach().float(), grid_hw)).flatten(1)
        cfg = self.cfg
        if cfg.budget == "per_batch":
            return sample_anchors(labels, preds, self.info.num_classes, cfg.max_samples, cfg.max_views)
        return sample_anchors(labels, preds, self.info.num_classes, max_views=cfg.max_views,
                              per_image=cfg.anchors_per_image, min_share=cfg.min_class_share)

    def contrast(self, out, mask) -> tuple[torch.Tensor, Anchors]:
        """The contrastive term of one step and the anchors it sampled. Under ``gather_contrast``
        with several processes: in-batch, each process's anchors contrast with the anchors of all
        processes (``gathered_contrast_loss``); against the memory, the mean runs over the anchors
        of all processes. Either way every process gets the term of the global batch's anchors."""
        cfg = self.cfg
        hidden, labels, (h, w) = self.grid(out, mask)
        anchors = self._sample(out["logits"], labels, (h, w))  # labels already on the grid
        rows = gather_anchors(hidden, anchors.index)
        feats = project_rows(rows, out["embed_proj"])  # only the anchors
        gather = contrast_world(cfg) > 1
        if self.memory is None:
            if gather:
                contrast = gathered_contrast_loss(feats, anchors.label, cfg.temperature, cfg.base_temperature)
            else:
                contrast = contrast_loss(feats, anchors.label, None, None, cfg.temperature, cfg.base_temperature)
        else:  # the gradient is computed in the forward: the queues may be updated in place after it
            blocks = self.memory.blocks()
            n_keys = sum(len(k) for _, ks in blocks for k in ks)
            contrast = blocked_contrast_loss(feats, anchors.label, blocks, cfg.temperature, cfg.base_temperature,
                                             factors=fold_anchors(rows, out["embed_proj"], n_keys))
            if gather:  # the mean over the anchors with a positive of every process
                n = ((self.memory.pixel_count + self.memory.region_count) > 0)[anchors.label].sum().float()
                total = all_sum_with_grad(torch.stack([contrast * n, n]))
                contrast = total[0] / total[1].clamp(min=1)
        return contrast, anchors

    def forward(self, out, batch, step):
        cfg = self.cfg
        mask = batch["mask"]
        ce = cross_entropy(out["logits"], mask)
        if step >= self.warmup_steps:
            contrast, anchors = self.contrast(out, mask)
            counts = class_counts(anchors.label, self.info.num_classes)
        else:  # (+0: no "-0.0" in the log) keeps the head in the graph (DDP)
            w, b = out["embed_proj"]
            contrast = (out["embed_hidden"].sum() + w.sum() + b.sum()) * 0.0 + 0.0
            counts = ce.new_zeros(self.info.num_classes, dtype=torch.float32)  # no sample during the warm-up

        if self.memory is not None:
            with torch.no_grad():
                emb = embedding_map(out).flatten(2)
            labels = self.grid_labels(mask, out["embed_hidden"].shape[-2:]).flatten(1)
            pk, pl, rk, rl = memory_keys(emb, labels, self.info.num_classes, cfg.pixel_update_freq)
            self.memory.push("pixel", all_gather_rows(pk), all_gather_rows(pl))
            self.memory.push("region", all_gather_rows(rk), all_gather_rows(rl))

        loss = ce + cfg.contrast_weight * contrast
        terms = {"ce": ce.detach(), "contrast": contrast.detach()}
        terms.update(anchor_terms(counts, self.info.class_names, cfg.log_class_anchors, contrast_gather(cfg)))
        return loss, terms
