"""Slow loop oracles for wsss_cam and DSCNet, written straight from methods.md section 4 and the
docstrings of ctxseg.methods.wsss / dscnet: one pixel, class, node and anchor at a time, float64,
torch ops only so that autograd gives the reference gradients too."""

from __future__ import annotations

import torch


def class_scores(y, masks, eps, p, lam):
    b, c, h, w = y.shape
    out = torch.zeros(b, c, dtype=torch.float64)
    for i in range(b):
        for k in range(c):
            num, den, total = 0.0, eps, 0.0
            for r in range(h):
                for s in range(w):
                    num = num + masks[i, k, r, s] * y[i, k, r, s]
                    den = den + masks[i, k, r, s]
                    total = total + masks[i, k, r, s]
            mean = total / (h * w)
            out[i, k] = num / den + (1 - mean) ** p * torch.log(lam + mean)
    return out


def pamr(image, masks, dilations, iters, temperature):
    """Image and masks on the same grid; replicate padding = clamped coordinates."""
    b, _, h, w = image.shape
    image, masks = image.double(), masks.double()
    offsets = [(dy * d, dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    weights = torch.zeros(b, len(offsets), h, w, dtype=torch.float64)
    for i in range(b):
        for r in range(h):
            for s in range(w):
                nbs = [image[i, :, min(max(r + oy, 0), h - 1), min(max(s + ox, 0), w - 1)] for oy, ox in offsets]
                stack = torch.stack(nbs, 1)  # (3, K)
                std = stack.std(1, unbiased=False)
                kappa = [(-(image[i, :, r, s] - nb).abs() / (temperature * std + 1e-8)).mean() for nb in nbs]
                weights[i, :, r, s] = torch.softmax(torch.stack(kappa), 0)
    for _ in range(iters):
        new = torch.zeros_like(masks)
        for i in range(b):
            for r in range(h):
                for s in range(w):
                    for k, (oy, ox) in enumerate(offsets):
                        rr, ss = min(max(r + oy, 0), h - 1), min(max(s + ox, 0), w - 1)
                        new[i, :, r, s] += weights[i, k, r, s] * masks[i, :, rr, ss]
        masks = new
    return masks


def group_centres(z, labels, weights, num_classes):
    d = z.shape[1]
    centres = torch.zeros(num_classes, d, dtype=torch.float64)
    has = torch.zeros(num_classes, dtype=torch.bool)
    for k in range(num_classes):
        acc = torch.zeros(d, dtype=torch.float64)
        for i in range(z.shape[0]):
            if int(labels[i]) == k:
                acc = acc + weights[i] * z[i]
                has[k] = True
        if has[k]:
            centres[k] = acc / acc.norm().clamp_min(1e-12)
    return centres, has


def group_contrast(anchors, labels, centres, has, tau):
    losses = []
    for i in range(anchors.shape[0]):
        y = int(labels[i])
        if not has[y]:
            continue
        denom = sum(torch.exp(anchors[i] @ centres[k] / tau) for k in range(centres.shape[0]) if has[k])
        losses.append(-torch.log(torch.exp(anchors[i] @ centres[y] / tau) / denom))
    return torch.stack(losses).mean() if losses else torch.zeros((), dtype=torch.float64)


def gcn(h, present, w1, b1, w2, b2):
    n = h.shape[0]
    idx = [u for u in range(n) if present[u]]
    cos = {}
    for u in idx:
        for v in idx:
            cos[u, v] = torch.clamp(h[u] @ h[v] / (h[u].norm() * h[v].norm()), min=0.0)
    deg = {u: sum(cos[u, v] for v in idx) for u in idx}

    def propagate(x):
        out = torch.zeros_like(x)
        for u in idx:
            for v in idx:
                out[u] = out[u] + cos[u, v] / torch.sqrt(deg[u] * deg[v]) * x[v]
        return out

    x = torch.relu(propagate(h @ w1.T + b1))
    return propagate(x @ w2.T + b2)


def node_contrast(z, classes, images, present, tau):
    n = z.shape[0]
    losses = []
    for u in range(n):
        if not present[u]:
            continue
        others = [v for v in range(n) if v != u and present[v]]
        positives = [v for v in others if classes[v] == classes[u] and images[v] != images[u]]
        if not positives:
            continue
        denom = sum(torch.exp(z[u] @ z[v] / tau) for v in others)
        losses.append(torch.stack([-torch.log(torch.exp(z[u] @ z[p] / tau) / denom) for p in positives]).mean())
    return torch.stack(losses).mean() if losses else torch.zeros((), dtype=torch.float64)


def pseudo_labels(masks, min_conf, ambiguity):
    b, c, h, w = masks.shape
    out = torch.full((b, h, w), 255, dtype=torch.long)
    for i in range(b):
        for r in range(h):
            for s in range(w):
                vals = sorted(((float(masks[i, k, r, s]), k) for k in range(c)), reverse=True)
                best, k = vals[0]
                second = vals[1][0] if c > 1 else 0.0
                if best >= min_conf and second < ambiguity * best:
                    out[i, r, s] = k
    return out



def pgcl_counts(reliable, hard, n, hard_fraction, per_image=True):
    """PGCL anchors to draw as {image: (hard, easy)}: from each image's reliable pixels
    (``per_image``), or from the whole batch's (image -1), ``round(n * hard_fraction)`` hard
    ones when there are enough, easy ones filling in, and the other way round."""
    groups = range(reliable.shape[0]) if per_image else [-1]
    out = {}
    for b in groups:
        rel = reliable[b] if b >= 0 else reliable.reshape(-1)
        hrd = hard[b] if b >= 0 else hard.reshape(-1)
        n_hard = sum(1 for r, h in zip(rel.tolist(), hrd.tolist()) if r and h)
        n_easy = sum(1 for r, h in zip(rel.tolist(), hrd.tolist()) if r and not h)
        want_hard = round(n * hard_fraction)
        if n_easy < n - want_hard:  # too few easy pixels: hard ones fill in
            want_hard = n - n_easy
        keep_hard = min(n_hard, want_hard)
        keep_easy = min(n_easy, n - keep_hard)
        out[b] = (keep_hard, keep_easy)
    return out
