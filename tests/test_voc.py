"""PASCAL VOC 2012 (+ SegmentationClassAug) on a tiny fabricated VOCdevkit, download_voc against a
loopback HTTP server, and the real copy under ../shared/data/voc when there is one."""

from __future__ import annotations

import shutil
import tarfile
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import HTTP_TIMEOUT, leftovers
from PIL import Image

from ctxseg.config import DATASET_DEFAULTS
from ctxseg.data import DATASETS, DEFAULT_ROOTS, build_dataset
from ctxseg.data.ade20k import _bit_palette
from ctxseg.data.base import IGNORE_INDEX, DatasetError
from ctxseg.data.download import DownloadError, sha256sum
from ctxseg.data.voc import (
    TRAIN_AUG_LISTS,
    VOC,
    VOC_INFO,
    VOC_MD5,
    VOC_PALETTE,
    download_voc,
    locate_voc2012,
    write_train_aug_list,
)

pytestmark = pytest.mark.timeout(20)

H, W = 30, 40
REAL_VOC = Path(__file__).resolve().parents[2] / "shared" / "data" / "voc"

# id -> classes of its mask (inside a 255 border). The first four are VOC images (train, val), the
# last two SBD-only images, labelled in SegmentationClassAug alone.
LABELS = {
    "2007_000002": [0, 1, 12],
    "2007_000001": [0, 15],
    "2008_000003": [7],  # no background pixel: class 0 is then not a tag
    "2009_000004": [0, 20],
    "2010_000005": [0, 3],
    "2011_000006": [11, 15],
}
SPLITS = {
    "train": ["2007_000002", "2007_000001"],  # not sorted: the list's order is kept
    "val": ["2009_000004", "2008_000003"],
}
SPLITS["trainval"] = SPLITS["train"] + SPLITS["val"]
TRAIN_AUG = ["2007_000001", "2007_000002", "2010_000005", "2011_000006"]
VOC_IDS = SPLITS["trainval"]


def _mask(values: list[int]) -> np.ndarray:
    """Vertical bands of ``values`` with a 1-pixel 255 border, like VOC's object outlines."""
    cols = np.array_split(np.arange(W - 2), len(values))
    arr = np.full((H, W), IGNORE_INDEX, dtype=np.uint8)
    for v, c in zip(values, cols):
        arr[1:-1, c + 1] = v
    return arr


def _palette_png(arr: np.ndarray) -> Image.Image:
    im = Image.fromarray(arr)
    flat = [c for rgb in VOC_PALETTE for c in rgb]
    im.putpalette(flat + [0] * (768 - len(flat) - 3) + [224, 224, 192])
    return im


def _jpg(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8))


def _make_voc(devkit: Path, aug: bool = True) -> Path:
    """Write ``devkit/VOC2012`` (with SegmentationClassAug and train_aug.txt when ``aug``)."""
    voc = devkit / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True)
    for k, (image_id, values) in enumerate(LABELS.items()):
        _jpg(k).save(voc / "JPEGImages" / f"{image_id}.jpg", quality=95)
        if image_id in VOC_IDS:
            _palette_png(_mask(values)).save(voc / "SegmentationClass" / f"{image_id}.png")
    for split, ids in SPLITS.items():
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    if aug:
        (voc / "SegmentationClassAug").mkdir()
        for image_id, values in LABELS.items():
            Image.fromarray(_mask(values)).save(voc / "SegmentationClassAug" / f"{image_id}.png")
        (voc / "ImageSets" / "Segmentation" / "train_aug.txt").write_text("\n".join(TRAIN_AUG) + "\n")
    return voc


@pytest.fixture
def devkit(tmp_path: Path) -> Path:
    root = tmp_path / "data" / "VOCdevkit"
    _make_voc(root)
    return root


def test_items_have_shapes_labels_and_whole_mask_tags(devkit: Path) -> None:
    ds = VOC(devkit, "train")
    assert ds.info is VOC_INFO and ds.num_classes == 21 and ds.info.background == 0
    assert ds.info.class_names[0] == "background" and ds.info.class_names[15] == "person"
    assert ds.ids == SPLITS["train"] and ds.describe(0).endswith("JPEGImages/2007_000002.jpg")
    assert all(p.parent.name == "SegmentationClassAug" for p in ds.labels)
    for split in ("train", "val"):
        ds = VOC(devkit, split)
        for i, image_id in enumerate(SPLITS[split]):
            item = ds[i]
            assert set(item) == {"image", "mask", "valid", "tags", "index"} and item["index"] == i
            assert item["image"].shape == (3, H, W) and item["image"].dtype == torch.float32
            assert item["mask"].shape == (H, W) and item["mask"].dtype == torch.int64
            assert torch.equal(item["mask"], torch.from_numpy(_mask(LABELS[image_id]).astype(np.int64)))
            assert item["mask"][0].eq(IGNORE_INDEX).all()  # the boundary is kept as ignore
            assert item["tags"].nonzero().flatten().tolist() == LABELS[image_id]
    # A crop keeps the whole image's tags, background included.
    crop = VOC(devkit, "train", transform=lambda im, m, v: (im[:, 1:3, 1:3], m[1:3, 1:3], v[1:3, 1:3]))[0]
    assert crop["mask"].unique().tolist() == [0] and crop["tags"].nonzero().flatten().tolist() == [0, 1, 12]


def test_image_tags_equal_item_tags(devkit: Path) -> None:
    for split in ("trainval", "train_aug"):
        ds = VOC(devkit, split)
        assert torch.equal(ds.image_tags(), torch.stack([ds[i]["tags"] for i in range(len(ds))]))
    assert VOC(devkit, "val").image_tags()[:, 0].tolist() == [1.0, 0.0]


def test_splits_palette_and_registry(devkit: Path) -> None:
    assert {s: len(VOC(devkit, s)) for s in ("train", "val", "trainval", "train_aug")} == {
        "train": 2, "val": 2, "trainval": 4, "train_aug": 4
    }  # fmt: skip
    assert VOC(devkit, "train_aug").ids == TRAIN_AUG
    assert VOC_PALETTE[0] == (0, 0, 0) and VOC_PALETTE[1:] == _bit_palette(20)
    assert DATASETS["voc"] is VOC and DEFAULT_ROOTS["voc"] == "data/VOCdevkit"
    assert DATASET_DEFAULTS["voc"] == {"crop": (320, 320), "eval_batch_size": 1}
    assert len(build_dataset("voc", "val", root=str(devkit))) == 2
    with Image.open(devkit / "VOC2012" / "SegmentationClass" / "2007_000001.png") as im:
        assert im.mode == "P"


def test_root_at_three_levels(devkit: Path) -> None:
    for root in (devkit, devkit / "VOC2012", devkit.parent):
        ds = VOC(root, "val")
        assert ds.root == devkit / "VOC2012" and ds.describe(1) == str(ds.root / "JPEGImages" / "2008_000003.jpg")


def test_without_aug_labels_come_from_segmentation_class(tmp_path: Path) -> None:
    devkit = tmp_path / "VOCdevkit"
    _make_voc(devkit, aug=False)
    ds = VOC(devkit, "trainval")
    assert all(p.parent.name == "SegmentationClass" for p in ds.labels)
    assert [ds[i]["tags"].nonzero().flatten().tolist() for i in range(4)] == [LABELS[i] for i in VOC_IDS]
    with pytest.raises(DatasetError, match="SegmentationClassAug") as e:
        VOC(devkit, "train_aug")
    assert "aug_url" in str(e.value) and "write_train_aug_list" in str(e.value)
    assert "expected layout" in str(e.value)


def test_errors_name_what_is_missing(devkit: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="expected layout") as e:
        VOC(tmp_path / "nowhere", "train")
    assert "nowhere" in str(e.value) and "JPEGImages/" in str(e.value) and "train_aug.txt" in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="expected layout(.|\n)*SegmentationClassAug/"):
        VOC(tmp_path / "empty", "train")
    with pytest.raises(DatasetError, match="unknown VOC split 'test'"):
        VOC(devkit, "test")
    voc = devkit / "VOC2012"
    lists = voc / "ImageSets" / "Segmentation"
    (lists / "train_aug.txt").rename(lists / "trainaug.txt")  # the other name in use
    assert VOC(devkit, "train_aug").ids == TRAIN_AUG
    (lists / "trainaug.txt").unlink()
    with pytest.raises(DatasetError, match="train_aug.txt.*missing.*write_train_aug_list"):
        VOC(devkit, "train_aug")
    (voc / "JPEGImages" / "2007_000001.jpg").unlink()
    with pytest.raises(DatasetError, match="2007_000001.*image is missing") as e:
        VOC(devkit, "train")
    assert str(voc / "JPEGImages" / "2007_000001.jpg") in str(e.value) and str(lists / "train.txt") in str(e.value)
    (voc / "SegmentationClassAug" / "2009_000004.png").unlink()
    with pytest.raises(DatasetError, match="label file is missing") as e:
        VOC(devkit, "val")
    assert str(voc / "SegmentationClassAug" / "2009_000004.png") in str(e.value)
    (lists / "trainval.txt").unlink()
    with pytest.raises(DatasetError, match="list file not found(.|\n)*expected layout"):
        VOC(devkit, "trainval")
    (lists / "train.txt").write_text("\n\n")
    with pytest.raises(DatasetError, match="no images found"):
        VOC(devkit, "train")


def test_write_train_aug_list(devkit: Path) -> None:
    voc = devkit / "VOC2012"
    lists = voc / "ImageSets" / "Segmentation"
    (lists / "train_aug.txt").unlink()
    # An aug label map without its JPEG is left out of the list.
    Image.fromarray(_mask([0])).save(voc / "SegmentationClassAug" / "2012_000099.png")
    assert write_train_aug_list(voc) == lists / "train_aug.txt"
    assert (lists / "train_aug.txt").read_text().split("\n") == [*TRAIN_AUG, ""]
    assert write_train_aug_list(devkit.parent) == lists / "train_aug.txt"  # any root level
    assert sorted(p.name for p in lists.iterdir()) == ["train.txt", "train_aug.txt", "trainval.txt", "val.txt"]
    assert VOC(devkit, "train_aug").ids == TRAIN_AUG
    shutil.rmtree(voc / "SegmentationClassAug")
    with pytest.raises(DatasetError, match="SegmentationClassAug is missing"):
        write_train_aug_list(voc)


# ------------------------------------------------------------------------------------ download_voc


@pytest.fixture
def archives(server: SimpleNamespace, tmp_path: Path) -> SimpleNamespace:
    """A VOCtrainval-shaped tar and a SegmentationClassAug zip (no list, a __MACOSX shadow folder)
    on the server; their URLs and sha256s."""
    src = _make_voc(tmp_path / "src" / "VOCdevkit")
    with zipfile.ZipFile(server.www / "aug.zip", "w") as zf:
        for png in sorted((src / "SegmentationClassAug").iterdir()):
            zf.write(png, f"SegmentationClassAug/{png.name}")
            zf.writestr(f"__MACOSX/SegmentationClassAug/._{png.name}", b"\0")
    shutil.rmtree(src / "SegmentationClassAug")
    (src / "ImageSets" / "Segmentation" / "train_aug.txt").unlink()
    with tarfile.open(server.www / "voc.tar", "w") as tf:
        tf.add(src.parent, "VOCdevkit")
    return SimpleNamespace(
        url=f"{server.url}/voc.tar", sha=sha256sum(server.www / "voc.tar"),
        aug_url=f"{server.url}/aug.zip", aug_sha=sha256sum(server.www / "aug.zip"),
    )  # fmt: skip


def test_download_voc_installs_with_aug(server: SimpleNamespace, archives: SimpleNamespace, tmp_path: Path) -> None:
    root = tmp_path / "data" / "VOCdevkit"
    kw = dict(url=archives.url, sha256=archives.sha, aug_url=archives.aug_url, aug_sha256=archives.aug_sha,
              timeout=HTTP_TIMEOUT, progress=False)  # fmt: skip
    assert download_voc(root, **kw) == root
    assert leftovers(root.parent) == ["VOCdevkit"] and leftovers(root) == ["VOC2012"]
    voc = root / "VOC2012"
    assert leftovers(voc) == ["ImageSets", "JPEGImages", "SegmentationClass", "SegmentationClassAug"]
    assert (voc / "ImageSets" / "Segmentation" / "train_aug.txt").read_text().split() == TRAIN_AUG
    ds = VOC(root, "train_aug")
    assert ds.ids == TRAIN_AUG and ds[3]["tags"].nonzero().flatten().tolist() == [11, 15]
    assert server.hits == ["/voc.tar", "/aug.zip"]
    download_voc(root, **kw)  # already installed: no request
    assert server.hits == ["/voc.tar", "/aug.zip"]


def test_download_voc_bad_checksums_leave_nothing(
    server: SimpleNamespace, archives: SimpleNamespace, tmp_path: Path
) -> None:
    root = tmp_path / "data" / "VOCdevkit"
    with pytest.raises(DownloadError, match="checksum mismatch") as e:
        download_voc(root, url=archives.url, sha256="0" * 64, timeout=HTTP_TIMEOUT, progress=False)
    assert archives.url in str(e.value) and leftovers(root.parent) == []
    # A bad aug archive fails after VOC is unpacked: still nothing in place.
    with pytest.raises(DownloadError, match="checksum mismatch") as e:
        download_voc(root, url=archives.url, sha256=archives.sha, aug_url=archives.aug_url,
                     aug_sha256="1" * 64, timeout=HTTP_TIMEOUT, progress=False)  # fmt: skip
    assert archives.aug_url in str(e.value) and leftovers(root.parent) == []
    assert server.hits == ["/voc.tar", "/voc.tar", "/aug.zip"]


def test_download_voc_requires_checksums(
    server: SimpleNamespace, archives: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "VOCdevkit"
    with pytest.raises(DownloadError, match=f"{VOC_MD5}(.|\n)*sha256sum"):
        download_voc(root, url=archives.url, timeout=HTTP_TIMEOUT, progress=False)
    with pytest.raises(DownloadError, match="no aug_sha256"):
        download_voc(root, url=archives.url, sha256=archives.sha, aug_url=archives.aug_url, progress=False)
    assert server.hits == [] and not root.exists()
    download_voc(root, url=archives.url, verify=False, timeout=HTTP_TIMEOUT, progress=False)
    err = capsys.readouterr().err
    assert "NOT verified" in err and archives.sha in err and "does NOT match the published md5" in err
    assert len(VOC(root, "val")) == 2 and not (root / "VOC2012" / "SegmentationClassAug").exists()
    # An installed VOC without aug gets only the aug archive added (here unverified too).
    download_voc(root, url=archives.url, aug_url=archives.aug_url, verify=False, timeout=HTTP_TIMEOUT, progress=False)
    assert archives.aug_sha in capsys.readouterr().err
    assert server.hits == ["/voc.tar", "/aug.zip"] and VOC(root, "train_aug").ids == TRAIN_AUG
    assert leftovers(root / "VOC2012") == ["ImageSets", "JPEGImages", "SegmentationClass", "SegmentationClassAug"]


def test_download_voc_refuses_a_non_empty_root(archives: SimpleNamespace, tmp_path: Path) -> None:
    root = tmp_path / "VOCdevkit"
    root.mkdir()
    (root / "notes.txt").write_text("mine")
    with pytest.raises(DownloadError, match="not empty"):
        download_voc(root, url=archives.url, sha256=archives.sha, timeout=HTTP_TIMEOUT, progress=False)
    assert leftovers(root) == ["notes.txt"]


def test_download_voc_uses_a_list_shipped_with_aug(server: SimpleNamespace, archives: SimpleNamespace,
                                                   tmp_path: Path) -> None:  # fmt: skip
    listed = ["2011_000006", "2007_000001"]
    with zipfile.ZipFile(server.www / "aug.zip", "a") as zf:
        zf.writestr("list/trainaug.txt", "".join(f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png\n"
                                                 for i in listed))  # fmt: skip
    root = tmp_path / "VOCdevkit"
    download_voc(root, url=archives.url, sha256=archives.sha, aug_url=f"{server.url}/aug.zip",
                 aug_sha256=sha256sum(server.www / "aug.zip"), timeout=HTTP_TIMEOUT, progress=False)  # fmt: skip
    written = root / "VOC2012" / "ImageSets" / "Segmentation" / "train_aug.txt"
    assert written.read_text() == "2011_000006\n2007_000001\n"  # normalised to bare ids
    assert VOC(root, "train_aug").ids == listed


def test_download_cli_voc(server: SimpleNamespace, archives: SimpleNamespace, tmp_path: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    from ctxseg.cli import main

    root = tmp_path / "VOCdevkit"
    args = ["download", "voc", "--root", str(root), "--url", archives.url, "--aug-url", archives.aug_url]
    assert main([*args, "--sha256", archives.sha, "--aug-sha256", "0" * 64]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error:") and archives.aug_url in last and not root.exists()
    assert main([*args, "--sha256", archives.sha, "--aug-sha256", archives.aug_sha]) == 0
    assert len(VOC(root, "train_aug")) == 4
    assert main(["download", "camvid", "--root", str(tmp_path / "c"), "--aug-url", archives.aug_url]) == 2
    assert "for `download voc` only" in capsys.readouterr().err


# -------------------------------------------------------------------------------------- real copy


def test_real_voc_copy() -> None:
    try:
        locate_voc2012(REAL_VOC)
    except DatasetError as e:
        pytest.skip(f"no real PASCAL VOC 2012 copy at {REAL_VOC} ({str(e).splitlines()[0]})")
    train, ds = VOC(REAL_VOC, "train"), VOC(REAL_VOC, "val")
    assert (len(train), len(ds)) == (1464, 1449)
    # A spread of samples rather than all of them keeps the test short.
    for d in (train, ds):
        for i in np.linspace(0, len(d) - 1, 5).astype(int).tolist():
            item = d[i]
            assert item["image"].shape[1:] == item["mask"].shape, d.describe(i)
            values = set(item["mask"].unique().tolist())
            assert values <= set(range(21)) | {IGNORE_INDEX} and values - {0, IGNORE_INDEX}, d.describe(i)
    lists = ds.root / "ImageSets" / "Segmentation"
    if (ds.root / "SegmentationClassAug").is_dir() and any((lists / n).is_file() for n in TRAIN_AUG_LISTS):
        assert len(VOC(REAL_VOC, "train_aug")) == 10582
