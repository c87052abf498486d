"""Deliberately simple loop implementations of pixel contrast: the oracles the vectorised code in
``ctxseg.methods.contrast`` (pixel contrast's sampler, loss and memory bank) is tested against
(and benchmarked against, in benchmarks/bench_pixel_contrast.py). Written for obviousness, not
speed: Python loops over images, classes, anchors and queue entries, straight from the formulas in
docs/methods.md: the loss (PC-1)-(PC-4) of "Pixel contrast", the anchor budgets and hard/easy split
(SH-6)-(SH-7) and the memory bank (SH-8) of "Shared contrast machinery"."""

from __future__ import annotations

import torch

IGNORE = 255


def sample_counts(labels, preds, num_classes, max_samples, max_views, per_image=None, min_share=None):
    """Per (image, class): (hard kept, easy kept), by the reference code's branches
    (docs/methods.md (SH-6), (SH-7)). Also returns n_view.

    The reference: a class qualifies in an image with more than ``max_views`` pixels, and
    ``n_view = min(max_samples // qualifying pairs of the batch, max_views)``. With ``min_share``
    it needs more than ``min_share * pixels of the image``; with ``per_image`` image b's n_view is
    ``min(per_image // its own qualifying classes, max_views)``, and a class gives at most its
    pixels. Returns n_view as a list, one per image (0 without a qualifying class)."""
    B, P = labels.shape
    threshold = max_views if min_share is None else min_share * P
    qualifying = []
    for b in range(B):
        for c in range(num_classes):
            if int((labels[b] == c).sum()) > threshold:
                qualifying.append((b, c))
    if not qualifying:
        return {}, [0] * B
    n_views = []
    for b in range(B):
        mine = [q for q in qualifying if q[0] == b]
        if not mine:
            n_views.append(0)
        elif per_image is None:
            n_views.append(max(1, min(max_samples // len(qualifying), max_views)))
        else:
            n_views.append(max(1, min(per_image // len(mine), max_views)))
    counts = {}
    for b, c in qualifying:
        is_c = labels[b] == c
        n_view = min(n_views[b], int(is_c.sum()))
        num_hard = int((is_c & (preds[b] != c)).sum())
        num_easy = int((is_c & (preds[b] == c)).sum())
        if num_hard >= n_view / 2 and num_easy >= n_view / 2:
            keep_hard = n_view // 2
            keep_easy = n_view - keep_hard
        elif num_hard >= n_view / 2:
            keep_easy = num_easy
            keep_hard = n_view - keep_easy
        else:
            keep_hard = num_hard
            keep_easy = n_view - keep_hard
        counts[(b, c)] = (keep_hard, keep_easy)
    return counts, n_views


def sample_anchors(emb, labels, preds, num_classes, max_samples, max_views, per_image=None, min_share=None):
    """Loop sampler over (B, D, P) embeddings: returns (anchor features (M, D), labels (M,)).

    Each (image, class) gathers its own anchors from the full embedding map, as the public
    reference does; hard and easy anchors drawn at random within their kind (docs/methods.md (SH-7))."""
    counts, _ = sample_counts(labels, preds, num_classes, max_samples, max_views, per_image, min_share)
    feats, ys = [], []
    for (b, c), (keep_hard, keep_easy) in counts.items():
        hard = ((labels[b] == c) & (preds[b] != c)).nonzero().squeeze(1)
        easy = ((labels[b] == c) & (preds[b] == c)).nonzero().squeeze(1)
        idx = torch.cat([hard[torch.randperm(len(hard))[:keep_hard]], easy[torch.randperm(len(easy))[:keep_easy]]])
        feats.append(emb[b][:, idx].T)
        ys.append(torch.full((len(idx),), c))
    if not feats:
        return emb.new_zeros(0, emb.shape[1]), labels.new_zeros(0)
    return torch.cat(feats), torch.cat(ys)


def contrast_loss(anchors, anchor_labels, keys=None, key_labels=None, temperature=0.1, base_temperature=0.07):
    """L_i = -(T/T_base) * mean_{j in P(i)} [s_ij - log(exp(s_ij) + sum_{k in N(i)} exp(s_ik))],
    averaged over anchors with at least one positive; anchors are their own keys when none given
    (docs/methods.md (PC-1)-(PC-3); keys from the queues: (PC-4))."""
    self_contrast = keys is None
    if self_contrast:
        keys, key_labels = anchors, anchor_labels
    terms = []
    for i in range(len(anchors)):
        s = anchors[i] @ keys.T / temperature  # one row
        positives = [j for j in range(len(keys)) if key_labels[j] == anchor_labels[i] and not (self_contrast and j == i)]
        negatives = [k for k in range(len(keys)) if key_labels[k] != anchor_labels[i]]
        if not positives:
            continue
        # Shift by the row maximum so that exp cannot overflow; the shift cancels in each term.
        m = s.max().detach()
        neg = sum((torch.exp(s[k] - m) for k in negatives), torch.zeros((), dtype=s.dtype))
        per_pos = [(s[j] - m) - torch.log(torch.exp(s[j] - m) + neg) for j in positives]
        terms.append(-(temperature / base_temperature) * sum(per_pos) / len(per_pos))
    if not terms:
        return anchors.sum() * 0.0
    return sum(terms) / len(terms)


def fifo_push(queue, ptr, count, keys, labels):
    """Write keys one at a time: slot ptr[c], then advance ptr[c] by one, wrapping at the size
    (docs/methods.md (SH-8): the pointer moves by the number written)."""
    queue, ptr, count = queue.clone(), ptr.clone(), count.clone()
    size = queue.shape[1]
    for key, c in zip(keys, labels.tolist()):
        queue[c, ptr[c]] = key
        ptr[c] = (ptr[c] + 1) % size
        count[c] = min(count[c] + 1, size)
    return queue, ptr, count


def region_keys(emb, labels, num_classes):
    """The L2-normalised mean embedding of each (image, class) present, image-major
    (docs/methods.md (SH-8), region keys)."""
    keys, ys = [], []
    for b in range(emb.shape[0]):
        for c in range(num_classes):
            sel = labels[b] == c
            if sel.any():
                mean = emb[b][:, sel].mean(1)
                keys.append(mean / max(float(mean.norm()), 1e-12))
                ys.append(c)
    return torch.stack(keys), torch.tensor(ys)

