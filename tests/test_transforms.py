import pytest
import torch
from torchvision import tv_tensors

from ctxseg.data import SyntheticScenes, train_transform
from ctxseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD, RandomScale, denormalize, eval_transform


def make_pair(h=20, w=30):
    image = tv_tensors.Image(torch.randint(0, 256, (3, h, w), dtype=torch.uint8))
    mask = tv_tensors.Mask(torch.arange(h * w).reshape(h, w) % 7)
    return image, mask


def test_crop_pads_masks_with_ignore_and_images_with_zero():
    image, mask = make_pair(10, 12)
    tf = train_transform(crop=(32, 40), scale_range=(1.0, 1.0), hflip=False, color_jitter=0)
    torch.manual_seed(0)
    out_img, out_mask = tf(image, mask)
    assert out_img.shape == (3, 32, 40) and out_mask.shape == (32, 40)
    assert out_img.dtype == torch.float32 and out_mask.dtype == torch.int64
    assert (out_mask == 255).sum() == 32 * 40 - 10 * 12
    padded = out_mask == 255
    black = ((0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)).view(3, 1)
    assert torch.allclose(out_img[:, padded], black.expand(3, int(padded.sum())), atol=1e-6)


def test_scale_keeps_labels_nearest_and_aspect():
    image, mask = make_pair(20, 30)
    torch.manual_seed(1)
    out_img, out_mask = RandomScale((1.5, 1.5))(image, mask)
    assert out_img.shape[-2:] == (30, 45) and out_mask.shape == (30, 45)
    assert set(out_mask.unique().tolist()) <= set(mask.unique().tolist())  # no interpolated labels


def test_flip_moves_image_and_mask_together():
    image, mask = make_pair(8, 8)
    mask = tv_tensors.Mask(torch.zeros(8, 8, dtype=torch.int64))
    mask[:, :2] = 1
    image[:] = 0
    image[:, :, :2] = 255
    tf = train_transform(crop=(8, 8), scale_range=(1.0, 1.0), hflip=True, color_jitter=0)
    seen = set()
    for seed in range(20):
        torch.manual_seed(seed)
        img, m = tf(image, mask)
        bright = denormalize(img).mean(0) > 0.5
        assert torch.equal(bright, m == 1)
        seen.add(bool(m[:, -1].all()))
    assert seen == {True, False}  # both flipped and unflipped happened


def test_eval_transform_keeps_mask_resolution():
    image, mask = make_pair(20, 30)
    img, m = eval_transform(size=(10, 15))(image, mask)
    assert img.shape == (3, 10, 15) and torch.equal(m, mask)


def test_same_seed_same_augmentation_regardless_of_global_rng():
    ds = SyntheticScenes("train", length=4, size=(48, 48), transform=train_transform((40, 40)))
    torch.manual_seed(123)
    a = ds[(2, 77)]
    torch.manual_seed(456)
    b = ds[(2, 77)]
    c = ds[(2, 78)]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    assert not torch.equal(a["image"], c["image"])


@pytest.mark.parametrize("hue", [0.05, -0.05, 0.013, 0.5, -0.5, 0.0])
def test_shift_hue_is_torchvisions_hue_adjustment(hue):
    from torchvision.transforms.v2 import functional as TF

    from ctxseg.data.transforms import shift_hue

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 20, 30, generator=g)
    x[:, :, :4, :4] = 0.5  # grey: no hue
    x[:, 1, 5, 5] = x[:, 0, 5, 5]  # ties between the max channels
    x[:, :, 6, 6] = torch.tensor([1.0, 0.0, 0.0])  # a primary
    torch.testing.assert_close(shift_hue(x, hue), TF.adjust_hue(x, hue), atol=2e-6, rtol=0)


def test_color_jitter_draws_and_applies_what_torchvisions_does():
    """The same factors and order from the same seed; on a float image torchvision's steps are
    the same maps, so the two agree to float rounding (on uint8 torchvision rounds between steps)."""
    from torchvision.transforms import v2

    from ctxseg.data.transforms import ColorJitter

    image = tv_tensors.Image(torch.rand(3, 24, 32, generator=torch.Generator().manual_seed(1)))
    mask = tv_tensors.Mask(torch.randint(0, 5, (24, 32)))
    ours, theirs = ColorJitter(0.4, 0.4, 0.4, 0.1), v2.ColorJitter(0.4, 0.4, 0.4, 0.1)
    changed = 0
    for seed in range(20):
        torch.manual_seed(seed)
        a, m = ours(image, mask)
        torch.manual_seed(seed)
        b = theirs(image)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        assert torch.equal(m, mask) and a.dtype == torch.float32
        changed += not torch.allclose(a, image, atol=1e-3)
    assert changed == 20
    uint8 = tv_tensors.Image((image * 255).round().to(torch.uint8))
    torch.manual_seed(0)
    out = ours(uint8)
    assert out.dtype == torch.float32 and 0 <= out.min() and out.max() <= 1  # scaled to [0, 1] once
