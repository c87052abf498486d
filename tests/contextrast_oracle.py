"""Deliberately simple loop implementations of Contextrast's pieces, read straight off the
definitions in docs/methods.md, "Contextrast" (CTX-2)-(CTX-10), for tests/test_contextrast.py.
Slow on purpose: loops over stages, classes, images and pixels; float64; the distance transform is
scipy's."""

import math

import numpy as np
import torch
from scipy import ndimage


def anchors(embeds, labels, C, fusion=True, w_h=0.5, normalize=True):
    """embeds: per stage (B, D, h, w); labels: per stage (B, h, w). Returns per stage a dict
    class -> anchor (D,) for the classes present at that stage: masked means (docs/methods.md
    (CTX-2)), then context fusion with the deepest stage (CTX-3)."""
    means = []
    for emb, lab in zip(embeds, labels):
        B, D, h, w = emb.shape
        m = {}
        for c in range(C):
            vecs = []
            for b in range(B):
                for y in range(h):
                    for x in range(w):
                        if int(lab[b, y, x]) == c:
                            v = emb[b, :, y, x].double()
                            vecs.append(v / v.norm() if normalize else v)
            if vecs:
                a = torch.stack(vecs).mean(0)
                m[c] = a / a.norm() if normalize else a
        means.append(m)
    out = []
    for i, m in enumerate(means):
        fused = {}
        for c, a in m.items():
            if fusion and i < len(means) - 1 and c in means[-1]:
                a = (1 - w_h) * a + w_h * means[-1][c]
                a = a / a.norm() if normalize else a
            fused[c] = a
        out.append(fused)
    return out


def bane_kept(labels, preds, C, ratio, negatives="missed", per_image=True):
    """(B, h, w) bool of the kept boundary-near error pixels, by scipy's EDT per (image, class):
    error regions (docs/methods.md (CTX-4)), distances on the grid given (CTX-5) and the K_s cut with
    ties kept (CTX-7)."""
    labels, preds = labels.numpy(), preds.numpy()
    B = labels.shape[0]
    dist = np.zeros(labels.shape)
    groups = {}
    for b in range(B):
        valid = (labels[b] >= 0) & (labels[b] < C)
        error = valid & (preds[b] != labels[b])
        owner = labels[b] if negatives == "missed" else preds[b]
        for c in range(C):
            region = error & (owner == c)
            if not region.any():
                continue
            dist[b][region] = ndimage.distance_transform_edt(region)[region]
            for y, x in zip(*np.nonzero(region)):
                groups.setdefault((b, c) if per_image else c, []).append((b, y, x))
    kept = np.zeros(labels.shape, dtype=bool)
    for members in groups.values():
        ds = sorted(dist[m] for m in members)
        k = max(1, math.ceil(round(ratio * len(ds), 9)))
        cut = ds[k - 1]
        for m in members:
            kept[m] = dist[m] <= cut
    return torch.from_numpy(kept)


def negatives(labels, preds, kept, C, reading="missed"):
    """dict class -> list of flat pixel indices that are negatives of that class's anchor, by
    either reading of BANE, or all other-class pixels without it (docs/methods.md (CTX-8))."""
    labels, preds = labels.flatten().tolist(), preds.flatten().tolist()
    kept = None if kept is None else kept.flatten().tolist()
    out = {}
    for c in range(C):
        other = [p for p, y in enumerate(labels) if 0 <= y < C and y != c]
        if kept is None:
            out[c] = other
            continue
        if reading == "missed":
            pool = [p for p in other if kept[p]]
        else:
            pool = [p for p in other if kept[p] and preds[p] == c]
        out[c] = pool if pool else other
    return out


def stage_loss(emb, labels, anchor, negs, C, T=0.1, normalize=True):
    """mean over classes present of L^n (docs/methods.md (CTX-9), (CTX-10)), with loops over
    positives and negatives."""
    B, D, h, w = emb.shape
    flat = emb.double().permute(0, 2, 3, 1).reshape(-1, D)
    if normalize:
        flat = flat / flat.norm(dim=1, keepdim=True)
    lab = labels.flatten().tolist()
    per_class = []
    for c in range(C):
        pos = [p for p, y in enumerate(lab) if y == c]
        if not pos:
            continue
        a = anchor[c]
        terms = []
        for p in pos:
            sp = torch.exp(a @ flat[p] / T)
            sn = sum((torch.exp(a @ flat[q] / T) for q in negs[c]), torch.zeros((), dtype=torch.float64))
            terms.append(-torch.log(sp / (sp + sn)))
        per_class.append(torch.stack(terms).mean())
    return torch.stack(per_class).mean() if per_class else torch.zeros((), dtype=torch.float64)


def total_loss(embeds, labels, preds, C, cfg):
    """L_PA = sum_i λ_i mean_n L_i^n (docs/methods.md (CTX-10)), every piece from the loops above."""
    A = anchors(embeds, labels, C, cfg.fusion, cfg.fusion_weight, cfg.normalize)
    if cfg.detach_anchors:
        A = [{c: a.detach() for c, a in m.items()} for m in A]
    total = torch.zeros((), dtype=torch.float64)
    per_stage = []
    for i, (emb, lab, pred) in enumerate(zip(embeds, labels, preds)):
        kept = bane_kept(lab, pred, C, cfg.bane_ratio, cfg.bane_negatives, cfg.bane_percentile == "image") \
            if cfg.bane else None
        negs = negatives(lab, pred, kept, C, cfg.bane_negatives)
        li = stage_loss(emb, lab, A[i], negs, C, cfg.temperature, cfg.normalize)
        per_stage.append(li)
        total = total + cfg.stage_weights[i] * li
    return total, per_stage
