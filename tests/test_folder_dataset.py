"""The folder dataset (``--data folder``) on small fabricated folders: items, tags from tags.csv or
from label maps, classes.yaml's settings, one clear error per bad input, and the CLI end to end;
plus one-line errors for bad files read inside DataLoader workers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_ctxseg
from PIL import Image
from torch.utils.data import DataLoader

from ctxseg.cli import main
from ctxseg.data import DATASETS, build_dataset
from ctxseg.data.base import IGNORE_INDEX, DatasetError
from ctxseg.data.folder import FolderDataset, default_palette

H, W = 24, 32
NAMES = ["sky", "road", "car"]


def write_image(path: Path, seed: int = 0, size: tuple[int, int] = (H, W), suffix: str = ".png") -> Path:
    path = path.with_suffix(suffix)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return path


def write_mask(path: Path, values: list[int], size: tuple[int, int] = (H, W)) -> np.ndarray:
    """A label map whose column bands hold ``values`` in turn; returns the array."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.asarray(values)[np.arange(size[1]) * len(values) // size[1]][None].repeat(size[0], 0)
    Image.fromarray(arr.astype(np.uint8)).save(path)
    return arr


def make_folder(root: Path, classes: str = "names: [sky, road, car]\n",
                images: dict[str, list[str]] | None = None,
                masks: dict[str, dict[str, list[int]]] | None = None, tags: str | None = None) -> Path:
    """A folder dataset: ``images`` {split: [stem.ext]}, ``masks`` {split: {stem: values}}, ``tags``
    the text of tags.csv (None: no file)."""
    images = images if images is not None else {"train": ["a.png", "b.jpg", "c.png"], "val": ["v1.png", "v2.png"]}
    masks = masks if masks is not None else {
        "train": {"a": [0, 1], "b": [2], "c": [1, 255]}, "val": {"v1": [0, 1, 2], "v2": [1]}}
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.yaml").write_text(classes)
    for split, names in images.items():
        for k, name in enumerate(names):
            write_image(root / "images" / split / Path(name).stem, seed=k, suffix=Path(name).suffix)
    for split, maps in masks.items():
        for stem, values in maps.items():
            write_mask(root / "masks" / split / f"{stem}.png", values)
    if tags is not None:
        (root / "tags.csv").write_text(tags)
    return root


def tag_names(tags: torch.Tensor, names=NAMES) -> list[str]:
    return [names[k] for k in tags.nonzero().flatten().tolist()]


# ---------------------------------------------------------------------------------------- items
def test_items_shapes_and_tags_from_masks(tmp_path):
    root = make_folder(tmp_path / "d")
    ds = build_dataset("folder", "train", str(root))
    assert isinstance(ds, FolderDataset) and DATASETS["folder"] is FolderDataset
    assert len(ds) == 3 and ds.has_masks and ds.info.class_names == tuple(NAMES) and ds.info.background is None
    assert [p.name for p in ds.images] == ["a.png", "b.jpg", "c.png"]
    for i in range(3):
        item = ds[i]
        assert set(item) == {"image", "mask", "valid", "tags", "index"} and item["index"] == i
        assert item["image"].shape == (3, H, W) and item["image"].dtype == torch.float32
        assert item["mask"].shape == (H, W) and item["mask"].dtype == torch.int64
        assert item["valid"].shape == (H, W) and item["valid"].all()
    assert torch.equal(ds[2]["mask"], torch.from_numpy(write_mask(tmp_path / "x.png", [1, 255])).long())
    assert [tag_names(ds[i]["tags"]) for i in range(3)] == [["sky", "road"], ["car"], ["road"]]
    assert torch.equal(ds.image_tags(), torch.stack([ds[i]["tags"] for i in range(3)]))
    assert len(build_dataset("folder", "val", str(root))) == 2


def test_tags_from_csv_from_masks_and_per_split_rows(tmp_path):
    csv = "image,tags\na,car\nb.jpg, sky ; road\nc,\nval/v1,road\n"
    root = make_folder(tmp_path / "d", tags=csv)
    ds = FolderDataset(root, "train")  # auto: a row wins over the label map
    assert [tag_names(ds[i]["tags"]) for i in range(3)] == [["car"], ["sky", "road"], []]
    assert torch.equal(ds.image_tags(), torch.stack([ds[i]["tags"] for i in range(3)]))
    val = FolderDataset(root, "val")  # v1 by split/stem; v2 has no row: its label map's classes
    assert [tag_names(val[i]["tags"]) for i in range(2)] == [["road"], ["road"]]
    by_masks = FolderDataset(root, "train", tags="masks")
    assert [tag_names(by_masks[i]["tags"]) for i in range(3)] == [["sky", "road"], ["car"], ["road"]]
    (root / "classes.yaml").write_text("names: [sky, road, car]\ntags: masks\n")
    assert [tag_names(FolderDataset(root, "train")[i]["tags"]) for i in range(3)] == [["sky", "road"], ["car"], ["road"]]


def test_tags_only_split(tmp_path):
    root = make_folder(tmp_path / "d", masks={"val": {"v1": [0], "v2": [1]}}, tags="image,tags\na,car\nb,sky\nc,\n")
    ds = FolderDataset(root, "train")
    assert not ds.has_masks and len(ds.images_without_masks()) == 3
    item = ds[0]
    assert (item["mask"] == IGNORE_INDEX).all() and item["valid"].all() and tag_names(item["tags"]) == ["car"]
    assert FolderDataset(root, "val").has_masks


def test_background_ignore_index_and_palette(tmp_path):
    classes = "names: [bg, road, car]\nbackground: bg\nignore_index: 7\npalette: [[1, 2, 3], [4, 5, 6], [7, 8, 9]]\n"
    root = make_folder(tmp_path / "d", classes=classes, masks={"train": {"a": [0, 7], "b": [2], "c": [1]}},
                       tags="image,tags\nb,car\n")
    ds = FolderDataset(root, "train")
    assert ds.info.background == 0 and ds.info.palette == ((1, 2, 3), (4, 5, 6), (7, 8, 9))
    assert set(ds[0]["mask"].unique().tolist()) == {0, IGNORE_INDEX}  # 7 -> 255
    assert tag_names(ds[1]["tags"], ["bg", "road", "car"]) == ["bg", "car"]  # background added to a row's tags
    palette = FolderDataset(make_folder(tmp_path / "e"), "train").info.palette
    assert palette == default_palette(3) and len(set(palette)) == 3 and (0, 0, 0) not in palette
    assert len(set(default_palette(255))) == 255 and (0, 0, 0) not in default_palette(255)


def test_a_mask_value_equal_to_255_is_an_error_when_ignore_index_is_another(tmp_path):
    root = make_folder(tmp_path / "d", classes="names: [sky, road, car]\nignore_index: 254\n")
    with pytest.raises(DatasetError, match="neither classes") as e:
        FolderDataset(root, "train")[2]  # c holds 255
    assert str(root / "masks" / "train" / "c.png") in str(e.value) and "ignore_index 254" in str(e.value)


# ---------------------------------------------------------------------------------------- errors
def _error(root: Path, split: str = "train", **kw) -> str:
    with pytest.raises(DatasetError) as e:
        ds = FolderDataset(root, split, **kw)
        for i in range(len(ds)):
            ds[i]
    return str(e.value)


@pytest.mark.parametrize(("classes", "needles"), [
    ("names: [sky, road\n", ["is not valid YAML"]),
    ("ignore_index: 255\n", ["has no 'names'", "names: [road, car, person]"]),
    ("names: sky\n", ["'names' must be a non-empty list"]),
    ("names: [sky, 3]\n", ["names[1] is 3"]),
    ("names: [sky, sky]\n", ["listed twice"]),
    ("names: [sky, road, car]\ncolours: []\n", ["unknown key(s) ['colours']", "palette"]),
    ("names: [sky, road, car]\nbackground: grass\n", ["background 'grass' is not one of the names"]),
    ("names: [sky, road, car]\nignore_index: 2\n", ["ignore_index must be an integer in [3, 65535]"]),
    ("names: [sky, road, car]\npalette: [[0, 0, 0]]\n", ["one [r, g, b]", "3 in all"]),
    ("names: [sky, road, car]\ntags: file\n", ["tags must be one of auto, csv, masks"]),
    ("- sky\n- road\n", ["must be a mapping"]),
])
def test_malformed_classes_yaml(tmp_path, classes, needles):
    root = make_folder(tmp_path / "d", classes=classes)
    message = _error(root)
    assert str(root / "classes.yaml") in message
    for needle in needles:
        assert needle in message


def test_missing_classes_yaml_shows_the_layout(tmp_path):
    root = make_folder(tmp_path / "d")
    (root / "classes.yaml").unlink()
    message = _error(root)
    assert f"{root / 'classes.yaml'} not found" in message and "expected layout" in message and "tags.csv" in message


def test_missing_split_lists_the_splits(tmp_path):
    root = make_folder(tmp_path / "d")
    message = _error(root, "test")
    assert str(root / "images" / "test") in message and "the splits of" in message and "train, val" in message
    shutil.rmtree(root / "images")
    assert "no images/ folder" in _error(root)
    with pytest.raises(DatasetError, match="--data-root"):
        build_dataset("folder", "train")


def test_empty_split_folders_are_errors(tmp_path):
    root = make_folder(tmp_path / "d")
    (root / "images" / "test").mkdir()  # a split folder without images
    (root / "images" / "test" / "notes.txt").write_text("not an image")
    assert f"no images (.png, .jpg, .jpeg) in {root / 'images' / 'test'}" in _error(root, "test")
    empty = tmp_path / "e"
    (empty / "images").mkdir(parents=True)  # images/ without any split folder
    (empty / "classes.yaml").write_text("names: [sky, road, car]\n")
    message = _error(empty, "train")
    assert f"no folder {empty / 'images' / 'train'} for split 'train'" in message
    assert "none (images/ has no sub-folder)" in message


def test_an_rgb_label_map_is_an_error_naming_the_file_and_a_palette_png_is_read_as_indices(tmp_path):
    root = make_folder(tmp_path / "d")
    rgb = root / "masks" / "train" / "b.png"  # a colour-coded label map (what annotation tools often export)
    Image.fromarray(np.zeros((H, W, 3), dtype=np.uint8)).save(rgb)
    ds = FolderDataset(root, "train")
    with pytest.raises(DatasetError) as e:
        ds[1]
    assert f"label map {rgb} has mode 'RGB'" in str(e.value) and "single-channel PNG" in str(e.value)
    with pytest.raises(DatasetError, match="has mode 'RGB'"):
        ds.image_tags()  # tags from the label maps read it too
    # The same classes as a palette PNG (mode P): the pixel values are the class indices.
    values = write_mask(tmp_path / "x.png", [2, 0])
    pal = Image.frombytes("P", (W, H), values.astype(np.uint8).tobytes())
    pal.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0, 0, 0, 128] + [0] * (256 * 3 - 12))
    pal.save(rgb)
    assert torch.equal(FolderDataset(root, "train")[1]["mask"], torch.from_numpy(values).long())
    assert tag_names(FolderDataset(root, "train")[1]["tags"]) == ["sky", "car"]


def test_an_empty_tags_field_means_no_class(tmp_path):
    # An empty field (or only separators and spaces): the image has no class; its row still wins
    # over its label map, and a background class is still added.
    csv = "image,tags\na,\nb, ; \nc,car\n"
    root = make_folder(tmp_path / "d", tags=csv)
    ds = FolderDataset(root, "train")
    assert [tag_names(ds[i]["tags"]) for i in range(3)] == [[], [], ["car"]]
    assert ds.image_tags().sum(1).tolist() == [0, 0, 1]
    csv_only = make_folder(tmp_path / "e", classes="names: [sky, road, car]\ntags: csv\n", masks={}, tags=csv)
    assert [tag_names(FolderDataset(csv_only, "train")[i]["tags"]) for i in range(3)] == [[], [], ["car"]]
    with_bg = make_folder(tmp_path / "f", classes="names: [bg, road, car]\nbackground: bg\n", tags=csv)
    assert [tag_names(FolderDataset(with_bg, "train")[i]["tags"], ["bg", "road", "car"]) for i in range(3)] == \
        [["bg"], ["bg"], ["bg", "car"]]
    # An empty image field is an error, not a row for no image.
    (root / "tags.csv").write_text("image,tags\na,car\n,road\n")
    assert "line 3: the image field is empty" in _error(root)


def test_image_without_mask_when_masks_are_required(tmp_path):
    root = make_folder(tmp_path / "d", tags="image,tags\nb,car\n")
    (root / "masks" / "train" / "b.png").unlink()
    assert not FolderDataset(root, "train").has_masks  # fine for tags-only training
    message = _error(root, require_masks=True)
    assert "1 of 3 have none" in message
    assert f"{root / 'images' / 'train' / 'b.jpg'} (no {root / 'masks' / 'train' / 'b.png'})" in message
    with pytest.raises(DatasetError, match="evaluation needs a label map for every image"):
        FolderDataset(root, "train").check_masks("evaluation")


def test_mask_without_image(tmp_path):
    root = make_folder(tmp_path / "d")
    write_mask(root / "masks" / "train" / "d.png", [0])
    message = _error(root)
    assert f"label map {root / 'masks' / 'train' / 'd.png'} has no image" in message
    assert str(root / "images" / "train" / "d") in message


def test_two_images_with_one_stem(tmp_path):
    root = make_folder(tmp_path / "d")
    write_image(root / "images" / "train" / "a", suffix=".jpg")
    assert "share the name 'a'" in _error(root)


@pytest.mark.parametrize(("csv", "needles"), [
    ("image,tags\na,car\nb,bus;road\n", ["line 3: unknown class 'bus' for image 'b'", "sky, road, car"]),
    ("image,tags\na,car\nzz,road\n", ["line 3: no image 'zz'"]),
    ("image,tags\nval/a,road\n", ["line 2: no image 'a' (.png, .jpg, .jpeg) in images/val/"]),
    ("image,tags\na,car\na,road\n", ["line 3: image 'a' already has a row (line 2)"]),
    ("image,tags\na,car,road\n", ["line 2: expected 2 fields", "separate class names with ';'"]),
    ("file,labels\na,car\n", ["the first line must be the header 'image,tags'"]),
])
def test_malformed_tags_csv(tmp_path, csv, needles):
    root = make_folder(tmp_path / "d", tags=csv)
    message = _error(root)
    assert str(root / "tags.csv") in message
    for needle in needles:
        assert needle in message


def test_image_without_tags(tmp_path):
    csv = "image,tags\na,car\nb,road\n"
    root = make_folder(tmp_path / "d", masks={}, tags=csv)  # c: no row and no label map
    message = _error(root)
    assert f"image {root / 'images' / 'train' / 'c.png'} has no image-level tags" in message
    assert str(root / "masks" / "train" / "c.png") in message and str(root / "tags.csv") in message
    root = make_folder(tmp_path / "e", classes="names: [sky, road, car]\ntags: csv\n", tags=csv)
    assert "expected a row in" in _error(root)  # c has a label map, but tags: csv asks for rows
    (root / "tags.csv").unlink()
    assert f"{root / 'tags.csv'} is missing" in _error(root)


def test_bad_mask_values_and_sizes_name_the_files(tmp_path):
    root = make_folder(tmp_path / "d")
    write_mask(root / "masks" / "train" / "b.png", [1, 42])
    message = _error(root)
    assert f"label map {root / 'masks' / 'train' / 'b.png'}: values [42]" in message and "0..2" in message
    write_mask(root / "masks" / "train" / "b.png", [1], size=(80, 100))
    message = _error(root)
    assert f"label map {root / 'masks' / 'train' / 'b.png'} is 100x80 (WxH)" in message
    assert f"its image {root / 'images' / 'train' / 'b.jpg'} is {W}x{H}" in message


# -------------------------------------------------------------------- errors from DataLoader workers
def test_worker_errors_keep_the_one_line_message(tmp_path):
    root = make_folder(tmp_path / "d")
    write_mask(root / "masks" / "train" / "c.png", [42])
    loader = DataLoader(FolderDataset(root, "train"), batch_size=1, num_workers=1)
    with pytest.raises(DatasetError) as e:
        list(loader)
    assert str(e.value) == f"label map {root / 'masks' / 'train' / 'c.png'}: values [42] are neither classes " \
        "(0..2, names of classes.yaml) nor ignore_index 255"
    assert e.value.worker_traceback.startswith("Traceback") and "read_labels" in e.value.worker_traceback
    assert DatasetError("two\nlines").args == ("two\nlines",) and DatasetError("x").worker_traceback is None
    wrapped = ("Caught DatasetError in DataLoader worker process 3.\nOriginal Traceback (most recent call last):\n"
               '  File "x.py", line 1, in f\nctxseg.data.base.DatasetError: first\nsecond\n')
    assert str(DatasetError(wrapped)) == "first\nsecond"
    assert str(ValueError(wrapped)) == wrapped  # only DatasetError is unwrapped


# ---------------------------------------------------------------------------------------- CLI
TINY = ["--encoder", "test_resnet", "--crop", "32", "32", "--batch-size", "2", "--iters", "2",
        "--set", "eval_batch_size=1", "--set", "log_every=1", "--no-progress"]


def _one_error_line(res) -> str:
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.stderr
    return lines[0]


@pytest.fixture(scope="module")
def ce_run(tmp_path_factory):
    """A CE run trained for 2 steps on a folder dataset with label maps."""
    tmp = tmp_path_factory.mktemp("folder")
    root = make_folder(tmp / "d")
    out = tmp / "ce"
    res = run_ctxseg(["train", "--data", "folder", "--data-root", str(root), "--method", "ce", *TINY,
                      "--set", "num_workers=0", "--out", str(out)])
    assert res.returncode == 0, res.stderr
    return root, out


@pytest.mark.slow
def test_cli_trains_and_evaluates_on_a_folder(ce_run):
    root, out = ce_run
    final = json.loads((out / "eval.json").read_text())
    assert final["split"] == "val" and final["num_images"] == 2 and set(final["per_class_iou"]) == set(NAMES)
    res = run_ctxseg(["eval", "--checkpoint", str(out), "--split", "val", "--num-workers", "0"])
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout)
    assert result["data"] == "folder" and result["num_images"] == 2 and result["miou"] == pytest.approx(final["miou"])


@pytest.mark.slow
def test_cli_trains_wsss_from_tags_only(tmp_path, capsys):
    root = make_folder(tmp_path / "d", masks={"val": {"v1": [0, 1, 2], "v2": [1]}},
                       tags="image,tags\na,sky;road\nb,car\nc,road\n")
    common = ["--data", "folder", "--data-root", str(root), *TINY, "--set", "num_workers=0"]
    res = run_ctxseg(["train", "--method", "wsss_cam", *common, "--out", str(tmp_path / "w")])
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "w" / "eval.json").read_text())["num_images"] == 2
    # A fully supervised method needs the label maps the training split lacks: refused before training.
    assert main(["train", "--method", "ce", *common, "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "training 'ce' (fully supervised" in err[0] and "3 of 3 have none" in err[0]
    assert str(root / "images" / "train" / "a.png") in err[0] and not (tmp_path / "c").exists()
    # Evaluation needs label maps: the training split has none.
    assert main(["eval", "--checkpoint", str(tmp_path / "w"), "--split", "train", "--num-workers", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot evaluate on split 'train' of folder in {root}" in err[0]
    assert "evaluation needs a label map for every image" in err[0]


# A copy of the dataset with one bad file, read by a DataLoader worker.
BAD_FILES = {
    "truncated image": ("images/val/v2.png", lambda p: p.write_bytes(p.read_bytes()[:100]),
                        "cannot read image {root}/images/val/v2.png: corrupt or not an image"),
    "mask of another size": ("masks/val/v2.png", lambda p: write_mask(p, [1], size=(80, 100)),
                             "label map {root}/masks/val/v2.png is 100x80 (WxH) but its image"),
    "label 42": ("masks/val/v2.png", lambda p: write_mask(p, [1, 42]),
                 "label map {root}/masks/val/v2.png: values [42] are neither classes"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", BAD_FILES)
def test_eval_with_workers_reports_a_bad_file_in_one_line(ce_run, tmp_path, case):
    root, out = ce_run
    bad = tmp_path / "bad"
    shutil.copytree(root, bad)
    path, spoil, needle = BAD_FILES[case]
    spoil(bad / path)
    res = run_ctxseg(["eval", "--checkpoint", str(out), "--data-root", str(bad), "--split", "val",
                      "--num-workers", "1"])
    assert needle.format(root=bad) in _one_error_line(res)


@pytest.mark.slow
def test_train_and_study_with_workers_report_a_bad_file_in_one_line(tmp_path):
    root = make_folder(tmp_path / "d")
    write_mask(root / "masks" / "train" / "c.png", [1, 42])
    needle = f"error: label map {root / 'masks' / 'train' / 'c.png'}: values [42] are neither classes"
    common = ["--data", "folder", "--data-root", str(root), *TINY, "--set", "num_workers=1"]
    res = run_ctxseg(["train", "--method", "ce", *common, "--out", str(tmp_path / "run")])
    assert _one_error_line(res).startswith(needle)
    res = run_ctxseg(["study", "--methods", "ce", "--seeds", "0", *common, "--out", str(tmp_path / "study")])
    assert _one_error_line(res).startswith(needle)
