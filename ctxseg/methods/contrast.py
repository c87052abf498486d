"""Shared machinery of the contrastive methods: what pixel contrast (``pixel_contrast.py``),
Contextrast (``contextrast.py``) and DSCNet (``dscnet.py``) have in common, and the loop-free
building blocks of pixel contrast. No method is defined here and nothing here imports a method
module: the methods import this module, never one another. The formulas are written out in
``docs/methods.md#shared-contrast-machinery``; how pixel contrast puts them together, with its
anchor budgets, in ``docs/methods.md#pixel-contrast`` and the docstring of ``pixel_contrast.py``.

- **Projection head.** ``ProjectionHead`` (1x1 conv, BN, ReLU, 1x1 conv to ``proj_dim``) returns its
  last conv unapplied; ``project_rows`` projects and L2-normalises only the rows a loss contrasts,
  ``embedding_map`` the whole map. Pixel contrast's head and DSCNet's PGCL head (``pgcl_proj``);
  ``ctxseg.viz.embeddings`` reads it for plots.
- **Label grids.** ``downsample_labels`` puts (B, H, W) labels on a feature grid by one of
  ``LABEL_GRIDS`` (the ``label_grid`` and ``label_purity`` settings of pixel contrast and
  Contextrast, checked by ``check_label_grid``); ``grid_stride`` and ``block_centres`` give a grid's
  stride and the pixel each cell reads (Contextrast's BANE pools its distances with them).
- **Anchor sampling.** ``sample_anchors``: hard and easy anchors per qualifying (image, class),
  budgeted by ``anchor_counts`` (``BUDGETS``: pixel contrast's ``budget``, DSCNet's
  ``pgcl_budget``), as ``Anchors``; ``rank_in_groups`` numbers elements within their group without
  a loop (also DSCNet's per-image pixel sampling and the memory bank); ``class_counts`` and
  ``anchor_terms`` give the per-class anchor counts the methods log (``anchors/<class>``).
- **Losses.** ``contrast_loss`` (the anchors against each other, or against constant keys) and
  ``blocked_contrast_loss`` (constant keys grouped by class, read in place) compute the loss and
  its gradient with respect to the anchors in the forward (the autograd Function ``_EagerGrad``
  over the kernels ``_in_batch_terms`` and ``_blocked_terms``; see "Loss" below); ``fold_anchors``
  lets the blocked loss compute similarities in the head's hidden width; ``gather_anchors`` takes
  the anchors' rows from a (B, D, P) map with a backward that writes without accumulating
  (``_GatherAnchors``).
- **Across processes.** Under torchrun with ``gather_contrast``: ``gathered_contrast_loss``, each
  process's anchors against the anchors of all processes, gathered with their gradient (each
  process's share: ``in_batch_share``). The collectives themselves are in
  ``ctxseg.engine.distributed``.
- **Memory bank.** ``MemoryBank``, class-wise FIFO queues of pixel and region embeddings (buffers,
  carried by checkpoints), and ``memory_keys``, a batch's keys for it.

Sampling is vectorised over images, classes and anchors (groups are formed with one random
permutation and one sort, never a Python loop); the losses go class by class over the anchors
sorted by class, and compute their similarities in float32 with autocast off.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ctxseg.data.base import IGNORE_INDEX
from ctxseg.engine.distributed import all_gather_rows, all_gather_with_grad, all_sum_with_grad, sum_gathered
from ctxseg.models.segmenter import Head

BUDGETS = ("per_image", "per_batch")


# ------------------------------------------------------------------------------------------------
# Projection head
class ProjectionHead(Head):
    """1x1 conv (c->c), BN, ReLU, 1x1 conv (c->dim), then L2 normalisation over channels.

    The last conv is linear, so the head returns it unapplied: ``out["embed_hidden"]``, the
    (B, c, h, w) float32 map before it, and ``out["embed_proj"]``, its (weight (dim, c), bias (dim,)).
    Pixel contrast projects only the pixels it contrasts (``project_rows``): the 256-d embedding
    map, the largest tensor of the method, is never materialised, normalised or backpropagated
    through in training. ``embedding_map(out)`` gives the whole normalised map (DSCNet's PGCL, the
    memory bank's keys, plots), the feature ``projection`` of the figures."""

    embedding_features = ("projection",)

    def __init__(self, in_channels: int, dim: int = 256):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, 1, bias=False),
            nn.BatchNorm2d(in_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_channels, dim, 1),
        )

    def forward(self, out):
        last = self.net[-1]
        return {"embed_hidden": self.net[:-1](out["features"]).float(),
                "embed_proj": (last.weight.flatten(1).float(), last.bias.float())}

    def feature_map(self, out, name):
        if name not in self.embedding_features:
            return super().feature_map(out, name)
        return embedding_map(out), True


def project_rows(x: torch.Tensor, proj) -> torch.Tensor:
    """L2-normalised embeddings (M, dim) of (M, c) rows of the hidden map under the head's last
    conv ``proj`` = (weight (dim, c), bias (dim,)), in float32."""
    w, b = proj
    with torch.autocast(x.device.type, enabled=False):
        return F.normalize(torch.addmm(b.float(), x.float(), w.float().T), dim=1)


def embedding_map(out) -> torch.Tensor:
    """The (B, dim, h, w) L2-normalised embedding map of a segmenter output with
    ``ProjectionHead``, in float32."""
    w, b = out["embed_proj"]
    hidden = out["embed_hidden"]
    with torch.autocast(hidden.device.type, enabled=False):
        return F.normalize(F.conv2d(hidden.float(), w.float()[:, :, None, None], b.float()), dim=1)


# ------------------------------------------------------------------------------------------------
# Label grids
LABEL_GRIDS = ("center", "majority", "nearest")


def grid_stride(full: int, cells: int) -> int:
    """The stride s of a grid of ``cells`` cells over ``full`` pixels: the smallest power of two
    with ceil(full / s) <= cells (a CNN's stage at stride s has ceil(full / s) cells: 180 pixels
    at stride 32 give 6 cells, a pitch of 30 pixels but a stride of 32)."""
    s = 1
    while -(-full // s) > cells:
        s *= 2
    return s


def check_label_grid(cfg) -> None:
    """Raise a ValueError naming the setting unless ``label_grid`` / ``label_purity`` can work."""
    if cfg.label_grid not in LABEL_GRIDS:
        raise ValueError(f"label_grid must be one of {LABEL_GRIDS}, got {cfg.label_grid!r}")
    if not 0.0 < cfg.label_purity <= 1.0:
        raise ValueError(f"label_purity must be in (0, 1], got {cfg.label_purity}")


def block_centres(full: int, cells: int, stride: int, device) -> torch.Tensor:
    """The centre pixel of each cell's block [s i, min(s i + s, full)) along one axis."""
    lo = torch.arange(cells, device=device) * stride
    hi = (lo + stride).clamp(max=full)
    return ((lo + hi - 1) // 2).clamp(0, full - 1)


def downsample_labels(mask: torch.Tensor, size: tuple[int, int], rule: str = "center",
                      purity: float = 0.5) -> torch.Tensor:
    """(B, H, W) labels (ignore = 255) on a feature grid of ``size`` (h, w) at the stride s of
    ``grid_stride``, where cell (i, j) covers the pixel block [s i, s i + s) x [s j, s j + s)
    (cut at the image's edge) and is centred in it, as the encoder's "same" padding places it.

    - ``center`` (**CHOICE**, the default): the label at the block's centre pixel;
    - ``majority``: the most frequent valid label of the block, or ignore when it covers less than
      ``purity`` of the block's valid pixels (or there are none): a cell astride a boundary says
      nothing rather than the wrong thing;
    - ``nearest``: ``F.interpolate(mode="nearest")``, the label at (floor(i H / h), floor(j W / w)):
      the block's top-left corner at a pitch of H / h, which drifts from the stride when h does
      not divide H (ctxseg before issue 22)."""
    H, W = mask.shape[-2:]
    h, w = size
    if (H, W) == (h, w):
        return mask
    if rule == "nearest":
        return F.interpolate(mask[:, None].float(), size=size, mode="nearest")[:, 0].long()
    sy, sx = grid_stride(H, h), grid_stride(W, w)
    if rule == "center":
        return mask[:, block_centres(H, h, sy, mask.device)][:, :, block_centres(W, w, sx, mask.device)]
    if rule != "majority":
        raise ValueError(f"label grid rule must be one of {LABEL_GRIDS}, got {rule!r}")
    B = mask.shape[0]
    padded = F.pad(mask, (0, w * sx - W, 0, h * sy - H), value=255)
    blocks = padded.reshape(B, h, sy, w, sx).permute(0, 1, 3, 2, 4).reshape(B, h, w, sy * sx)
    valid = blocks != 255
    n_cls = int(mask[mask != 255].max()) + 1 if bool((mask != 255).any()) else 1
    counts = F.one_hot(torch.where(valid, blocks, n_cls), n_cls + 1)[..., :n_cls].sum(-2)  # (B, h, w, C)
    best, label = counts.max(-1)
    total = valid.sum(-1)
    keep = (total > 0) & (best >= purity * total)
    return torch.where(keep, label, 255)


# ------------------------------------------------------------------------------------------------
# Sampling
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
    uniformly at random within each group; anchors come out grouped by (image, class, easy).

    One sort: every candidate pixel (of a group that keeps anchors) gets the key
    ``group * N + r`` with ``r`` a random permutation of 0..N-1, so that the keys are distinct and
    each group's pixels come out in uniformly random order; the first ``keep`` of each group are
    its anchors."""
    B, P = labels.shape
    C = num_classes
    keep_hard, keep_easy, n_view = anchor_counts(
        labels, preds, C, max_samples, max_views, per_image=per_image, min_share=min_share
    )
    keep = torch.stack([keep_hard, keep_easy], dim=-1).flatten()  # group id (b*C + c)*2 + easy
    valid = (labels != IGNORE_INDEX) & (labels >= 0) & (labels < C)
    lab = torch.where(valid, labels, 0)
    easy = preds == labels
    group = ((torch.arange(B, device=labels.device)[:, None] * C + lab) * 2 + easy).flatten()
    pix = (valid.flatten() & (keep[group] > 0)).nonzero().squeeze(1)
    groups = group[pix]
    n = pix.numel()
    key = groups * n + torch.randperm(n, device=labels.device)
    if 2 * B * C * max(n, 1) < 2**31:
        key = key.int()  # sorts about twice as fast as int64
    order = torch.argsort(key)  # the keys are distinct: no need for a stable sort
    sorted_groups = groups[order]
    sizes = torch.bincount(groups, minlength=2 * B * C)
    rank = torch.arange(n, device=labels.device) - (torch.cumsum(sizes, 0) - sizes)[sorted_groups]
    index = pix[order[rank < keep[sorted_groups]]]
    return Anchors(index, lab.flatten()[index], ~easy.flatten()[index], n_view)


def class_counts(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C,) float counts of ``labels`` (all in [0, C)), without a host synchronisation."""
    counts = torch.zeros(num_classes, device=labels.device)
    return counts.index_add_(0, labels, torch.ones_like(labels, dtype=counts.dtype))


def anchor_terms(counts: torch.Tensor, class_names, max_classes: int, gather=None) -> dict[str, torch.Tensor]:
    """Log terms for (C,) per-class anchor ``counts``: ``anchors`` (all), ``anchor_classes``
    (classes with at least one anchor) and, when there are at most ``max_classes`` classes,
    ``anchors/<class name>`` for every class (the same keys every step, so no host sync decides
    them). Tensors: the trainer reads them on logging steps only. ``gather`` (the method's
    ``contrast_gather``): the counts of every process summed, the sample of the global batch the
    loss contrasts over (every process must call it)."""
    counts = sum_gathered(gather, counts.detach()) if gather is not None else counts
    terms = {"anchors": counts.sum(), "anchor_classes": (counts > 0).sum().float()}
    if len(class_names) <= max_classes:
        terms.update({f"anchors/{name}": counts[k] for k, name in enumerate(class_names)})
    return terms


# ------------------------------------------------------------------------------------------------
# Loss
#
# Both forms compute the loss and its gradient with respect to the anchors in one pass, with the
# anchors sorted by class, and keep only the (M, D) gradient for the backward (``_EagerGrad``).
# With s = f.k / T, x_ij = lse_neg_i - s_ij (lse_neg_i: the logsumexp of s_ik over i's negatives)
# and a_i = (T / T_base) / (anchors with a positive * |P(i)|):
#     L = sum_i a_i sum_{j in P(i)} softplus(x_ij),
#     dL/ds_ij = -a_i sigmoid(x_ij) for a positive j,
#     dL/ds_ik = W_i exp(s_ik - lse_neg_i) for a negative k, with W_i = a_i sum_{j in P(i)} sigmoid(x_ij).
#
# - In-batch (``_in_batch_terms``): one (M, M) similarity matrix; an anchor's positives are its own
#   class's diagonal block, set aside before the negatives' logsumexp. The gradient flows into both
#   sides of each similarity: (G + G') F / T.
# - Against constant keys given per class (``_blocked_terms``: the memory bank): for each key class
#   c, the anchors of the other classes are multiplied with c's keys once, and the product is
#   reduced at once to L[c, i] = logsumexp_k s_ik and V[c, i] = sum_k exp(s_ik) k (``_negative_sums``;
#   unshifted when every sum stays in a safe range, otherwise again with each row's maximum
#   subtracted); then lse_neg_i = logsumexp_{c != y_i} L[c, i], the negatives' gradient is
#   W_i sum_c V[c, i] / exp(lse_neg_i) / T, and last the anchors of class c meet c's own keys (the
#   positives). Every anchor-key similarity is computed once, no (M, K) matrix is held and the keys
#   are read in place (views of the queues, no copy): about 2 x 2 x M x K x D flops, the matrix
#   products' own cost.
NEG_INF = float("-inf")


def _class_ranges(labels: torch.Tensor):
    """Stable order of ``labels`` by class, and {class: (first, end)} rows in that order (one host
    synchronisation)."""
    order = torch.argsort(labels, stable=True)
    classes, sizes = torch.unique_consecutive(labels[order], return_counts=True)
    ranges, start = {}, 0
    for c, n in zip(classes.tolist(), sizes.tolist()):
        ranges[c] = (start, start + n)
        start += n
    return order, ranges


def _unsort(grad_sorted: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    grad = torch.empty_like(grad_sorted)
    grad[order] = grad_sorted
    return grad


def _scales(n_pos: torch.Tensor, n_with_pos: int, temperature: float, base_temperature: float) -> torch.Tensor:
    """a_i = (T / T_base) / (n_with_pos * |P(i)|), 0 for an anchor without a positive."""
    return torch.where(n_pos > 0, (temperature / base_temperature) / (n_with_pos * n_pos.clamp(min=1)), 0.0)


def _in_batch_terms(f, y, temperature, base_temperature, need_grad):
    """(loss, dloss/df or None) of (M, D) float32 anchors contrasting with each other."""
    M, D = f.shape
    order, ranges = _class_ranges(y)
    n_with_pos = sum(hi - lo for lo, hi in ranges.values() if hi - lo > 1)
    if n_with_pos == 0:
        return f.new_zeros(()), (torch.zeros_like(f) if need_grad else None)
    fs = f[order]
    s = (fs * (1.0 / temperature)) @ fs.T
    n_pos = f.new_empty(M)
    positives = []
    for lo, hi in ranges.values():
        block = s[lo:hi, lo:hi]
        positives.append((lo, hi, block.clone().fill_diagonal_(float("inf"))))  # not its own positive
        block.fill_(NEG_INF)  # positives are not negatives
        n_pos[lo:hi] = hi - lo - 1
    m = s.amax(1, keepdim=True)  # the negatives' maximum; -inf where there is no negative
    m = torch.where(torch.isfinite(m), m, 0.0)
    e = s.sub_(m).exp_()  # exp(s - m) on negatives, 0 elsewhere
    z = e.sum(1)
    lse_neg = m[:, 0] + z.log()  # -inf without negatives: those terms are 0
    a = _scales(n_pos, n_with_pos, temperature, base_temperature)
    per_anchor = f.new_zeros(M)
    w = f.new_zeros(M)
    sig = []
    for lo, hi, ps in positives:
        x = lse_neg[lo:hi, None] - ps  # -inf on the diagonal: softplus and sigmoid give 0
        per_anchor[lo:hi] = F.softplus(x).sum(1)
        if need_grad:
            sig.append(torch.sigmoid(x))
            w[lo:hi] = sig[-1].sum(1)
    loss = (a * per_anchor).sum()
    if not need_grad:
        return loss, None
    # G: negatives W_i exp(s_ik - lse_neg_i) = (W_i / z_i) e_ik; positives -a_i sigmoid(x_ij).
    e.mul_(torch.where(z > 0, a * w / z, 0.0)[:, None])
    for (lo, hi, _), sg in zip(positives, sig):
        e[lo:hi, lo:hi] = sg.mul_(-a[lo:hi, None])
    grad = ((e + e.T) @ fs).mul_(1.0 / temperature)  # one product: cheaper than e @ fs + e' @ fs
    return loss, _unsort(grad, order)


# Sums of exp(s) over a class without a shift, when every one lies in this range, lose nothing to
# underflow or overflow (their largest terms are normal floats, the denormal ones weigh < 1e-13).
_UNSHIFTED_RANGE = (1e-20, 1e30)


def _negative_sums(qs_t, sim_blocks, key_blocks, classes, ranges, need_grad, shifted):
    """For each key class c (row j of the results) and each anchor i of another class: the shift
    m[j, i] (its row maximum over the class's keys with ``shifted``, else 0), L[j, i] = logsumexp_k
    s_ik and V[j, i] = sum_k exp(s_ik - m[j, i]) k; 0 on the class's own anchors. The similarities
    are ``qs_t @ sim_blocks[c][t].T`` (the anchors / T against the keys, or their factors, see
    ``_blocked_terms``), V sums the keys themselves. Also whether the unshifted sums stayed in
    ``_UNSHIFTED_RANGE`` (always True with ``shifted``)."""
    M = qs_t.shape[0]
    D = next(iter(key_blocks.values()))[0].shape[1]
    shift = qs_t.new_zeros(len(classes), M)
    lse = qs_t.new_zeros(len(classes), M)
    v = qs_t.new_zeros(len(classes), M, D) if need_grad else None
    sums, buffers = [], []  # buffers: one reused (M * n) buffer per block of a class
    for j, c in enumerate(classes):
        lo, hi = ranges.get(c, (0, 0))
        blocks = key_blocks[c]
        for r0, r1 in ((0, lo), (hi, M)):  # the anchors of the other classes
            if r1 <= r0:
                continue
            sims = []
            for t, k in enumerate(sim_blocks[c]):
                if t == len(buffers) or buffers[t].numel() < M * len(k):
                    buffers[t:t + 1] = [qs_t.new_empty(M * len(k))]
                out = buffers[t][: (r1 - r0) * len(k)].view(r1 - r0, len(k))
                sims.append(torch.mm(qs_t[r0:r1], k.T, out=out))
            if shifted:
                m = torch.stack([s.amax(1) for s in sims]).amax(0)
                shift[j, r0:r1] = m
            z = 0.0
            for s, k in zip(sims, blocks):
                e = (s.sub_(m[:, None]) if shifted else s).exp_()
                z = z + e.sum(1)
                if need_grad:
                    v[j, r0:r1].addmm_(e, k)
            lse[j, r0:r1] = z.log() + m if shifted else z.log()
            sums.append(z)
    in_range = True
    if not shifted and sums:
        z = torch.cat(sums)
        in_range = bool(((z >= _UNSHIFTED_RANGE[0]) & (z <= _UNSHIFTED_RANGE[1])).all())
    return shift, lse, v, in_range


def _blocked_terms(f, y, key_blocks, temperature, base_temperature, factors, need_grad):
    """(loss, dloss/df or None) of (M, D) float32 anchors against constant keys given per class:
    ``key_blocks`` maps a class to a list of (n, D) float32 tensors.

    ``factors`` (None, or (coords (M, r), basis (D, r))) with f = coords @ basis.T and r < D (anchors that
    are a linear map of shorter vectors, ``fold_anchors``): the similarities are computed as
    coords . (k @ basis), r instead of D multiply-adds per anchor-key pair, after one (K, D) x
    (D, r) product for the keys; the gradient still sums the keys themselves."""
    M, D = f.shape
    order, ranges = _class_ranges(y)
    n_keys = {c: sum(len(k) for k in ks) for c, ks in key_blocks.items()}
    n_with_pos = sum(hi - lo for c, (lo, hi) in ranges.items() if n_keys.get(c, 0) > 0)
    if n_with_pos == 0:
        return f.new_zeros(()), (torch.zeros_like(f) if need_grad else None)
    fs = f[order]
    if factors is None:
        qs_t, sim_blocks = fs * (1.0 / temperature), key_blocks
    else:
        coords, basis = factors
        qs_t = coords.detach().float()[order] * (1.0 / temperature)
        basis = basis.detach().float()
        sim_blocks = {c: [k @ basis for k in ks] for c, ks in key_blocks.items()}
    classes = list(key_blocks)
    # Negatives: each class's sums, unshifted (one pass less) unless they leave the safe range
    # (tiny temperatures, long vectors): then again, each block shifted by its row maximum.
    shift, lse, v, in_range = _negative_sums(qs_t, sim_blocks, key_blocks, classes, ranges, need_grad, shifted=False)
    if not in_range:
        shift, lse, v, _ = _negative_sums(qs_t, sim_blocks, key_blocks, classes, ranges, need_grad, shifted=True)
    own = torch.tensor(classes, dtype=y.dtype, device=y.device)[:, None] == y[order][None, :]  # (C', M)
    lse_neg = torch.logsumexp(lse.masked_fill(own, NEG_INF), 0)  # -inf without negatives
    n_pos = f.new_zeros(M)
    for c, (lo, hi) in ranges.items():
        n_pos[lo:hi] = n_keys.get(c, 0)
    a = _scales(n_pos, n_with_pos, temperature, base_temperature)
    # Positives: each class's anchors against its own keys, now that lse_neg is known.
    per_anchor = f.new_zeros(M)
    w = f.new_zeros(M)
    g_pos = f.new_zeros(M, D) if need_grad else None
    for c, (lo, hi) in ranges.items():
        for k, ks in zip(key_blocks.get(c, ()), sim_blocks.get(c, ())):
            x = (qs_t[lo:hi] @ ks.T).neg_().add_(lse_neg[lo:hi, None])
            per_anchor[lo:hi] += F.softplus(x).sum(1)
            if need_grad:
                sg = torch.sigmoid(x)
                w[lo:hi] += sg.sum(1)
                g_pos[lo:hi].addmm_(sg, k)
    loss = (a * per_anchor).sum()
    if not need_grad:
        return loss, None
    # exp(L_c - lse_neg) V_c / z_c = exp(m_c - lse_neg) sum_k exp(s_ik - m_c) k; at most 1 (L_c <= lse_neg).
    weight = torch.where(own | torch.isinf(lse_neg)[None, :], 0.0, torch.exp(shift - lse_neg[None, :]))
    g_neg = f.new_zeros(M, D)
    for j in range(len(classes)):
        g_neg.addcmul_(weight[j][:, None], v[j])
    grad = (a * w)[:, None] * g_neg - a[:, None] * g_pos
    return loss, _unsort(grad.mul_(1.0 / temperature), order)


class _EagerGrad(torch.autograd.Function):
    """Loss whose gradient with respect to the anchors is computed with it (``terms``); the
    backward only scales it. Nothing else is saved: keys may change in place once the forward is
    done (the memory bank's enqueue)."""

    @staticmethod
    def forward(ctx, anchors, terms, *args):
        loss, grad = terms(anchors, *args, need_grad=ctx.needs_input_grad[0])
        if grad is not None:
            ctx.save_for_backward(grad)
        ctx.n_args = 1 + len(args)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return (grad * grad_loss, *([None] * ctx.n_args))


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
    that have a positive. No anchor with a positive gives 0 (still connected to the graph).
    Keys are constants: no gradient flows into them (``keys`` requiring one is refused). Keys
    that are already grouped by class are better passed to ``blocked_contrast_loss`` (no copy)."""
    if keys is None:
        with torch.autocast(anchors.device.type, enabled=False):
            return _EagerGrad.apply(anchors.float(), _in_batch_terms, anchor_labels, temperature, base_temperature)
    if keys.requires_grad and torch.is_grad_enabled():
        raise ValueError("contrast_loss: keys are constants (memory entries); detach them")
    order, ranges = _class_ranges(key_labels)
    keys = keys.detach()[order]
    blocks = [(c, keys[lo:hi]) for c, (lo, hi) in ranges.items()]
    return blocked_contrast_loss(anchors, anchor_labels, blocks, temperature, base_temperature)


def blocked_contrast_loss(
    anchors: torch.Tensor,
    anchor_labels: torch.Tensor,
    key_blocks,
    temperature: float = 0.1,
    base_temperature: float = 0.07,
    factors: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``contrast_loss`` of (M, D) anchors against constant keys grouped by class: ``key_blocks``
    is a sequence of ``(class, keys)`` with ``keys`` one (n, D) tensor or a list of them (a class
    may appear more than once; empty tensors are skipped). The keys are read where they are (e.g.
    ``MemoryBank.blocks()``, views of the queues), never copied; each anchor-key similarity is
    computed once and no (M, K) matrix is held. ``factors``: the anchors' ``fold_anchors`` (their
    similarities computed in fewer dimensions; constants, the gradient flows through ``anchors``)."""
    blocks: dict[int, list[torch.Tensor]] = {}
    for c, ks in key_blocks:
        for k in [ks] if torch.is_tensor(ks) else ks:
            if len(k):
                blocks.setdefault(int(c), []).append(k.detach().float())
    with torch.autocast(anchors.device.type, enabled=False):
        return _EagerGrad.apply(anchors.float(), _blocked_terms, anchor_labels, blocks, temperature, base_temperature,
                                factors)


def fold_anchors(rows: torch.Tensor, proj, n_keys: int):
    """Factors (coords (M, c + 1), basis (D, c + 1)) of the normalised embeddings of (M, c) hidden
    rows under the head's last conv ``proj`` = (W (D, c), b (D,)): e = (W h + b) / ||W h + b|| =
    coords @ basis.T with coords = [h, 1] / ||W h + b|| and basis = [W, b]. None when folding
    would not save work against ``n_keys`` keys (c + 1 >= D, or the keys' product with the basis,
    K D (c + 1) multiply-adds, costs more than the M K (D - c - 1) it saves)."""
    w, b = (t.detach().float() for t in proj)
    M, c = rows.shape
    D = w.shape[0]
    if c + 1 >= D or M * (D - c - 1) <= D * (c + 1):
        return None
    with torch.no_grad(), torch.autocast(rows.device.type, enabled=False):
        h = rows.detach().float()
        norms = torch.addmm(b, h, w.T).norm(dim=1, keepdim=True).clamp(min=1e-12)  # F.normalize's eps
        coords = torch.cat([h, torch.ones_like(h[:, :1])], 1) / norms
        return coords, torch.cat([w, b[:, None]], 1)


def in_batch_share(keys: torch.Tensor, labels: torch.Tensor, lo: int, hi: int, temperature: float = 0.1,
                   base_temperature: float = 0.07) -> torch.Tensor:
    """The part of the in-batch ``contrast_loss`` of all (M, D) anchors ``keys`` that anchors
    ``lo:hi`` (the queries) contribute, normalised over all M: summed over disjoint query ranges
    that cover the M anchors it is ``contrast_loss(keys, labels)``. Plain autograd, the gradient
    flowing into the queries and into every key; an (hi - lo, M) similarity matrix."""
    with torch.autocast(keys.device.type, enabled=False):
        keys = keys.float()
        q, yq = keys[lo:hi], labels[lo:hi]
        n_class = torch.bincount(labels)
        n_with_pos = int((n_class[labels] > 1).sum())
        if n_with_pos == 0 or hi <= lo:
            return keys.sum() * 0.0
        s = (q * (1.0 / temperature)) @ keys.T
        same = yq[:, None] == labels[None, :]
        rows = torch.arange(hi - lo, device=keys.device)
        pos = same.clone()
        pos[rows, lo + rows] = False  # an anchor is not its own positive
        neg = ~same
        lse_neg = torch.logsumexp(torch.where(neg, s, torch.finfo(s.dtype).min / 4), 1)
        x = lse_neg[:, None] - s
        per_anchor = torch.where(pos & neg.any(1, keepdim=True), F.softplus(x), 0.0).sum(1)
        n_pos = pos.sum(1)
        a = _scales(n_pos.float(), n_with_pos, temperature, base_temperature)
        return (a * per_anchor).sum()


def gathered_contrast_loss(anchors: torch.Tensor, anchor_labels: torch.Tensor, temperature: float = 0.1,
                           base_temperature: float = 0.07) -> torch.Tensor:
    """The in-batch loss of the anchors of every process (``gather_contrast``): this process's
    (M_r, D) anchors are the queries, the anchors of all processes (gathered with their gradient)
    the keys, and the processes' shares (``in_batch_share``) are summed, with their gradient, so
    every process gets ``contrast_loss`` of the global batch's anchors. Every process must call
    it."""
    parts = all_gather_with_grad(anchors)
    labels = all_gather_rows(anchor_labels)
    rank = torch.distributed.get_rank()
    lo = sum(len(p) for p in parts[:rank])
    share = in_batch_share(torch.cat(parts), labels, lo, lo + len(anchors), temperature, base_temperature)
    return all_sum_with_grad(share)


class _GatherAnchors(torch.autograd.Function):
    @staticmethod
    def forward(ctx, emb, image, pos):
        ctx.save_for_backward(image, pos)
        ctx.shape = emb.shape
        return emb[image, :, pos]

    @staticmethod
    def backward(ctx, grad):
        image, pos = ctx.saved_tensors
        out = grad.new_zeros(ctx.shape)
        out[image, :, pos] = grad  # distinct cells: a plain write, no accumulation
        return out, None, None


def gather_anchors(emb: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(M, D) rows of (B, D, P) embeddings at ``index`` into the flattened (B * P) grid, which must
    not repeat (``sample_anchors``'s never do): the backward writes each anchor's gradient into
    the (B, D, P) map without accumulating."""
    P = emb.shape[2]
    return _GatherAnchors.apply(emb, index // P, index % P)


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

    def blocks(self) -> list[tuple[int, list[torch.Tensor]]]:
        """The filled entries per class, ``(class, [pixel entries, region entries])`` for every
        class with an entry: views of the queues (no copy; once a queue is full its whole
        (size, dim) slice), for ``blocked_contrast_loss``. One host synchronisation (the fill
        counts)."""
        counts = torch.stack([self.pixel_count, self.region_count], 1).tolist()
        return [(c, [self.pixel[c, :n_pixel], self.region[c, :n_region]])
                for c, (n_pixel, n_region) in enumerate(counts) if n_pixel + n_region > 0]

    def keys(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The filled entries of both queues (pixel first) and their class labels, copied into one
        (K, dim) tensor (for inspection; the loss reads ``blocks()``)."""
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
