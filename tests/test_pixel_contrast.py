"""Pixel contrast (docs/methods.md, "Pixel contrast"): the vectorised sampler, loss and memory bank
against loop oracles (tests/pixel_contrast_oracle.py), the edge cases that give NaN in the public
reference code (docs/methods.md, "Pixel contrast", defect 4), and the method inside the trainer
(warm-up, single-process contrast (defect 5), resume with the memory bank)."""

from collections import Counter

import pixel_contrast_oracle as oracle
import pytest
import torch
import torch.nn.functional as F

from ctxseg.config import make_config
from ctxseg.data import SyntheticScenes, eval_transform
from ctxseg.engine.checkpoint import list_checkpoints
from ctxseg.engine.trainer import Trainer
from ctxseg.methods.contrast import (
    MemoryBank,
    anchor_counts,
    blocked_contrast_loss,
    contrast_loss,
    downsample_labels,
    embedding_map,
    fold_anchors,
    gather_anchors,
    memory_keys,
    project_rows,
    sample_anchors,
)
from ctxseg.methods.pixel_contrast import PixelContrast, PixelContrastConfig
from ctxseg.models import Segmenter
from ctxseg.models.segmenter import upsample_to
from ctxseg.runs import load_run


def blob_labels(B, h, w, C, seed, ignore_frac=0.05):
    """Piecewise-constant random label maps with some ignored pixels."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, C, (B, 1, max(1, h // 8), max(1, w // 8)), generator=g).float()
    labels = F.interpolate(coarse, size=(h, w), mode="nearest")[:, 0].long()
    labels[torch.rand(B, h, w, generator=g) < ignore_frac] = 255
    return labels.flatten(1)


def noisy_preds(labels, C, wrong_frac, seed):
    g = torch.Generator().manual_seed(seed)
    preds = labels.clone()
    flip = torch.rand(labels.shape, generator=g) < wrong_frac
    preds[flip] = torch.randint(0, C, (int(flip.sum()),), generator=g)
    return preds.clamp(max=C - 1)


# ------------------------------------------------------------------------------------------------
# Sampler
BUDGET_CASES = [(5, 1024, 100, 0.3), (19, 1024, 100, 0.5), (7, 300, 20, 0.05), (7, 300, 20, 0.95), (3, 50, 40, 0.5)]


@pytest.mark.parametrize(
    "C,max_samples,max_views,wrong_frac,per_image,min_share",
    [case + (None, None) for case in BUDGET_CASES]  # per batch, the reference's rule as written
    + [(5, 0, 100, 0.3, 512, 100 / 32768), (19, 0, 100, 0.5, 512, 100 / 32768), (7, 0, 20, 0.05, 150, 0.01),
       (7, 0, 20, 0.95, 150, 0.0), (3, 0, 300, 0.5, 700, 0.05), (12, 0, 40, 0.5, 90, 0.002)],
)
def test_sampler_counts_match_the_loop_oracle(C, max_samples, max_views, wrong_frac, per_image, min_share):
    labels = blob_labels(4, 48, 64, C, seed=C)
    preds = noisy_preds(labels, C, wrong_frac, seed=1)
    want, n_view = oracle.sample_counts(labels, preds, C, max_samples, max_views, per_image, min_share)
    torch.manual_seed(0)
    a = sample_anchors(labels, preds, C, max_samples, max_views, per_image=per_image, min_share=min_share)
    assert a.n_view.tolist() == n_view
    image = a.index // labels.shape[1]
    got = Counter(zip(image.tolist(), a.label.tolist(), a.hard.tolist()))
    for (b, c), (keep_hard, keep_easy) in want.items():
        assert (got[(b, c, True)], got[(b, c, False)]) == (keep_hard, keep_easy), (b, c)
    assert sum(got.values()) == sum(h + e for h, e in want.values())
    # The anchors are what they claim: distinct pixels of their class, hard iff mispredicted.
    assert len(set(a.index.tolist())) == len(a)
    flat_labels, flat_preds = labels.flatten(), preds.flatten()
    assert torch.equal(flat_labels[a.index], a.label)
    assert torch.equal(flat_preds[a.index] != a.label, a.hard)


def test_sampler_draws_uniformly_within_a_group():
    # One image, one class of 200 pixels, all easy: each pixel should be drawn ~ n_view/200 of the time.
    labels = torch.zeros(1, 200, dtype=torch.long)
    hits = torch.zeros(200)
    torch.manual_seed(0)
    for _ in range(400):
        hits[sample_anchors(labels, labels, 2, max_samples=50, max_views=50).index] += 1
    assert hits.sum() == 400 * 50
    expected = 400 * 50 / 200  # 100 per pixel; binomial sd ~ 8.7
    assert hits.min() > expected - 45 and hits.max() < expected + 45


def _by_pair(a, P):
    """{(image, class): (hard, easy)} of a sample on images of P cells."""
    got = Counter(zip((a.index // P).tolist(), a.label.tolist(), a.hard.tolist()))
    pairs = {(b, c) for b, c, _ in got}
    return {(b, c): (got[(b, c, True)], got[(b, c, False)]) for b, c in sorted(pairs)}


def _hand_case():
    """2 images of a 4x8 grid (32 cells), 4 classes. Image 0: class 0 x20 (6 mispredicted),
    class 1 x8, class 2 x3, class 3 x1. Image 1: class 0 x10, class 1 x4 (1 mispredicted),
    class 3 x12, ignore x6."""
    labels = torch.tensor([[0] * 20 + [1] * 8 + [2] * 3 + [3], [0] * 10 + [1] * 4 + [3] * 12 + [255] * 6])
    preds = labels.clamp(max=3).clone()
    preds[0, :6] = 1
    preds[1, 10] = 0
    return labels, preds


def test_per_image_budget_on_a_hand_computed_case():
    labels, preds = _hand_case()
    # Qualifying share 0.1: more than 3.2 of the 32 cells, so image 0: {0, 1} (class 2 has 3),
    # image 1: {0, 1, 3}. 24 anchors per image, at most 10 per (image, class):
    # image 0: n_view = min(24 // 2, 10) = 10: class 0 gives 5 hard + 5 easy, class 1 all its 8;
    # image 1: n_view = min(24 // 3, 10) = 8: class 0 8, class 1 all its 4 (1 hard), class 3 8.
    torch.manual_seed(0)
    a = sample_anchors(labels, preds, 4, max_views=10, per_image=24, min_share=0.1)
    assert a.n_view.tolist() == [10, 8]
    assert _by_pair(a, 32) == {(0, 0): (5, 5), (0, 1): (0, 8), (1, 0): (0, 8), (1, 1): (1, 3), (1, 3): (0, 8)}
    assert oracle.sample_counts(labels, preds, 4, 0, 10, per_image=24, min_share=0.1) == (
        {(0, 0): (5, 5), (0, 1): (0, 8), (1, 0): (0, 8), (1, 1): (1, 3), (1, 3): (0, 8)}, [10, 8])
    keep_hard, keep_easy, n_view = anchor_counts(labels, preds, 4, max_views=10, per_image=24, min_share=0.1)
    assert keep_hard.tolist() == [[5, 0, 0, 0], [0, 1, 0, 0]]
    assert keep_easy.tolist() == [[5, 8, 0, 0], [8, 3, 0, 8]] and n_view.tolist() == [10, 8]


def test_per_batch_budget_on_a_hand_computed_case():
    labels, preds = _hand_case()
    # The reference's rule: more than max_views = 10 cells qualify: (0, 0) with 20 and (1, 3) with
    # 12 (class 0 of image 1 has exactly 10); n_view = min(20 // 2, 10) = 10 for both.
    torch.manual_seed(0)
    a = sample_anchors(labels, preds, 4, max_samples=20, max_views=10)
    assert a.n_view.tolist() == [10, 10]
    assert _by_pair(a, 32) == {(0, 0): (5, 5), (1, 3): (0, 10)}
    # A smaller batch budget is shared by the batch's qualifying pairs: 13 // 2 = 6 each.
    a = sample_anchors(labels, preds, 4, max_samples=13, max_views=10)
    assert _by_pair(a, 32) == {(0, 0): (3, 3), (1, 3): (0, 6)}


def test_default_budgets_are_the_references_numbers():
    cfg = PixelContrastConfig()
    assert cfg.budget == "per_image" and cfg.anchors_per_image * 2 == 1024 and cfg.max_views == 100
    assert cfg.min_class_share * 128 * 256 == 100
    # On the reference's 128x256 grid the share is its threshold: 100 cells do not qualify, 101 do.
    labels = torch.zeros(2, 128 * 256, dtype=torch.long)
    labels[:, :100] = 1
    labels[:, 100:201] = 2
    for kw in ({"per_image": cfg.anchors_per_image, "min_share": cfg.min_class_share}, {}):
        a = sample_anchors(labels, labels, 3, 1024, 100, **kw)
        assert set(a.label.tolist()) == {0, 2}, kw
        assert _by_pair(a, 128 * 256) == {(b, c): (0, 100) for b in (0, 1) for c in (0, 2)}, kw


def test_per_image_budget_does_not_depend_on_the_batch():
    C, P = 9, 32 * 32
    labels = blob_labels(4, 32, 32, C, seed=11)
    preds = noisy_preds(labels, C, 0.4, seed=12)
    kw = {"max_views": 100, "per_image": 150, "min_share": 100 / 32768}
    pairs = {}
    for B in (1, 2, 4):
        torch.manual_seed(B)
        a = sample_anchors(labels[:B], preds[:B], C, **kw)
        pairs[B] = _by_pair(a, P)
        assert a.n_view.tolist() == sample_anchors(labels, preds, C, **kw).n_view[:B].tolist()
    first_two = {k: v for k, v in pairs[4].items() if k[0] < 2}
    assert pairs[2] == first_two and pairs[1] == {k: v for k, v in first_two.items() if k[0] == 0}
    assert sum(h + e for h, e in first_two.values()) > 0
    # The budget per batch (the reference's rule) does depend on it: the test is not vacuous.
    per_batch = [_by_pair(sample_anchors(labels[:B], preds[:B], C, 300, 100), P) for B in (2, 4)]
    assert per_batch[0] != {k: v for k, v in per_batch[1].items() if k[0] < 2}


def test_class_zero_and_ignore():
    labels = torch.zeros(2, 300, dtype=torch.long)
    labels[1, :150] = 255
    a = sample_anchors(labels, labels, 3, max_samples=1024, max_views=100)
    assert len(a) == 2 * 100 and set(a.label.tolist()) == {0}
    assert (a.index // 300 == 1).sum() == 100 and (a.index[a.index // 300 == 1] % 300 >= 150).all()


# ------------------------------------------------------------------------------------------------
# Loss
def _anchor_set(M, D, C, seed, single=True):
    g = torch.Generator().manual_seed(seed)
    feats = F.normalize(torch.randn(M, D, generator=g, dtype=torch.float64), dim=1).float()
    y = torch.randint(0, C, (M,), generator=g)
    if single:
        y[0] = C  # a class with a single anchor: no positive for it
    return feats, y


@pytest.mark.parametrize("T,T_base", [(0.1, 0.07), (0.5, 0.5), (0.05, 0.07)])
def test_loss_and_gradients_match_the_loop_oracle(T, T_base):
    feats, y = _anchor_set(48, 16, 4, seed=0)
    a = feats.clone().requires_grad_()
    b = feats.clone().requires_grad_()
    got = contrast_loss(a, y, temperature=T, base_temperature=T_base)
    want = oracle.contrast_loss(b, y, temperature=T, base_temperature=T_base)
    got.backward()
    want.backward()
    assert got.item() == pytest.approx(want.item(), abs=1e-5, rel=1e-5)
    torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5)


def test_memory_loss_matches_the_loop_oracle():
    feats, y = _anchor_set(32, 16, 4, seed=1)
    keys, yk = _anchor_set(60, 16, 5, seed=2, single=False)  # class 4 is in memory only
    a = feats.clone().requires_grad_()
    b = feats.clone().requires_grad_()
    got = contrast_loss(a, y, keys, yk)
    want = oracle.contrast_loss(b, y, keys, yk)
    got.backward()
    want.backward()
    assert got.item() == pytest.approx(want.item(), abs=1e-5, rel=1e-5)
    torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5)


def _loss_and_grad(fn, feats, *args, **kw):
    leaf = feats.clone().requires_grad_()
    loss = fn(leaf, *args, **kw)
    loss.backward()
    return loss.item(), leaf.grad


def test_in_batch_loss_matches_the_loop_oracle_with_many_classes():
    # 19 classes in no particular order: several with a single anchor (no positive), a class with
    # most anchors, anchors of unequal norms (the loss does not assume unit vectors).
    g = torch.Generator().manual_seed(8)
    y = torch.cat([torch.randint(0, 19, (70,), generator=g), torch.full((50,), 3)])[torch.randperm(120, generator=g)]
    feats = F.normalize(torch.randn(120, 24, generator=g), dim=1) * (0.5 + torch.rand(120, 1, generator=g))
    got, got_grad = _loss_and_grad(contrast_loss, feats, y)
    want, want_grad = _loss_and_grad(oracle.contrast_loss, feats, y)
    assert got == pytest.approx(want, abs=1e-5, rel=1e-5)
    torch.testing.assert_close(got_grad, want_grad, atol=1e-5, rtol=1e-5)
    # Anchors of one class only: no negatives, every term is 0.
    got, got_grad = _loss_and_grad(contrast_loss, feats[:10], torch.zeros(10, dtype=torch.long))
    assert got == 0.0 and torch.equal(got_grad, torch.zeros_like(got_grad))


def _filled_bank(C=5, size=12, dim=16, seed=9):
    """Class 0 wrapped in both queues, 1 partly filled, 2 in the region queue only, 3 empty, 4 full."""
    bank = MemoryBank(num_classes=C, size=size, dim=dim)
    g = torch.Generator().manual_seed(seed)
    for kind, labels in (("pixel", [0] * 20 + [1] * 5 + [4] * 12), ("region", [0] * 15 + [1] * 3 + [2] * 4 + [4] * 12)):
        keys = F.normalize(torch.randn(len(labels), dim, generator=g), dim=1)
        bank.push(kind, keys, torch.tensor(labels))
    return bank


@pytest.mark.parametrize("T,T_base,norm,path", [
    (0.1, 0.07, 1.0, "unshifted"), (0.5, 0.5, 1.0, "unshifted"), (0.05, 0.07, 3.0, "unshifted"),
    (0.1, 0.07, 1.0, "shifted"),  # forced: the exp sums are declared out of range
    (0.01, 0.07, 1.0, "shifted"),  # exp(s) reaches exp(100): the sums leave the range by themselves
])
def test_blocked_loss_on_the_queues_matches_the_loop_oracle(T, T_base, norm, path, monkeypatch):
    import ctxseg.methods.contrast as pc

    calls = []
    negative_sums = pc._negative_sums
    def spy(*args, shifted):
        calls.append(shifted)
        return negative_sums(*args, shifted=shifted)

    monkeypatch.setattr(pc, "_negative_sums", spy)
    if path == "shifted" and T == 0.1:
        monkeypatch.setattr(pc, "_UNSHIFTED_RANGE", (float("inf"), 0.0))
    bank = _filled_bank()
    assert bank.pixel_count.tolist() == [12, 5, 0, 0, 12] and bank.region_count.tolist() == [12, 3, 4, 0, 12]
    g = torch.Generator().manual_seed(10)
    # Anchors of classes 0-3 and 5: class 3 and 5 have no memory entry (no positive); class 4 has no anchor.
    y = torch.tensor([0] * 9 + [1] * 6 + [2] * 4 + [3] * 3 + [5] * 2)[torch.randperm(24, generator=g)]
    feats = norm * F.normalize(torch.randn(24, 16, generator=g), dim=1)
    got, got_grad = _loss_and_grad(blocked_contrast_loss, feats, y, bank.blocks(), T, T_base)
    want, want_grad = _loss_and_grad(oracle.contrast_loss, feats, y, *bank.keys(), T, T_base)
    assert calls == ([False] if path == "unshifted" else [False, True])
    assert got == pytest.approx(want, abs=1e-5, rel=1e-5)
    torch.testing.assert_close(got_grad, want_grad, atol=1e-5, rtol=1e-5)
    # The same through contrast_loss with the keys as one tensor.
    got, got_grad = _loss_and_grad(contrast_loss, feats, y, *bank.keys(), T, T_base)
    assert got == pytest.approx(want, abs=1e-5, rel=1e-5)
    torch.testing.assert_close(got_grad, want_grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("T,path", [(0.1, "unshifted"), (0.01, "shifted")])
def test_folded_similarities_match_the_loop_oracle(T, path):
    # Anchors e = normalize(W h + b) given with their factors: the loss and the gradients with
    # respect to h, W and b equal the oracle's on the embeddings themselves.
    bank = _filled_bank()
    g = torch.Generator().manual_seed(12)
    M, c, D = 24, 5, 16
    y = torch.tensor([0] * 9 + [1] * 6 + [2] * 4 + [3] * 3 + [5] * 2)[torch.randperm(M, generator=g)]
    leaves0 = [torch.randn(M, c, generator=g).relu(), torch.randn(D, c, generator=g), torch.randn(D, generator=g)]
    got = [t.clone().requires_grad_() for t in leaves0]
    want = [t.clone().requires_grad_() for t in leaves0]
    feats = project_rows(got[0], (got[1], got[2]))
    factors = fold_anchors(got[0], (got[1], got[2]), n_keys=100)
    assert factors is not None and factors[0].shape == (M, c + 1) and factors[1].shape == (D, c + 1)
    torch.testing.assert_close(factors[0] @ factors[1].T, feats.detach(), atol=1e-6, rtol=1e-5)
    loss = blocked_contrast_loss(feats, y, bank.blocks(), T, 0.07, factors=factors)
    loss.backward()
    ref = oracle.contrast_loss(F.normalize(want[0] @ want[1].T + want[2], dim=1), y, *bank.keys(), T, 0.07)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), abs=1e-5, rel=1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5)
    # Folding is skipped where it would not save work: as wide as the embeddings, or few anchors.
    assert fold_anchors(torch.randn(M, D), (torch.randn(D, D), torch.randn(D)), n_keys=100) is None
    assert fold_anchors(got[0][:2], (got[1], got[2]), n_keys=100) is None


def test_blocked_loss_edge_cases():
    bank = _filled_bank()
    f = F.normalize(torch.randn(6, 16), dim=1)
    # Only class 2 in memory: its anchors have positives but no negative (terms 0).
    only_two = [(c, ks) for c, ks in bank.blocks() if c == 2]
    loss, grad = _loss_and_grad(blocked_contrast_loss, f, torch.full((6,), 2), only_two)
    assert loss == 0.0 and torch.equal(grad, torch.zeros_like(grad))
    # No anchor has a positive: 0, with a (zero) gradient.
    loss, grad = _loss_and_grad(blocked_contrast_loss, f, torch.full((6,), 3), bank.blocks())
    assert loss == 0.0 and torch.equal(grad, torch.zeros_like(grad))
    # Keys that require a gradient are refused (they would silently get none).
    with pytest.raises(ValueError, match="constants"):
        contrast_loss(f, torch.zeros(6, dtype=torch.long), torch.randn(4, 16, requires_grad=True), torch.arange(4))


def test_blocks_are_views_of_the_queues():
    bank = _filled_bank()
    blocks = dict(bank.blocks())
    assert sorted(blocks) == [0, 1, 2, 4]
    for c, (pixel, region) in blocks.items():
        assert len(pixel) == bank.pixel_count[c] and len(region) == bank.region_count[c]
        if len(pixel):
            assert pixel.data_ptr() == bank.pixel[c].data_ptr()
        if len(region):
            assert region.data_ptr() == bank.region[c].data_ptr()
    assert blocks[4][0].shape == bank.pixel[4].shape  # a full queue: its whole slice, not a copy


def test_gather_anchors_matches_indexing_forward_and_backward():
    emb = torch.randn(3, 5, 40)
    index = torch.randperm(120)[:30]
    a, b = emb.clone().requires_grad_(), emb.clone().requires_grad_()
    got = gather_anchors(a, index)
    want = b[index // 40, :, index % 40]
    assert torch.equal(got, want)
    w = torch.randn(30, 5)
    (got * w).sum().backward()
    (want * w).sum().backward()
    assert torch.equal(a.grad, b.grad)


def test_sampling_plus_loss_equals_the_oracle_on_the_same_anchors():
    B, D, h, w, C = 2, 8, 24, 24, 4
    labels = blob_labels(B, h, w, C, seed=3)
    preds = noisy_preds(labels, C, 0.4, seed=4)
    emb = F.normalize(torch.randn(B, D, h * w), dim=1)
    torch.manual_seed(5)
    a = sample_anchors(labels, preds, C, max_samples=200, max_views=20)
    feats = emb[a.index // (h * w), :, a.index % (h * w)]
    assert torch.equal(feats, emb.permute(0, 2, 1).reshape(-1, D)[a.index])
    assert contrast_loss(feats, a.label).item() == pytest.approx(oracle.contrast_loss(feats, a.label).item(), abs=1e-5)


def _finite_with_grad(loss, leaf):
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(leaf.grad).all()


def test_degenerate_batches_give_finite_losses():
    D = 8
    # No qualifying class (every class has <= max_views pixels, or <= the share): no anchors.
    labels = torch.arange(40).remainder(4)[None]
    assert len(sample_anchors(labels, labels, 4, max_views=100)) == 0
    a = sample_anchors(labels, labels, 4, per_image=512, min_share=0.25)
    assert len(a) == 0 and a.n_view.tolist() == [0]
    emb = torch.randn(0, D, requires_grad=True)
    _finite_with_grad(contrast_loss(emb, torch.zeros(0, dtype=torch.long)), emb)
    # All-ignore crop.
    labels = torch.full((2, 500), 255)
    assert len(sample_anchors(labels, labels, 4)) == 0
    assert len(sample_anchors(labels, labels, 4, per_image=512, min_share=0.0)) == 0
    # A single anchor in the batch, and every anchor of one class (no negatives).
    for y in (torch.tensor([2]), torch.zeros(10, dtype=torch.long)):
        f = F.normalize(torch.randn(len(y), D), dim=1).requires_grad_()
        _finite_with_grad(contrast_loss(f, y), f)
    # Empty memory.
    f = F.normalize(torch.randn(6, D), dim=1).requires_grad_()
    loss = contrast_loss(f, torch.arange(6) % 2, torch.zeros(0, D), torch.zeros(0, dtype=torch.long))
    _finite_with_grad(loss, f)
    assert loss.item() == 0.0
    # Extreme similarities at a tiny temperature.
    f = F.normalize(torch.randn(20, D), dim=1).requires_grad_()
    _finite_with_grad(contrast_loss(f, torch.arange(20) % 3, temperature=1e-3), f)


def test_loss_is_float32_under_autocast():
    feats, y = _anchor_set(40, 16, 3, seed=6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = contrast_loss(feats.bfloat16(), y)
    assert got.dtype == torch.float32
    # The loop oracle in float64 on the same bf16-rounded features: a loss computed in bf16 would
    # be off by ~1e-2.
    want = oracle.contrast_loss(feats.bfloat16().double(), y)
    assert got.item() == pytest.approx(want.item(), abs=1e-5)


# ------------------------------------------------------------------------------------------------
# Memory bank
def test_fifo_pointer_advances_by_the_number_written_and_wraps():
    bank = MemoryBank(num_classes=3, size=5, dim=2)
    torch.manual_seed(0)
    q, p, n = bank.pixel.clone(), bank.pixel_ptr.clone(), bank.pixel_count.clone()
    for batch in ([0, 0, 0], [0, 0, 0, 0, 2], [1] * 12 + [0], [], [2, 0, 2]):
        labels = torch.tensor(batch, dtype=torch.long)
        keys = torch.randn(len(batch), 2)
        bank.push("pixel", keys, labels)
        q, p, n = oracle.fifo_push(q, p, n, keys, labels)
        assert torch.equal(bank.pixel, q) and torch.equal(bank.pixel_ptr, p) and torch.equal(bank.pixel_count, n)
    # Class 0 got 3 + 4 + 1 + 1 = 9 entries in a queue of 5: pointer at 9 mod 5.
    assert bank.pixel_ptr[0] == 4 and bank.pixel_count.tolist() == [5, 5, 3]


def test_memory_keys_cover_every_class_including_zero():
    B, D, h, w, C = 2, 6, 16, 16, 4
    labels = blob_labels(B, h, w, C, seed=7)
    labels[0, :10] = 0  # class 0 present in both images
    labels[1, :10] = 0
    emb = F.normalize(torch.randn(B, D, h * w), dim=1)
    pk, pl, rk, rl = memory_keys(emb, labels, C, per_class=10)
    want_k, want_y = oracle.region_keys(emb, labels, C)
    torch.testing.assert_close(rk, want_k, atol=1e-6, rtol=1e-5)
    assert torch.equal(rl, want_y) and 0 in rl.tolist()
    for b in range(B):
        for c in range(C):
            n = int((labels[b] == c).sum())
            got = [k for k, y in zip(pk, pl) if y == c and any(torch.equal(k, e) for e in emb[b].T)]
            assert len(got) == min(n, 10), (b, c)


def test_memory_reads_only_filled_slots():
    bank = MemoryBank(num_classes=3, size=4, dim=2)
    keys, labels = bank.keys()
    assert keys.shape == (0, 2)
    bank.push("pixel", torch.ones(2, 2), torch.tensor([0, 0]))
    bank.push("region", torch.full((1, 2), 2.0), torch.tensor([2]))
    keys, labels = bank.keys()
    assert labels.tolist() == [0, 0, 2] and keys[-1].tolist() == [2.0, 2.0]


def test_labels_are_downsampled_on_the_embedding_stride():
    H, W, s = 32, 48, 4
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    mask = (ys * W + xs)[None]  # each pixel labelled with its own position
    i, j = torch.meshgrid(torch.arange(H // s), torch.arange(W // s), indexing="ij")
    # center (the default, docs/methods.md (SH-2)): the pixel at (s i + 1, s j + 1), the centre of
    # each 4x4 block (rounded down)
    assert torch.equal(downsample_labels(mask, (H // s, W // s))[0], (i * s + 1) * W + j * s + 1)
    # nearest, the former rule (SH-4): the block's top-left pixel
    assert torch.equal(downsample_labels(mask, (H // s, W // s), "nearest")[0], (i * s) * W + j * s)


# ------------------------------------------------------------------------------------------------
# The method
def _method_and_model(**kw):
    ds = SyntheticScenes("train", length=4, size=(64, 64), transform=eval_transform())
    cfg = PixelContrastConfig(method="pixel_contrast", iters=100, encoder="test_resnet", max_views=10, **kw)
    method = PixelContrast(cfg, ds.info, total_iters=100)
    torch.manual_seed(0)
    model = Segmenter(ds.info.num_classes, "test_resnet", heads=method.heads)
    items = [ds[(i, 0)] for i in range(4)]
    batch = {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in ("image", "mask")}
    return method, model, batch


def test_contrast_is_active_on_a_single_process_after_the_warmup():
    method, model, batch = _method_and_model(contrast_warmup=0.1)
    assert method.warmup_steps == 10
    model.train()
    for step, active in ((9, False), (10, True)):
        model.zero_grad()
        loss, terms = method(model(batch["image"]), batch, step)
        loss.backward()
        head_grad = model.heads["proj"].net[-1].weight.grad
        assert head_grad is not None  # the head is in the graph either way (DDP needs that)
        if active:
            assert terms["contrast"] > 0 and loss.item() == pytest.approx(terms["ce"] + 0.1 * terms["contrast"])
            assert head_grad.abs().sum() > 0
        else:
            assert terms["contrast"] == 0 and head_grad.abs().sum() == 0


def test_logged_anchor_counts_are_the_samples_counts():
    method, model, batch = _method_and_model(contrast_warmup=0.1)
    names = method.info.class_names
    model.train()
    out = model(batch["image"])
    _, terms = method(out, batch, 5)  # warm-up: no sample, every count 0
    assert terms["anchors"] == 0 and all(terms[f"anchors/{n}"] == 0 for n in names)
    torch.manual_seed(3)
    _, terms = method(out, batch, 10)
    torch.manual_seed(3)
    a = method.sample(out, batch["mask"])
    want = Counter(a.label.tolist())
    assert len(set(want)) >= 2
    assert {k: terms[f"anchors/{n}"].item() for k, n in enumerate(names)} == {k: float(want[k]) for k in range(len(names))}
    assert terms["anchors"].item() == len(a) and terms["anchor_classes"].item() == len(want)
    assert set(terms) == {"ce", "contrast", "anchors", "anchor_classes"} | {f"anchors/{n}" for n in names}
    assert all(torch.is_tensor(v) for v in terms.values())  # read by the trainer on logging steps only
    # The per-image default: each image's quota is min(512 // its qualifying classes, max_views),
    # and each (image, class) its share of it: the loop oracle's counts.
    labels = downsample_labels(batch["mask"], (16, 16)).flatten(1)
    preds = upsample_to(out["logits"].detach().float(), (16, 16)).argmax(1).flatten(1)
    cfg = method.cfg
    counts, n_views = oracle.sample_counts(labels, preds, 8, cfg.max_samples, cfg.max_views,
                                           per_image=cfg.anchors_per_image, min_share=cfg.min_class_share)
    assert a.n_view.tolist() == n_views and max(n_views) > 0
    got = Counter(zip((a.index // 256).tolist(), a.label.tolist()))
    assert got == {bc: hard + easy for bc, (hard, easy) in counts.items()}
    # Wide datasets: totals only.
    method.cfg.log_class_anchors = len(names) - 1
    _, terms = method(out, batch, 10)
    assert set(terms) == {"ce", "contrast", "anchors", "anchor_classes"}


def test_per_batch_budget_is_the_old_rule():
    method, model, batch = _method_and_model(contrast_warmup=0.0, budget="per_batch", max_samples=30)
    model.train()
    out = model(batch["image"])
    torch.manual_seed(4)
    a = method.sample(out, batch["mask"])
    labels = downsample_labels(batch["mask"], (16, 16)).flatten(1)
    preds = upsample_to(out["logits"].detach().float(), (16, 16)).argmax(1).flatten(1)
    torch.manual_seed(4)
    b = sample_anchors(labels, preds, 8, 30, 10)
    assert torch.equal(a.index, b.index) and torch.equal(a.n_view, b.n_view)
    counts, n_views = oracle.sample_counts(labels, preds, 8, 30, 10)  # the loop oracle's n_view per image
    assert a.n_view.tolist() == n_views and len(counts) > 0
    assert Counter(zip((a.index // 256).tolist(), a.label.tolist())) == {bc: h + e for bc, (h, e) in counts.items()}


def test_memory_fills_during_warmup_and_is_read_after():
    method, model, batch = _method_and_model(contrast_warmup=0.02, memory=True, memory_size=20)
    model.train()
    _, terms = method(model(batch["image"]), batch, 0)
    assert terms["contrast"] == 0
    present = torch.stack([(downsample_labels(batch["mask"], (16, 16)) == c).any() for c in range(8)])
    assert torch.equal(method.memory.region_count > 0, present)
    loss, terms = method(model(batch["image"]), batch, 2)
    assert terms["contrast"] > 0 and torch.isfinite(loss)


def _leaf_outputs(out):
    """Copies of the head's hidden map and last conv as leaves: the graph the method builds on them."""
    w, b = out["embed_proj"]
    leaves = [t.detach().clone().requires_grad_() for t in (out["embed_hidden"], w, b)]
    return {"logits": out["logits"], "embed_hidden": leaves[0], "embed_proj": tuple(leaves[1:])}, leaves


def _oracle_anchor_embeddings(leaves, index):
    """The anchors' rows of the whole embedding map, computed by the head's own conv and
    ``F.normalize`` (what the method computes for the anchors only)."""
    hidden, w, b = leaves
    emb = F.normalize(F.conv2d(hidden, w[:, :, None, None], b), dim=1).flatten(2)
    P = emb.shape[2]
    return emb[index // P, :, index % P]


@pytest.mark.parametrize("memory", [False, True])
def test_contrast_in_the_method_matches_the_oracle(memory, monkeypatch):
    # The method's contrast term and its gradients with respect to the head's hidden map and its
    # last conv (the method projects only its anchors) equal the oracle's on the whole projected,
    # normalised map. With memory, the queues filled: the oracle reads the queues as they were
    # before the step (the forward enqueues this batch's keys in place before the backward runs).
    import ctxseg.methods.pixel_contrast as pc

    folds = []

    def spy(*args, **kw):
        folds.append(fold(*args, **kw))
        return folds[-1]

    fold = pc.fold_anchors
    monkeypatch.setattr(pc, "fold_anchors", spy)
    # 1024-d embeddings from the 128-d hidden map: the memory loss folds the head's last conv.
    method, model, batch = _method_and_model(contrast_warmup=0.0, memory=memory, memory_size=20, proj_dim=1024)
    model.train()
    with torch.no_grad():
        out = model(batch["image"])
    keys = key_labels = None
    if memory:
        for _ in range(3):
            method(out, batch, 0)  # fill the queues (class 0 wraps)
        keys, key_labels = method.memory.keys()
        assert len(set(key_labels.tolist())) >= 3
        pixel_before = method.memory.pixel.clone()
    got_out, got = _leaf_outputs(out)
    folds.clear()
    torch.manual_seed(5)
    loss, terms = method(got_out, batch, 1)
    if memory:
        assert not torch.equal(method.memory.pixel, pixel_before)  # enqueued in place, before the backward
    loss.backward()
    torch.manual_seed(5)
    a = method.sample(out, batch["mask"])
    _, want = _leaf_outputs(out)
    want_term = oracle.contrast_loss(_oracle_anchor_embeddings(want, a.index), a.label, keys, key_labels)
    (0.1 * want_term).backward()
    assert terms["contrast"].item() == pytest.approx(want_term.item(), abs=1e-5, rel=1e-5)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.grad, w.grad, atol=1e-6, rtol=1e-5)
        assert w.grad.abs().sum() > 0
    assert [f is not None for f in folds] == ([True] if memory else [])


def test_embedding_map_is_the_heads_whole_output():
    method, model, batch = _method_and_model()
    model.train()  # the heads run in training
    with torch.no_grad():
        out = model(batch["image"])
        want = F.normalize(model.heads["proj"].net(out["features"]), dim=1)  # the same batch statistics
    torch.testing.assert_close(embedding_map(out), want, atol=1e-6, rtol=1e-5)
    index = torch.randperm(want.shape[0] * want.shape[2] * want.shape[3])[:50]
    rows = project_rows(gather_anchors(out["embed_hidden"].flatten(2), index), out["embed_proj"])
    torch.testing.assert_close(rows, _oracle_anchor_embeddings([out["embed_hidden"], *out["embed_proj"]], index),
                               atol=1e-6, rtol=1e-5)


def test_resume_carries_the_memory_bank(tmp_path):
    common = dict(encoder="test_resnet", crop=(64, 64), batch_size=4, synthetic_size=(64, 64), synthetic_train_len=16,
                  eval_batch_size=50, num_workers=0, device="cpu", iters=8, ckpt_every=4, memory=True,
                  memory_size=30, contrast_warmup=0.25, max_views=20)
    ref = Trainer(make_config(PixelContrastConfig, "synthetic", method="pixel_contrast", out=str(tmp_path / "a"), **common),
                  PixelContrast, progress=False)
    ref.fit()
    first = list_checkpoints(tmp_path / "a" / "ckpt")[0]
    assert first.name.endswith("4.pt")
    cfg = make_config(PixelContrastConfig, "synthetic", method="pixel_contrast", out=str(tmp_path / "b"), **common)
    resumed = Trainer(cfg, PixelContrast, resume=str(first), progress=False)
    resumed.fit()
    assert ref.method.memory.pixel_count.sum() > 0 and ref.method.memory.pixel_ptr.sum() > 0
    for name, buf in ref.method.state_dict().items():
        assert torch.equal(buf, resumed.method.state_dict()[name]), name
    for name, w in ref.model.state_dict().items():
        assert torch.equal(w, resumed.model.state_dict()[name]), name
    # metrics.jsonl has the per-class anchor counts of each logged step.
    rows = load_run(ref.run_dir)["train"]
    names = ref.train_set.info.class_names
    assert rows and all(sum(r[f"anchors/{n}"] for n in names) == r["anchors"] for r in rows)
    assert any(r["anchors"] > 0 for r in rows)


@pytest.mark.parametrize(
    "key,value", [("budget", "per_gpu"), ("anchors_per_image", 0), ("min_class_share", 1.0), ("log_class_anchors", -1)]
)
def test_budget_settings_are_validated(key, value):
    cfg = make_config(PixelContrastConfig, "synthetic", **{key: value})
    with pytest.raises(ValueError, match=key):
        cfg.validate()


def test_config_class_names_its_method_and_a_mismatch_is_refused(tmp_path):
    from ctxseg.methods.ce import CEConfig

    assert make_config(PixelContrastConfig, "synthetic").method == "pixel_contrast"
    wrong = make_config(CEConfig, "synthetic", method="pixel_contrast", out=str(tmp_path / "x"))
    with pytest.raises(ValueError, match="PixelContrastConfig"):
        Trainer(wrong, PixelContrast, progress=False)


def test_labels_on_the_encoders_grids_come_from_the_blocks_the_cells_cover():
    """At 180x240 the default encoder ("same" padding) gives stage grids of 45x60 and 6x8: stride
    32 over 180 rows is 6 cells, a pitch of 30 px. A hand-built mask labels each 32-row block (and
    each 4-row block) by its index: the ``center`` rule gives every cell its own block's label,
    where ``nearest`` (the former rule) drifts a block behind toward the bottom; ``majority`` agrees
    with ``center`` on pure blocks and ignores an impure one (docs/methods.md (SH-1)-(SH-4))."""
    from ctxseg.methods.contrast import grid_stride
    from ctxseg.models import Segmenter

    model = Segmenter(11, "tf_efficientnet_lite0").eval()
    with torch.no_grad():
        stages = model(torch.zeros(1, 3, 180, 240))["stages"]
    assert [tuple(f.shape[-2:]) for f in stages] == [(45, 60), (23, 30), (12, 15), (6, 8)]
    assert [grid_stride(180, f.shape[-2]) for f in stages] == [4, 8, 16, 32]

    rows = torch.arange(180)
    by32 = (rows // 32).view(1, 180, 1).expand(1, 180, 240)
    assert downsample_labels(by32, (6, 8))[0, :, 0].tolist() == [0, 1, 2, 3, 4, 5]
    assert downsample_labels(by32, (6, 8), "nearest")[0, :, 0].tolist() == [0, 0, 1, 2, 3, 4]
    assert downsample_labels(by32, (6, 8), "majority")[0, :, 0].tolist() == [0, 1, 2, 3, 4, 5]
    by4 = (rows // 4 % 7).view(1, 180, 1).expand(1, 180, 240)
    assert downsample_labels(by4, (45, 60))[0, :, 0].tolist() == [i % 7 for i in range(45)]
    # A stride-32 cell astride two classes: 20 rows of one, 12 of the other.
    mixed = torch.zeros(1, 180, 240, dtype=torch.long)
    mixed[:, 20:] = 3
    assert downsample_labels(mixed, (6, 8), "majority")[0, 0, 0].item() == 0  # 20/32 > 0.5
    assert downsample_labels(mixed, (6, 8), "majority", purity=0.7)[0, 0, 0].item() == 255
    assert downsample_labels(mixed, (6, 8), "center")[0, 0, 0].item() == 0  # row 15
