"""Slow loop oracles for wsss_cam and DSCNet, written straight from the equations of docs/methods.md,
"WSSS CAM" (WS-2)-(WS-9) and "DSCNet" (DSC-1)-(DSC-7): one pixel, class, node and anchor at a time,
float64, torch ops only so that autograd gives the reference gradients too."""

from __future__ import annotations

import torch


def class_scores(y, masks, eps, p, lam, valid=None):
    """Normalised global weighted pooling plus the focal size penalty over the valid pixels
    (docs/methods.md (WS-2))."""
    b, c, h, w = y.shape
    out = torch.zeros(b, c, dtype=torch.float64)
    for i in range(b):
        for k in range(c):
            num, den, total, area = 0.0, eps, 0.0, 0
            for r in range(h):
                for s in range(w):
                    if valid is not None and not valid[i, r, s]:
                        continue
                    num = num + masks[i, k, r, s] * y[i, k, r, s]
                    den = den + masks[i, k, r, s]
                    total = total + masks[i, k, r, s]
                    area += 1
            mean = total / area
            out[i, k] = num / den + (1 - mean) ** p * torch.log(lam + mean)
    return out


def pamr(image, masks, dilations, iters, temperature, valid=None):
    """PAMR, docs/methods.md (WS-4)-(WS-5).

    Image and masks on the same grid; replicate padding = clamped coordinates. The local std is
    1-stage-wseg's: per channel over every dilation's 3x3 neighbourhood, centre included once per
    dilation, unbiased. With ``valid``: padding neighbours weigh 0, padding pixels hold 0."""
    b, _, h, w = image.shape
    image, masks = image.double(), masks.double()
    offsets = [(dy * d, dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    weights = torch.zeros(b, len(offsets), h, w, dtype=torch.float64)

    def at(r, s):
        return min(max(r, 0), h - 1), min(max(s, 0), w - 1)

    for i in range(b):
        for r in range(h):
            for s in range(w):
                if valid is not None and not valid[i, r, s]:
                    continue
                nbs = [image[i, :, at(r + oy, s + ox)[0], at(r + oy, s + ox)[1]] for oy, ox in offsets]
                window = torch.stack(nbs + [image[i, :, r, s]] * len(dilations), 1)  # (3, 9 * D)
                std = window.std(1, unbiased=True)
                kappa, use = [], []
                for (oy, ox), nb in zip(offsets, nbs):
                    kappa.append((-(image[i, :, r, s] - nb).abs() / (temperature * std + 1e-8)).mean())
                    use.append(valid is None or bool(valid[i, at(r + oy, s + ox)[0], at(r + oy, s + ox)[1]]))
                e = torch.stack([torch.exp(k) if u else torch.zeros((), dtype=torch.float64) for k, u in zip(kappa, use)])
                weights[i, :, r, s] = e / e.sum()
    if valid is not None:
        masks = masks * valid[:, None]
    for _ in range(iters):
        new = torch.zeros_like(masks)
        for i in range(b):
            for r in range(h):
                for s in range(w):
                    for k, (oy, ox) in enumerate(offsets):
                        rr, ss = at(r + oy, s + ox)
                        new[i, :, r, s] += weights[i, k, r, s] * masks[i, :, rr, ss]
        masks = new
    return masks


def group_centres(z, labels, weights, num_classes):
    """PGCL group centres: the confidence-weighted sum of each class's reliable embeddings, divided
    by its length (docs/methods.md (DSC-1))."""
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


def graph_centres(nodes, classes, present, num_classes):
    """Dual stream B's PGCL centres: for each class, the mean of the embeddings of its nodes
    (present ones only), divided by its length; a class without a node has none (docs/methods.md
    (DSC-7))."""
    d = nodes.shape[1]
    centres = torch.zeros(num_classes, d, dtype=torch.float64)
    has = torch.zeros(num_classes, dtype=torch.bool)
    for k in range(num_classes):
        mine = [u for u in range(nodes.shape[0]) if present[u] and int(classes[u]) == k]
        if not mine:
            continue
        mean = sum(nodes[u].double() for u in mine) / len(mine)
        centres[k] = mean / mean.norm()
        has[k] = True
    return centres, has


def group_contrast(anchors, labels, centres, has, tau):
    """PGCL: InfoNCE of each anchor against every existing centre, averaged over the anchors whose
    class has one (docs/methods.md (DSC-3))."""
    losses = []
    for i in range(anchors.shape[0]):
        y = int(labels[i])
        if not has[y]:
            continue
        denom = sum(torch.exp(anchors[i] @ centres[k] / tau) for k in range(centres.shape[0]) if has[k])
        losses.append(-torch.log(torch.exp(anchors[i] @ centres[y] / tau) / denom))
    return torch.stack(losses).mean() if losses else torch.zeros((), dtype=torch.float64)


def gcn(h, present, w1, b1, w2, b2):
    """Two GCN layers over the present nodes, with ReLU-cosine edges (self-loops included) and
    symmetric normalisation (docs/methods.md (DSC-5))."""
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
    """SGCL: supervised contrast over nodes, positives the same class in other images, the
    denominator every other present node (docs/methods.md (DSC-6))."""
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


def pseudo_labels_pixel_best(masks, min_conf, ambiguity):
    """ctxseg's former per-pixel rule (docs/methods.md (WS-7))."""
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


def pseudo_labels_class_max(masks, cutoff, floor, background=None, cutoff_background=0.7, drop_ambiguous=True):
    """1-stage-wseg's rule: each class thresholded against its own peak in the image
    (docs/methods.md (WS-6))."""
    b, c, h, w = masks.shape
    out = torch.full((b, h, w), 255, dtype=torch.long)
    for i in range(b):
        thr = []
        for k in range(c):
            peak = max(float(masks[i, k, r, s]) for r in range(h) for s in range(w))
            thr.append(max((cutoff_background if k == background else cutoff) * peak, floor))
        for r in range(h):
            for s in range(w):
                claims = [(float(masks[i, k, r, s]), k) for k in range(c) if float(masks[i, k, r, s]) > thr[k]]
                if len(claims) == 1 or (claims and not drop_ambiguous):
                    out[i, r, s] = max(claims)[1]
    return out


def balanced_ce(logits, labels):
    """1-stage-wseg's class-balanced CE (docs/methods.md (WS-9)), one image and one pixel at a time
    (logits and labels on the same grid; every pixel is image)."""
    b, c, h, w = logits.shape
    per_image = []
    for i in range(b):
        counts = [sum(int(labels[i, r, s]) == k for r in range(h) for s in range(w)) for k in range(c)]
        n = sum(counts)
        total = torch.zeros((), dtype=torch.float64)
        for r in range(h):
            for s in range(w):
                k = int(labels[i, r, s])
                if k == 255:
                    continue
                ce = -torch.log_softmax(logits[i, :, r, s].double(), 0)[k]
                total = total + (n - counts[k]) / (1 + n) * ce
        per_image.append(total / (h * w))
    return torch.stack(per_image).mean()


def pgcl_counts(reliable, hard, n, hard_fraction, per_image=True):
    """PGCL anchors to draw as {image: (hard, easy)}: from each image's reliable pixels
    (``per_image``), or from the whole batch's (image -1), ``round(n * hard_fraction)`` hard
    ones when there are enough, easy ones filling in, and the other way round (docs/methods.md
    (DSC-2))."""
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
