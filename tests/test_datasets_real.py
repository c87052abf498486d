"""CamVid, Cityscapes and ADE20K loaders on tiny fabricated trees, plus the real CamVid dev copy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ctxseg.data.ade20k import ADE20K, ADE20K_INFO
from ctxseg.data.base import IGNORE_INDEX, DatasetError
from ctxseg.data.camvid import CAMVID_INFO, CamVid
from ctxseg.data.cityscapes import CITYSCAPES_INFO, LABEL_ID_TO_TRAIN_ID, Cityscapes

pytestmark = pytest.mark.timeout(20)

H, W = 12, 16


def _write_image(path: Path, seed: int, size: tuple[int, int] = (H, W)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)


def _write_label(path: Path, values: list[int], size: tuple[int, int] = (H, W)) -> np.ndarray:
    """Write a single-channel label map whose rows cycle through ``values``; return the array."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.resize(np.asarray(values), size[0])[:, None].repeat(size[1], axis=1)
    dtype = np.uint16 if max(values) > 255 else np.uint8
    Image.fromarray(arr.astype(dtype)).save(path)
    return arr


def _check_item(item: dict, num_classes: int, index: int) -> None:
    assert set(item) == {"image", "mask", "valid", "tags", "index"}
    assert item["image"].shape == (3, H, W) and item["image"].dtype == torch.float32
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert item["mask"].shape == (H, W) and item["mask"].dtype == torch.int64
    assert item["tags"].shape == (num_classes,) and item["tags"].dtype == torch.float32
    assert item["index"] == index


# ---------------------------------------------------------------------------------------- CamVid

CAMVID_LABELS = {"a.png": [0, 3, 11], "b.png": [10, 8], "c.png": [11]}


@pytest.fixture
def camvid_root(tmp_path: Path) -> Path:
    root = tmp_path / "camvid"
    for split in ("train", "val"):
        for k, (name, values) in enumerate(CAMVID_LABELS.items()):
            _write_image(root / split / name, seed=k)
            _write_label(root / f"{split}annot" / name, values)
    return root


def test_camvid_samples_map_void_to_ignore(camvid_root: Path) -> None:
    ds = CamVid(camvid_root, "train")
    assert len(ds) == 3 and len(CamVid(camvid_root, "val")) == 3
    assert ds.info is CAMVID_INFO and ds.num_classes == 11
    assert ds.describe(1) == str(camvid_root / "train" / "b.png")
    item = ds[0]
    _check_item(item, 11, 0)
    assert set(item["mask"].unique().tolist()) == {0, 3, IGNORE_INDEX}
    assert item["tags"].nonzero().flatten().tolist() == [0, 3]
    assert (ds[2]["mask"] == IGNORE_INDEX).all() and ds[2]["tags"].sum() == 0
    image, mask = ds.load(1)
    assert image.shape == (H, W, 3) and image.dtype == np.uint8 and mask.dtype == np.int64


def test_camvid_missing_root_shows_layout(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="expected layout") as e:
        CamVid(tmp_path / "nowhere", "train")
    assert "trainannot/" in str(e.value) and "nowhere" in str(e.value)


def test_camvid_missing_split_folder(camvid_root: Path) -> None:
    (camvid_root / "test").mkdir()
    with pytest.raises(DatasetError, match="dataset folder not found: .*testannot"):
        CamVid(camvid_root, "test")


def test_camvid_empty_split_and_unknown_split(camvid_root: Path) -> None:
    for folder in ("test", "testannot"):
        (camvid_root / folder).mkdir()
    with pytest.raises(DatasetError, match="empty"):
        CamVid(camvid_root, "test")
    with pytest.raises(DatasetError, match="unknown CamVid split"):
        CamVid(camvid_root, "training")


def test_camvid_missing_label_file(camvid_root: Path) -> None:
    (camvid_root / "trainannot" / "b.png").unlink()
    with pytest.raises(DatasetError, match=r"label file missing .*trainannot/b\.png"):
        CamVid(camvid_root, "train")


def test_camvid_corrupt_image_names_file(camvid_root: Path) -> None:
    (camvid_root / "train" / "b.png").write_bytes(b"\x89PNG garbage, not an image")
    ds = CamVid(camvid_root, "train")
    with pytest.raises(DatasetError, match=r"cannot read image .*train/b\.png"):
        ds[1]


def test_camvid_mask_size_mismatch(camvid_root: Path) -> None:
    _write_label(camvid_root / "trainannot" / "a.png", [0], size=(H - 2, W))
    with pytest.raises(DatasetError, match=r"a\.png.*same size"):
        CamVid(camvid_root, "train")[0]


def test_camvid_out_of_range_label_names_file_and_value(camvid_root: Path) -> None:
    _write_label(camvid_root / "trainannot" / "c.png", [1, 12])
    with pytest.raises(DatasetError, match=r"train/c\.png.*\[12\].*outside \[0, 11\)"):
        CamVid(camvid_root, "train")[2]


def test_camvid_real_dev_copy(shared_camvid: Path) -> None:
    # A skip without ../shared/data/camvid, a failure with CTXSEG_REQUIRE_CAMVID=1 (conftest.py).
    train, val = CamVid(shared_camvid, "train"), CamVid(shared_camvid, "val")
    assert (len(train), len(val)) == (367, 101)
    # A spread of samples rather than all 468 keeps the test well under two seconds.
    for ds in (train, val):
        for i in np.linspace(0, len(ds) - 1, 5).astype(int).tolist():
            image, mask = ds.load(i)
            assert image.shape == (360, 480, 3) and mask.shape == (360, 480), ds.describe(i)
            labels = np.unique(mask)
            assert ((labels < 11) | (labels == IGNORE_INDEX)).all(), (ds.describe(i), labels)
        assert ds[len(ds) - 1]["image"].shape == (3, 360, 480)


# ------------------------------------------------------------------------------------ Cityscapes

CITY_FILES = {
    ("aachen", "aachen_000000_000019"): [7, 8, 26, 0],  # road, sidewalk, car, unlabelled
    ("bochum", "bochum_000000_000313"): [33, 1, 24, 31],  # bicycle, ego vehicle, person, train
}


@pytest.fixture
def cityscapes_root(tmp_path: Path) -> Path:
    root = tmp_path / "cityscapes"
    for k, ((city, stem), values) in enumerate(CITY_FILES.items()):
        _write_image(root / "leftImg8bit" / "train" / city / f"{stem}_leftImg8bit.png", seed=k)
        _write_label(root / "gtFine" / "train" / city / f"{stem}_gtFine_labelIds.png", values)
    return root


def test_cityscapes_label_ids_to_train_ids(cityscapes_root: Path) -> None:
    ds = Cityscapes(cityscapes_root, "train")
    assert len(ds) == 2 and ds.info is CITYSCAPES_INFO and ds.num_classes == 19
    item = ds[0]
    _check_item(item, 19, 0)
    assert item["mask"][:4, 0].tolist() == [0, 1, 13, IGNORE_INDEX]
    assert ds[1]["mask"][:4, 0].tolist() == [18, IGNORE_INDEX, 11, 16]
    assert ds.describe(1).endswith("bochum_000000_000313_leftImg8bit.png")


def test_cityscapes_lookup_table_is_the_official_one() -> None:
    official = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}  # fmt: skip
    expected = [official.get(i, IGNORE_INDEX) for i in range(256)]
    assert LABEL_ID_TO_TRAIN_ID.tolist() == expected


def test_cityscapes_errors(cityscapes_root: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="expected layout(.|\n)*gtFine_labelIds"):
        Cityscapes(tmp_path / "missing", "val")
    label = cityscapes_root / "gtFine/train/bochum/bochum_000000_000313_gtFine_labelIds.png"
    _write_label(label, [7, 300])
    with pytest.raises(DatasetError, match=r"bochum_000000_000313_gtFine_labelIds\.png.*300"):
        Cityscapes(cityscapes_root, "train")[1]
    label.unlink()
    with pytest.raises(DatasetError, match=r"label file missing .*bochum_000000_000313"):
        Cityscapes(cityscapes_root, "train")


# ---------------------------------------------------------------------------------------- ADE20K


@pytest.fixture
def ade_parent(tmp_path: Path) -> Path:
    folder = tmp_path / "ade" / "ADEChallengeData2016"
    for split, prefix in (("training", "ADE_train"), ("validation", "ADE_val")):
        for k, values in enumerate(([0, 1, 150], [5, 0])):
            _write_image(folder / "images" / split / f"{prefix}_{k + 1:08d}.jpg", seed=k)
            _write_label(folder / "annotations" / split / f"{prefix}_{k + 1:08d}.png", values)
    return folder.parent


def test_ade20k_class_metadata() -> None:
    assert ADE20K_INFO.num_classes == 150 and len(set(ADE20K_INFO.class_names)) == 150
    assert ADE20K_INFO.class_names[:3] == ("wall", "building", "sky")
    assert ADE20K_INFO.class_names[-1] == "flag"
    assert len(set(ADE20K_INFO.palette)) == 150


def test_ade20k_shifts_labels_and_accepts_both_roots(ade_parent: Path) -> None:
    ds = ADE20K(ade_parent, "train")
    assert len(ds) == 2 and len(ADE20K(ade_parent / "ADEChallengeData2016", "val")) == 2
    item = ds[0]
    _check_item(item, 150, 0)
    assert item["mask"][:3, 0].tolist() == [IGNORE_INDEX, 0, 149]
    assert item["tags"].nonzero().flatten().tolist() == [0, 149]
    assert ds.describe(1).endswith("images/training/ADE_train_00000002.jpg")


def test_ade20k_errors(ade_parent: Path) -> None:
    with pytest.raises(DatasetError, match="expected layout(.|\n)*annotations/"):
        ADE20K(ade_parent / "elsewhere", "train")
    with pytest.raises(DatasetError, match="unknown ADE20K split"):
        ADE20K(ade_parent, "test")
    folder = ade_parent / "ADEChallengeData2016"
    _write_label(folder / "annotations/validation/ADE_val_00000002.png", [3, 151])
    with pytest.raises(DatasetError, match=r"ADE_val_00000002\.png.*\[151\]"):
        ADE20K(ade_parent, "val")[1]
    (folder / "images/validation/ADE_val_00000001.jpg").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match=r"cannot read image .*ADE_val_00000001\.jpg"):
        ADE20K(ade_parent, "val")[0]
    (folder / "annotations/training/ADE_train_00000001.png").unlink()
    with pytest.raises(DatasetError, match=r"label file missing .*ADE_train_00000001\.png"):
        ADE20K(ade_parent, "train")


def test_a_missing_camvid_copy_skips_or_fails_where_ci_requires_it(monkeypatch, tmp_path: Path) -> None:
    import conftest

    monkeypatch.setattr(conftest, "SHARED", tmp_path / "shared")  # a clone without ../shared
    monkeypatch.delenv("CTXSEG_REQUIRE_CAMVID", raising=False)
    with pytest.raises(pytest.skip.Exception, match="is not present"):
        conftest.require_shared_camvid()
    monkeypatch.setenv("CTXSEG_REQUIRE_CAMVID", "1")  # .ci/run where ../shared exists
    with pytest.raises(pytest.fail.Exception, match=r"CTXSEG_REQUIRE_CAMVID=1 but .*shared/data/camvid"):
        conftest.require_shared_camvid()
    (tmp_path / "shared" / "data" / "camvid" / "train").mkdir(parents=True)
    assert conftest.require_shared_camvid() == tmp_path / "shared" / "data" / "camvid"
