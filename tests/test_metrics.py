"""Tests for ctxseg.engine.metrics (confusion matrix, IoU, Boundary IoU, distributed sums)."""

from __future__ import annotations

import json
import math
import os
import time
from datetime import timedelta

import numpy as np
import pytest
import torch

from ctxseg.engine.metrics import (
    SegMetrics,
    _boundary_counts_per_class,
    boundary_counts,
    boundary_region,
    confusion_matrix,
    iou_from_confusion,
    mean_accuracy,
    pixel_accuracy,
)

IGNORE = 255


def _random_batch(seed, num_classes, n=2, h=24, w=31, ignore_frac=0.1):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, num_classes, (n, h, w), generator=g)
    pred = torch.randint(0, num_classes, (n, h, w), generator=g)
    target[torch.rand(n, h, w, generator=g) < ignore_frac] = IGNORE
    return pred, target


def _blob_labels(seed: int, num_classes: int, n: int = 2, h: int = 48, w: int = 40) -> torch.Tensor:
    """Piecewise-constant label maps (smooth noise, argmax over classes): realistic regions."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((n, num_classes, h, w))
    smooth = gaussian_filter(noise, sigma=(0, 0, 3, 3))
    return torch.from_numpy(smooth.argmax(1))


# Hand-computed 4x4 example (C = 3, one ignored pixel at the bottom right).
HAND_TARGET = torch.tensor(
    [
        [0, 0, 1, 1],
        [0, 0, 1, 1],
        [2, 2, 2, 2],
        [2, 2, 2, IGNORE],
    ]
)
HAND_PRED = torch.tensor(
    [
        [0, 1, 1, 1],
        [0, 0, 1, 1],
        [2, 2, 1, 2],
        [2, 0, 2, 0],
    ]
)
# Rows = GT, columns = prediction; the ignored pixel (predicted 0) is not counted.
HAND_CM = [[3, 1, 0], [0, 4, 0], [1, 1, 5]]
HAND_IOU = [3 / 5, 4 / 6, 5 / 7]  # TP / (row + col - TP)
HAND_MIOU = (3 / 5 + 4 / 6 + 5 / 7) / 3  # = 208 / 315
HAND_PIXEL_ACC = 12 / 15
HAND_MEAN_ACC = (3 / 4 + 4 / 4 + 5 / 7) / 3  # = 23 / 28


# --------------------------------------------------------------------------- confusion matrix


@pytest.mark.parametrize("num_classes", [2, 5, 19])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_confusion_matrix_matches_sklearn(num_classes, seed):
    from sklearn.metrics import confusion_matrix as sk_confusion_matrix

    pred, target = _random_batch(seed, num_classes)
    cm = confusion_matrix(pred, target, num_classes, ignore_index=IGNORE)
    valid = target != IGNORE
    expected = sk_confusion_matrix(
        target[valid].numpy(), pred[valid].numpy(), labels=list(range(num_classes))
    )
    assert cm.dtype == torch.long and cm.shape == (num_classes, num_classes)
    np.testing.assert_array_equal(cm.numpy(), expected)
    # Shape-agnostic: a single (H, W) image gives the same as its batch of one.
    np.testing.assert_array_equal(
        confusion_matrix(pred[0], target[0], num_classes).numpy(),
        confusion_matrix(pred[:1], target[:1], num_classes).numpy(),
    )


def test_confusion_matrix_rejects_bad_labels():
    target = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError):
        confusion_matrix(torch.full((2, 3), 3), target, 3)
    with pytest.raises(ValueError):
        confusion_matrix(torch.full((2, 3), -1), target, 3)
    with pytest.raises(ValueError):  # GT out of range and not ignore
        confusion_matrix(target, torch.full((2, 3), 7), 3)
    with pytest.raises(ValueError):
        confusion_matrix(target, torch.zeros(3, 2, dtype=torch.long), 3)
    with pytest.raises(TypeError):
        confusion_matrix(target.float(), target, 3)
    with pytest.raises(ValueError):
        SegMetrics(3).update(torch.full((1, 2, 3), 5), torch.zeros(1, 2, 3, dtype=torch.long))


# --------------------------------------------------------------------------- IoU and accuracies


def test_hand_computed_iou_miou_accuracy():
    cm = confusion_matrix(HAND_PRED, HAND_TARGET, 3)
    assert cm.tolist() == HAND_CM
    np.testing.assert_allclose(iou_from_confusion(cm).numpy(), HAND_IOU)
    assert float(pixel_accuracy(cm)) == pytest.approx(HAND_PIXEL_ACC)
    assert float(mean_accuracy(cm)) == pytest.approx(HAND_MEAN_ACC)

    m = SegMetrics(3, class_names=["road", "car", "sky"])
    m.update(HAND_PRED[None], HAND_TARGET[None])
    res = m.compute()
    assert res["miou"] == pytest.approx(HAND_MIOU) and res["miou"] == pytest.approx(208 / 315)
    assert res["pixel_acc"] == pytest.approx(0.8)
    assert res["mean_acc"] == pytest.approx(23 / 28)
    assert res["num_pixels"] == 15
    assert list(res["per_class_iou"]) == ["road", "car", "sky"]
    assert res["per_class_iou"]["road"] == pytest.approx(0.6)
    assert res["per_class_iou"]["car"] == pytest.approx(2 / 3)
    assert res["per_class_iou"]["sky"] == pytest.approx(5 / 7)
    # Plain Python types, JSON round trip.
    assert json.loads(json.dumps(res)) == res
    assert all(type(res[k]) is float for k in ("miou", "pixel_acc", "mean_acc", "boundary_iou"))
    assert type(res["num_pixels"]) is int and type(res["boundary_px"]) is int


def test_absent_class_excluded_from_miou():
    m = SegMetrics(4)  # class 3 never appears in GT nor in the prediction
    m.update(HAND_PRED[None], HAND_TARGET[None])
    res = m.compute()
    assert res["per_class_iou"]["3"] is None
    assert res["per_class_boundary_iou"]["3"] is None
    assert res["miou"] == pytest.approx(HAND_MIOU)  # not (sum / 4)
    assert res["mean_acc"] == pytest.approx(HAND_MEAN_ACC)
    assert math.isnan(float(iou_from_confusion(m.confmat)[3]))
    # A class predicted but absent from GT has IoU 0 and does count.
    pred = HAND_PRED.clone()
    pred[0, 0] = 3
    m.reset()
    m.update(pred[None], HAND_TARGET[None])
    assert m.compute()["per_class_iou"]["3"] == 0.0


def test_ignore_pixels_do_not_count():
    ref = SegMetrics(3)
    ref.update(HAND_PRED[None], HAND_TARGET[None])
    ref_res = ref.compute()
    # Whatever is predicted on the ignored pixel changes nothing in the confusion matrix.
    for value in (1, 2):
        pred = HAND_PRED.clone()
        pred[3, 3] = value
        m = SegMetrics(3)
        m.update(pred[None], HAND_TARGET[None])
        assert torch.equal(m.confmat, ref.confmat)
        res = m.compute()
        for key in ("miou", "pixel_acc", "mean_acc", "num_pixels", "per_class_iou"):
            assert res[key] == ref_res[key]
    # A fully ignored image adds nothing at all (not even boundary counts).
    m = SegMetrics(3)
    m.update(HAND_PRED[None], HAND_TARGET[None])
    m.update(torch.randint(0, 3, (2, 4, 4)), torch.full((2, 4, 4), IGNORE))
    assert m.compute() == ref_res
    # With ignore_index=None the 255 would be out of range.
    with pytest.raises(ValueError):
        SegMetrics(3, ignore_index=None).update(HAND_PRED[None], HAND_TARGET[None])


# --------------------------------------------------------------------------- boundary region


def _scipy_boundary(mask: np.ndarray, d: int) -> np.ndarray:
    """Oracle: Boundary IoU's boundary region (Cheng et al., CVPR 2021; docs/methods.md (EV-2)) as
    the authors' mask_to_boundary computes it (zero-pad, d iterations of a 3x3 erosion)."""
    from scipy.ndimage import binary_erosion

    padded = np.pad(mask, 1, mode="constant", constant_values=False)
    eroded = binary_erosion(padded, structure=np.ones((3, 3), bool), iterations=d, border_value=0)
    return mask & ~eroded[1:-1, 1:-1]


@pytest.mark.parametrize("d", [1, 2, 3])
def test_boundary_region_matches_scipy_oracle(d):
    masks = _blob_labels(seed=d, num_classes=3, n=4) == 1  # random blobs, some touch the border
    out = boundary_region(masks, d)
    assert out.dtype == torch.bool and out.shape == masks.shape
    for i in range(masks.shape[0]):
        np.testing.assert_array_equal(out[i].numpy(), _scipy_boundary(masks[i].numpy(), d))
    # Full and empty masks; extra leading dims are fine.
    full = torch.ones(1, 2, 9, 11, dtype=torch.bool)
    np.testing.assert_array_equal(
        boundary_region(full, d)[0, 0].numpy(), _scipy_boundary(full[0, 0].numpy(), d)
    )
    assert not boundary_region(torch.zeros(3, 9, 11, dtype=torch.bool), d).any()


def test_boundary_counts_equal_per_class_masks():
    """The class-agnostic fast path equals explicit one-hot erosion (chunked over classes)."""
    for seed, c in [(0, 2), (1, 7), (2, 19)]:
        target = _blob_labels(seed, c, n=3)
        pred = _blob_labels(seed + 100, c, n=3)
        target[:, :6, :9] = IGNORE
        for d in (1, 2, 3):
            fast = boundary_counts(pred, target, c, d)
            ref = _boundary_counts_per_class(pred, target, c, d, max_chunk_elements=3 * 48 * 40 * 3)
            assert torch.equal(fast[0], ref[0]) and torch.equal(fast[1], ref[1]), (seed, c, d)


# --------------------------------------------------------------------------- boundary IoU


def _square(h, w, top, left, size):
    m = torch.zeros(h, w, dtype=torch.long)
    m[top : top + size, left : left + size] = 1
    return m


def test_boundary_iou_perfect_prediction():
    target = _blob_labels(3, 5, n=2)
    m = SegMetrics(5, boundary_px=2)
    m.update(target.clone(), target)
    res = m.compute()
    assert res["boundary_iou"] == 1.0 and res["miou"] == 1.0
    assert all(v in (1.0, None) for v in res["per_class_boundary_iou"].values())


def test_boundary_iou_shifted_square():
    # 10x10 square in a 20x20 image, predicted one pixel to the right; d = 1.
    target = _square(20, 20, 5, 5, 10)
    pred = _square(20, 20, 5, 6, 10)
    m = SegMetrics(2, boundary_px=1)
    m.update(pred[None], target[None])
    res = m.compute()
    # Foreground: both boundary regions are 36-pixel rings; they share the top and bottom
    # rows at columns 6..14 (9 + 9 = 18 pixels), so IoU = 18 / (36 + 36 - 18) = 1/3.
    assert m.boundary_inter[1] == 18 and m.boundary_union[1] == 54
    assert res["per_class_boundary_iou"]["1"] == pytest.approx(1 / 3)
    # Background: image-border ring (76 px, shared) plus a 44-px ring around each square,
    # sharing rows 4 and 15 at columns 5..15 (22 px): (76 + 22) / (76 + 66) = 98 / 142.
    assert res["per_class_boundary_iou"]["0"] == pytest.approx(98 / 142)
    assert res["boundary_iou"] == pytest.approx((1 / 3 + 98 / 142) / 2)
    # Mask IoU of the foreground is much higher: 90 / 110.
    assert res["per_class_iou"]["1"] == pytest.approx(9 / 11)
    # Cross-check with the scipy oracle.
    g, p = _scipy_boundary(target.numpy() == 1, 1), _scipy_boundary(pred.numpy() == 1, 1)
    assert (g & p).sum() / (g | p).sum() == pytest.approx(1 / 3)


def test_boundary_iou_penalises_wrong_boundary_with_correct_interior():
    # A large object whose interior is right but whose contour is one pixel too far out:
    # mask IoU barely notices (interior pixels dominate), boundary IoU does.
    target = _square(64, 64, 12, 12, 40)
    pred = _square(64, 64, 11, 11, 42)  # GT dilated by one pixel
    m = SegMetrics(2, boundary_px=3)
    m.update(pred[None], target[None])
    res = m.compute()
    mask_iou = res["per_class_iou"]["1"]
    assert mask_iou == pytest.approx(1600 / 1764)
    assert res["per_class_boundary_iou"]["1"] < mask_iou - 0.2
    assert res["boundary_iou"] < res["miou"]


# --------------------------------------------------------------------------- accumulation


def test_two_batches_equal_concatenation():
    _, t1 = _random_batch(10, 6)  # noisy GT with ignore pixels, blob-shaped predictions
    _, t2 = _random_batch(11, 6)
    p1, p2 = _blob_labels(12, 6, n=2, h=24, w=31), _blob_labels(13, 6, n=2, h=24, w=31)
    acc = SegMetrics(6, boundary_px=2)
    acc.update(p1, t1)
    acc.update(p2, t2)
    cat = SegMetrics(6, boundary_px=2)
    cat.update(torch.cat([p1, p2]), torch.cat([t1, t2]))
    assert torch.equal(acc.confmat, cat.confmat)
    assert torch.equal(acc.boundary_inter, cat.boundary_inter)
    assert torch.equal(acc.boundary_union, cat.boundary_union)
    assert acc.compute() == cat.compute()
    acc.reset()
    assert acc.compute()["num_pixels"] == 0 and math.isnan(acc.compute()["miou"])


def test_all_reduce_is_noop_without_distributed():
    import torch.distributed as dist

    assert not (dist.is_available() and dist.is_initialized())
    p, t = _random_batch(5, 4)
    m = SegMetrics(4)
    m.update(p, t)
    before = m.compute()
    cm = m.confmat.clone()
    m.all_reduce()
    assert m.compute() == before and torch.equal(m.confmat, cm)
    SegMetrics(4).all_reduce()  # never updated: still fine


# --------------------------------------------------------------------------- distributed (gloo)

_DIST_CLASSES = 5
_DIST_WORLD = 2


def _dist_batches():
    """Four deterministic batches; rank r evaluates batches r, r + 2."""
    out = []
    for i in range(4):
        target = _blob_labels(40 + i, _DIST_CLASSES, n=2, h=32, w=36)
        pred = _blob_labels(50 + i, _DIST_CLASSES, n=2, h=32, w=36)
        target[:, :4, :5] = IGNORE
        out.append((pred, target))
    return out


def _dist_worker(rank: int, world_size: int, init_method: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=30),
    )
    try:
        m = SegMetrics(_DIST_CLASSES, boundary_px=2)
        for pred, target in _dist_batches()[rank::world_size]:
            m.update(pred, target)
        local = m.compute()
        m.all_reduce()
        reduced = m.compute()
        m.all_reduce()  # idempotent: the global sums are recomputed from the local counters
        again = m.compute()
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"local": local, "reduced": reduced, "again": again}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_all_reduce_two_process_gloo(tmp_path):
    import torch.multiprocessing as mp

    init_method = f"file://{tmp_path / 'dist_store'}"
    ctx = mp.spawn(
        _dist_worker, args=(_DIST_WORLD, init_method, str(tmp_path)), nprocs=_DIST_WORLD, join=False
    )
    deadline = time.monotonic() + 60
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.terminate()
            pytest.fail("distributed workers did not finish within 60 s")

    single = SegMetrics(_DIST_CLASSES, boundary_px=2)
    for pred, target in _dist_batches():
        single.update(pred, target)
    expected = json.loads(json.dumps(single.compute()))

    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(_DIST_WORLD)]
    assert results[0]["local"] != results[1]["local"]  # the ranks saw different data
    for r in results:
        assert r["local"]["num_pixels"] < expected["num_pixels"]
        assert r["reduced"] == expected
        assert r["again"] == expected
