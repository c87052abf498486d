"""Cross-image pixel contrast (Wang et al., ICCV 2021), loop-free.

CE on the logits plus ``contrast_weight`` times a supervised contrastive loss over pixel
embeddings from a training-only projection head (1x1 conv, BN, ReLU, 1x1 conv to ``proj_dim``,
L2-normalised). Per step:

1. Labels are nearest-downsampled to the embedding grid; predictions are the argmax of the
   logits on that grid.
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
``max_views`` cells. The in-batch contrast set is every anchor of the process's batch, so with
more images per process each anchor meets more negatives than in the reference (memory off).
The forward logs how many anchors each class got (``anchors/<class>``, see
``log_class_anchors``); under torchrun these are rank 0's own sample.

Everything is vectorised over images, classes and anchors: groups are formed with one random
permutation and one stable sort, never a Python loop. Similarities are computed in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ctxseg.config import TrainConfig
from ctxseg.data.base import IGNORE_INDEX
from ctxseg.engine.distributed import all_gather_rows
from ctxseg.methods.base import Method, cross_entropy
from ctxseg.models.segmenter import Head, upsample_to


BUDGETS = ("per_image", "per_batch")


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
        return self


class ProjectionHead(Head):
    """1x1 conv (c->c), BN, ReLU, 1x1 conv (c->dim), L2-normalised over channels: ``out["embed"]``."""

    def __init__(self, in_channels: int, dim: int = 256):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, 1, bias=False),
            nn.BatchNorm2d(in_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_channels, dim, 1),
        )

    def forward(self, out):
        return {"embed": F.normalize(self.net(out["features"]).float(), dim=1)}


# ------------------------------------------------------------------------------------------------
# Sampling
def downsample_labels(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of (B, H, W) labels to the embedding grid ``size``: grid cell
    (i, j) takes the label at (floor(i * H / h), floor(j * W / w)), the pixel its embedding is
    computed for at stride H / h."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    return F.interpolate(mask[:, None].float(), size=size, mode="nearest")[:, 0].long()


def rank_in_groups(groups: torch.Tensor, num_groups: int, shuffle: bool = False):
    """Order elements by group id and number them within their group, loop-free.

    Returns ``(order, rank)``: ``order`` lists element indices grouped by group id (in input
    order within a group, or uniformly random with ``shuffle``) and ``rank[t]`` is the position
    of element ``order[t]`` inside its group."""
    if shuffle:
        perm = torch.randperm(groups.numel(), device=groups.device)
        order = perm[torch.argsort(groups[perm], stable=True)]
    else:
        order = torch.argsort(groups, stable=True)
    sorted_groups = groups[order]
    sizes = torch.bincount(sorted_groups, minlength=num_groups)
    starts = torch.cumsum(sizes, 0) - sizes
    return order, torch.arange(groups.numel(), device=groups.device) - starts[sorted_groups]


@dataclass
class Anchors:
    """Sampled anchors: ``index`` into the flattened (B * h * w) grid, their ``label``, whether
    each was ``hard`` (predicted wrongly), and ``n_view`` (B,), the per-class quota of each image
    (0 for an image without a qualifying class)."""

    index: torch.Tensor
    label: torch.Tensor
    hard: torch.Tensor
    n_view: torch.Tensor

    def __len__(self) -> int:
        return self.index.numel()


def anchor_counts(labels, preds, num_classes, max_samples=1024, max_views=100, *, per_image=None, min_share=None):
    """Per (image, class): how many hard and easy anchors to keep, and each image's n_view.

    Budget: ``max_samples`` for the whole batch, ``n_view = min(max_samples // q, max_views)``
    over the batch's q qualifying (image, class) pairs (the reference, per process); or, with
    ``per_image``, ``n_view_b = min(per_image // q_b, max_views)`` over image b's own q_b.
    Threshold: a class qualifies in an image with more than ``max_views`` cells, or, with
    ``min_share``, more than ``min_share * P`` of the image's P cells. A qualifying class gives
    ``min(n_view_b, its cells)`` anchors (at least one quota per qualifying pair).

    Returns ``(keep_hard (B, C), keep_easy (B, C), n_view (B,))``; both are 0 for classes that do
    not qualify or are absent."""
    B, P = labels.shape
    C = num_classes
    valid = (labels != IGNORE_INDEX) & (labels >= 0) & (labels < C)
    lab = torch.where(valid, labels, C)  # C collects ignored pixels and is dropped
    image = torch.arange(B, device=labels.device)[:, None]
    cell = (image * (C + 1) + lab).flatten()
    counts = torch.bincount(cell, minlength=B * (C + 1)).view(B, C + 1)[:, :C]
    wrong = (preds != labels).flatten().long()
    n_hard = torch.bincount(cell, weights=wrong, minlength=B * (C + 1)).view(B, C + 1)[:, :C].long()
    n_easy = counts - n_hard
    qualify = counts > (max_views if min_share is None else min_share * P)
    if per_image is None:
        q = qualify.sum().expand(B)
        budget = max_samples
    else:
        q = qualify.sum(1)
        budget = per_image
    n_view = torch.clamp(torch.clamp(budget // q.clamp(min=1), max=max_views), min=1)
    n_view = torch.where(qualify.any(1), n_view, 0)
    k = torch.where(qualify, torch.minimum(counts, n_view[:, None]), 0)  # anchors per (image, class)
    keep_hard = torch.minimum(n_hard, torch.maximum(k - n_easy, k // 2))
    keep_easy = k - keep_hard
    return keep_hard, keep_easy, n_view


def sample_anchors(
    labels: torch.Tensor,
    preds: torch.Tensor,
    num_classes: int,
    max_samples: int = 1024,
    max_views: int = 100,
    *,
    per_image: int | None = None,
    min_share: float | None = None,
) -> Anchors:
    """Hard anchor sampling on flattened (B, P) labels and predictions (ignore = 255).

    Half hard, half easy per qualifying (image, class) (see ``anchor_counts`` for the budgets),
    uniformly at random within each group; anchors come out grouped by (image, class, easy)."""
    B, P = labels.shape
    C = num_classes
    keep_hard, keep_easy, n_view = anchor_counts(
        labels, preds, C, max_samples, max_views, per_image=per_image, min_share=min_share
    )
    qualify = (keep_hard + keep_easy) > 0
    valid = (labels != IGNORE_INDEX) & (labels >= 0) & (labels < C)
    lab = torch.where(valid, labels, 0)
    image = torch.arange(B, device=labels.device)[:, None].expand(B, P)
    candidate = (valid & qualify[image, lab]).flatten()
    pix = candidate.nonzero().squeeze(1)
    easy = (preds == labels).flatten()[pix].long()
    groups = ((image.flatten()[pix] * C + lab.flatten()[pix]) * 2) + easy
    order, rank = rank_in_groups(groups, B * C * 2, shuffle=True)
    keep = torch.stack([keep_hard, keep_easy], dim=-1).flatten()  # group id (b*C + c)*2 + easy
    chosen = order[rank < keep[groups[order]]]
    index = pix[chosen]
    return Anchors(index, lab.flatten()[index], easy[chosen] == 0, n_view)


def class_counts(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C,) float counts of ``labels`` (all in [0, C)), without a host synchronisation."""
    counts = torch.zeros(num_classes, device=labels.device)
    return counts.index_add_(0, labels, torch.ones_like(labels, dtype=counts.dtype))


def anchor_terms(counts: torch.Tensor, class_names, max_classes: int) -> dict[str, torch.Tensor]:
    """Log terms for (C,) per-class anchor ``counts``: ``anchors`` (all), ``anchor_classes``
    (classes with at least one anchor) and, when there are at most ``max_classes`` classes,
    ``anchors/<class name>`` for every class (the same keys every step, so no host sync decides
    them). Tensors: the trainer reads them on logging steps only."""
    terms = {"anchors": counts.sum(), "anchor_classes": (counts > 0).sum().float()}
    if len(class_names) <= max_classes:
        terms.update({f"anchors/{name}": counts[k] for k, name in enumerate(class_names)})
    return terms


# ------------------------------------------------------------------------------------------------
# Loss
def contrast_loss(
    anchors: torch.Tensor,
    anchor_labels: torch.Tensor,
    keys: torch.Tensor | None = None,
    key_labels: torch.Tensor | None = None,
    temperature: float = 0.1,
    base_temperature: float = 0.07,
) -> torch.Tensor:
    """The pixel-contrast loss of (M, D) anchors against (K, D) keys, in float32.

    Without ``keys`` the anchors contrast with each other (an anchor is not its own positive).
    Each positive j of anchor i is scored against itself plus all of i's negatives:
    ``(T/T_base) * softplus(logsumexp_k s_ik - s_ij)``, averaged over P(i), then over the anchors
    that have a positive. No anchor with a positive gives 0 (still connected to the graph)."""
    with torch.autocast(anchors.device.type, enabled=False):
        anchors = anchors.float()
        self_contrast = keys is None
        if self_contrast:
            keys, key_labels = anchors, anchor_labels
        s = anchors @ keys.float().T / temperature
        same = anchor_labels[:, None] == key_labels[None, :]
        pos = same
        if self_contrast:
            pos = same & ~torch.eye(len(anchors), dtype=torch.bool, device=anchors.device)
        # A finite fill (not -inf) keeps the gradient finite for anchors without negatives.
        fill = torch.finfo(s.dtype).min / 4
        lse_neg = torch.logsumexp(torch.where(same, fill, s), dim=1, keepdim=True)
        per_pair = F.softplus(lse_neg - s)
        n_pos = pos.sum(1)
        per_anchor = torch.where(pos, per_pair, 0.0).sum(1) / n_pos.clamp(min=1)
        has_pos = n_pos > 0
        if not has_pos.any():
            return s.sum() * 0.0
        return (temperature / base_temperature) * per_anchor[has_pos].mean()


# ------------------------------------------------------------------------------------------------
# Memory
class MemoryBank(nn.Module):
    """Class-wise FIFO queues of L2-normalised embeddings: ``pixel`` and ``region``, each
    (C, size, dim), with per-class write pointers and fill counts. All buffers, so checkpoints and
    ``--resume`` carry them. Slots [0, count) of a class are filled (a queue wraps only once full)."""

    def __init__(self, num_classes: int, size: int, dim: int):
        super().__init__()
        for kind in ("pixel", "region"):
            self.register_buffer(kind, torch.zeros(num_classes, size, dim))
            self.register_buffer(f"{kind}_ptr", torch.zeros(num_classes, dtype=torch.long))
            self.register_buffer(f"{kind}_count", torch.zeros(num_classes, dtype=torch.long))

    @torch.no_grad()
    def push(self, kind: str, keys: torch.Tensor, labels: torch.Tensor) -> None:
        """Write (N, dim) ``keys`` with class ``labels`` in order: each class's entries go to
        consecutive slots from its pointer (mod size), and the pointer advances by their number."""
        queue, ptr, count = getattr(self, kind), getattr(self, f"{kind}_ptr"), getattr(self, f"{kind}_count")
        C, S, _ = queue.shape
        if labels.numel() == 0:
            return
        order, rank = rank_in_groups(labels, C)
        labels, keys = labels[order], keys[order]
        n = torch.bincount(labels, minlength=C)
        newest = rank >= (n[labels] - S)  # more than `size` entries for a class: the last `size` win
        slot = (ptr[labels] + rank) % S
        queue[labels[newest], slot[newest]] = keys[newest].to(queue.dtype)
        ptr.copy_((ptr + n) % S)
        count.copy_(torch.clamp(count + n, max=S))

    def keys(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The filled entries of both queues (pixel first) and their class labels."""
        C, S, _ = self.pixel.shape
        cls = torch.arange(C, device=self.pixel.device)[:, None].expand(C, S)
        slot = torch.arange(S, device=self.pixel.device)[None, :]
        out_k, out_y = [], []
        for kind in ("pixel", "region"):
            filled = slot < getattr(self, f"{kind}_count")[:, None]
            out_k.append(getattr(self, kind)[filled])
            out_y.append(cls[filled])
        return torch.cat(out_k), torch.cat(out_y)


def memory_keys(emb: torch.Tensor, labels: torch.Tensor, num_classes: int, per_class: int):
    """This batch's keys for the queues, from detached (B, D, P) embeddings and (B, P) labels.

    Returns ``(pixel_keys, pixel_labels, region_keys, region_labels)``: up to ``per_class`` random
    pixel embeddings and the L2-normalised mean embedding of every (image, class) present,
    ordered by image then class."""
    B, D, P = emb.shape
    C = num_classes
    valid = (labels != IGNORE_INDEX) & (labels >= 0) & (labels < C)
    lab = torch.where(valid, labels, C)
    # Region keys: class sums per image by one batched matmul with a one-hot (B, P, C+1).
    onehot = F.one_hot(lab, C + 1).to(emb.dtype)
    sums = torch.bmm(emb, onehot)[:, :, :C]  # (B, D, C)
    present = onehot[:, :, :C].sum(1) > 0  # (B, C)
    region = F.normalize(sums.permute(0, 2, 1)[present], dim=1)
    region_labels = torch.arange(C, device=emb.device).expand(B, C)[present]
    # Pixel keys: a random subset of each (image, class).
    image = torch.arange(B, device=emb.device)[:, None].expand(B, P)
    pix = valid.flatten().nonzero().squeeze(1)
    groups = image.flatten()[pix] * C + lab.flatten()[pix]
    order, rank = rank_in_groups(groups, B * C, shuffle=True)
    chosen = pix[order[rank < per_class]]
    b, p = chosen // P, chosen % P
    return emb[b, :, p], lab.flatten()[chosen], region, region_labels


# ------------------------------------------------------------------------------------------------
class PixelContrast(Method):
    """CE + pixel contrast, optionally with a memory bank (``memory=True``)."""

    config_class = PixelContrastConfig

    def __init__(self, cfg: PixelContrastConfig, info, total_iters: int = 0):
        super().__init__(cfg, info, total_iters)
        self.warmup_steps = round(cfg.contrast_warmup * total_iters)
        self.memory = MemoryBank(info.num_classes, cfg.memory_size, cfg.proj_dim) if cfg.memory else None

    def heads(self, model):
        return {"proj": ProjectionHead(model.decoder_channels, self.cfg.proj_dim)}

    def grid(self, out, mask):
        """Embeddings (B, D, P) on the embedding grid, labels (B, P) nearest-downsampled to it and
        the grid size (h, w)."""
        emb = out["embed"].float()
        B, D, h, w = emb.shape
        return emb.flatten(2), downsample_labels(mask, (h, w)).flatten(1), (h, w)

    def sample(self, out, mask) -> Anchors:
        """Hard anchor sampling for one step: flat indices into the (B, h * w) embedding grid."""
        _, labels, grid_hw = self.grid(out, mask)
        return self._sample(out["logits"], labels, grid_hw)

    def _sample(self, logits, labels, grid_hw) -> Anchors:
        with torch.no_grad():
            preds = upsample_to(logits.detach().float(), grid_hw).argmax(1).flatten(1)
        cfg = self.cfg
        if cfg.budget == "per_batch":
            return sample_anchors(labels, preds, self.info.num_classes, cfg.max_samples, cfg.max_views)
        return sample_anchors(labels, preds, self.info.num_classes, max_views=cfg.max_views,
                              per_image=cfg.anchors_per_image, min_share=cfg.min_class_share)

    def forward(self, out, batch, step):
        cfg = self.cfg
        mask = batch["mask"]
        ce = cross_entropy(out["logits"], mask)
        emb, labels, (h, w) = self.grid(out, mask)

        if step >= self.warmup_steps:
            anchors = self._sample(out["logits"], labels, (h, w))  # labels already on the grid
            feats = emb[anchors.index // (h * w), :, anchors.index % (h * w)]
            keys = self.memory.keys() if self.memory is not None else (None, None)
            contrast = contrast_loss(feats, anchors.label, *keys, cfg.temperature, cfg.base_temperature)
            counts = class_counts(anchors.label, self.info.num_classes)
        else:
            contrast = emb.sum() * 0.0 + 0.0  # (+0: no "-0.0" in the log) keeps the head in the graph (DDP)
            counts = emb.new_zeros(self.info.num_classes)  # no sample during the warm-up

        if self.memory is not None:
            pk, pl, rk, rl = memory_keys(emb.detach(), labels, self.info.num_classes, cfg.pixel_update_freq)
            self.memory.push("pixel", all_gather_rows(pk), all_gather_rows(pl))
            self.memory.push("region", all_gather_rows(rk), all_gather_rows(rl))

        loss = ce + cfg.contrast_weight * contrast
        terms = {"ce": ce.detach(), "contrast": contrast.detach()}
        terms.update(anchor_terms(counts, self.info.class_names, cfg.log_class_anchors))
        return loss, terms
