"""Contextrast (Sung et al., CVPR 2024): contextual contrastive learning (CCL) over multi-scale
representative anchors, with boundary-aware negative (BANE) sampling. Loop-free over images and
classes.

CE on the logits plus ``contrast_weight`` (alpha) times a pixel-to-anchor loss summed over four
stages i = 1..4 (strides 4, 8, 16, 32): by default the decoder's maps the classifier reads
(``contrast_features``), else the encoder's stages. Per step and stage:

1. A training-only projection head (1x1 conv c->c without bias, ReLU, BN, 1x1 conv c->``proj_dim``;
   the head of Pissas et al. ECCV 2022) embeds the stage's features. Embeddings and anchors are
   L2-normalised (**CHOICE** ``normalize``). The head's last 1x1 conv and the normalisation are
   folded into the loss's small matrix products (``Projection``, ``inverse_norms``): the same
   numbers, without materialising the 256-d stride-4 embedding map.
2. Representative anchors: labels are put on the stage's grid by the ``label_grid`` rule
   (``downsample_labels``); ``a_i^n`` is the mean of the stage's embeddings of class n over the
   whole mini-batch, recomputed every step (under torchrun with ``gather_contrast``, the default:
   over every process's images, the per-class sums and counts gathered with their gradient; so are
   the negatives' logsumexps and the loss's per-class sums, so each process computes the loss of
   the whole batch).
3. Context fusion (``fusion``): ``â_i^n = w_l a_i^n + w_h a_4^n`` when class n is present at stage i
   and at the deepest stage, else ``a_i^n`` (**CHOICE** ``fusion_weight`` w_h = 0.5, w_l = 1 - w_h);
   anchors stay in the graph unless ``detach_anchors`` (**CHOICE**, default False).
4. BANE (``bane``): the final prediction's argmax on the stage's grid (``stage_targets``), against
   the stage's labels, gives error regions; an exact Euclidean distance transform (``edge_distance``,
   in torch on the training device) measures each error pixel's distance to its region's edge (on
   the stride-4 grid and pooled to the coarser stages, **CHOICE** ``bane_distance="fine"``), and
   the ``bane_ratio`` (K_s) fraction nearest the edge is kept (``bane_select``). Which anchors a kept
   pixel is a negative for is ambiguous in the paper (**CHOICE** ``bane_negatives``):

   - ``"missed"`` (default): error regions are pixels of class n predicted as something else; the
     kept ones are negatives of every other class's anchor c != n (and stay positives of anchor n);
   - ``"false_positives"``: error regions are pixels predicted as c whose label is not c; the kept
     ones are negatives of anchor c.

   **CHOICE**: the percentile is taken per image and region class (``bane_percentile="image"``) or
   per class over the batch (``"batch"``); ignored pixels are never negatives; an anchor whose BANE
   pool is empty falls back to all other-class pixels of the stage. Without BANE (``bane=False``,
   "CCL alone") every other-class pixel is a negative.
5. ``L_i^n = mean over positives v+ (the stage's pixels of class n) of
   -log[exp(â.v+/τ) / (exp(â.v+/τ) + Σ_{v-} exp(â.v-/τ))]``, computed as
   ``softplus(logsumexp_{v-}(â.v-/τ) - â.v+/τ)``; ``L_PA = Σ_i λ_i mean_n L_i^n`` over the classes
   present at stage i; ``L = L_CE + α L_PA``. Similarities are computed in float32 with autocast off.

Defaults: λ = (0.1, 0.3, 0.7, 1.0), α = 0.1, **CHOICE** τ = 0.1, K_s = 0.5. The specification,
equations (CTX-1)-(CTX-10), every CHOICE and the paper's numbers: ``docs/methods.md#contextrast``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ctxseg.config import TrainConfig
from ctxseg.engine.distributed import all_gather_rows, contrast_gather, contrast_world, sum_gathered
from ctxseg.methods.base import Method, cross_entropy
from ctxseg.methods.contrast import block_centres, check_label_grid, downsample_labels, grid_stride
from ctxseg.models.segmenter import Head, class_argmax

BANE_NEGATIVES = ("missed", "false_positives")
BANE_PERCENTILES = ("image", "batch")
CONTRAST_FEATURES = ("encoder", "decoder")
BANE_DISTANCES = ("fine", "stage")


@dataclass
class ContextrastConfig(TrainConfig):
    """Contextrast. Defaults follow the paper; **CHOICE** marks our reading where it is silent.

    Attributes:
        proj_dim: width of each stage's projection head output.
        temperature: τ in s = â.v / τ (**CHOICE**: 0.1; not published).
        contrast_weight: α, the weight of the pixel-to-anchor loss next to CE.
        stage_weights: λ_1..λ_4, shallow to deep.
        normalize: L2-normalise embeddings and anchors (**CHOICE**: True).
        fusion: inject the deepest stage's anchors into every stage (context fusion).
        fusion_weight: w_h, the deepest stage's share; w_l = 1 - w_h (**CHOICE**: 0.5).
        detach_anchors: stop gradients through the anchors (**CHOICE**: False).
        bane: boundary-aware negative sampling; False is "CCL alone" (all other-class pixels are
            negatives).
        bane_ratio: K_s, the fraction of each error region's pixels kept, nearest its edge first
            (ties at the cut are kept).
        bane_negatives: ``"missed"`` (**CHOICE**, default): kept pixels of class n are negatives of
            every anchor c != n; ``"false_positives"``: negatives of anchor c are the kept pixels
            predicted c whose label is not c.
        bane_percentile: ``"image"`` (**CHOICE**, default): K_s per image and class; ``"batch"``:
            per class over the whole batch.
        contrast_warmup: fraction of the run trained with CE only before the contrast switches on
            (**CHOICE**: 0, the paper is silent; the public pixel-contrast code keeps its contrast
            off for the first 5000 of 30000 CamVid steps, 1/6, and before that BANE would read the
            predictions of an untrained model).
        bane_distance: where the distance to an error region's edge is measured (**CHOICE**):
            ``"fine"`` (default), on the finest stage's grid (stride 4) and pooled to each coarser
            stage (``pooled_distance``); ``"stage"``, on each stage's own grid, where at strides
            16 and 32 every error cell is 1 cell from the edge and BANE keeps them all (ctxseg
            before issue 22).
        contrast_features: which four maps (strides 4, 8, 16, 32) the projection heads read
            (**CHOICE**): ``"decoder"`` (default), the classifier's input and the decoder's
            pyramid levels it is built from (``contrasted_maps``), as in the paper's HRNet setting
            where the contrasted maps are the classifier's own input; ``"encoder"``, the
            encoder's stages (the paper's multi-scale encoder features; the FPN then stands
            between them and the classifier, so the contrast never reaches the decoder: ctxseg
            before issue 22). Why the default: README, "Contextrast after issue 22".
        label_grid: how a label is put on each embedding-grid cell (``downsample_labels``, for every stage;
            **CHOICE**): ``center`` (default), the pixel at the centre of the s x s block the
            cell covers; ``majority``, the block's most frequent label, ignored below
            ``label_purity`` of its valid pixels; ``nearest``, what ctxseg did before issue 22
            (a cell's top-left pixel at a pitch of H / h; the numbers in README tables older than
            that were trained with it).
        label_purity: ``majority`` only: the least share of a block's valid pixels its label must have.
    """

    method: str = "contextrast"
    proj_dim: int = 256
    temperature: float = 0.1
    contrast_weight: float = 0.1
    stage_weights: tuple[float, float, float, float] = (0.1, 0.3, 0.7, 1.0)
    normalize: bool = True
    fusion: bool = True
    fusion_weight: float = 0.5
    detach_anchors: bool = False
    bane: bool = True
    bane_ratio: float = 0.5
    bane_negatives: str = "missed"
    bane_percentile: str = "image"
    contrast_features: str = "decoder"
    bane_distance: str = "fine"
    contrast_warmup: float = 0.0
    label_grid: str = "center"
    label_purity: float = 0.5

    def validate(self) -> ContextrastConfig:
        super().validate()
        if self.proj_dim <= 0:
            raise ValueError(f"proj_dim must be positive, got {self.proj_dim}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if len(self.stage_weights) != 4 or min(self.stage_weights) < 0:
            raise ValueError(f"stage_weights must be 4 non-negative numbers (λ_1..λ_4), got {self.stage_weights}")
        if not 0.0 <= self.fusion_weight <= 1.0:
            raise ValueError(f"fusion_weight (w_h; w_l = 1 - w_h) must be in [0, 1], got {self.fusion_weight}")
        if not 0.0 < self.bane_ratio <= 1.0:
            raise ValueError(f"bane_ratio (K_s) must be in (0, 1], got {self.bane_ratio}")
        if self.bane_negatives not in BANE_NEGATIVES:
            raise ValueError(f"bane_negatives must be one of {BANE_NEGATIVES}, got {self.bane_negatives!r}")
        check_label_grid(self)
        if not 0.0 <= self.contrast_warmup <= 1.0:
            raise ValueError(f"contrast_warmup is a fraction of the run in [0, 1], got {self.contrast_warmup}")
        if self.bane_distance not in BANE_DISTANCES:
            raise ValueError(f"bane_distance must be one of {BANE_DISTANCES}, got {self.bane_distance!r}")
        if self.contrast_features not in CONTRAST_FEATURES:
            raise ValueError(f"contrast_features must be one of {CONTRAST_FEATURES}, got {self.contrast_features!r}")
        if self.bane_percentile not in BANE_PERCENTILES:
            raise ValueError(f"bane_percentile must be one of {BANE_PERCENTILES}, got {self.bane_percentile!r}")
        return self


class StageProjections(Head):
    """One projection head per encoder stage (1x1 conv c->c, ReLU, BN, 1x1 conv c->dim).

    The last 1x1 conv is linear, so the head returns it unapplied: ``out["stage_hidden"]``, four
    (B, c_i, h_i, w_i) float32 maps before it, and ``out["stage_proj"]``, its (weight (dim, c_i),
    bias (dim,)) per stage. The loss folds it into its small matrix products (``Projection``): at
    the stride-4 stage (c = 64 for ResNet-18) the 256-d embedding map, the largest tensor of the
    method, is never materialised, normalised or backpropagated through. ``stage_embeddings(out)``
    gives the embeddings themselves (for plots); the figures read them L2-normalised as the
    features ``stage1``..``stage4``."""

    embedding_features = ("stage1", "stage2", "stage3", "stage4")

    def __init__(self, stage_channels: list[int], dim: int = 256, source: str = "encoder"):
        super().__init__()
        self.source = source
        self.nets = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(c, c, 1, bias=False), nn.ReLU(inplace=True), nn.BatchNorm2d(c), nn.Conv2d(c, dim, 1)
            )
            for c in stage_channels
        )

    def forward(self, out):
        hidden = [net[:-1](x).float() for net, x in zip(self.nets, contrasted_maps(out, self.source))]
        proj = [(net[-1].weight.flatten(1).float(), net[-1].bias.float()) for net in self.nets]
        return {"stage_hidden": hidden, "stage_proj": proj}

    def feature_map(self, out, name):
        if name not in self.embedding_features:
            return super().feature_map(out, name)
        return F.normalize(stage_embeddings(out)[self.embedding_features.index(name)].float(), dim=1), True


def contrasted_maps(out, source: str) -> list[torch.Tensor]:
    """The four maps, strides 4 to 32, that ``contrast_features`` names in a segmenter output:
    ``"encoder"``, the encoder's stages; ``"decoder"``, the classifier's own input (the fused
    stride-4 ``features``) and the decoder's pyramid levels at strides 8, 16 and 32 that it is
    built from, so the contrast's gradient reaches every decoder layer (the stride-4 level
    itself feeds ``features`` only through the fuse conv, which the first map goes through)."""
    if source == "encoder":
        return list(out["stages"])
    return [out["features"], *out["pyramid"][1:]]


def stage_embeddings(out) -> list[torch.Tensor]:
    """The (B, dim, h_i, w_i) embeddings of each stage (not normalised) from a segmenter output
    with ``StageProjections``."""
    return [
        torch.einsum("dc,bchw->bdhw", w, h) + b[:, None, None]
        for h, (w, b) in zip(out["stage_hidden"], out["stage_proj"])
    ]


class Projection:
    """A linear map e = W x + b applied lazily to (B, c, P) features x, for the products the loss
    needs: ``None`` stands for the identity (x are the embeddings)."""

    @staticmethod
    def scores(x, anchors, proj):
        """anchors (C, D) . e for every pixel: (B, C, P)."""
        if proj is None:
            return anchors @ x
        w, b = proj
        return (anchors @ w) @ x + (anchors @ b)[None, :, None]

    @staticmethod
    def sums(x, weights, proj):
        """sum over the batch of weights (B, P, C)-weighted embeddings: (C, D)."""
        s = torch.bmm(x, weights).sum(0)  # (c, C)
        if proj is None:
            return s.T
        w, b = proj
        return (w @ s).T + weights.sum((0, 1))[:, None] * b[None, :]

    @staticmethod
    def sq_norms(x, proj):
        """||e||^2 for every pixel: (B, P); ||Wx + b||^2 = x.(W'W)x + 2 (W'b).x + b.b."""
        if proj is None:
            return (x * x).sum(1)
        w, b = proj
        gram = w.T @ w
        return (x * (gram @ x)).sum(1) + 2.0 * ((w.T @ b) @ x) + b @ b


def inverse_norms(x: torch.Tensor, normalize: bool = True, proj=None) -> torch.Tensor | None:
    """Per-pixel 1 / ||e|| (clamped like ``F.normalize``) of the embeddings of (B, c, P) features
    under ``proj`` (see ``Projection``): (B, P), or None without normalisation. Scaling by it is L2
    normalisation."""
    if not normalize:
        return None
    return Projection.sq_norms(x.float(), proj).clamp(min=1e-24).rsqrt()


# ------------------------------------------------------------------------------------------------
# Anchors
def class_means(x: torch.Tensor, labels: torch.Tensor, num_classes: int, scale: torch.Tensor | None = None,
                proj=None, gather=None):
    """Per-class mean over the batch of the embeddings of (B, c, P) features ``x`` under ``proj``
    (``None``: x are the embeddings), for (B, P) labels (ignore = 255), each pixel's embedding
    first multiplied by ``scale`` (B, P) when given (``inverse_norms``).

    Returns ``(means (C, D), counts (C,))``; classes without pixels get a zero mean. One batched
    matrix product with the (B, P, C) one-hot labels: no copy of the embeddings. ``gather``
    (``gather_contrast``: ``all_gather_with_grad``, every process's tensor with the gradient)
    turns this process's sums and counts into the global batch's before dividing."""
    C = num_classes
    lab = torch.where((labels >= 0) & (labels < C), labels, C)  # C collects ignored pixels and is dropped
    onehot = F.one_hot(lab, C + 1)[..., :C].to(x.dtype)  # (B, P, C)
    counts = onehot.sum((0, 1))
    weights = onehot if scale is None else onehot * scale[..., None]
    sums = Projection.sums(x, weights, proj)
    if gather is not None:
        sums, counts = sum_gathered(gather, sums), sum_gathered(gather, counts)
    return sums / counts.clamp(min=1)[:, None], counts.long()


def representative_anchors(
    embeds: list[torch.Tensor],
    labels: list[torch.Tensor],
    num_classes: int,
    fusion: bool = True,
    fusion_weight: float = 0.5,
    normalize: bool = True,
    detach: bool = False,
    scales: list[torch.Tensor | None] | None = None,
    projs: list | None = None,
    gather=None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Anchors of every stage from (B, D, P_i) embeddings (or features and their ``projs``, see
    ``Projection``) and (B, P_i) labels on each stage's grid.

    With ``normalize`` the embeddings are L2-normalised before averaging (``scales``: their
    precomputed ``inverse_norms``, else computed here) and the anchors after averaging and after
    fusion. Returns ``(anchors, present)``: per stage a (C, D) tensor of (fused) anchors and a
    (C,) bool of the classes with pixels at that stage. Fusion mixes in the deepest stage's anchor
    only for classes present at both stages. ``gather``: see ``class_means`` (the anchors of the
    global batch under ``gather_contrast``)."""
    projs = projs or [None] * len(embeds)
    if scales is None:
        scales = [inverse_norms(e, normalize, p) for e, p in zip(embeds, projs)]
    means, present = [], []
    for emb, lab, scale, proj in zip(embeds, labels, scales, projs):
        m, n = class_means(emb, lab, num_classes, scale, proj, gather)
        means.append(F.normalize(m, dim=1) if normalize else m)
        present.append(n > 0)
    anchors = []
    for i, a in enumerate(means):
        if fusion and i < len(means) - 1:
            fused = (1.0 - fusion_weight) * a + fusion_weight * means[-1]
            if normalize:
                fused = F.normalize(fused, dim=1)
            a = torch.where((present[i] & present[-1])[:, None], fused, a)
        anchors.append(a.detach() if detach else a)
    return anchors, present


# ------------------------------------------------------------------------------------------------
# BANE
def edge_distance(regions: torch.Tensor, max_elements: int = 1 << 24) -> torch.Tensor:
    """Exact Euclidean distance from every pixel to the nearest pixel of its image with a different
    region id, for (B, h, w) integer ``regions``.

    For a pixel of region r this is the Euclidean distance transform of the binary map
    ``regions == r`` (distance to the region's edge: 1 for a pixel next to another region), computed
    for all regions of all images at once because the regions of one image are disjoint. Only
    pixels of the image count as outside (as in ``scipy.ndimage.distance_transform_edt``); a region
    that fills its image gets ``inf``.

    Two exact separable passes, in torch on the input's device (no CPU round trip): along columns,
    g = distance to the nearest different id in the same column (the pixel just outside the
    pixel's run, found with a cumulative max); along rows,
    ``d²(y, x) = min_x' (x - x')² + [regions(y, x') == regions(y, x)] g(y, x')²`` (a pixel of another
    region at (y, x') is itself outside, at distance |x - x'|), by brute force over each row:
    O(h w²) per image, processed in chunks of images of at most ``max_elements`` (b, h, w, w) cells.
    """
    B, h, w = regions.shape
    if B == 0:
        return regions.new_zeros(regions.shape, dtype=torch.float32)
    chunk = max(1, max_elements // (h * w * w))
    if B > chunk:
        return torch.cat([edge_distance(r, max_elements) for r in regions.split(chunk)])
    g = torch.minimum(_run_distance(regions), _run_distance(regions.flip(1)).flip(1))
    # Pass 2, rows: (B, h, x, x') -> d² (B, h, w).
    xs = torch.arange(w, device=regions.device, dtype=torch.float32)
    dx2 = (xs[:, None] - xs[None, :]) ** 2  # (x, x')
    same = regions[:, :, :, None] == regions[:, :, None, :]
    d2 = (dx2 + torch.where(same, g[:, :, None, :] ** 2, 0.0)).amin(-1)
    return d2.sqrt()


def _run_distance(regions: torch.Tensor) -> torch.Tensor:
    """(B, h, w): distance from each pixel up its column to the nearest pixel with another id
    (inf if none): y - (start of the pixel's run) + 1."""
    B, h, w = regions.shape
    y = torch.arange(h, device=regions.device)[None, :, None].expand(B, h, w)
    starts = torch.ones_like(regions, dtype=torch.bool)
    starts[:, 1:] = regions[:, 1:] != regions[:, :-1]
    run_start = torch.where(starts, y, 0).cummax(1).values
    return torch.where(run_start > 0, (y - run_start + 1).float(), float("inf"))


def bane_select(
    labels: torch.Tensor,
    preds: torch.Tensor,
    num_classes: int,
    ratio: float = 0.5,
    negatives: str = "missed",
    per_image: bool = True,
    gather_rows=None,
    fine: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Boundary-aware negatives on one stage's grid, from (B, h, w) labels (ignore = 255) and
    predictions. ``fine``: this function's result on a finer grid of the same images, to measure
    each error pixel's distance to its region's edge there (``pooled_distance``); None:
    ``edge_distance`` on this grid.

    Error pixels are valid pixels with ``pred != label``; their region class is the label
    (``negatives="missed"``) or the prediction (``"false_positives"``). In each error region (per
    image and class, or per class over the batch when not ``per_image``) the ``k = ceil(ratio * n)``
    pixels nearest the edge are kept, plus any tied with the k-th.

    ``gather_rows`` (``gather_contrast``, with ``per_image`` False: the rows of every process, no
    gradient) takes the per-class cut over the error pixels of the global batch.

    Returns a dict of (B, h, w) maps: ``region`` (region class, -1 outside the error regions),
    ``distance`` (to the region's edge; 0 outside) and ``kept`` (bool)."""
    if negatives not in BANE_NEGATIVES:
        raise ValueError(f"negatives must be one of {BANE_NEGATIVES}, got {negatives!r}")
    C = num_classes
    B, h, w = labels.shape
    valid = (labels >= 0) & (labels < C)
    error = valid & (preds != labels)
    region = torch.where(error, labels if negatives == "missed" else preds, -1)
    distance = edge_distance(region) if fine is None else pooled_distance(fine["region"], fine["distance"], region)
    dist = torch.where(error, distance, 0.0)
    kept = torch.zeros_like(error)
    idx = error.flatten().nonzero().squeeze(1)
    d = dist.flatten()[idx]
    cls = region.flatten()[idx]
    group = (idx // (h * w)) * C + cls if per_image else cls
    G = B * C if per_image else C
    if gather_rows is not None and not per_image:  # a collective: every process, even without errors
        cut = _group_cuts(gather_rows(group), gather_rows(d), G, ratio)
    elif idx.numel():
        cut = _group_cuts(group, d, G, ratio)
    else:
        cut = None
    if idx.numel():
        kept.view(-1)[idx] = d <= cut[group]
    return {"region": region, "distance": dist, "kept": kept}


def pooled_distance(fine_region: torch.Tensor, fine_distance: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Edge distances for a coarse grid's error regions, measured on a finer grid where they
    discriminate (**CHOICE**, ``bane_distance="fine"``): at stride 32 an error region is one or two
    cells thick, so every distance on that grid is 1 and BANE keeps them all.

    (B, h, w) ``region`` (a coarse cell's region class, -1 outside the error regions) against the
    (B, H, W) ``fine_region`` and ``fine_distance`` of ``bane_select`` on the finer grid, whose cells
    group into s x s blocks under each coarse cell (s = ``grid_stride``). A coarse error cell gets
    the fine distance of its block's centre cell (where the coarse cell's label and prediction are
    read, ``downsample_labels``) when that cell is in the same error region, else the least fine
    distance among its block's error cells of its region class, in fine cells; a cell whose block
    has none (an error seen only at the coarse scale) gets its coarse-grid distance times s,
    ranking it behind every cell whose error is seen at the fine scale."""
    B, H, W = fine_region.shape
    h, w = region.shape[-2:]
    sy, sx = grid_stride(H, h), grid_stride(W, w)
    pad = (0, w * sx - W, 0, h * sy - H)
    fr = F.pad(fine_region, pad, value=-1).reshape(B, h, sy, w, sx).permute(0, 1, 3, 2, 4).reshape(B, h, w, -1)
    fd = F.pad(fine_distance, pad, value=0.0).reshape(B, h, sy, w, sx).permute(0, 1, 3, 2, 4).reshape(B, h, w, -1)
    match = (fr == region[..., None]) & (region[..., None] >= 0)
    nearest = torch.where(match, fd, float("inf")).amin(-1)
    # The block's centre cell, as downsample_labels reads it (blocks at the edge are cut short).
    cy = block_centres(H, h, sy, region.device) - torch.arange(h, device=region.device) * sy
    cx = block_centres(W, w, sx, region.device) - torch.arange(w, device=region.device) * sx
    centre = (cy[:, None] * sx + cx[None, :]).expand(B, h, w)[..., None]
    at_centre = torch.where(match.gather(-1, centre), fd.gather(-1, centre), float("inf"))[..., 0]
    fine = torch.where(torch.isfinite(at_centre), at_centre, nearest)
    coarse = edge_distance(region) * max(sy, sx)
    return torch.where(torch.isfinite(fine), fine, coarse)


def _group_cuts(group: torch.Tensor, d: torch.Tensor, num_groups: int, ratio: float) -> torch.Tensor:
    """(G,) the distance of the ``ceil(ratio * n)``-th nearest of each group's n pixels (-1 for an
    empty group), for (N,) group ids and distances."""
    if group.numel() == 0:
        return torch.full((num_groups,), -1.0, device=d.device)
    # Sort by (group, distance): two stable sorts.
    by_d = torch.argsort(d, stable=True)
    order = by_d[torch.argsort(group[by_d], stable=True)]
    n = torch.bincount(group, minlength=num_groups)
    starts = torch.cumsum(n, 0) - n
    # k = ceil(ratio * n); the small tolerance keeps e.g. 0.3 * 10 at 3, not 4.
    k = torch.ceil(n.double() * ratio - 1e-9).long().clamp(min=1)
    last = (starts + k - 1).clamp(max=group.numel() - 1)
    return torch.where(n > 0, d[order][last], -1.0)


def negative_mask(labels, preds, kept, num_classes, negatives="missed", gather=None) -> torch.Tensor:
    """(C, N) bool: which of N flattened pixels are negatives of each class's anchor.

    With ``kept`` (BANE's selection) the negatives follow ``negatives`` (see ``bane_select``);
    without it (``None``, CCL alone) they are all valid pixels of another class. An anchor whose
    BANE pool is empty falls back to all other-class pixels (empty over the global batch with
    ``gather``, see ``class_means``)."""
    C = num_classes
    classes = torch.arange(C, device=labels.device)[:, None]
    other = ((labels >= 0) & (labels < C))[None, :] & (labels[None, :] != classes)
    if kept is None:
        return other
    if negatives == "missed":
        neg = kept[None, :] & other
    else:
        neg = kept[None, :] & (preds[None, :] == classes) & other
    any_neg = neg.any(1, keepdim=True)
    if gather is not None:
        any_neg = sum_gathered(gather, any_neg.float()) > 0
    empty = ~any_neg
    return torch.where(empty, other, neg)


# ------------------------------------------------------------------------------------------------
# Loss
def pixel_to_anchor_loss(
    emb: torch.Tensor,
    labels: torch.Tensor,
    anchors: torch.Tensor,
    neg: torch.Tensor,
    temperature: float = 0.1,
    scale: torch.Tensor | None = None,
    proj=None,
    gather=None,
) -> torch.Tensor:
    """``mean_n L^n`` for (B, D, P) pixel embeddings (or (B, c, P) features and their ``proj``, see
    ``Projection``) with (B, P) labels (ignore = 255), (C, D) anchors and a (C, B * P) negative
    mask, in float32.

    ``L^n = mean over pixels v+ of class n of softplus(logsumexp_{v- in neg[n]} s(â_n, v-)
    - s(â_n, v+))``, ``s = â.v / τ`` with v scaled by ``scale`` (B, P) when given (``inverse_norms``:
    v L2-normalised). The mean is over the classes with pixels. An anchor without negatives
    contributes 0; no valid pixel gives 0 (still connected to the graph).

    ``gather`` (``gather_contrast``: ``all_gather_with_grad``) makes every sum over pixels one
    over the global batch: each process's (C,) negatives' logsumexps, per-class loss sums and
    positive counts are combined over the processes, so every process gets the loss of the whole
    batch (given the anchors of the whole batch)."""
    C = anchors.shape[0]
    B, _, P = emb.shape
    with torch.autocast(emb.device.type, enabled=False):
        s = Projection.scores(emb.float(), anchors.float(), proj)  # (B, C, P): no copy of the embeddings
        if scale is not None:
            s = s * scale[:, None, :]
        s = (s / temperature).transpose(0, 1).reshape(C, B * P)
        # A finite fill (not -inf) keeps the gradient finite for an anchor without negatives.
        fill = torch.finfo(s.dtype).min / 4
        lse_neg = torch.logsumexp(torch.where(neg, s, fill), dim=1)  # (C,)
        if gather is not None:  # logsumexp over the processes of their logsumexps
            lse_neg = torch.logsumexp(torch.cat(gather(lse_neg[None], same_shape=True)), 0)
        labels = labels.flatten()
        pos = ((labels >= 0) & (labels < C)).nonzero().squeeze(1)
        if pos.numel() == 0 and gather is None:
            return s.sum() * 0.0
        y = labels[pos]
        per_pixel = F.softplus(lse_neg[y] - s[y, pos])
        counts = torch.bincount(y, minlength=C).to(s.dtype)
        sums = s.new_zeros(C).index_add(0, y, per_pixel)
        if gather is not None:
            sums, counts = sum_gathered(gather, sums + 0.0 * s.sum()), sum_gathered(gather, counts)  # (+0 s: in the graph)
            if not bool((counts > 0).any()):
                return sums.sum() * 0.0
        per_class = sums / counts.clamp(min=1)
        return per_class[counts > 0].mean()


# ------------------------------------------------------------------------------------------------
class Contextrast(Method):
    """CE + contextual contrastive learning over four stages, with BANE (``bane=True``)."""

    config_class = ContextrastConfig
    key_settings = ("bane", "fusion", "contrast_features")

    @classmethod
    def embedding_feature(cls, config):
        """With ``contrast_features=decoder`` the contrasted map the classifier reads (``decoder``);
        with ``encoder`` (and runs older than the setting) the finest stage's embeddings."""
        return "decoder" if config.get("contrast_features", "encoder") == "decoder" else "stage1"

    def heads(self, model):
        source = self.cfg.contrast_features
        channels = model.stage_channels if source == "encoder" else [model.decoder_channels] * 4
        return {"ctx_proj": StageProjections(channels, self.cfg.proj_dim, source)}

    def stage_targets(self, out, mask) -> list[dict[str, torch.Tensor]]:
        """Per stage: (B, h_i, w_i) ``labels`` (the GT on the stage's grid, ``label_grid``) and
        ``preds`` (the final prediction's argmax at the logits' stride, on the same grid)."""
        with torch.no_grad():
            pred = class_argmax(out["logits"].detach())
            targets = []
            for hidden in out["stage_hidden"]:
                size = tuple(hidden.shape[-2:])
                targets.append({
                    "labels": downsample_labels(mask, size, self.cfg.label_grid, self.cfg.label_purity),
                    # The prediction's classes at each cell, by the same rule (no purity: every
                    # cell has one), from the logits' stride-4 grid.
                    "preds": downsample_labels(pred, size, "nearest" if self.cfg.label_grid == "nearest" else "center"),
                })
        return targets

    def bane(self, targets, ratio: float | None = None) -> list[dict[str, torch.Tensor]]:
        """BANE maps (``bane_select``) for each stage's targets, at ``ratio`` (default: K_s), the
        coarser stages' distances measured on the finest stage's grid (``bane_distance="fine"``)."""
        cfg = self.cfg
        ratio = cfg.bane_ratio if ratio is None else ratio
        rows = all_gather_rows if contrast_world(cfg) > 1 else None
        C, per_image = self.info.num_classes, cfg.bane_percentile == "image"
        maps = [bane_select(targets[0]["labels"], targets[0]["preds"], C, ratio, cfg.bane_negatives, per_image, rows)]
        fine = maps[0] if cfg.bane_distance == "fine" else None
        for t in targets[1:]:
            maps.append(bane_select(t["labels"], t["preds"], C, ratio, cfg.bane_negatives, per_image, rows, fine))
        return maps

    def anchors(self, out, targets, scales=None):
        """(anchors, present) of every stage (see ``representative_anchors``): over the global
        batch under ``gather_contrast``."""
        cfg = self.cfg
        return representative_anchors(
            [h.flatten(2) for h in out["stage_hidden"]], [t["labels"].flatten(1) for t in targets],
            self.info.num_classes, cfg.fusion, cfg.fusion_weight, cfg.normalize, cfg.detach_anchors, scales,
            out["stage_proj"], contrast_gather(self.cfg),
        )

    def contrast(self, out, mask) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The pixel-to-anchor loss ``L_PA = sum_i λ_i L_i`` and each stage's L_i. Under
        ``gather_contrast`` with several processes every sum over pixels runs over the global
        batch (anchors, negatives' logsumexps, per-class means, BANE's empty-pool fallback and its
        ``batch`` percentile), so each process gets the value a single process gets for the whole
        batch."""
        cfg = self.cfg
        C = self.info.num_classes
        gather = contrast_gather(self.cfg)
        targets = self.stage_targets(out, mask)
        hidden = [h.flatten(2) for h in out["stage_hidden"]]
        scales = [inverse_norms(h, cfg.normalize, p) for h, p in zip(hidden, out["stage_proj"])]
        anchors, _ = self.anchors(out, targets, scales)
        maps = self.bane(targets) if cfg.bane else [None] * len(targets)
        contrast, stages = 0.0, []
        for i, (x, proj, scale, t, a, m) in enumerate(zip(hidden, out["stage_proj"], scales, targets, anchors, maps)):
            labels = t["labels"].flatten(1)
            with torch.no_grad():
                kept = None if m is None else m["kept"].flatten()
                neg = negative_mask(labels.flatten(), t["preds"].flatten(), kept, C, cfg.bane_negatives, gather)
            li = pixel_to_anchor_loss(x, labels, a, neg, cfg.temperature, scale, proj, gather)
            stages.append(li)
            contrast = contrast + cfg.stage_weights[i] * li
        return contrast, stages

    def forward(self, out, batch, step):
        cfg = self.cfg
        mask = batch["mask"]
        ce = cross_entropy(out["logits"], mask)
        if step >= round(cfg.contrast_warmup * self.total_iters):
            contrast, stages = self.contrast(out, mask)
        else:  # CE only; the heads stay in the graph (DDP), and +0 keeps "-0.0" out of the log
            leaves = [h.sum() for h in out["stage_hidden"]] + [w.sum() + b.sum() for w, b in out["stage_proj"]]
            contrast = sum(leaves) * 0.0 + 0.0
            stages = [contrast.detach()] * len(out["stage_hidden"])
        terms = {"ce": ce.detach()}
        terms.update({f"contrast_s{i + 1}": li.detach() for i, li in enumerate(stages)})
        terms["contrast"] = contrast.detach()
        return ce + cfg.contrast_weight * contrast, terms
