"""wsss_cam and DSCNet (docs/methods.md, "WSSS CAM" and "DSCNet"): CAMs, pooling, PAMR, pseudo
labels, PGCL and SGCL against loop oracles (tests/dscnet_oracle.py), the class-aware sampler, and the
weak evaluation (docs/methods.md, "Evaluation") against scikit-learn."""

from __future__ import annotations

import math

import dscnet_oracle as oracle
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import jaccard_score

from ctxseg.config import make_config
from ctxseg.data.base import IGNORE_INDEX, DatasetInfo
from ctxseg.data.synthetic import SYNTHETIC_INFO
from ctxseg.engine.distributed import DistInfo
from ctxseg.engine.evaluate import build_model
from ctxseg.engine.loader import ClassAwareBatchSampler
from ctxseg.engine.metrics import SegMetrics
from ctxseg.engine.trainer import Trainer
from ctxseg.methods.ce import CEConfig
from ctxseg.methods.dscnet import (
    DSCNet,
    DSCNetConfig,
    gcn,
    graph_class_embeddings,
    group_centres,
    group_contrast,
    node_contrast,
    node_embeddings,
    node_features,
    node_layout,
    sample_pixels,
    sample_pixels_per_image,
)
from ctxseg.methods.wsss import (
    WSSSCam,
    WSSSConfig,
    _without_unlabelled,
    balanced_cross_entropy,
    cam_masks,
    class_scores,
    classification_ap,
    classification_loss,
    complete_images,
    evaluate_weak,
    pamr,
    pamr_affinity,
    pseudo_labels_class_max,
    pseudo_labels_pixel_best,
    restrict_to_tags,
    validity_on,
)

VOC_LIKE = DatasetInfo("voc-like", ("background", "a", "b", "c"), ((0, 0, 0),) * 4, background=0)


# ------------------------------------------------------------------------------------------------
# CAMs and pooling
def test_cams_replace_the_background_logit_and_sum_to_one():
    logits = torch.tensor([[5.0, 0.0], [0.0, 2.0], [1.0, 1.0]]).reshape(1, 3, 1, 2)
    m = cam_masks(logits, background=0, background_logit=1.0)
    expected = torch.softmax(torch.tensor([[1.0, 0.0, 1.0], [1.0, 2.0, 1.0]]), 1)  # per pixel
    assert torch.allclose(m[0, :, 0].T, expected)
    assert torch.allclose(cam_masks(logits, None, 1.0), logits.softmax(1))
    assert torch.allclose(m.sum(1), torch.ones(1, 1, 2))


def test_ngwp_and_size_penalty_by_hand():
    # One image, two classes, 2 pixels: masks (0.75, 0.25) and (0.25, 0.75).
    y = torch.tensor([[[[2.0, -1.0]], [[0.5, 3.0]]]])
    m = torch.tensor([[[[0.75, 0.25]], [[0.25, 0.75]]]])
    s = class_scores(y, m, eps=1.0, p=3.0, lam=0.01)
    pooled0 = (0.75 * 2.0 + 0.25 * -1.0) / (1.0 + 1.0)
    pooled1 = (0.25 * 0.5 + 0.75 * 3.0) / (1.0 + 1.0)
    penalty = (1 - 0.5) ** 3 * np.log(0.01 + 0.5)
    assert s[0].tolist() == pytest.approx([pooled0 + penalty, pooled1 + penalty], abs=1e-6)
    # Against the loop oracle on random input.
    g = torch.Generator().manual_seed(0)
    y = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
    m = y.softmax(1)
    assert torch.allclose(class_scores(y, m, 1.0, 3.0, 0.01), oracle.class_scores(y, m, 1.0, 3.0, 0.01), atol=1e-10)
    # Padding is not image: the scores over the valid pixels equal the oracle's, and differ from
    # pooling everything.
    valid = torch.ones(2, 4, 5, dtype=torch.bool)
    valid[:, 3:] = False
    valid[1, :, 4] = False
    got = class_scores(y, m, 1.0, 3.0, 0.01, valid)
    assert torch.allclose(got, oracle.class_scores(y, m, 1.0, 3.0, 0.01, valid), atol=1e-10)
    assert not torch.allclose(got, class_scores(y, m, 1.0, 3.0, 0.01))
    # ... and equal the scores of the image cropped to its valid part.
    assert torch.allclose(got[0], class_scores(y[:1, :, :3], m[:1, :, :3])[0], atol=1e-12)


def test_validity_on_the_logits_grid():
    valid = torch.zeros(1, 8, 8, dtype=torch.bool)
    valid[:, :6, :5] = True  # cells of 2x2: rows 0-2 whole, columns 0-1 whole, column 2 half
    got = validity_on(valid, (4, 4))[0]
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[:3, :3] = True
    assert torch.equal(got, expected)
    assert validity_on(None, (4, 4)) is None and torch.equal(validity_on(valid, (8, 8)), valid)


def test_classification_loss_never_asks_for_the_background():
    scores = torch.tensor([[-9.0, 3.0, -3.0, 1.0]])
    tags = torch.tensor([[0.0, 1.0, 0.0, 1.0]])  # background untagged: must not matter
    got = classification_loss(scores, tags, background=0)
    expected = F.multilabel_soft_margin_loss(scores[:, 1:], tags[:, 1:])
    assert torch.allclose(got, expected)
    assert not torch.allclose(classification_loss(scores, tags, None), expected)


def test_balanced_classification_loss_equals_the_loop_oracle_and_by_hand():
    torch.manual_seed(0)
    scores = torch.randn(5, 4, requires_grad=True)
    tags = torch.tensor([[1, 1, 0, 1], [1, 0, 0, 1], [1, 1, 1, 0], [1, 0, 0, 1], [1, 1, 0, 0]]).float()
    freq = torch.tensor([0.5, 0.95, 0.2, 0.005])  # the last is clipped to 0.01
    got = classification_loss(scores, tags, background=0, frequency=freq)
    total = 0.0
    for i in range(5):
        for c in (1, 2, 3):  # background (0) left out
            p = min(max(float(freq[c]), 0.01), 0.99)
            s, t = scores[i, c], float(tags[i, c])
            bce = -(t * F.logsigmoid(s) + (1 - t) * F.logsigmoid(-s))
            total = total + (0.5 / p if t else 0.5 / (1 - p)) * bce
    expected = total / 15
    assert torch.allclose(got, expected, atol=1e-6)
    g_got, = torch.autograd.grad(got, scores)
    g_exp, = torch.autograd.grad(expected, scores)
    assert torch.allclose(g_got, g_exp, atol=1e-6)
    # By hand: a class tagged in 95 % of the images; its one absent tag weighs 10, a present one 0.526.
    one = torch.zeros(1, 2)
    neg = classification_loss(one, torch.tensor([[1.0, 0.0]]), 0, torch.tensor([0.5, 0.95]))
    pos = classification_loss(one, torch.tensor([[1.0, 1.0]]), 0, torch.tensor([0.5, 0.95]))
    assert torch.allclose(neg, torch.tensor(10.0 * math.log(2)), atol=1e-5)
    assert torch.allclose(pos, torch.tensor(0.5 / 0.95 * math.log(2)), atol=1e-5)
    # Frequencies of one half weigh every tag 1: the unweighted loss.
    half = classification_loss(scores, tags, 0, torch.full((4,), 0.5))
    assert torch.allclose(half, classification_loss(scores, tags, 0), atol=1e-6)


def test_the_trainer_gives_the_method_the_training_tag_frequencies(tmp_path):
    cfg = make_config(WSSSConfig, encoder="test_resnet", iters=1, crop=(32, 32), synthetic_size=(32, 32),
                      synthetic_train_len=24, out=str(tmp_path / "run"))
    assert cfg.cls_balance  # the synthetic scenes' default
    trainer = Trainer(cfg, WSSSCam)
    expected = trainer.train_set.image_tags().float().mean(0)
    assert torch.allclose(trainer.method.tag_frequency, expected)
    assert not torch.allclose(expected, torch.full_like(expected, 0.5))
    off = Trainer(make_config(WSSSConfig, encoder="test_resnet", iters=1, crop=(32, 32), synthetic_size=(32, 32),
                              synthetic_train_len=24, out=str(tmp_path / "off"), cls_balance=False), WSSSCam)
    assert torch.equal(off.method.tag_frequency, torch.full((8,), 0.5))  # never read


def test_restrict_to_tags_keeps_background():
    masks = torch.full((1, 4, 2, 2), 0.25)
    out = restrict_to_tags(masks, torch.tensor([[0.0, 0.0, 1.0, 0.0]]), background=0)
    assert out[0, :, 0, 0].tolist() == [0.25, 0.0, 0.25, 0.0]


# ------------------------------------------------------------------------------------------------
# PAMR
def test_pamr_keeps_a_constant_image_with_constant_masks_unchanged():
    image = torch.full((2, 3, 9, 11), 0.3)
    masks = torch.tensor([0.6, 0.3, 0.1])[None, :, None, None].expand(2, 3, 9, 11).contiguous()
    out = pamr(image, masks, dilations=(1, 2, 4), iters=10)
    assert torch.allclose(out, masks, atol=1e-6)
    w = pamr_affinity(image, (1, 2, 4))
    assert torch.allclose(w, torch.full_like(w, 1 / 24))  # no edge: uniform over neighbours


def test_pamr_sharpens_a_step_edge():
    h, w = 8, 16
    image = torch.zeros(1, 3, h, w)
    image[..., w // 2 :] = 1.0
    image += 0.01 * torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    ramp = torch.linspace(0.0, 1.0, w).expand(h, w)  # a blurred mask of the right half
    masks = torch.stack([1 - ramp, ramp])[None]
    out = pamr(image, masks, dilations=(1, 2, 4), iters=10)
    truth = (torch.arange(w) >= w // 2).float().expand(h, w)
    # Within a side the masks pool towards the side's mean; across the edge they jump.
    jump = out[0, 1, :, w // 2] - out[0, 1, :, w // 2 - 1]
    assert (jump > 0.5).all() and (masks[0, 1, :, w // 2] - masks[0, 1, :, w // 2 - 1] < 0.1).all()
    assert (out[0, 1] - truth).abs().mean() < 0.6 * (masks[0, 1] - truth).abs().mean()
    assert torch.allclose(out.sum(1), torch.ones(1, h, w), atol=1e-5)  # still a distribution
    # The refined mask crosses 0.5 at the image's edge.
    assert (out[0, 1, :, : w // 2] < 0.5).all() and (out[0, 1, :, w // 2 :] > 0.5).all()


def test_pamr_equals_the_loop_oracle_and_resizes_the_image_to_the_masks():
    g = torch.Generator().manual_seed(1)
    image = torch.rand(2, 3, 5, 6, generator=g)
    masks = torch.rand(2, 3, 5, 6, generator=g).softmax(1)
    got = pamr(image, masks, dilations=(1, 2), iters=3, temperature=0.1)
    assert torch.allclose(got.double(), oracle.pamr(image, masks, (1, 2), 3, 0.1), atol=1e-5)
    # The local std is 1-stage-wseg's (centre once per dilation, unbiased; docs/methods.md (WS-4)):
    # a neighbourhood-only, biased std would give other weights.
    nb = torch.stack([F.pad(image, (2,) * 4, mode="replicate")[..., 2 + dy: 7 + dy, 2 + dx: 8 + dx]
                      for d in (1, 2) for dy in (-d, 0, d) for dx in (-d, 0, d) if dy or dx], 2)
    other = (-(image[:, :, None] - nb).abs() / (0.1 * nb.std(2, unbiased=False, keepdim=True) + 1e-8)).mean(1)
    assert not torch.allclose(pamr_affinity(image, (1, 2)), other.softmax(1), atol=1e-3)
    # Padding (valid False) is neither read nor written.
    valid = torch.ones(2, 5, 6, dtype=torch.bool)
    valid[0, :, 4:] = False
    valid[1, 3:] = False
    got = pamr(image, masks, (1, 2), 3, 0.1, valid)
    assert torch.allclose(got.double(), oracle.pamr(image, masks, (1, 2), 3, 0.1, valid), atol=1e-5)
    assert (got[0, :, :, 4:] == 0).all() and torch.allclose(got[0, :, :, :4].sum(0), torch.ones(5, 4), atol=1e-5)
    junk = masks.clone()
    junk[0, :, :, 4:] = 100.0  # whatever the masks hold in the padding
    assert torch.allclose(pamr(image, junk, (1, 2), 3, 0.1, valid), got)
    big = F.interpolate(image, size=(10, 12), mode="nearest")
    resized = F.interpolate(big, size=(5, 6), mode="bilinear", align_corners=False)
    assert torch.allclose(pamr(big, masks, (1, 2), 3), pamr(resized, masks, (1, 2), 3))


def test_pixel_best_pseudo_labels_by_hand_and_oracle():
    # pixel 0: clear winner; 1: ambiguous (0.45 vs 0.40); 2: too weak (0.15); 3: class 2 wins.
    m = torch.tensor([[0.8, 0.45, 0.15, 0.1], [0.1, 0.40, 0.10, 0.2], [0.1, 0.15, 0.05, 0.7]])[None, :, None]
    assert pseudo_labels_pixel_best(m, 0.2, 0.6)[0, 0].tolist() == [0, IGNORE_INDEX, IGNORE_INDEX, 2]
    g = torch.Generator().manual_seed(2)
    m = torch.rand(2, 4, 3, 5, generator=g)
    assert torch.equal(pseudo_labels_pixel_best(m, 0.3, 0.7), oracle.pseudo_labels_pixel_best(m, 0.3, 0.7))


def test_class_max_pseudo_labels_by_hand():
    # Class 0 (max 0.9) claims > 0.54; class 1 (max 0.5, a weak object) claims > 0.3; class 2
    # (max 0.25) claims > 0.2 (the floor, not 0.15).
    m = torch.tensor([
        [0.90, 0.60, 0.50, 0.10, 0.10, 0.30],
        [0.05, 0.35, 0.50, 0.31, 0.29, 0.30],
        [0.05, 0.05, 0.00, 0.25, 0.19, 0.21],
    ])[None, :, None]
    got = pseudo_labels_class_max(m, cutoff=0.6, floor=0.2)[0, 0].tolist()
    # 0: class 0; 1: 0 and 1 both claim -> ambiguous; 2: only 1 (0.5 < 0.54); 3: 1 and 2 claim;
    # 4: no class claims (0.29 < 0.3, 0.19 < 0.2); 5: only 2 (0.30 is not > 0.30).
    assert got == [0, IGNORE_INDEX, 1, IGNORE_INDEX, IGNORE_INDEX, 2]
    # Where ambiguity is allowed the strongest claim wins.
    assert pseudo_labels_class_max(m, 0.6, 0.2, drop_ambiguous=False)[0, 0].tolist() == [0, 0, 1, 1, IGNORE_INDEX, 2]
    # The per-pixel rule loses the weak object: its pixels rarely beat the others by enough.
    assert 1 not in pseudo_labels_pixel_best(m, 0.2, 0.6)[0, 0].tolist()
    # The background class uses its own cutoff (0.7 of its max: > 0.63 instead of > 0.54).
    assert pseudo_labels_class_max(m, 0.6, 0.2, background=0)[0, 0].tolist() == [0, 1, 1, IGNORE_INDEX,
                                                                                   IGNORE_INDEX, 2]
    # Padding is never labelled and does not count towards a class's maximum.
    valid = torch.ones(1, 1, 6, dtype=torch.bool)
    valid[..., 0] = False
    # Class 0's max is now 0.6, so it claims > 0.36: pixels 1 and 2 too, which become ambiguous.
    got = pseudo_labels_class_max(m, 0.6, 0.2, valid=valid)[0, 0].tolist()
    assert got == [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 2]
    g = torch.Generator().manual_seed(5)
    m = torch.rand(2, 4, 3, 5, generator=g).softmax(1)
    for bg, drop in ((None, True), (0, True), (2, False)):
        assert torch.equal(pseudo_labels_class_max(m, 0.6, 0.2, bg, 0.7, drop),
                           oracle.pseudo_labels_class_max(m, 0.6, 0.2, bg, 0.7, drop))


def test_perfect_cams_give_perfect_pseudo_labels_for_every_class():
    # CAMs that are the one-hot truth (a small object included) must give every class back whole.
    truth = torch.zeros(1, 16, 16, dtype=torch.long)
    truth[0, 8:] = 1
    truth[0, 2:4, 5:7] = 2  # a 2x2 object
    m = F.one_hot(truth, 3).permute(0, 3, 1, 2).float() * 0.9 + 0.05
    for background in (None, 0):
        labels = pseudo_labels_class_max(m, 0.6, 0.2, background)
        assert torch.equal(labels, truth)
    tags = torch.ones(1, 3)
    cfg = make_config(WSSSConfig, iters=1)
    method = WSSSCam(cfg, DatasetInfo("t", ("a", "b", "c"), ((0, 0, 0),) * 3), 1)
    image = F.one_hot(truth, 3).permute(0, 3, 1, 2).float()  # the image shows the classes
    labels = method.pseudo(method.refine(image, m, tags))
    for k in range(3):
        assert ((labels == k) & (truth == k)).sum() / ((labels == k) | (truth == k)).sum() > 0.9, k


def test_images_without_one_of_their_tags_in_the_pseudo_mask_are_gated():
    labels = torch.full((3, 2, 2), IGNORE_INDEX)
    labels[0] = torch.tensor([[1, 1], [2, 255]])  # tags 1, 2: both present
    labels[1] = torch.tensor([[1, 1], [1, 255]])  # tags 1, 2: 2 missing
    labels[2] = torch.tensor([[3, 3], [1, 1]])  # tags 3: the extra 1 cannot come from the tags, kept
    tags = torch.zeros(3, 4)
    tags[0, [1, 2]] = tags[1, [1, 2]] = tags[2, 3] = 1
    assert complete_images(labels, tags, None).tolist() == [True, False, True]
    # With a background class, it must be in the pseudo mask too.
    assert complete_images(labels, tags, 0).tolist() == [False, False, False]
    labels[0, 1, 1] = 0
    assert complete_images(labels, tags, 0).tolist() == [True, False, False]


def test_balanced_cross_entropy_equals_the_oracle_and_by_hand():
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(3, 4, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 4, (3, 5, 6), generator=g)
    labels[labels == 3] = IGNORE_INDEX
    labels[2] = IGNORE_INDEX  # a gated image counts as 0 in the mean
    got = balanced_cross_entropy(logits, labels)
    ref = oracle.balanced_ce(logits, labels)
    assert got.item() == pytest.approx(ref.item(), abs=1e-6)  # the loss computes in float32
    ga, = torch.autograd.grad(got, logits)
    gb, = torch.autograd.grad(ref, logits)
    assert torch.allclose(ga, gb, atol=1e-7)
    # By hand: 3 pixels of class 0 and 1 of class 1 -> weights 1/5 and 3/5, over 4 pixels.
    logits = torch.zeros(1, 2, 2, 2)
    labels = torch.tensor([[[0, 0], [0, 1]]])
    assert balanced_cross_entropy(logits, labels).item() == pytest.approx((3 * 0.2 + 0.6) * np.log(2) / 4)
    # An image with a single pseudo class weighs nothing; padding does not dilute the mean.
    assert balanced_cross_entropy(logits, torch.zeros(1, 2, 2, dtype=torch.long)).item() == 0.0
    valid = torch.tensor([[[False, False], [True, True]]])
    half = torch.tensor([[[255, 255], [0, 1]]])  # weights 1/3 each, over the 2 image pixels
    assert balanced_cross_entropy(logits, half, valid).item() == pytest.approx(2 / 3 * np.log(2) / 2)
    assert balanced_cross_entropy(logits, half).item() == pytest.approx(2 / 3 * np.log(2) / 4)


# ------------------------------------------------------------------------------------------------
# PGCL and SGCL against the oracles
def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_group_centres_and_contrast_equal_the_oracle_with_gradients():
    z = F.normalize(_rand(40, 6), dim=1).requires_grad_()
    labels = torch.randint(0, 4, (40,), generator=torch.Generator().manual_seed(3))
    labels[::7] = IGNORE_INDEX
    labels[labels == 2] = 1  # class 2 has no reliable pixel
    weights = torch.rand(40, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    centres, has = group_centres(z, labels, weights, 4)
    ref_c, ref_has = oracle.group_centres(z, labels, weights, 4)
    assert torch.equal(has, ref_has) and has.tolist() == [True, True, False, True]
    assert torch.allclose(centres, ref_c, atol=1e-10)

    idx = torch.tensor([0, 3, 5, 8, 11, 13, 20, 39])
    idx = idx[labels[idx] != IGNORE_INDEX]
    loss = group_contrast(z[idx], labels[idx], centres, has, 0.1)
    ref = oracle.group_contrast(z[idx], labels[idx], ref_c, ref_has, 0.1)
    assert loss.item() == pytest.approx(ref.item(), abs=1e-5)
    (g,) = torch.autograd.grad(loss, z)
    (g_ref,) = torch.autograd.grad(ref, z)
    assert torch.isfinite(g).all() and torch.allclose(g, g_ref, atol=1e-5)


def test_dual_stream_b_centres_equal_the_oracle_with_gradients():
    # Variant B's PGCL centres: the normalised mean of each class's (present) node embeddings, on
    # nodes that differ (an untrained GCN's nodes are nearly identical, which would hide a missing
    # normalisation or a node of another class or image counted in).
    tags = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.float64)  # class 3: no node
    present, classes, images = node_layout(tags, background=None)
    z = F.normalize(_rand(12, 5, seed=8), dim=1).requires_grad_()
    centres, has = graph_class_embeddings(z, classes, present, 4)
    ref_c, ref_has = oracle.graph_centres(z, classes, present, 4)
    assert torch.equal(has, ref_has) and has.tolist() == [True, True, True, False]
    assert torch.allclose(centres, ref_c, atol=1e-10)
    (g,) = torch.autograd.grad(centres.sum(), z)
    (g_ref,) = torch.autograd.grad(ref_c.sum(), z)
    assert torch.allclose(g, g_ref, atol=1e-10) and g[~present].abs().sum() == 0


def test_graph_stream_equals_the_oracle_with_gradients():
    b, c, d = 3, 4, 5
    tags = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0], [1, 0, 1, 1]], dtype=torch.float64)
    present, classes, images = node_layout(tags, background=None)
    h = _rand(b * c, d, seed=5).requires_grad_()
    layers = torch.nn.ModuleList([torch.nn.Linear(d, d), torch.nn.Linear(d, d)]).double()
    g = gcn(h, present, layers)
    ref = oracle.gcn(h, present, layers[0].weight, layers[0].bias, layers[1].weight, layers[1].bias)
    assert torch.allclose(g[present], ref[present], atol=1e-10)
    assert torch.count_nonzero(g[~present]) == 0  # absent nodes have no edges

    z = F.normalize(g, dim=1)
    loss = node_contrast(z, classes, images, present, 0.1)
    ref_loss = oracle.node_contrast(F.normalize(ref, dim=1), classes, images, present, 0.1)
    assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-5)
    params = [h, *layers.parameters()]
    grads = torch.autograd.grad(loss, params)
    ref_grads = torch.autograd.grad(ref_loss, params)
    for a, r in zip(grads, ref_grads):
        assert torch.isfinite(a).all() and torch.allclose(a, r, atol=1e-5)


def test_background_is_a_node_of_every_image():
    present, classes, images = node_layout(torch.tensor([[0.0, 1.0, 0.0, 0.0]]), background=0)
    assert present.tolist() == [True, True, False, False]
    assert classes.tolist() == [0, 1, 2, 3] and images.tolist() == [0, 0, 0, 0]


def test_sgcl_is_zero_and_finite_when_no_two_images_share_a_class():
    tags = torch.eye(4)[:3]  # images tagged with classes 0, 1, 2: nothing shared
    present, classes, images = node_layout(tags, background=None)
    h = _rand(12, 5, seed=6).float().requires_grad_()
    layers = torch.nn.ModuleList([torch.nn.Linear(5, 5), torch.nn.Linear(5, 5)])
    loss = node_contrast(F.normalize(gcn(h, present, layers), dim=1), classes, images, present, 0.1)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(h.grad).all() and all(torch.isfinite(p.grad).all() for p in layers.parameters())
    # One image alone: no other node at all.
    present1, classes1, images1 = node_layout(torch.tensor([[1.0, 0.0]]), background=None)
    z = F.normalize(torch.randn(2, 3), dim=1).requires_grad_()
    loss = node_contrast(z, classes1, images1, present1, 0.1)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(z.grad).all()


def test_node_features_are_cam_weighted_means():
    feats = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    masks = torch.zeros(2, 2, 2, 2)
    masks[:, 0, 0, 0] = 1.0
    masks[:, 1] = 0.5
    out = node_features(feats, masks, eps=0.0)
    assert torch.allclose(out[:, 0], feats[:, :, 0, 0])
    assert torch.allclose(out[:, 1], feats.mean((2, 3)))


def test_graph_class_embeddings_average_a_class_nodes():
    z = F.normalize(_rand(6, 4, seed=7), dim=1)
    classes = torch.tensor([0, 1, 2, 0, 1, 2])
    present = torch.tensor([True, True, False, True, False, False])
    emb, has = graph_class_embeddings(z, classes, present, 3)
    assert has.tolist() == [True, True, False]
    assert torch.allclose(emb[0], F.normalize(z[0] + z[3], dim=0)) and torch.allclose(emb[1], z[1])


def test_anchor_sampling_takes_half_hard_and_fills_in():
    reliable = torch.ones(100, dtype=torch.bool)
    reliable[:10] = False
    hard = torch.zeros(100, dtype=torch.bool)
    hard[5:30] = True  # 20 reliable hard pixels (10..29), 70 easy
    torch.manual_seed(0)
    idx = sample_pixels(reliable, hard, 32, 0.5)
    assert len(idx) == len(set(idx.tolist())) == 32 and reliable[idx].all()
    assert int(hard[idx].sum()) == 16
    idx = sample_pixels(reliable, hard, 60, 0.5)  # only 20 hard: easy fills in
    assert int(hard[idx].sum()) == 20 and len(idx) == 60
    idx = sample_pixels(reliable, hard, 1000, 0.5)  # fewer reliable pixels than the budget
    assert sorted(idx.tolist()) == list(range(10, 100))
    assert sample_pixels(torch.zeros(5, dtype=torch.bool), hard[:5], 8, 0.5).numel() == 0


@pytest.mark.parametrize("n,fraction", [(32, 0.5), (60, 0.5), (1000, 0.5), (7, 0.3), (40, 1.0), (40, 0.0)])
def test_per_image_anchor_sampling_matches_the_loop_oracle(n, fraction):
    g = torch.Generator().manual_seed(n)
    reliable = torch.rand(3, 120, generator=g) < torch.tensor([[0.9], [0.5], [0.0]])  # image 2: none
    hard = torch.rand(3, 120, generator=g) < torch.tensor([[0.2], [0.7], [0.5]])
    torch.manual_seed(0)
    idx = sample_pixels_per_image(reliable, hard, n, fraction)
    assert len(idx) == len(set(idx.tolist())) and reliable.flatten()[idx].all()
    image, is_hard = idx // 120, hard.flatten()[idx]
    got = {b: (int((is_hard & (image == b)).sum()), int((~is_hard & (image == b)).sum())) for b in range(3)}
    assert got == oracle.pgcl_counts(reliable, hard, n, fraction)
    # per_batch (the old rule) against the same oracle over the pooled batch
    idx = sample_pixels(reliable.flatten(), hard.flatten(), n, fraction)
    assert (int(hard.flatten()[idx].sum()), int((~hard.flatten()[idx]).sum())) == \
        oracle.pgcl_counts(reliable, hard, n, fraction, per_image=False)[-1]


def test_per_image_anchor_sampling_by_hand_and_independent_of_the_batch():
    reliable = torch.ones(2, 10, dtype=torch.bool)
    reliable[1, 6:] = False  # image 1: 6 reliable pixels
    hard = torch.zeros(2, 10, dtype=torch.bool)
    hard[0, :2] = True  # image 0: 2 hard, 8 easy; image 1: 6 easy
    torch.manual_seed(0)
    idx = sample_pixels_per_image(reliable, hard, 8, 0.5)
    # image 0: 4 hard wanted, 2 exist, easy fills in: 2 + 6; image 1: all 6 reliable pixels.
    assert sorted(idx[idx < 10].tolist())[:2] == [0, 1] and (idx < 10).sum() == 8
    assert sorted(idx[idx >= 10].tolist()) == list(range(10, 16))
    # Pooled over the batch (the old rule), image 1's pixels compete with image 0's.
    idx = sample_pixels(reliable.flatten(), hard.flatten(), 8, 0.5)
    assert len(idx) == 8 and hard.flatten()[idx].sum() == 2
    # The same image gives the same number of anchors in a batch of 1, 2 or 4.
    g = torch.Generator().manual_seed(5)
    reliable = torch.rand(4, 200, generator=g) < 0.6
    hard = torch.rand(4, 200, generator=g) < 0.3
    per_image = [torch.bincount(sample_pixels_per_image(reliable[:b], hard[:b], 50, 0.5) // 200, minlength=b)
                 for b in (1, 2, 4)]
    assert per_image[0].tolist() == per_image[1][:1].tolist() == per_image[2][:1].tolist() == [50]
    assert per_image[1].tolist() == per_image[2][:2].tolist()


# ------------------------------------------------------------------------------------------------
# The methods end to end on a batch
def _batch_and_out(method, model, seed=0, b=4, size=32):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(b, 3, size, size, generator=g)
    model.train()
    out = model(image)
    tags = torch.zeros(b, method.info.num_classes)
    tags[:, 1] = 1
    tags[0, 2] = tags[1, 2] = tags[2, 3] = 1
    mask = torch.randint(0, method.info.num_classes, (b, size, size), generator=g)
    return out, {"image": image, "tags": tags, "mask": mask}


@pytest.mark.parametrize("variant,budget", [("A", "per_batch"), ("B", "per_image"), ("A", "per_image")])
def test_dscnet_terms_equal_the_oracles(variant, budget):
    torch.manual_seed(0)
    # No gating: this untrained model's pseudo labels miss tagged classes, which would gate every
    # image out, leave PGCL no reliable pixel and no anchor, and make its comparison 0 == 0.
    cfg = make_config(DSCNetConfig, encoder="test_resnet", iters=10, dual_stream=variant, pgcl_anchors=64,
                      pgcl_anchors_per_image=10, pgcl_budget=budget, seg_warmup=0.0, seg_gate=False)
    method = DSCNet(cfg, VOC_LIKE, 10)
    model = build_model(cfg, VOC_LIKE.num_classes, heads=method.heads)
    out, batch = _batch_and_out(method, model)
    torch.manual_seed(1)
    loss, terms = method(out, batch, step=5)
    assert torch.isfinite(loss)
    names = VOC_LIKE.class_names
    assert set(terms) == {"cls", "seg", "pseudo_coverage", "seg_gated", "pgcl", "sgcl", "anchors",
                          "anchor_classes"} | {f"anchors/{n}" for n in names} | {f"pseudo_px/{n}" for n in names}

    # Recompute every piece with the oracles (same anchors: same RNG state).
    _, _, weak = method.weak_terms(out, batch, 5)
    torch.manual_seed(1)
    anchors, anchor_labels, z, y, conf = method.pixel_stream(out, weak)
    present, classes, images = node_layout(batch["tags"], 0)
    h = node_embeddings(out).double().reshape(-1, cfg.proj_dim)
    layers = out["gcn"]
    nodes = F.normalize(oracle.gcn(h, present, *(p.double() for p in (
        layers[0].weight, layers[0].bias, layers[1].weight, layers[1].bias))), dim=1)
    sgcl = oracle.node_contrast(nodes, classes, images, present, 0.1)
    assert terms["sgcl"].item() == pytest.approx(sgcl.item(), abs=1e-5)
    # The group centres themselves (an untrained model's anchors are about equally similar to
    # every centre, so PGCL alone, about log 4, would hardly tell centres apart).
    if variant == "A":
        centres, has = oracle.group_centres(z.double(), y, conf.double(), 4)
        got, got_has = group_centres(z, y, conf, 4)
    else:
        centres, has = oracle.graph_centres(nodes, classes, present, 4)
        # Every class has a node: background in each image, a tagged in all, b in images 0-1, c in 2.
        assert has.tolist() == [True] * 4
        got, got_has = graph_class_embeddings(method.graph_stream(out, batch["tags"], weak["valid"])[0],
                                              classes, present, 4)
    assert torch.equal(got_has, has) and has.sum() >= 2
    torch.testing.assert_close(got.double(), centres, atol=1e-5, rtol=0)
    pgcl = oracle.group_contrast(anchors.double(), anchor_labels, centres, has, 0.1)
    assert len(anchors) > 0 and pgcl.item() > 0
    assert terms["pgcl"].item() == pytest.approx(pgcl.item(), abs=1e-5)
    reliable = (weak["labels"] != IGNORE_INDEX).flatten(1).sum(1)
    if budget == "per_batch":
        assert len(anchors) == min(64, int(reliable.sum()))
    else:  # each image gives min(10, its reliable pixels)
        labels = weak["labels"].flatten(1)
        torch.manual_seed(1)
        idx = sample_pixels_per_image(labels != IGNORE_INDEX, out["logits"].argmax(1).flatten(1) != labels, 10, 0.5)
        assert torch.equal(anchors, z[idx]) and torch.equal(anchor_labels, y[idx])
        assert torch.bincount(idx // labels.shape[1], minlength=4).tolist() == reliable.clamp(max=10).tolist()
    # The logged per-class counts are the sample's.
    counts = torch.bincount(anchor_labels, minlength=4)
    assert [terms[f"anchors/{n}"].item() for n in names] == counts.float().tolist()
    assert terms["anchors"].item() == len(anchors) and terms["anchor_classes"].item() == int((counts > 0).sum())

    loss.backward()
    for name, p in model.named_parameters():  # every head in the graph (DDP needs it)
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_weak_loss_never_reads_the_pixel_labels():
    torch.manual_seed(0)
    cfg = make_config(DSCNetConfig, encoder="test_resnet", iters=10, seg_warmup=0.0)
    method = DSCNet(cfg, SYNTHETIC_INFO, 10)
    model = build_model(cfg, 8, heads=method.heads)
    out, batch = _batch_and_out(method, model)
    torch.manual_seed(3)
    a, _ = method(out, batch, 5)
    torch.manual_seed(3)
    b, _ = method(out, {**batch, "mask": torch.full_like(batch["mask"], IGNORE_INDEX)}, 5)
    assert a.item() == b.item()


TOY = DatasetInfo("toy", ("sky", "ground", "car"), ((0, 0, 0),) * 3)


def _toy_scene():
    """Two 16x16 images: sky over ground, each with a 4x4 car the image shows in its own colour."""
    truth = torch.zeros(2, 16, 16, dtype=torch.long)
    truth[:, 8:] = 1
    truth[0, 3:7, 4:8] = 2
    truth[1, 9:13, 9:13] = 2
    return truth, F.one_hot(truth, 3).permute(0, 3, 1, 2).float()


def test_a_good_cams_object_survives_self_training():
    # Free logits as the 'model': a diffuse car CAM that barely wins inside the car (3.3 against
    # the stuff class's 3.0) and is high (2.0) all around it. Sixty steps of the weak loss (Adam)
    # must keep the car, and its pseudo labels must hold it from the first step.
    truth, image = _toy_scene()
    logits = F.one_hot(truth.clamp(max=1), 3).permute(0, 3, 1, 2).float() * 3.0
    logits[:, 2] = torch.where(truth == 2, 3.3, 2.0)
    logits = torch.nn.Parameter(logits)
    method = WSSSCam(make_config(WSSSConfig, iters=60, seg_warmup=0.0), TOY, 60)
    optimizer = torch.optim.Adam([logits], lr=0.05)
    start = logits.detach().softmax(1)[:, 2][truth == 2].mean()
    for step in range(60):
        loss, terms = method({"logits": logits}, {"image": image, "tags": torch.ones(2, 3)}, step)
        if step == 0:
            assert terms["pseudo_px/car"].item() == 32 and terms["seg_gated"].item() == 0.0
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    pred = logits.detach().argmax(1)
    assert torch.equal(pred, truth)
    assert logits.detach().softmax(1)[:, 2][truth == 2].mean() > start + 0.2


def test_a_gated_image_and_padding_contribute_nothing_to_the_segmentation_loss():
    truth, image = _toy_scene()
    logits = (F.one_hot(truth, 3).permute(0, 3, 1, 2).float() * 2.0).requires_grad_()
    cfg = make_config(WSSSConfig, iters=10, seg_warmup=0.0, pamr_iters=0)
    method = WSSSCam(cfg, TOY, 10)
    tags = torch.ones(2, 3)
    tags[1, 2] = 0  # image 1 untagged with car: its car pixels go to other classes
    tags = torch.cat([tags, torch.tensor([[1.0, 1.0, 1.0]])])  # image 2: car tagged but absent
    third = truth[:1].clone()
    third[third == 2] = 0
    batch_truth = torch.cat([truth, third])
    logits = (F.one_hot(batch_truth, 3).permute(0, 3, 1, 2).float() * 2.0).requires_grad_()
    images = F.one_hot(batch_truth, 3).permute(0, 3, 1, 2).float()
    _, terms, weak = method.weak_terms({"logits": logits}, {"image": images, "tags": tags}, 5)
    assert terms["seg_gated"].item() == pytest.approx(1 / 3)
    assert (weak["labels"][2] == IGNORE_INDEX).all() and (weak["labels"][:2] != IGNORE_INDEX).any()
    seg = balanced_cross_entropy(logits, weak["labels"])
    grad, = torch.autograd.grad(seg, logits)
    assert grad[2].abs().sum() == 0 and grad[:2].abs().sum() > 0
    assert terms["seg"].item() == pytest.approx(seg.item())
    # Without gating, image 2's pseudo labels (no car) are learned from.
    ungated = WSSSCam(make_config(WSSSConfig, iters=10, seg_warmup=0.0, pamr_iters=0, seg_gate=False), TOY, 10)
    _, terms, weak = ungated.weak_terms({"logits": logits}, {"image": images, "tags": tags}, 5)
    assert terms["seg_gated"].item() == 0.0 and (weak["labels"][2] != IGNORE_INDEX).all()
    # Padding: whatever the logits and image hold there, the loss is the same.
    valid = torch.ones(3, 16, 16, dtype=torch.bool)
    valid[:, :, 12:] = False
    base = {"image": images, "tags": tags, "valid": valid}
    a, terms_a = method({"logits": logits}, base, 5)
    junk_logits, junk_image = logits.detach().clone(), images.clone()
    junk_logits[..., 12:] = torch.randn(3, 3, 16, 4) * 5
    junk_image[..., 12:] = torch.rand(3, 3, 16, 4)
    b, terms_b = method({"logits": junk_logits}, {**base, "image": junk_image}, 5)
    assert a.item() == pytest.approx(b.item(), abs=1e-6)
    assert all(terms_a[k].item() == pytest.approx(terms_b[k].item(), abs=1e-6) for k in terms_a)
    # pseudo_coverage is the share of image pixels with a pseudo label (before gating): the padded
    # batch's equals that of the batch cropped to its 12 valid columns, whose labels (without
    # gating) are counted here by hand.
    crop = {"logits": logits[..., :12]}, {"image": images[..., :12], "tags": tags}
    _, terms_crop = method(*crop, 5)
    _, _, weak = ungated.weak_terms(*crop, 5)
    labelled = int((weak["labels"] != IGNORE_INDEX).sum())
    assert 0 < labelled < 3 * 16 * 12  # some pixels unlabelled: the test tells a share from 1
    assert terms_a["pseudo_coverage"].item() == pytest.approx(labelled / (3 * 16 * 12), abs=1e-6)
    assert terms_crop["pseudo_coverage"].item() == pytest.approx(labelled / (3 * 16 * 12), abs=1e-6)


def test_segmentation_loss_waits_for_the_warmup():
    cfg = make_config(WSSSConfig, encoder="test_resnet", iters=24)
    method = WSSSCam(cfg, SYNTHETIC_INFO, 24)
    assert method.warmup_steps == 5  # ceil(5/24 * 24)
    model = build_model(cfg, 8)
    out, batch = _batch_and_out(method, model)
    before, terms = method(out, batch, 4)
    after, _ = method(out, batch, 5)
    assert before.item() == pytest.approx(terms["cls"].item())
    assert after.item() == pytest.approx((terms["cls"] + terms["seg"]).item(), rel=1e-6)


def test_dscnet_heads_are_dropped_from_the_deployed_model():
    cfg = make_config(DSCNetConfig, encoder="test_resnet", iters=10)
    method = DSCNet(cfg, SYNTHETIC_INFO, 10)
    model = build_model(cfg, 8, heads=method.heads)
    ce = build_model(make_config(CEConfig, encoder="test_resnet", iters=10), 8)
    assert len(model.heads) == 2
    deployed = model.deploy_state_dict()
    assert deployed.keys() == ce.state_dict().keys()


@pytest.mark.parametrize(
    "key,value",
    [("seg_warmup", 1.5), ("pamr_dilations", [0, 1]), ("pseudo_ambiguity", 0.0), ("dual_stream", "C"),
     ("pgcl_hard_fraction", 2.0), ("temperature", 0.0), ("batch_sampler", "balanced"),
     ("pgcl_budget", "per_gpu"), ("pgcl_anchors_per_image", 0), ("log_class_anchors", -1)],
)
def test_config_errors_name_the_setting(key, value):
    cfg = make_config(DSCNetConfig, iters=10, **{key: value})
    with pytest.raises(ValueError, match=key):
        cfg.validate()


def test_dilations_take_any_length_from_the_command_line():
    cfg = make_config(WSSSConfig, pamr_dilations="1, 3")
    assert cfg.pamr_dilations == (1, 3)


# ------------------------------------------------------------------------------------------------
# Class-aware batches
def _epoch(sampler, epoch=0):
    sampler.set_epoch(epoch)
    return [[i for i, _ in batch] for batch in sampler]


def test_class_aware_batches_pair_images_that_share_a_class():
    g = torch.Generator().manual_seed(0)
    tags = torch.zeros(60, 6)
    tags[torch.arange(60), torch.randint(1, 6, (60,), generator=g)] = 1  # one class each
    tags[:, 0] = 1  # the background: in every image, never a key class
    s = ClassAwareBatchSampler(tags, 6, seed=0, group_size=2, background=0)
    batches = _epoch(s)
    seen = sorted(i for b in batches for i in b)
    assert seen == list(range(60))
    fg = tags[:, 1:].argmax(1)
    # All but at most one image per class (odd group sizes) have a partner of the same class in
    # their batch.
    alone = sum(int((fg[b] == fg[i]).sum()) == 1 for b in batches for i in b)
    assert alone <= 5
    shuffled = _epoch(ClassAwareBatchSampler(tags, 6, seed=0, group_size=2))  # background may be key
    assert seen == sorted(i for b in shuffled for i in b)
    # With random batches nearly every image is alone with its class.
    assert _epoch(s, 1) != batches and _epoch(s, 0) == batches


def test_class_aware_batches_are_world_size_and_resume_invariant():
    tags = (torch.rand(40, 5, generator=torch.Generator().manual_seed(1)) < 0.3).float()
    one = _epoch(ClassAwareBatchSampler(tags, 4, seed=3))
    ranks = [ClassAwareBatchSampler(tags, 4, seed=3, dist=DistInfo(rank=r, world_size=2)) for r in (0, 1)]
    two = [a + b for a, b in zip(_epoch(ranks[0]), _epoch(ranks[1]))]
    assert one == two
    resumed = ClassAwareBatchSampler(tags, 4, seed=3)
    resumed.set_epoch(0, 4)
    assert [[i for i, _ in b] for b in resumed] == one[4:]


# ------------------------------------------------------------------------------------------------
# Evaluation
class _Oracle(torch.nn.Module):
    """A 'model' whose logits are the one-hot ground truth (scaled), at the label resolution."""

    def __init__(self, masks):
        super().__init__()
        self.masks = masks

    def forward(self, image, with_heads=False):
        m = self.masks[: image.shape[0]]
        return {"logits": 10.0 * F.one_hot(m.clamp_max(7), 8).permute(0, 3, 1, 2).float()}


def test_unlabelled_pseudo_pixels_count_as_misses_like_sklearn():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 4, (3, 10, 10), generator=g)
    pred = torch.randint(0, 5, (3, 10, 10), generator=g)  # 4 = unlabelled
    m = SegMetrics(5, class_names=["a", "b", "c", "d", "unlabelled"])
    m.update(pred, target)
    got = _without_unlabelled(m.compute(), ["a", "b", "c", "d"])
    ref = jaccard_score(target.flatten(), pred.flatten(), labels=[0, 1, 2, 3], average=None)
    assert list(got["per_class_iou"].values()) == pytest.approx(ref.tolist())
    assert got["miou"] == pytest.approx(ref.mean())


def test_evaluate_weak_on_perfect_cams():
    from ctxseg.data.synthetic import SyntheticScenes

    ds = SyntheticScenes("train", length=4, size=(48, 48))
    items = [ds[i] for i in range(4)]
    batch = {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in ("image", "mask", "tags")}
    cfg = make_config(WSSSConfig, iters=1)
    result = evaluate_weak(_Oracle(batch["mask"]), [batch], cfg, SYNTHETIC_INFO, torch.device("cpu"),
                           progress=False)
    assert result["cam"]["miou"] == pytest.approx(1.0)
    assert result["protocol"] == {"split": "train", "images": 4, "scales": [1.0], "flip": False, "crf": False}
    assert set(result["cam"]["per_class_iou"].values()) <= {1.0, None}
    # Perfect CAMs: every class present survives into the pseudo labels. PAMR (at full resolution
    # here, dilations up to 24 on 48x48 images) spreads the textured tree into its surroundings:
    # 0.38 IoU by 1-stage-wseg's rule (WS-6), 0.03 by the per-pixel rule ctxseg had before (WS-7).
    pseudo = result["pseudo"]
    present = [SYNTHETIC_INFO.class_names[k] for k in batch["mask"].unique().tolist()]
    assert all(pseudo["per_class_iou"][name] > 0.3 for name in present), pseudo["per_class_iou"]
    assert pseudo["miou"] > 0.8 and 0.9 < pseudo["coverage"] <= 1.0 and pseudo["split"] == "train"
    old_rule = evaluate_weak(_Oracle(batch["mask"]), [batch], make_config(WSSSConfig, iters=1, pseudo_rule="pixel_best"),
                             SYNTHETIC_INFO, torch.device("cpu"), progress=False)["pseudo"]
    assert old_rule["per_class_iou"]["tree"] < 0.1
    # The class scores of perfect CAMs rank every tagged image above every untagged one.
    ap = result["cls_ap"]
    assert ap["images"] == 4 and all(v in (1.0, None) for v in ap["per_class"].values())
    assert ap["tag_frequency"]["sky"] == batch["tags"][:, 0].mean().item()


def test_classification_ap_equals_sklearn_per_class():
    from sklearn.metrics import average_precision_score

    g = torch.Generator().manual_seed(0)
    tags = (torch.rand(30, 4, generator=g) < 0.4).float()
    tags[:, 0] = 1  # the background: always tagged
    tags[:, 3] = 0
    tags[0, 3] = 1  # one positive
    scores = torch.randn(30, 4, generator=g) + 2 * tags
    got = classification_ap(scores, tags, ["bg", "a", "b", "c"], background=0)
    assert "bg" not in got["per_class"]
    for k, name in ((1, "a"), (2, "b"), (3, "c")):
        assert got["per_class"][name] == pytest.approx(average_precision_score(tags[:, k], scores[:, k]))
        assert got["tag_frequency"][name] == pytest.approx(tags[:, k].mean().item())
    assert got["mean"] == pytest.approx(np.mean(list(got["per_class"].values())))
    # A class tagged in every image (or none) has no AP.
    assert classification_ap(scores, tags, ["bg", "a", "b", "c"], None)["per_class"]["bg"] is None
    # By hand: scores 0.9 (tagged), 0.8 (not), 0.7 (tagged): precision 1 at the first hit, 2/3 at the second.
    one = classification_ap(torch.tensor([[0.9], [0.8], [0.7]]), torch.tensor([[1.0], [0.0], [1.0]]), ["x"], None)
    assert one["per_class"]["x"] == pytest.approx((1 + 2 / 3) / 2)


# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_train_and_eval_cli_report_cam_pseudo_and_seg_miou_with_their_splits(tmp_path):
    import json

    from conftest import TINY_TRAIN, run_ctxseg

    out = tmp_path / "run"
    res = run_ctxseg(["train", "--method", "dscnet", *TINY_TRAIN, "--iters", "4", "--out", str(out), "--no-progress",
                      "--set", "num_workers=0", "--set", "seg_warmup=0.5"])
    assert res.returncode == 0, res.stderr
    printed = json.loads(res.stdout.strip().splitlines()[-1])
    assert {"cam_miou", "pseudo_miou", "seg_miou", "cam_split", "seg_split"} <= printed.keys()
    trained = json.loads((out / "eval.json").read_text())
    assert trained["cam"]["split"] == "train" and trained["split"] == "val"
    assert trained["cam"]["num_pixels"] == 32 * 64 * 64  # the run's 32 training images, all pixels

    res = run_ctxseg(["eval", "--checkpoint", str(out), "--split", "val", "--num-workers", "0"])
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout)
    summary = result["wsss"]
    assert summary["cam_split"] == "train" and summary["seg_split"] == "val" and summary["crf"] is False
    assert summary["cam_miou"] == pytest.approx(trained["cam"]["miou"], abs=1e-9)
    assert summary["pseudo_miou"] == pytest.approx(trained["pseudo"]["miou"], abs=1e-9)
    assert summary["seg_miou"] == pytest.approx(trained["miou"], abs=1e-9)
    # Coverage by hand from the pseudo labels' confusion matrix (C + 1 columns, the last one the
    # unlabelled pixels; synthetic labels ignore no pixel): 1 - unlabelled / all pixels.
    cm = np.asarray(result["pseudo"]["confusion"], dtype=np.float64)
    assert cm.shape == (9, 9) and cm.sum() == 32 * 64 * 64
    coverage = 1.0 - cm[:, 8].sum() / cm.sum()
    assert result["pseudo"]["coverage"] == pytest.approx(coverage, abs=1e-12)
    assert summary["pseudo_coverage"] == pytest.approx(trained["pseudo"]["coverage"], abs=1e-9)


def test_tags_are_those_of_the_whole_image_even_after_a_crop():
    from ctxseg.data import SyntheticScenes, train_transform
    from ctxseg.data.base import tags_from_mask

    ds = SyntheticScenes("train", length=6, size=(96, 96), transform=train_transform((32, 32), (0.5, 0.5)))
    lost = 0
    for i in range(6):
        item = ds[(i, 7)]
        whole = tags_from_mask(torch.from_numpy(ds.load(i)[1]), 8)
        assert torch.equal(item["tags"], whole)
        lost += int((whole > tags_from_mask(item["mask"], 8)).any())
    assert lost > 0  # small crops do lose tagged classes: the weak label is the image's
    assert torch.equal(ds.image_tags(), torch.stack([ds[i]["tags"] for i in range(6)]))


@pytest.mark.slow
def test_dscnet_resumed_from_a_checkpoint_ends_with_the_uninterrupted_weights(tmp_path):
    # Class-aware batches, PGCL's random anchors and the warm-up switch must all resume exactly.
    import shutil

    from conftest import TINY_TRAIN, run_ctxseg
    from safetensors.torch import load_file

    common = ["train", "--method", "dscnet", *TINY_TRAIN, "--iters", "6", "--ckpt-every", "3", "--no-progress",
              "--set", "num_workers=0", "--set", "seg_warmup=0.4", "--set", "eval_every=0"]
    ref = run_ctxseg([*common, "--out", str(tmp_path / "ref")])
    assert ref.returncode == 0, ref.stderr
    resumed = tmp_path / "resumed"
    (resumed / "ckpt").mkdir(parents=True)
    shutil.copy(tmp_path / "ref" / "ckpt" / "step_00000003.pt", resumed / "ckpt")
    res = run_ctxseg([*common, "--out", str(resumed), "--resume"])
    assert res.returncode == 0, res.stderr
    a, b = load_file(str(tmp_path / "ref" / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_group_centres_plot_says_so_when_no_pixel_has_a_pseudo_label():
    import matplotlib

    matplotlib.use("Agg")
    from ctxseg.viz.weak import plot_group_centres

    z = torch.randn(10, 4)
    fig = plot_group_centres(z, torch.full((10,), IGNORE_INDEX), torch.zeros(8, 4), torch.zeros(8, dtype=torch.bool),
                             SYNTHETIC_INFO)
    assert "no reliable pixel" in fig.axes[0].texts[0].get_text()
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1, 2, 0])
    centres, has = group_centres(F.normalize(z, dim=1), labels, torch.ones(10), 8)
    fig = plot_group_centres(z, labels, centres, has, SYNTHETIC_INFO)
    assert "PCA" in fig.axes[-1].get_title()


def test_weak_eval_subset_takes_evenly_spaced_images_the_same_every_time():
    from ctxseg.methods.wsss import weak_eval_subset

    data = list(range(2000))
    sub = weak_eval_subset(data, 500)
    assert len(sub) == 500 and list(sub)[:3] == [0, 4, 8] and list(sub)[-1] == 1996
    assert list(weak_eval_subset(data, 500)) == list(sub)
    assert weak_eval_subset(data, None) is data and weak_eval_subset(data, 5000) is data
    assert list(weak_eval_subset(list(range(10)), 3)) == [0, 3, 6]
    assert make_config(WSSSConfig, "synthetic", iters=1).weak_eval_images == 500
    assert make_config(WSSSConfig, "voc", iters=1).weak_eval_images is None  # the field's protocol: every image
    with pytest.raises(ValueError, match="weak_eval_images"):
        make_config(WSSSConfig, iters=1, weak_eval_images=0).validate()
