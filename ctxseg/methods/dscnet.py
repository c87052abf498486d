"""DSCNet (Lai & Vong, IEEE TII 2024): dual-stream contrastive learning for weakly supervised
segmentation from image-level tags, on top of the single-stage baseline ``wsss_cam``.

Only the paper's abstract and Figure 1 were readable and it has no public code, so everything
here is a **CHOICE** (``docs/methods.md#dscnet``), each a setting of ``DSCNetConfig``:

- **PGCL, pixel-wise group contrast.** A training-only projection head maps the decoder features
  to L2-normalised pixel embeddings ``z``. A *group* is the reliable pixels of one class (pseudo
  label not ignored, background included) across all images of the batch; the pseudo labels are
  those the segmentation loss learns from (``wsss_cam``'s rules: an image gated out of the
  segmentation loss gives PGCL nothing either); its centre is the
  confidence-weighted mean of their embeddings (weight: the pixel's refined mask value for its
  class), L2-normalised. Each image gives up to ``pgcl_anchors_per_image`` (512) of its reliable
  pixels, ``pgcl_hard_fraction`` of them hard (predicted as another class than their pseudo
  label), uniformly at random within each kind; each anchor is contrasted with InfoNCE against
  all group centres (``temperature`` 0.1). It learns from pseudo labels, so it
  switches on with the segmentation loss, after the warm-up.
- **SGCL, semantic-wise graph contrast.** One node per (image, tagged class), plus the background
  class of a dataset that has one: the CAM-weighted mean of the decoder features over the image's
  pixels (crop padding left out; CAM weights detached by default), through a training-only MLP. Edges are the ReLU of the nodes' cosine
  similarities (self-loops included), symmetrically normalised (``A``); a 2-layer GCN,
  ``H1 = relu(A (H W1 + b1))``, ``Z = A (H1 W2 + b2)``, gives the node embeddings, L2-normalised. Supervised contrast over nodes: nodes of the same class in other
  images are positives, nodes of other classes negatives; a node without a positive (its class in
  no other image of the batch) contributes nothing, and a batch without any gives 0.
  Class-aware batches (``batch_sampler: class_aware``) make positives common.
- **Dual stream.** ``dual_stream: A`` adds both losses (``pgcl_weight`` = ``sgcl_weight`` = 0.1);
  ``dual_stream: B`` also feeds the graph's class embeddings (the normalised mean of a class's
  node embeddings) to PGCL as its group centres, so the pixel stream is pulled towards the
  semantic stream.

PGCL's budget: the paper gives none; 1024 anchors is pixel contrast's per-GPU budget, whose public
runs put 2 images on each GPU, so ``pgcl_budget: per_image`` (default, a **CHOICE**) gives each
image 512 whatever the batch size and the number of processes; ``pgcl_budget: per_batch`` draws
``pgcl_anchors`` (1024) from the pooled reliable pixels of the process's batch, as before. The
anchors are drawn by pixel, not by class (no per-class quota or qualifying size), so a class gets
anchors in proportion to its reliable area. The forward logs the anchors of each pseudo class
(``anchors/<class>``, see ``log_class_anchors``).

Under torchrun with ``gather_contrast`` (the default) "the batch" is the global batch: the group
centres' sums and the PGCL mean are summed over the processes and the graph holds every process's
nodes, all gathered with their gradient, so each process computes the terms of the whole batch.

Everything is vectorised over images, classes, nodes and anchors. Contrastive similarities are
computed in float32. The projection head and the graph module are training-only heads: the
deployed model is the plain segmenter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ctxseg.data.base import IGNORE_INDEX
from ctxseg.engine.distributed import contrast_gather, sum_gathered
from ctxseg.methods.contrast import (
    BUDGETS,
    ProjectionHead,
    anchor_terms,
    class_counts,
    embedding_map,
    rank_in_groups,
)
from ctxseg.methods.wsss import WSSSCam, WSSSConfig, cam_masks
from ctxseg.models.segmenter import Head, class_argmax


@dataclass
class DSCNetConfig(WSSSConfig):
    """DSCNet = ``wsss_cam`` + PGCL + SGCL + the dual-stream coupling (all CHOICEs, see module).

    Attributes:
        proj_dim: width of the pixel embeddings and of the graph's node embeddings.
        temperature: tau of both InfoNCE losses.
        pgcl_weight, sgcl_weight: weights of the two contrastive losses.
        pgcl_budget: ``per_image`` (default): at most ``pgcl_anchors_per_image`` anchors from each
            image; ``per_batch``: at most ``pgcl_anchors`` from the process's whole batch.
        pgcl_anchors_per_image: most anchor pixels per image (``per_image``; **CHOICE**: pixel
            contrast's 1024 per GPU of 2 images).
        pgcl_anchors: most anchor pixels per process batch (``per_batch`` only).
        pgcl_hard_fraction: share of the anchors drawn from hard pixels (the rest easy; either
            fills in when the other is short).
        detach_centres: stop gradients through the PGCL group centres.
        detach_node_cams: stop gradients through the CAM weights that pool the node features.
        dual_stream: ``A`` (sum of the losses) or ``B`` (graph class embeddings as PGCL centres).
        log_class_anchors: the forward returns ``anchors/<class>`` (PGCL anchors of each class in
            the step's sample) when the dataset has at most this many classes; ``anchors`` and
            ``anchor_classes`` always.
    """

    method: str = "dscnet"
    proj_dim: int = 128
    temperature: float = 0.1
    pgcl_weight: float = 0.1
    sgcl_weight: float = 0.1
    pgcl_budget: str = "per_image"
    pgcl_anchors_per_image: int = 512
    pgcl_anchors: int = 1024
    pgcl_hard_fraction: float = 0.5
    detach_centres: bool = False
    detach_node_cams: bool = True
    dual_stream: str = "A"
    log_class_anchors: int = 40

    def validate(self) -> DSCNetConfig:
        super().validate()
        for name in ("proj_dim", "pgcl_anchors", "pgcl_anchors_per_image"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.pgcl_budget not in BUDGETS:
            raise ValueError(f"pgcl_budget must be one of {BUDGETS}, got {self.pgcl_budget!r}")
        if self.log_class_anchors < 0:
            raise ValueError(f"log_class_anchors must be >= 0, got {self.log_class_anchors}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if not 0.0 <= self.pgcl_hard_fraction <= 1.0:
            raise ValueError(f"pgcl_hard_fraction must lie in [0, 1], got {self.pgcl_hard_fraction}")
        if self.dual_stream not in ("A", "B"):
            raise ValueError(f"dual_stream must be 'A' or 'B', got {self.dual_stream!r}")
        return self


# ------------------------------------------------------------------------------------------------
# Heads
class GraphHead(Head):
    """The graph stream's learnable parts: the node MLP, ``out["node_mlp"]``, and the 2-layer GCN,
    ``out["gcn"]``, with the CAMs that pool the nodes, ``out["node_cams"]`` (detached by default).
    The loss pools and runs them (``node_embeddings``, ``gcn``) once it knows which pixels are
    image and which nodes exist (the image's tags)."""

    def __init__(self, channels: int, dim: int, background: int | None, background_logit: float,
                 detach_cams: bool = True):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(channels, channels), nn.ReLU(inplace=True), nn.Linear(channels, dim))
        self.gcn = nn.ModuleList([nn.Linear(dim, dim), nn.Linear(dim, dim)])
        self.background, self.background_logit, self.detach_cams = background, background_logit, detach_cams

    def forward(self, out):
        masks = cam_masks(out["logits"], self.background, self.background_logit)
        if self.detach_cams:
            masks = masks.detach()
        return {"node_cams": masks, "node_mlp": self.mlp, "gcn": self.gcn}


def node_embeddings(out, valid: torch.Tensor | None = None) -> torch.Tensor:
    """(B, C, proj_dim) node embeddings before the GCN: the CAM-weighted mean of the decoder
    features over the image's pixels (``valid`` (B, h, w) on the features' grid; all when None),
    through the node MLP."""
    cams = out["node_cams"] if valid is None else out["node_cams"] * valid[:, None]
    features = at_least_float32(out["features"])
    return out["node_mlp"](node_features(features, cams.to(features.dtype)))


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32, or in its own precision where that is higher (float64: the layout test)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def node_features(features: torch.Tensor, masks: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(B, C, D) CAM-weighted means ``sum_i m_ic f_i / (eps + sum_i m_ic)`` of (B, D, h, w) features."""
    num = torch.einsum("bchw,bdhw->bcd", masks, features)
    return num / (eps + masks.sum((2, 3)))[..., None]


# ------------------------------------------------------------------------------------------------
# SGCL
def edge_weights(h: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """(N, N) edges ``relu(cos(h_u, h_v))`` between present nodes (self-loops: cos = 1), else 0."""
    hn = F.normalize(h, dim=1)
    return (hn @ hn.T).clamp_min(0) * (present[:, None] & present[None, :])


def gcn(h: torch.Tensor, present: torch.Tensor, layers) -> torch.Tensor:
    """Two GCN layers over the present nodes: ``A (relu(A (h W1 + b1)) W2 + b2)``, with
    ``A = D^-1/2 E D^-1/2`` for the edges E of ``edge_weights``. Absent nodes have no edges and
    come out as 0. h (N, d), present (N,) bool."""
    adj = edge_weights(h, present)
    deg = adj.sum(1)
    dinv = torch.where(deg > 0, deg.clamp_min(1e-12).rsqrt(), 0.0)
    a_hat = dinv[:, None] * adj * dinv[None, :]
    x = F.relu(a_hat @ layers[0](h))
    return a_hat @ layers[1](x)


def node_contrast(z: torch.Tensor, classes: torch.Tensor, images: torch.Tensor, present: torch.Tensor,
                  temperature: float) -> torch.Tensor:
    """Supervised contrast over L2-normalised node embeddings z (N, d).

    For node u with positives P(u) (present nodes of its class in other images) and the set O(u)
    of all other present nodes: ``L_u = -mean_{p in P(u)} log(exp(s_up) / sum_{v in O(u)} exp(s_uv))``
    with ``s = z.z' / tau``; the loss is the mean over nodes with a positive, or 0 (connected to the
    graph) when no node has one."""
    s = (z @ z.T) / temperature
    n = z.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    others = present[:, None] & present[None, :] & ~eye
    pos = others & (classes[:, None] == classes[None, :]) & (images[:, None] != images[None, :])
    has = pos.any(1)
    # Rows without any other node would be all -inf: give them zeros (they have no positive).
    masked = torch.where(others.any(1, keepdim=True), s.masked_fill(~others, float("-inf")), torch.zeros_like(s))
    log_prob = s - torch.logsumexp(masked, 1, keepdim=True)
    per_node = -torch.where(pos, log_prob, 0.0).sum(1) / pos.sum(1).clamp_min(1)
    if not bool(has.any()):
        return z.sum() * 0.0
    return per_node[has].mean()


def node_layout(tags: torch.Tensor, background: int | None):
    """(present, classes, images), each (B*C,), of the nodes in (image, class) order."""
    b, c = tags.shape
    present = tags.bool().clone()
    if background is not None:
        present[:, background] = True
    classes = torch.arange(c, device=tags.device).repeat(b)
    images = torch.arange(b, device=tags.device).repeat_interleave(c)
    return present.reshape(-1), classes, images


def graph_class_embeddings(z: torch.Tensor, classes: torch.Tensor, present: torch.Tensor, num_classes: int):
    """(C, d) normalised mean node embedding per class, and (C,) whether the class has a node."""
    onehot = F.one_hot(classes, num_classes).to(z.dtype) * present[:, None]
    return F.normalize(onehot.T @ z, dim=1), onehot.sum(0) > 0


# ------------------------------------------------------------------------------------------------
# PGCL
def group_centres(z: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, num_classes: int, gather=None):
    """Confidence-weighted, L2-normalised class centres of pixel embeddings.

    z (N, d), labels (N,) with 255 = unreliable, weights (N,). Returns (C, d) centres and (C,)
    whether the class has a reliable pixel. ``gather`` (``gather_contrast``: ``all_gather_with_grad``)
    sums the weighted sums and counts over the processes first: the centres of the global batch."""
    reliable = labels != IGNORE_INDEX
    onehot = F.one_hot(torch.where(reliable, labels, 0), num_classes).to(z.dtype)
    w = onehot * (weights * reliable)[:, None]
    sums, counts = sum_gathered(gather, w.T @ z), sum_gathered(gather, (onehot * reliable[:, None]).sum(0))
    return F.normalize(sums, dim=1), counts > 0


def pixel_confidence(refined: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, h, w) refined mask value of each pixel's pseudo label (any value where it is ignored):
    the weight of the pixel in its group centre."""
    return refined.gather(1, torch.where(labels == IGNORE_INDEX, 0, labels)[:, None])[:, 0]


def sample_pixels(reliable: torch.Tensor, hard: torch.Tensor, n: int, hard_fraction: float) -> torch.Tensor:
    """Indices of at most ``n`` reliable pixels, ``hard_fraction`` of them hard when there are
    enough (either kind fills in for the other), uniformly at random within each kind."""
    hard_idx = torch.nonzero(reliable & hard).flatten()
    easy_idx = torch.nonzero(reliable & ~hard).flatten()
    n_hard = min(hard_idx.numel(), max(round(n * hard_fraction), n - easy_idx.numel()))
    n_easy = min(easy_idx.numel(), n - n_hard)
    hard_idx = hard_idx[torch.randperm(hard_idx.numel(), device=hard_idx.device)[:n_hard]]
    easy_idx = easy_idx[torch.randperm(easy_idx.numel(), device=easy_idx.device)[:n_easy]]
    return torch.cat([hard_idx, easy_idx])


def sample_pixels_per_image(reliable: torch.Tensor, hard: torch.Tensor, n: int, hard_fraction: float) -> torch.Tensor:
    """``sample_pixels`` in every image at once: flat indices into (B, P) ``reliable`` / ``hard``
    of at most ``n`` reliable pixels per image, ``hard_fraction`` of them hard when there are
    enough (either kind fills in for the other), uniformly at random within each (image, kind)."""
    B, P = reliable.shape
    image = torch.arange(B, device=reliable.device)[:, None].expand(B, P)
    n_hard = (reliable & hard).sum(1)
    n_easy = (reliable & ~hard).sum(1)
    keep_hard = torch.minimum(n_hard, torch.clamp(n - n_easy, min=round(n * hard_fraction)))
    keep_easy = torch.minimum(n_easy, n - keep_hard)
    pix = reliable.flatten().nonzero().squeeze(1)
    groups = image.flatten()[pix] * 2 + (~hard.flatten()[pix]).long()  # (image, easy)
    order, rank = rank_in_groups(groups, B * 2, shuffle=True)
    keep = torch.stack([keep_hard, keep_easy], dim=1).flatten()
    return pix[order[rank < keep[groups[order]]]]


def group_contrast(anchors: torch.Tensor, anchor_labels: torch.Tensor, centres: torch.Tensor,
                   has_centre: torch.Tensor, temperature: float, gather=None) -> torch.Tensor:
    """InfoNCE of each anchor (M, d) against all existing centres (C, d): the mean over anchors of
    ``-log(exp(z.c_y / tau) / sum_k exp(z.c_k / tau))``. Anchors whose class has no centre are
    skipped; no anchor gives 0 (connected to the graph). ``gather`` (see ``group_centres``): the
    mean over the anchors of every process."""
    keep = has_centre[anchor_labels] if anchor_labels.numel() else anchor_labels.bool()
    if gather is not None:  # collectives: every process, with or without anchors
        logits = (anchors @ centres.T / temperature).masked_fill(~has_centre[None, :], float("-inf"))
        per_anchor = F.cross_entropy(logits[keep], anchor_labels[keep], reduction="sum") if bool(keep.any()) else 0.0
        total = sum_gathered(gather, torch.stack([per_anchor + 0.0 * (anchors.sum() + centres.sum()), keep.sum().float()]))
        return total[0] / total[1].clamp(min=1)
    if not bool(keep.any()):
        return anchors.sum() * 0.0 + centres.sum() * 0.0
    logits = (anchors[keep] @ centres.T / temperature).masked_fill(~has_centre[None, :], float("-inf"))
    return F.cross_entropy(logits, anchor_labels[keep])


# ------------------------------------------------------------------------------------------------
class DSCNet(WSSSCam):
    """``wsss_cam`` + PGCL + SGCL, coupled as ``dual_stream`` A or B."""

    config_class = DSCNetConfig
    key_settings = ("dual_stream",)

    @classmethod
    def embedding_feature(cls, config):
        return "projection"

    def heads(self, model):
        cfg = self.cfg
        return {
            "pgcl_proj": ProjectionHead(model.decoder_channels, cfg.proj_dim),
            "sgcl_graph": GraphHead(model.decoder_channels, cfg.proj_dim, self.info.background,
                                    cfg.background_logit, cfg.detach_node_cams),
        }

    def graph_stream(self, out, tags, valid=None):
        """Node embeddings (N, d) after the GCN, normalised, and the node layout. Under
        ``gather_contrast`` with several processes the graph holds the nodes of every process
        (gathered with their gradient, images numbered over the global batch), so every process
        runs the GCN of the global batch."""
        present, classes, images = node_layout(tags, self.info.background)
        h = at_least_float32(node_embeddings(out, valid))
        h = h.reshape(-1, h.shape[-1])
        gather = contrast_gather(self.cfg)
        if gather is not None:
            layouts = gather(torch.stack([present.long(), classes, images], 1))
            offsets = [0]
            for part in layouts[:-1]:
                offsets.append(offsets[-1] + len(part) // max(1, tags.shape[1]))
            present = torch.cat([p[:, 0] for p in layouts]).bool()
            classes = torch.cat([p[:, 1] for p in layouts])
            images = torch.cat([p[:, 2] + o for p, o in zip(layouts, offsets)])
            h = torch.cat(gather(h))
        with torch.autocast(h.device.type, enabled=False):
            z = F.normalize(gcn(h, present, out["gcn"]), dim=1)
        return z, present, classes, images

    def pixel_stream(self, out, weak):
        """(anchor embeddings, anchor labels, pixel embeddings, pixel labels, pixel weights)."""
        z = embedding_map(out)  # (B, d, h, w), L2-normalised
        labels = weak["labels"]
        if labels.shape[-2:] != z.shape[-2:]:
            raise ValueError(f"pseudo labels {tuple(labels.shape)} and embeddings {tuple(z.shape)} differ in size")
        flat_z = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        flat_y = labels.reshape(-1)
        conf = pixel_confidence(weak["refined"], labels)
        preds = class_argmax(out["logits"])
        reliable, hard = labels != IGNORE_INDEX, preds != labels
        if self.cfg.pgcl_budget == "per_batch":
            idx = sample_pixels(reliable.reshape(-1), hard.reshape(-1), self.cfg.pgcl_anchors, self.cfg.pgcl_hard_fraction)
        else:
            idx = sample_pixels_per_image(reliable.flatten(1), hard.flatten(1), self.cfg.pgcl_anchors_per_image,
                                          self.cfg.pgcl_hard_fraction)
        return flat_z[idx], flat_y[idx], flat_z, flat_y, conf.reshape(-1)

    def contrast(self, out, batch, weak):
        """(PGCL, SGCL, the PGCL anchors' labels) for the pseudo labels of ``weak_terms``. Under
        ``gather_contrast`` with several processes the group centres, the graph and both means
        cover the global batch: every process gets the terms a single process gets for it."""
        cfg = self.cfg
        c = self.info.num_classes
        gather = contrast_gather(self.cfg)
        z_nodes, present, classes, images = self.graph_stream(out, batch["tags"], weak["valid"])
        sgcl = node_contrast(z_nodes, classes, images, present, cfg.temperature)
        anchors, anchor_labels, z, y, conf = self.pixel_stream(out, weak)
        if cfg.dual_stream == "B":
            centres, has = graph_class_embeddings(z_nodes, classes, present, c)
        else:
            centres, has = group_centres(z, y, conf, c, gather)
        if cfg.detach_centres:
            centres = centres.detach()
        pgcl = group_contrast(anchors, anchor_labels, centres, has, cfg.temperature, gather)
        return pgcl, sgcl, anchor_labels

    def forward(self, out, batch, step):
        cfg = self.cfg
        loss, terms, weak = self.weak_terms(out, batch, step)
        c = self.info.num_classes
        pgcl, sgcl, anchor_labels = self.contrast(out, batch, weak)
        loss = loss + (cfg.pgcl_weight if weak["seg_on"] else 0.0) * pgcl + cfg.sgcl_weight * sgcl
        terms.update({"pgcl": pgcl.detach(), "sgcl": sgcl.detach()})
        terms.update(anchor_terms(class_counts(anchor_labels, c), self.info.class_names, cfg.log_class_anchors,
                                  contrast_gather(cfg)))
        return loss, terms
