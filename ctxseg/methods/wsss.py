"""Single-stage weakly supervised segmentation from image-level tags (``wsss_cam``).

The baseline DSCNet builds on. methods.md section 4 marks all of it a **CHOICE**, following the
public single-stage baseline 1-stage-wseg (Araslanov & Roth, CVPR 2020); every choice is a
setting of ``WSSSConfig``. The training loss never reads the pixel labels, only ``batch["tags"]``.

1. **CAMs from the class logits.** The segmenter's logits ``y`` (B, C, h, w) at stride 4 become
   class activation masks ``m = softmax_c(y)``; on datasets with a background class (VOC) its
   logit is replaced by the constant ``background_logit`` first, so "background" is whatever no
   class claims (CHOICE). Datasets without one (the synthetic scenes, whose every class is a
   tagged thing or stuff class) use the plain softmax.
2. **Class scores** by normalised global weighted pooling plus the focal size penalty (CHOICE):
   ``s_c = sum_i m_ic y_ic / (eps + sum_i m_ic) + (1 - mean_i m_ic)^p log(lambda + mean_i m_ic)``,
   trained with the multilabel soft-margin loss against the tags (the background class excluded:
   every image has it).
3. **Pseudo labels** (no gradient): the masks of classes not in the image's tags are zeroed, the
   rest refined by PAMR (``pamr``) on the image resized to the mask grid, and each pixel takes
   its best class if that is confident (``>= pseudo_min``) and unambiguous (the runner-up below
   ``pseudo_ambiguity`` times the best); other pixels are ignored (CHOICE: thresholds relative to
   each pixel's best class).
4. **Segmentation loss**: CE of the raw logits (the learned background channel included) on the
   pseudo labels, switched on after a classification warm-up of ``seg_warmup`` of the run
   (1-stage-wseg: 5 of 24 epochs). The deployed model is the plain segmenter: its argmax is the
   prediction, exactly as for the supervised methods.

Evaluation follows the field (``evaluate_weak``): CAM mIoU and pseudo-label mIoU on the training
images (single scale, no flip, no CRF; the tags of the image are given, as in the field), and
segmentation mIoU on val by the shared evaluator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ctxseg.config import TrainConfig
from ctxseg.data.base import IGNORE_INDEX, DatasetInfo
from ctxseg.engine.metrics import SegMetrics
from ctxseg.methods.base import Method, cross_entropy
from ctxseg.models.segmenter import upsample_to


@dataclass
class WSSSConfig(TrainConfig):
    """``wsss_cam``: CAMs, PAMR pseudo labels and self-training from image-level tags.

    Every field below is a CHOICE of methods.md section 4 (1-stage-wseg's values where it has one).

    Attributes:
        background_logit: fixed logit of the background class in the CAM softmax (only for
            datasets with a background class).
        ngwp_eps: eps in the normalised global weighted pooling.
        focal_p, focal_lambda: exponent p and offset lambda of the size penalty
            ``(1 - mean m)^p log(lambda + mean m)``; ``focal_p=0`` with ``focal_lambda=1`` turns it off.
        seg_warmup: fraction of the run trained with the classification loss only, before the
            segmentation loss on pseudo labels switches on (5/24 as in 1-stage-wseg).
        seg_weight: weight of the segmentation loss after the warm-up.
        pamr_iters: PAMR iterations.
        pamr_dilations: dilations of PAMR's 3x3 neighbourhoods (8 neighbours each).
        pamr_temperature: affinity scale: ``-|I_i - I_j| / (pamr_temperature * std)``.
        pseudo_min: least refined mask value for a pixel to take its best class.
        pseudo_ambiguity: a pixel whose runner-up class reaches this fraction of its best is
            ambiguous and ignored.
    """

    method: str = "wsss_cam"
    batch_sampler: str = "class_aware"
    background_logit: float = 1.0
    ngwp_eps: float = 1.0
    focal_p: float = 3.0
    focal_lambda: float = 0.01
    seg_warmup: float = 5 / 24
    seg_weight: float = 1.0
    pamr_iters: int = 10
    pamr_dilations: tuple[int, ...] = (1, 2, 4, 8, 12, 24)
    pamr_temperature: float = 0.1
    pseudo_min: float = 0.2
    pseudo_ambiguity: float = 0.6

    def validate(self) -> WSSSConfig:
        super().validate()
        if not 0.0 <= self.seg_warmup <= 1.0:
            raise ValueError(f"seg_warmup is a fraction of the run in [0, 1], got {self.seg_warmup}")
        if self.ngwp_eps <= 0 or self.focal_lambda <= 0 or self.focal_p < 0:
            raise ValueError("ngwp_eps and focal_lambda must be positive and focal_p >= 0")
        if self.pamr_iters < 0 or not self.pamr_dilations or min(self.pamr_dilations) < 1:
            raise ValueError(
                f"pamr_iters must be >= 0 and pamr_dilations positive ints, got {self.pamr_iters}, "
                f"{self.pamr_dilations}"
            )
        if self.pamr_temperature <= 0:
            raise ValueError(f"pamr_temperature must be positive, got {self.pamr_temperature}")
        if not 0.0 <= self.pseudo_min <= 1.0 or not 0.0 < self.pseudo_ambiguity <= 1.0:
            raise ValueError(
                f"pseudo_min must lie in [0, 1] and pseudo_ambiguity in (0, 1], got {self.pseudo_min}, "
                f"{self.pseudo_ambiguity}"
            )
        return self


# ------------------------------------------------------------------------------------------------
# CAMs and class scores
def cam_logits(logits: torch.Tensor, background: int | None, background_logit: float) -> torch.Tensor:
    """The logits the CAMs are read from: float32, with the background class's logit (if the
    dataset has one) replaced by the constant ``background_logit``."""
    y = logits.float()
    if background is None:
        return y
    y = y.clone()
    y[:, background] = background_logit
    return y


def cam_masks(logits: torch.Tensor, background: int | None, background_logit: float) -> torch.Tensor:
    """Class activation masks (B, C, h, w): the softmax over classes of ``cam_logits``."""
    return cam_logits(logits, background, background_logit).softmax(1)


def class_scores(y: torch.Tensor, masks: torch.Tensor, eps: float = 1.0, p: float = 3.0,
                 lam: float = 0.01) -> torch.Tensor:
    """(B, C) scores: normalised global weighted pooling of ``y`` by ``masks`` plus the size
    penalty ``(1 - mean m)^p log(lam + mean m)``."""
    pooled = (masks * y).sum((2, 3)) / (eps + masks.sum((2, 3)))
    size = masks.mean((2, 3))
    return pooled + (1.0 - size).pow(p) * torch.log(lam + size)


def classification_loss(scores: torch.Tensor, tags: torch.Tensor, background: int | None) -> torch.Tensor:
    """Multilabel soft-margin loss of the scores against the tags, the background class left out."""
    keep = [c for c in range(scores.shape[1]) if c != background]
    return F.multilabel_soft_margin_loss(scores[:, keep], tags[:, keep].float())


def restrict_to_tags(masks: torch.Tensor, tags: torch.Tensor, background: int | None) -> torch.Tensor:
    """Zero the masks of classes an image is not tagged with (its background class is kept)."""
    allowed = tags.bool().clone()
    if background is not None:
        allowed[:, background] = True
    return masks * allowed[:, :, None, None]


# ------------------------------------------------------------------------------------------------
# PAMR
def _offsets(dilations) -> list[tuple[int, int]]:
    """The 8 neighbour offsets (dy, dx) of each dilation, in dilation order."""
    return [(dy * d, dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]


def _shifted(x: torch.Tensor, dilations):
    """Views of the replicate-padded ``x`` (B, C, H, W), one per neighbour offset: entry k at
    (i, j) is x at (i + dy_k, j + dx_k), clamped to the image."""
    h, w = x.shape[-2:]
    p = max(dilations)
    padded = F.pad(x, (p, p, p, p), mode="replicate")
    return [padded[..., p + dy : p + dy + h, p + dx : p + dx + w] for dy, dx in _offsets(dilations)]


def pamr_affinity(image: torch.Tensor, dilations=(1, 2, 4, 8, 12, 24), temperature: float = 0.1) -> torch.Tensor:
    """(B, K, H, W) weights of each pixel's K = 8 * len(dilations) neighbours, summing to 1.

    ``kappa_ij = -mean_channels |I_i - I_j| / (temperature * std_i + 1e-8)`` where ``std_i`` is the
    per-channel standard deviation of pixel i's neighbours, and the weights are the softmax of
    kappa over the neighbours: pixels that look alike pass each other their masks."""
    image = image.float()
    nb = torch.stack(_shifted(image, dilations), 2)  # (B, 3, K, H, W)
    std = nb.std(2, unbiased=False, keepdim=True)
    kappa = -(image[:, :, None] - nb).abs() / (temperature * std + 1e-8)
    return kappa.mean(1).softmax(1)


@torch.no_grad()
def pamr(image: torch.Tensor, masks: torch.Tensor, dilations=(1, 2, 4, 8, 12, 24), iters: int = 10,
         temperature: float = 0.1) -> torch.Tensor:
    """Pixel-adaptive mask refinement: ``iters`` times replace every pixel's masks by the
    affinity-weighted mean of its neighbours' (``pamr_affinity``). The image is resized to the
    masks' grid first, so the refinement runs at the mask resolution, on the masks' device."""
    if image.shape[-2:] != masks.shape[-2:]:
        image = F.interpolate(image.float(), size=masks.shape[-2:], mode="bilinear", align_corners=False)
    weights = pamr_affinity(image, dilations, temperature)[:, None]  # (B, 1, K, H, W)
    masks = masks.float()
    for _ in range(iters):
        out = torch.zeros_like(masks)
        for k, view in enumerate(_shifted(masks, dilations)):
            out.addcmul_(view, weights[:, :, k])
        masks = out
    return masks


def pseudo_labels(masks: torch.Tensor, min_conf: float = 0.2, ambiguity: float = 0.6) -> torch.Tensor:
    """(B, h, w) labels from tag-restricted masks: each pixel's best class when it reaches
    ``min_conf`` and the runner-up stays below ``ambiguity`` times it, else 255 (ignored)."""
    if masks.shape[1] == 1:
        best, label = masks[:, 0], torch.zeros_like(masks[:, 0], dtype=torch.long)
        second = torch.zeros_like(best)
    else:
        top = masks.topk(2, dim=1)
        best, second, label = top.values[:, 0], top.values[:, 1], top.indices[:, 0]
    reliable = (best >= min_conf) & (second < ambiguity * best)
    return torch.where(reliable, label, IGNORE_INDEX)


# ------------------------------------------------------------------------------------------------
class WSSSCam(Method):
    """Single-stage WSSS baseline: classification from tags, then self-training on pseudo labels."""

    config_class = WSSSConfig

    def __init__(self, cfg: WSSSConfig, info: DatasetInfo, total_iters: int = 0):
        super().__init__(cfg, info, total_iters)
        self.warmup_steps = math.ceil(cfg.seg_warmup * total_iters)

    def cams(self, logits: torch.Tensor) -> torch.Tensor:
        return cam_masks(logits, self.info.background, self.cfg.background_logit)

    @torch.no_grad()
    def refine(self, image: torch.Tensor, masks: torch.Tensor, tags: torch.Tensor) -> torch.Tensor:
        """Tag-restricted, PAMR-refined masks on the masks' grid."""
        cfg = self.cfg
        return pamr(image, restrict_to_tags(masks, tags, self.info.background), cfg.pamr_dilations,
                    cfg.pamr_iters, cfg.pamr_temperature)

    def pseudo(self, refined: torch.Tensor) -> torch.Tensor:
        return pseudo_labels(refined, self.cfg.pseudo_min, self.cfg.pseudo_ambiguity)

    def weak_terms(self, out, batch, step):
        """The baseline's loss and its parts; DSCNet adds its contrastive terms to these."""
        cfg, bg = self.cfg, self.info.background
        y = cam_logits(out["logits"], bg, cfg.background_logit)
        masks = y.softmax(1)
        tags = batch["tags"]
        cls = classification_loss(class_scores(y, masks, cfg.ngwp_eps, cfg.focal_p, cfg.focal_lambda), tags, bg)
        refined = self.refine(batch["image"], masks.detach(), tags)
        labels = self.pseudo(refined)
        seg = cross_entropy(out["logits"], labels)
        on = step >= self.warmup_steps
        loss = cls + (cfg.seg_weight if on else 0.0) * seg
        terms = {"cls": cls.detach(), "seg": seg.detach(), "pseudo_coverage": (labels != IGNORE_INDEX).float().mean()}
        return loss, terms, {"masks": masks, "refined": refined, "labels": labels, "seg_on": on}

    def forward(self, out, batch, step):
        loss, terms, _ = self.weak_terms(out, batch, step)
        return loss, terms

    def final_metrics(self, model, device, dist, seg: dict, progress: bool = True) -> dict:
        from ctxseg.engine.evaluate import eval_dataset
        from ctxseg.engine.loader import eval_loader

        data = eval_dataset(self.cfg, "train")
        loader = eval_loader(data, self.cfg.eval_batch_size, min(self.cfg.num_workers, 2), dist)
        result = evaluate_weak(model, loader, self.cfg, self.info, device, "train", progress)
        result["wsss"] = weak_summary({**seg, **result})
        return result


# ------------------------------------------------------------------------------------------------
def _without_unlabelled(result: dict, names) -> dict:
    """Metrics over C + 1 classes (the last one 'unlabelled' predictions) -> over the C real ones.

    An unlabelled (ignored) pseudo-label pixel counts as a miss of its true class: IoU_c keeps it
    in the class's ground-truth row, and no real class gets it as a prediction."""
    iou = [result["per_class_iou"][n] for n in names]
    biou = [result["per_class_boundary_iou"][n] for n in names]

    def nanmean(values):
        vals = [v for v in values if v is not None]
        return sum(vals) / len(vals) if vals else float("nan")

    out = dict(result)
    out.update({
        "miou": nanmean(iou), "boundary_iou": nanmean(biou),
        "per_class_iou": dict(zip(names, iou)), "per_class_boundary_iou": dict(zip(names, biou)),
    })
    out.pop("mean_acc", None)
    return out


@torch.no_grad()
def evaluate_weak(model, loader, cfg: WSSSConfig, info: DatasetInfo, device, split: str = "train",
                  progress: bool = True) -> dict:
    """CAM and pseudo-label quality on ``loader``'s images (the training split, un-augmented).

    - CAM: the CAMs at full resolution (logits upsampled), restricted to the image's tags, argmax.
    - Pseudo: the pseudo labels the segmentation loss learns from (tag-restricted, PAMR-refined on
      the logits' grid, upsampled bilinearly, thresholded); ignored pixels count as misses, and
      ``coverage`` is the fraction of labelled pixels that got a pseudo label.

    Single scale, no flip, no CRF. Returns ``{"cam": metrics, "pseudo": metrics, "protocol": ...}``.
    """
    was_training = model.training
    model.eval()
    method = WSSSCam(cfg, info)
    names = list(info.class_names)
    c = info.num_classes
    cam_m = SegMetrics(c, boundary_px=cfg.boundary_px, class_names=names, device=device)
    pseudo_m = SegMetrics(c + 1, boundary_px=cfg.boundary_px, class_names=[*names, "unlabelled"], device=device)
    labelled = torch.zeros(2, dtype=torch.float64, device=device)
    n_images = 0
    for batch in tqdm(loader, desc="eval CAM + pseudo labels", leave=False, disable=not progress):
        image = batch["image"].to(device)
        mask = batch["mask"].to(device)
        tags = batch["tags"].to(device)
        logits = model(image, with_heads=False)["logits"].float()
        full = restrict_to_tags(method.cams(upsample_to(logits, mask.shape[-2:])), tags, info.background)
        cam_m.update(full.argmax(1), mask)
        refined = method.refine(image, method.cams(logits), tags)
        labels = method.pseudo(upsample_to(refined, mask.shape[-2:]))
        valid = mask != IGNORE_INDEX
        labelled += torch.stack([((labels != IGNORE_INDEX) & valid).sum(), valid.sum()]).double()
        pseudo_m.update(torch.where(labels == IGNORE_INDEX, c, labels), mask)
        n_images += image.shape[0]
    cam_m.all_reduce()
    pseudo_m.all_reduce()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(labelled)
    model.train(was_training)
    pseudo = _without_unlabelled(pseudo_m.compute(), names)
    pseudo["coverage"] = float(labelled[0] / labelled[1]) if labelled[1] > 0 else float("nan")
    cam = cam_m.compute()
    for r in (cam, pseudo):
        r["split"] = split
    return {"cam": cam, "pseudo": pseudo, "protocol": {"split": split, "scales": [1.0], "flip": False, "crf": False}}


def weak_summary(result: dict) -> dict:
    """The three numbers of the field's protocol from a WSSS evaluation, with their splits."""
    return {
        "cam_miou": result["cam"]["miou"], "pseudo_miou": result["pseudo"]["miou"], "seg_miou": result["miou"],
        "pseudo_coverage": result["pseudo"]["coverage"], "cam_split": result["cam"]["split"],
        "seg_split": result.get("split"), **{k: v for k, v in result["protocol"].items() if k != "split"},
    }
