"""Single-stage weakly supervised segmentation from image-level tags (``wsss_cam``).

The baseline DSCNet builds on: the public single-stage method 1-stage-wseg (Araslanov & Roth,
CVPR 2020); its specification is ``docs/methods.md#wsss-cam``. Its pseudo-label and segmentation-loss rules are facts of that
code (``models/stage_net.py``) and are the defaults here; what 1-stage-wseg does not decide is a
**CHOICE**. Every rule is a setting of ``WSSSConfig``. The training loss never reads the pixel
labels, only ``batch["tags"]`` (and ``batch["valid"]``, which pixels are image, not crop padding).

1. **CAMs from the class logits.** The segmenter's logits ``y`` (B, C, h, w) at stride 4 become
   class activation masks ``m = softmax_c(y)``; on datasets with a background class (VOC) its
   logit is replaced by the constant ``background_logit`` first, so "background" is whatever no
   class claims. Datasets without one (the synthetic scenes, whose every class is a tagged thing
   or stuff class) use the plain softmax.
2. **Class scores** by normalised global weighted pooling plus the focal size penalty over the
   image's pixels (padding left out):
   ``s_c = sum_i m_ic y_ic / (eps + sum_i m_ic) + (1 - mean_i m_ic)^p log(lambda + mean_i m_ic)``,
   trained with the multilabel soft-margin loss against the tags (the background class excluded:
   every image has it).
3. **Pseudo labels** (no gradient): the masks of classes not in the image's tags are zeroed, the
   rest refined by PAMR (``pamr``: 10 iterations of local image affinities, padding neither read
   nor labelled), then ``pseudo_rule``:
   - ``class_max`` (1-stage-wseg, default): each class is thresholded against its OWN maximum over
     the image, ``m_ic > max(pseudo_cutoff * max_i m_ic, pseudo_min)`` (``pseudo_cutoff_background``
     for a background class); a pixel claimed by more than one class is ambiguous and ignored
     (``pseudo_drop_ambiguous``), one claimed by none is ignored.
   - ``pixel_best`` (ctxseg before; not the reference): each pixel's best class if it reaches
     ``pseudo_min`` and the runner-up stays below ``pseudo_ambiguity`` times it. A weak object's
     pixels rarely pass it, which is how self-training erased the objects.
4. **Segmentation loss** on the pseudo labels, switched on after a classification warm-up of
   ``seg_warmup`` of the run (1-stage-wseg: 5 of 24 epochs), with 1-stage-wseg's two rules:
   - ``seg_gate``: an image whose pseudo mask lacks one of its tags (or the background class of a
     dataset that has one) contributes nothing: its pseudo labels are not trusted;
   - ``seg_balance``: class-balanced CE, per image ``w_c = (N - n_c) / (1 + N)`` for the N
     pseudo-labelled pixels of which n_c are class c, summed over labelled pixels and divided by
     the image's pixels, then averaged over the batch (gated images count as 0). An image with one
     pseudo class gets weight 0. Off: the plain CE over the labelled pixels.
   The CE is on the raw logits (the learned background channel included) at the logits' grid
   (**CHOICE**: 1-stage-wseg upsamples to the image). The deployed model is the plain
   segmenter: its argmax is the prediction, exactly as for the supervised methods.

The forward logs ``seg_gated`` (share of the batch's images gated out), ``pseudo_coverage`` (share
of image pixels with a pseudo label, before gating) and ``pseudo_px/<class>`` (pseudo-labelled
pixels of each class the segmentation loss learns from, after gating).

Crops and tags: tags name the whole image, so a crop that cuts a tagged object out makes the tag
a lie (and gating then drops the image). On the synthetic scenes the weakly supervised methods
therefore default to ``scale_range`` (0.75, 1.0) with the 128x128 crop of a 128x128 image: the
whole image is always inside the crop (``benchmarks/weak_crops.py`` measures the lost tags).

Evaluation follows the field (``evaluate_weak``): CAM mIoU and pseudo-label mIoU on the training
images (single scale, no flip, no CRF; the tags of the image are given, as in the field), the
per-class average precision of the class scores against the tags (has the classifier learned a
class at all?), and segmentation mIoU on val by the shared evaluator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ctxseg.config import TrainConfig
from ctxseg.data.base import IGNORE_INDEX, DatasetInfo
from ctxseg.engine.metrics import SegMetrics
from ctxseg.methods.base import Method, cross_entropy
from ctxseg.models.segmenter import class_argmax, upsample_to

PSEUDO_RULES = ("class_max", "pixel_best")


@dataclass
class WSSSConfig(TrainConfig):
    """``wsss_cam``: CAMs, PAMR pseudo labels and self-training from image-level tags.

    1-stage-wseg's values are the defaults (see the module for which rules are its facts).

    Attributes:
        background_logit: fixed logit of the background class in the CAM softmax (only for
            datasets with a background class).
        ngwp_eps: eps in the normalised global weighted pooling.
        focal_p, focal_lambda: exponent p and offset lambda of the size penalty
            ``(1 - mean m)^p log(lambda + mean m)``; ``focal_p=0`` with ``focal_lambda=1`` turns it off.
        cls_balance: weight each class's present and absent tags by ``0.5 / p_c`` and
            ``0.5 / (1 - p_c)`` (``p_c``: the class's tag frequency on the training images), so that
            a class tagged in nearly every image (sky: 94.5 % of the synthetic scenes) still learns
            where it is not from the few images without it. Off: 1-stage-wseg's unweighted
            multilabel soft margin. On by default for the synthetic scenes (``docs/methods.md`` (WS-3)).
        seg_warmup: fraction of the run trained with the classification loss only, before the
            segmentation loss on pseudo labels switches on (5/24 as in 1-stage-wseg).
        seg_weight: weight of the segmentation loss after the warm-up.
        seg_balance: class-balanced segmentation CE (1-stage-wseg); False: plain CE.
        seg_gate: drop from the segmentation loss every image whose pseudo mask lacks a tag.
        pamr_iters: PAMR iterations.
        pamr_dilations: dilations of PAMR's 3x3 neighbourhoods (8 neighbours each).
        pamr_temperature: affinity scale: ``-|I_i - I_j| / (pamr_temperature * std)``.
        pseudo_rule: ``class_max`` (1-stage-wseg) or ``pixel_best`` (see the module).
        pseudo_cutoff: ``class_max``: share of a class's maximum its pixels must exceed.
        pseudo_cutoff_background: the same for the background class of a dataset that has one.
        pseudo_min: the least threshold of ``class_max``; the least best value of ``pixel_best``.
        pseudo_drop_ambiguous: ``class_max``: ignore pixels claimed by several classes (else the
            strongest claim wins).
        pseudo_ambiguity: ``pixel_best`` only: a pixel whose runner-up reaches this fraction of
            its best is ignored.
        log_class_pixels: log ``pseudo_px/<class>`` when the dataset has at most this many classes.
        weak_eval_images: how many training images the CAM / pseudo-label / AP evaluation reads
            (the same ones at every evaluation, evenly spaced over the split; None: all of them,
            the field's protocol). The synthetic default reads 500 of the 2000 generated scenes
            (about 11 s instead of 45 s an evaluation on 2 cores); ``protocol`` in eval.json
            records the count (``images``).
    """

    dataset_defaults: ClassVar[dict[str, dict[str, Any]]] = {
        "synthetic": {"scale_range": (0.75, 1.0), "cls_balance": True, "weak_eval_images": 500},
    }

    method: str = "wsss_cam"
    batch_sampler: str = "class_aware"
    background_logit: float = 1.0
    ngwp_eps: float = 1.0
    focal_p: float = 3.0
    focal_lambda: float = 0.01
    cls_balance: bool = False
    seg_warmup: float = 5 / 24
    seg_weight: float = 1.0
    seg_balance: bool = True
    seg_gate: bool = True
    pamr_iters: int = 10
    pamr_dilations: tuple[int, ...] = (1, 2, 4, 8, 12, 24)
    pamr_temperature: float = 0.1
    pseudo_rule: str = "class_max"
    pseudo_cutoff: float = 0.6
    pseudo_cutoff_background: float = 0.7
    pseudo_min: float = 0.2
    pseudo_drop_ambiguous: bool = True
    pseudo_ambiguity: float = 0.6
    log_class_pixels: int = 40
    weak_eval_images: int | None = None

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
        if self.pseudo_rule not in PSEUDO_RULES:
            raise ValueError(f"pseudo_rule must be one of {PSEUDO_RULES}, got {self.pseudo_rule!r}")
        for name in ("pseudo_min", "pseudo_cutoff", "pseudo_cutoff_background"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if not 0.0 < self.pseudo_ambiguity <= 1.0:
            raise ValueError(f"pseudo_ambiguity must lie in (0, 1], got {self.pseudo_ambiguity}")
        if self.log_class_pixels < 0:
            raise ValueError(f"log_class_pixels must be >= 0, got {self.log_class_pixels}")
        if self.weak_eval_images is not None and self.weak_eval_images < 1:
            raise ValueError(f"weak_eval_images must be >= 1 (or null for every training image), got {self.weak_eval_images}")
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


def validity_on(valid: torch.Tensor | None, size) -> torch.Tensor | None:
    """A (B, H, W) validity map on the (h, w) grid ``size``: a cell is image when at least half of
    the pixels it covers are. None stays None (every pixel is image)."""
    if valid is None or tuple(valid.shape[-2:]) == tuple(size):
        return None if valid is None else valid.bool()
    return F.adaptive_avg_pool2d(valid[:, None].float(), tuple(size))[:, 0] >= 0.5


def class_scores(y: torch.Tensor, masks: torch.Tensor, eps: float = 1.0, p: float = 3.0,
                 lam: float = 0.01, valid: torch.Tensor | None = None) -> torch.Tensor:
    """(B, C) scores: normalised global weighted pooling of ``y`` by ``masks`` plus the size
    penalty ``(1 - mean m)^p log(lam + mean m)``, over the pixels where ``valid`` (B, h, w) is
    True (all when None)."""
    if valid is None:
        area = masks.new_tensor(float(masks.shape[-2] * masks.shape[-1]))
    else:
        masks = masks * valid[:, None]
        area = valid.sum((1, 2)).clamp_min(1).to(masks.dtype)[:, None]
    pooled = (masks * y).sum((2, 3)) / (eps + masks.sum((2, 3)))
    size = masks.sum((2, 3)) / area
    return pooled + (1.0 - size).pow(p) * torch.log(lam + size)


def classification_loss(scores: torch.Tensor, tags: torch.Tensor, background: int | None,
                        frequency: torch.Tensor | None = None) -> torch.Tensor:
    """Multilabel soft-margin loss of the scores against the tags, the background class left out.

    With ``frequency`` (C,), each class's tag frequency on the training images, an image's
    present tags of class c weigh ``0.5 / p_c`` and its absent ones ``0.5 / (1 - p_c)``
    (``p_c`` clipped to [0.01, 0.99]): both sides of every class carry the same total weight, and
    the expected weight is 1, as in the unweighted loss."""
    keep = [c for c in range(scores.shape[1]) if c != background]
    scores, tags = scores[:, keep], tags[:, keep].float()
    if frequency is None:
        return F.multilabel_soft_margin_loss(scores, tags)
    p = frequency[keep].to(scores).clamp(0.01, 0.99)
    weight = tags * (0.5 / p) + (1.0 - tags) * (0.5 / (1.0 - p))
    return (F.binary_cross_entropy_with_logits(scores, tags, reduction="none") * weight).mean()


def required_classes(tags: torch.Tensor, background: int | None) -> torch.Tensor:
    """(B, C) bool: the classes an image's masks may hold: its tags and the background class."""
    allowed = tags.bool().clone()
    if background is not None:
        allowed[:, background] = True
    return allowed


def restrict_to_tags(masks: torch.Tensor, tags: torch.Tensor, background: int | None) -> torch.Tensor:
    """Zero the masks of classes an image is not tagged with (its background class is kept)."""
    return masks * required_classes(tags, background)[:, :, None, None]


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


def pamr_affinity(image: torch.Tensor, dilations=(1, 2, 4, 8, 12, 24), temperature: float = 0.1,
                  valid: torch.Tensor | None = None) -> torch.Tensor:
    """(B, K, H, W) weights of each pixel's K = 8 * len(dilations) neighbours, summing to 1.

    ``kappa_ij = -mean_channels |I_i - I_j| / (temperature * std_i + 1e-8)`` and the weights are
    the softmax of kappa over the neighbours: pixels that look alike pass each other their masks.
    ``std_i`` is 1-stage-wseg's local standard deviation: per channel, over the 3x3 neighbourhood
    of every dilation with the centre counted once per dilation (9 * len(dilations) values),
    unbiased. Where ``valid`` (B, H, W) is given, padding neighbours get weight 0 and padding
    pixels all-zero weights (their masks become 0 and are never read)."""
    image = image.float()
    nb = torch.stack(_shifted(image, dilations), 2)  # (B, 3, K, H, W)
    centre = image[:, :, None].expand(-1, -1, len(dilations), -1, -1)
    std = torch.cat([nb, centre], 2).std(2, keepdim=True)
    kappa = (-(image[:, :, None] - nb).abs() / (temperature * std + 1e-8)).mean(1)
    if valid is None:
        return kappa.softmax(1)
    valid = valid.bool()
    nb_valid = torch.stack(_shifted(valid[:, None].float(), dilations), 2)[:, 0] > 0.5  # (B, K, H, W)
    weights = kappa.masked_fill(~nb_valid, float("-inf")).softmax(1).nan_to_num(0.0)
    return weights * valid[:, None]


@torch.no_grad()
def pamr(image: torch.Tensor, masks: torch.Tensor, dilations=(1, 2, 4, 8, 12, 24), iters: int = 10,
         temperature: float = 0.1, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Pixel-adaptive mask refinement: ``iters`` times replace every pixel's masks by the
    affinity-weighted mean of its neighbours' (``pamr_affinity``). The image is resized to the
    masks' grid first, so the refinement runs at the mask resolution, on the masks' device;
    ``valid`` (B, h, w), on that grid, keeps padding out."""
    if image.shape[-2:] != masks.shape[-2:]:
        image = F.interpolate(image.float(), size=masks.shape[-2:], mode="bilinear", align_corners=False)
    weights = pamr_affinity(image, dilations, temperature, valid)[:, None]  # (B, 1, K, H, W)
    masks = masks.float()
    if valid is not None:
        masks = masks * valid[:, None]
    for _ in range(iters):
        out = torch.zeros_like(masks)
        for k, view in enumerate(_shifted(masks, dilations)):
            out.addcmul_(view, weights[:, :, k])
        masks = out
    return masks


# ------------------------------------------------------------------------------------------------
# Pseudo labels and the segmentation loss
def pseudo_labels_class_max(masks: torch.Tensor, cutoff: float = 0.6, floor: float = 0.2,
                            background: int | None = None, cutoff_background: float = 0.7,
                            drop_ambiguous: bool = True, valid: torch.Tensor | None = None) -> torch.Tensor:
    """(B, h, w) labels, 1-stage-wseg's rule: class c claims pixel i when
    ``m_ic > max(cutoff * max_j m_jc, floor)`` (max over the image's valid pixels;
    ``cutoff_background`` for the background class); a pixel claimed by exactly one class takes
    it, one claimed by several is ignored (255) when ``drop_ambiguous`` (else the strongest claim
    wins), one claimed by none is ignored, and so is padding (``valid`` False)."""
    if valid is not None:
        masks = masks * valid[:, None]
    cut = torch.full((masks.shape[1],), cutoff, dtype=masks.dtype, device=masks.device)
    if background is not None:
        cut[background] = cutoff_background
    threshold = (masks.amax((2, 3), keepdim=True) * cut[:, None, None]).clamp_min(floor)
    claimed = masks > threshold
    n = claimed.sum(1)
    label = class_argmax(torch.where(claimed, masks, -1.0))
    keep = n == 1 if drop_ambiguous else n >= 1
    return torch.where(keep, label, IGNORE_INDEX)


def pseudo_labels_pixel_best(masks: torch.Tensor, min_conf: float = 0.2, ambiguity: float = 0.6,
                             valid: torch.Tensor | None = None) -> torch.Tensor:
    """(B, h, w) labels, ctxseg's former rule: each pixel's best class when it reaches
    ``min_conf`` and the runner-up stays below ``ambiguity`` times it, else 255 (ignored)."""
    if masks.shape[1] == 1:
        best, label = masks[:, 0], torch.zeros_like(masks[:, 0], dtype=torch.long)
        second = torch.zeros_like(best)
    else:
        top = masks.topk(2, dim=1)
        best, second, label = top.values[:, 0], top.values[:, 1], top.indices[:, 0]
    reliable = (best >= min_conf) & (second < ambiguity * best)
    if valid is not None:
        reliable &= valid.bool()
    return torch.where(reliable, label, IGNORE_INDEX)


def per_image_counts(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, C) float pixel counts of each class in each image's (B, h, w) labels (255 not counted)."""
    flat = labels.flatten(1)
    counts = torch.zeros(flat.shape[0], num_classes + 1, device=labels.device)
    counts.scatter_add_(1, flat.clamp(max=num_classes), torch.ones_like(flat, dtype=counts.dtype))
    return counts[:, :num_classes]


def complete_images(labels: torch.Tensor, tags: torch.Tensor, background: int | None) -> torch.Tensor:
    """(B,) bool: the images whose pseudo labels hold every tagged class (and the background class
    of a dataset that has one): 1-stage-wseg trains the segmentation only on these."""
    present = per_image_counts(labels, tags.shape[1]) > 0
    return ~(required_classes(tags, background) & ~present).any(1)


def balanced_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """1-stage-wseg's class-balanced CE: per image, pixel i of pseudo class c weighs
    ``(N - n_c) / (1 + N)`` (N labelled pixels, n_c of class c); the weighted CE is summed over
    the labelled pixels, divided by the image's pixels (``valid`` ones; all when None) and
    averaged over the images. Logits are upsampled to the labels; float32."""
    logits = upsample_to(logits, labels.shape[-2:]).float()
    ce = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")  # 0 where ignored
    counts = per_image_counts(labels, logits.shape[1])
    total = counts.sum(1, keepdim=True)
    class_weight = (total - counts) / (1.0 + total)  # (B, C)
    labelled = labels != IGNORE_INDEX
    weight = class_weight.gather(1, torch.where(labelled, labels, 0).flatten(1)).view_as(ce) * labelled
    area = valid.sum((1, 2)).clamp_min(1) if valid is not None else labels[0].numel()
    return ((weight * ce).sum((1, 2)) / area).mean()


# ------------------------------------------------------------------------------------------------
class WSSSCam(Method):
    """Single-stage WSSS baseline: classification from tags, then self-training on pseudo labels."""

    config_class = WSSSConfig
    needs_masks = False

    def __init__(self, cfg: WSSSConfig, info: DatasetInfo, total_iters: int = 0):
        super().__init__(cfg, info, total_iters)
        self.warmup_steps = math.ceil(cfg.seg_warmup * total_iters)
        # Each class's tag frequency on the training images (``prepare``), for ``cls_balance``.
        self.register_buffer("tag_frequency", torch.full((info.num_classes,), 0.5), persistent=False)

    def prepare(self, train_set) -> None:
        """The training images' tag frequencies (read only when ``cls_balance`` uses them)."""
        if self.cfg.cls_balance and len(train_set):
            self.tag_frequency.copy_(train_set.tag_table().float().mean(0))

    def cams(self, logits: torch.Tensor) -> torch.Tensor:
        return cam_masks(logits, self.info.background, self.cfg.background_logit)

    @torch.no_grad()
    def refine(self, image: torch.Tensor, masks: torch.Tensor, tags: torch.Tensor,
               valid: torch.Tensor | None = None) -> torch.Tensor:
        """Tag-restricted, PAMR-refined masks on the masks' grid (``valid`` on that grid)."""
        cfg = self.cfg
        return pamr(image, restrict_to_tags(masks, tags, self.info.background), cfg.pamr_dilations,
                    cfg.pamr_iters, cfg.pamr_temperature, valid)

    def pseudo(self, refined: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Pseudo labels of refined masks by ``pseudo_rule``."""
        cfg = self.cfg
        if cfg.pseudo_rule == "pixel_best":
            return pseudo_labels_pixel_best(refined, cfg.pseudo_min, cfg.pseudo_ambiguity, valid)
        return pseudo_labels_class_max(refined, cfg.pseudo_cutoff, cfg.pseudo_min, self.info.background,
                                       cfg.pseudo_cutoff_background, cfg.pseudo_drop_ambiguous, valid)

    def weak_terms(self, out, batch, step):
        """The baseline's loss and its parts; DSCNet adds its contrastive terms to these.

        The extras dict holds ``masks`` (CAMs), ``refined`` (PAMR), ``labels`` (the pseudo labels
        the losses learn from: gated images' are all 255), ``valid`` (on the logits' grid or
        None) and ``seg_on``."""
        cfg, bg = self.cfg, self.info.background
        y = cam_logits(out["logits"], bg, cfg.background_logit)
        masks = y.softmax(1)
        tags = batch["tags"]
        valid = validity_on(batch.get("valid"), y.shape[-2:])
        scores = class_scores(y, masks, cfg.ngwp_eps, cfg.focal_p, cfg.focal_lambda, valid)
        cls = classification_loss(scores, tags, bg, self.tag_frequency if cfg.cls_balance else None)
        refined = self.refine(batch["image"], masks.detach(), tags, valid)
        labels = self.pseudo(refined, valid)
        image_px = valid.sum().clamp_min(1) if valid is not None else labels.numel()
        coverage = (labels != IGNORE_INDEX).sum().float() / image_px
        kept = complete_images(labels, tags, bg) if cfg.seg_gate else labels.new_ones(len(labels), dtype=torch.bool)
        labels = torch.where(kept[:, None, None], labels, IGNORE_INDEX)
        seg = balanced_cross_entropy(out["logits"], labels, valid) if cfg.seg_balance else cross_entropy(out["logits"], labels)
        on = step >= self.warmup_steps
        loss = cls + (cfg.seg_weight if on else 0.0) * seg
        terms = {"cls": cls.detach(), "seg": seg.detach(), "pseudo_coverage": coverage,
                 "seg_gated": 1.0 - kept.float().mean()}
        if len(self.info.class_names) <= cfg.log_class_pixels:
            counts = per_image_counts(labels, self.info.num_classes).sum(0)
            terms.update({f"pseudo_px/{name}": counts[k] for k, name in enumerate(self.info.class_names)})
        return loss, terms, {"masks": masks, "refined": refined, "labels": labels, "valid": valid, "seg_on": on}

    def forward(self, out, batch, step):
        loss, terms, _ = self.weak_terms(out, batch, step)
        return loss, terms

    def eval_metrics(self, model, device, dist, seg: dict, progress: bool = True) -> dict:
        from ctxseg.engine.evaluate import eval_dataset
        from ctxseg.engine.loader import eval_loader

        data = eval_dataset(self.cfg, "train")
        if not data.has_masks:  # tags-only data: no CAM or pseudo-label quality to measure
            return {}
        subset = weak_eval_subset(data, self.cfg.weak_eval_images)
        loader = eval_loader(subset, self.cfg.eval_batch_size, min(self.cfg.num_workers, 2), dist)
        result = evaluate_weak(model, loader, self.cfg, self.info, device, "train", progress)
        result["wsss"] = weak_summary({**seg, **result})
        return result

    def log_scalars(self, metrics: dict) -> dict:
        """The weak evaluation's numbers for a metrics.jsonl row: the ``wsss`` summary's numbers
        and ``cls_ap/<class>``."""
        row = {k: v for k, v in metrics.get("wsss", {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for name, ap in metrics.get("cls_ap", {}).get("per_class", {}).items():
            row[f"cls_ap/{name}"] = ap
        return row


# ------------------------------------------------------------------------------------------------
def weak_eval_subset(data, images: int | None):
    """``images`` of ``data``'s samples, evenly spaced from the first (all of them when None or
    when the split is smaller): the same images at every evaluation of a run and in every run."""
    n = len(data)
    if images is None or images >= n:
        return data
    return torch.utils.data.Subset(data, [i * n // images for i in range(images)])


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
    """CAM and pseudo-label quality and the classifier's AP on ``loader``'s images (the training
    split, un-augmented).

    - CAM: the CAMs at full resolution (logits upsampled), restricted to the image's tags, argmax.
    - Pseudo: the pseudo labels the segmentation loss learns from (tag-restricted, PAMR-refined on
      the logits' grid, upsampled bilinearly, thresholded by ``pseudo_rule``); ignored pixels count
      as misses, and ``coverage`` is the fraction of labelled pixels that got a pseudo label.
    - ``cls_ap``: per-class average precision (scikit-learn) of the class scores (the pooling the
      classification loss trains) against the tags, with each class's tag frequency (the AP of a
      classifier that knows nothing); a class tagged in all or none of the images has no AP.

    Single scale, no flip, no CRF. Returns ``{"cam", "pseudo", "cls_ap", "protocol"}``; the
    protocol names the split and counts the images read (``weak_eval_images`` may make them a subset).
    """
    from ctxseg.engine.evaluate import fold_batchnorm

    was_training = model.training
    model.eval()
    method = WSSSCam(cfg, info)
    names = list(info.class_names)
    c = info.num_classes
    cam_m = SegMetrics(c, boundary_px=cfg.boundary_px, class_names=names, device=device)
    pseudo_m = SegMetrics(c + 1, boundary_px=cfg.boundary_px, class_names=[*names, "unlabelled"], device=device)
    labelled = torch.zeros(2, dtype=torch.float64, device=device)
    scores, all_tags = [], []
    infer = None
    for batch in tqdm(loader, desc="eval CAM + pseudo labels", leave=False, disable=not progress):
        image = batch["image"].to(device)
        mask = batch["mask"].to(device)
        tags = batch["tags"].to(device)
        if infer is None:  # BatchNorm folded into the convolutions (the same numbers, faster)
            infer = fold_batchnorm(model, image[:1], with_heads=False)
        logits = infer(image, with_heads=False)["logits"].float()
        y = cam_logits(logits, info.background, cfg.background_logit)
        cams = y.softmax(1)  # = method.cams(logits)
        scores.append(class_scores(y, cams, cfg.ngwp_eps, cfg.focal_p, cfg.focal_lambda).cpu())
        all_tags.append(tags.cpu())
        full = restrict_to_tags(method.cams(upsample_to(logits, mask.shape[-2:])), tags, info.background)
        cam_m.update(class_argmax(full), mask)
        refined = method.refine(image, cams, tags)
        labels = method.pseudo(upsample_to(refined, mask.shape[-2:]))
        valid = mask != IGNORE_INDEX
        labelled += torch.stack([((labels != IGNORE_INDEX) & valid).sum(), valid.sum()]).double()
        pseudo_m.update(torch.where(labels == IGNORE_INDEX, c, labels), mask)
    cam_m.all_reduce()
    pseudo_m.all_reduce()
    scores, all_tags = torch.cat(scores), torch.cat(all_tags)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(labelled)
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, (scores, all_tags))
        scores, all_tags = torch.cat([g[0] for g in gathered]), torch.cat([g[1] for g in gathered])
    model.train(was_training)
    pseudo = _without_unlabelled(pseudo_m.compute(), names)
    pseudo["coverage"] = float(labelled[0] / labelled[1]) if labelled[1] > 0 else float("nan")
    cam = cam_m.compute()
    for r in (cam, pseudo):
        r["split"] = split
    return {"cam": cam, "pseudo": pseudo, "cls_ap": classification_ap(scores, all_tags, names, info.background),
            "protocol": {"split": split, "images": len(all_tags), "scales": [1.0], "flip": False, "crf": False}}


def classification_ap(scores: torch.Tensor, tags: torch.Tensor, names, background: int | None) -> dict:
    """Per-class average precision of (N, C) class scores against (N, C) tags (scikit-learn's
    ``average_precision_score``), the background class left out; None for a class tagged in all
    or none of the N images. ``mean`` is over the classes that have an AP; ``tag_frequency`` is
    each class's share of tagged images, what a classifier that knows nothing scores."""
    from sklearn.metrics import average_precision_score

    y, s = tags.numpy().astype(bool), scores.numpy()
    per_class, frequency = {}, {}
    for k, name in enumerate(names):
        if k == background:
            continue
        positives = int(y[:, k].sum())
        frequency[name] = positives / len(y) if len(y) else None
        per_class[name] = float(average_precision_score(y[:, k], s[:, k])) if 0 < positives < len(y) else None
    defined = [v for v in per_class.values() if v is not None]
    return {"per_class": per_class, "tag_frequency": frequency,
            "mean": sum(defined) / len(defined) if defined else None, "images": len(y)}


def weak_summary(result: dict) -> dict:
    """The three numbers of the field's protocol from a WSSS evaluation, with their splits, and the
    classifier's mean AP (``cls_map``)."""
    return {
        "cam_miou": result["cam"]["miou"], "pseudo_miou": result["pseudo"]["miou"], "seg_miou": result["miou"],
        "pseudo_coverage": result["pseudo"]["coverage"], "cls_map": result.get("cls_ap", {}).get("mean"),
        "cam_split": result["cam"]["split"], "seg_split": result.get("split"),
        **{("cam_images" if k == "images" else k): v for k, v in result["protocol"].items() if k != "split"},
    }
