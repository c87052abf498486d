"""Behaviour of the procedural synthetic scenes: determinism, sizes, labels, tags, context rules,
irregular boundaries and the intended appearance overlaps."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from ctxseg.data import build_dataset, train_transform
from ctxseg.data.synthetic import (
    BIRD,
    BOAT,
    CAR,
    GROUND,
    PERSON,
    SKY,
    SYNTHETIC_INFO,
    TREE,
    WATER,
    SyntheticScenes,
)

N_SCENES = 120


@pytest.fixture(scope="module")
def scenes():
    ds = SyntheticScenes("train", length=N_SCENES)
    return [ds.load(i) for i in range(N_SCENES)]


def _touching(mask: np.ndarray, a: int, b: int) -> int:
    """Number of 4-neighbour pixel pairs where one pixel is class ``a`` and the other ``b``."""
    n = 0
    for x, y in ((mask[:, 1:], mask[:, :-1]), (mask[1:], mask[:-1])):
        n += int((((x == a) & (y == b)) | ((x == b) & (y == a))).sum())
    return n


def _stacked_fraction(masks) -> float:
    """Fraction of label changes between neighbouring pixels that repeat exactly one row (or
    column) further on. Axis-aligned rectangles give ~1; curved and rotated outlines much less."""
    stacked = total = 0
    for mask in masks:
        for m in (mask, mask.T):
            change = m[:, 1:] != m[:, :-1]
            stacked += int((change[1:] & change[:-1]).sum())
            total += int(change[:-1].sum())
    return stacked / total


def test_same_key_gives_identical_sample_regardless_of_global_rng_state():
    a = SyntheticScenes("val", seed=3)
    b = SyntheticScenes("val", seed=3)
    image, mask = a.load(7)
    np.random.seed(123)
    torch.manual_seed(123)
    random.seed(123)
    image2, mask2 = b.load(7)
    assert np.array_equal(image, image2) and np.array_equal(mask, mask2)
    image3, mask3 = a.load(7)
    assert np.array_equal(image, image3) and np.array_equal(mask, mask3)


@pytest.mark.parametrize("other", [dict(split="val", seed=3), dict(split="train", seed=4),
                                   dict(split="test", seed=3)])
def test_other_seed_or_split_gives_other_scenes(other):
    base = SyntheticScenes("train", seed=3)
    changed = SyntheticScenes(**other)
    for i in range(3):
        assert not np.array_equal(base.load(i)[0], changed.load(i)[0])
    assert not np.array_equal(base.load(0)[0], base.load(1)[0])


def test_default_lengths_and_names():
    assert [len(SyntheticScenes(s)) for s in ("train", "val", "test")] == [2000, 200, 200]
    assert len(SyntheticScenes("val", length=5)) == 5
    assert SyntheticScenes("train").describe(17) == "synthetic/train[17]"
    assert isinstance(build_dataset("synthetic", "val"), SyntheticScenes)
    with pytest.raises(IndexError):
        SyntheticScenes("val", length=5).load(5)


@pytest.mark.parametrize("size", [(48, 64), (160, 96), (32, 32), (128, 128)])
def test_any_size_gives_matching_arrays(size):
    ds = SyntheticScenes("train", size=size)
    for i in range(4):
        image, mask = ds.load(i)
        assert image.shape == (*size, 3) and image.dtype == np.uint8
        assert mask.shape == size and mask.dtype == np.int64
        assert mask.min() >= 0 and mask.max() < ds.num_classes


@pytest.mark.parametrize("size", [(1, 64), (64, 1), (31, 64), (64, 31), 16])
def test_too_small_size_is_a_clear_value_error(size):
    with pytest.raises(ValueError, match="at least 32"):
        SyntheticScenes(size=size)


def test_bad_split_and_length_are_value_errors():
    with pytest.raises(ValueError, match="split"):
        SyntheticScenes("training")
    with pytest.raises(ValueError, match="length"):
        SyntheticScenes(length=-1)


def test_every_class_occurs_and_the_class_subset_varies(scenes):
    info = SYNTHETIC_INFO
    assert info.num_classes >= 6
    assert len(info.palette) == len(info.class_names) == SyntheticScenes.info.num_classes
    present = np.array([np.bincount(m.ravel(), minlength=info.num_classes) > 0
                        for _, m in scenes[:50]])
    assert present.any(axis=0).all(), "some class never occurs in 50 scenes"
    assert len({tuple(p) for p in present}) >= 10
    # Every class, background regions included, is missing from some scenes.
    assert (~present).any(axis=0).all()


def test_tags_are_the_classes_in_the_mask():
    ds = SyntheticScenes("train")
    for i in range(8):
        _, mask = ds.load(i)
        tags = ds.tags(i)
        assert tags == sorted(set(np.unique(mask).tolist()))
        multi_hot = ds[i]["tags"]
        assert torch.nonzero(multi_hot).ravel().tolist() == tags


def test_context_rules_hold_pixelwise(scenes):
    images_with_boats = 0
    for _, mask in scenes:
        assert _touching(mask, BOAT, GROUND) == 0, "a boat touches ground"
        assert _touching(mask, CAR, WATER) == 0, "a car touches water"
        assert _touching(mask, PERSON, WATER) == 0, "a person touches water"
        assert _touching(mask, BIRD, WATER) == 0 and _touching(mask, BIRD, GROUND) == 0
        if (mask == BOAT).any():
            images_with_boats += 1
            assert (mask == WATER).any()
        if (mask == CAR).any():
            assert (mask == GROUND).any()
    assert images_with_boats >= 20, "too few boats for the check to mean anything"


def test_boats_and_cars_mostly_border_their_support(scenes):
    """Occlusion can hide an object's surroundings, but usually a boat borders water and a car
    ground: that contact is the cue that tells them apart."""
    boat_ok = boats = car_ok = cars = 0
    for _, mask in scenes:
        if (mask == BOAT).any():
            boats += 1
            boat_ok += _touching(mask, BOAT, WATER) > 0
        if (mask == CAR).any():
            cars += 1
            car_ok += _touching(mask, CAR, GROUND) > 0
    assert boat_ok >= 0.9 * boats and car_ok >= 0.9 * cars


def test_boundaries_are_not_axis_aligned(scenes):
    rects = np.zeros((128, 128), np.int64)
    rects[20:60, 30:90] = 1
    rects[70:100, 10:50] = 2
    rects[:10] = 3
    assert _stacked_fraction([rects]) > 0.9  # the check does catch axis-aligned shapes
    assert _stacked_fraction([m for _, m in scenes[:50]]) < 0.75


def _mean_colour(scenes, cls: int) -> np.ndarray:
    pixels = np.concatenate([im[m == cls] for im, m in scenes]).astype(np.float64)
    return pixels.mean(axis=0)


def test_appearance_is_ambiguous_where_context_decides(scenes):
    mean = {c: _mean_colour(scenes, c) for c in (SKY, WATER, GROUND, TREE, CAR, BOAT)}

    def dist(a, b):
        return float(np.linalg.norm(mean[a] - mean[b]))

    assert dist(CAR, BOAT) < 20.0
    assert dist(SKY, WATER) < 0.6 * dist(SKY, GROUND)
    assert dist(TREE, GROUND) < 0.6 * dist(TREE, SKY)


def test_train_transform_item_has_the_expected_form():
    ds = SyntheticScenes("train", size=(64, 96), transform=train_transform((64, 96)))
    item = ds[(3, 11)]
    assert item["image"].shape == (3, 64, 96) and item["image"].dtype == torch.float32
    assert item["mask"].shape == (64, 96) and item["mask"].dtype == torch.int64
    assert item["tags"].shape == (ds.num_classes,)
    again = ds[(3, 11)]
    assert torch.equal(item["image"], again["image"]) and torch.equal(item["mask"], again["mask"])
