"""Your own data: a folder of images with optional label maps and optional image-level tags.

``--data folder --data-root DIR`` reads the layout ``FOLDER_LAYOUT``. Label maps are needed by
the fully supervised methods and by evaluation; the weakly supervised methods (``wsss_cam``,
``dscnet``) train from image-level tags alone, taken from ``tags.csv`` or from the label maps.
Where an image's tags come from is ``classes.yaml``'s ``tags`` key:

- ``auto`` (default): the image's row of ``tags.csv`` when the file has one, else the classes
  of its label map;
- ``csv``: ``tags.csv`` only; every image of the split needs a row;
- ``masks``: the classes of the label map only (``tags.csv`` is not read); every image needs one.

A label map without its image is an error (a misnamed file would otherwise be dropped silently),
as is a ``tags.csv`` row for an image that no split holds. A row names its image by stem (``a``,
or ``a.jpg``), which every split's image of that stem shares, or by split and stem (``val/a``),
which wins for that split.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
import yaml

from ctxseg.data.base import (
    IGNORE_INDEX,
    DatasetError,
    DatasetInfo,
    SegmentationDataset,
    read_image,
    read_mask,
    require_dir,
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
TAG_SOURCES = ("auto", "csv", "masks")
CLASSES_KEYS = ("names", "ignore_index", "background", "palette", "tags")

FOLDER_LAYOUT = """\
<root>/
|-- classes.yaml      names: [road, car, person]   (required; optional keys: ignore_index (default
|                     255), background (a class name or null), palette ([[r, g, b], ...], one per
|                     class), tags (auto | csv | masks: where image-level tags come from))
|-- images/
|   |-- train/        a.jpg b.png ...   RGB images (.png, .jpg, .jpeg), one folder per split
|   `-- val/          ...
|-- masks/            (optional)
|   |-- train/        a.png b.png ...   single-channel PNGs of class indices (0..N-1, or
|   `-- val/          ...               ignore_index), named and sized as their image
`-- tags.csv          (optional) header "image,tags", then one row per image (its stem, or
                      split/stem) with its class names separated by ';' (a,road;car); an empty
                      field: no class"""


def default_palette(n: int) -> tuple[tuple[int, int, int], ...]:
    """``n`` distinct colours, none black: the bits of ``i + 1`` spread over R, G and B from the
    high bit down (the scheme of the PASCAL VOC colour map, shifted by one)."""
    colours = []
    for i in range(n):
        c, rgb = i + 1, [0, 0, 0]
        for bit in range(7, -1, -1):
            for ch in range(3):
                rgb[ch] |= ((c >> ch) & 1) << bit
            c >>= 3
        colours.append(tuple(rgb))
    return tuple(colours)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_classes(path: Path) -> tuple[DatasetInfo, int, str]:
    """(class metadata, ignore_index of the label maps, tag source) from ``classes.yaml``."""
    if not path.is_file():
        raise DatasetError(f"{path} not found: a folder dataset names its classes there\n"
                           f"expected layout:\n{FOLDER_LAYOUT}")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path} must be a mapping with at least 'names: [class, ...]', "
                           f"got {type(data).__name__}")
    unknown = sorted(set(data) - set(CLASSES_KEYS), key=str)
    if unknown:
        raise DatasetError(f"{path}: unknown key(s) {unknown}; valid keys: {', '.join(CLASSES_KEYS)}")
    names = data.get("names")
    if names is None:
        raise DatasetError(f"{path} has no 'names': list the class names in label order, e.g. "
                           "names: [road, car, person]")
    if not isinstance(names, list) or not names:
        raise DatasetError(f"{path}: 'names' must be a non-empty list of class names, got {names!r}")
    for k, name in enumerate(names):
        if not isinstance(name, str) or not name.strip() or ";" in name:
            raise DatasetError(f"{path}: names[{k}] is {name!r}; every class name must be a non-empty string "
                               "without ';' (quote names that YAML reads as numbers or booleans)")
    names = [n.strip() for n in names]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DatasetError(f"{path}: class name(s) {dupes} listed twice in 'names'")
    if len(names) > IGNORE_INDEX:
        raise DatasetError(f"{path}: {len(names)} classes; at most {IGNORE_INDEX} are supported")
    ignore = data.get("ignore_index", IGNORE_INDEX)
    if not _is_int(ignore) or not len(names) <= ignore <= 65535:
        raise DatasetError(f"{path}: ignore_index must be an integer in [{len(names)}, 65535] (not a class "
                           f"index), got {ignore!r}")
    background = data.get("background")
    if background is not None and background not in names:
        raise DatasetError(f"{path}: background {background!r} is not one of the names {names}")
    palette = data.get("palette")
    if palette is None:
        palette = default_palette(len(names))
    else:
        ok = isinstance(palette, list) and len(palette) == len(names) and all(
            isinstance(c, list) and len(c) == 3 and all(_is_int(v) and 0 <= v <= 255 for v in c) for c in palette)
        if not ok:
            raise DatasetError(f"{path}: palette must list one [r, g, b] (integers 0-255) per class, "
                               f"{len(names)} in all; got {palette!r}")
        palette = tuple(tuple(c) for c in palette)
    source = data.get("tags", "auto")
    if source not in TAG_SOURCES:
        raise DatasetError(f"{path}: tags must be one of {', '.join(TAG_SOURCES)}, got {source!r}")
    info = DatasetInfo("folder", tuple(names), palette,
                       background=names.index(background) if background is not None else None)
    return info, ignore, source


def image_files(folder: Path) -> list[Path]:
    """The images of a split folder, by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_tags_csv(path: Path, names: tuple[str, ...], stems: dict[str, set[str]]) -> dict[str, tuple[list[int], int]]:
    """{image key: (class indices, line)} of ``tags.csv``, where a key is an image stem, or
    ``split/stem`` for one split's image; ``stems`` holds the image stems of every split."""
    index = {n: k for k, n in enumerate(names)}
    everywhere = set().union(*stems.values())
    rows: dict[str, tuple[list[int], int]] = {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None or [h.strip().lower() for h in header] != ["image", "tags"]:
                raise DatasetError(f"{path}: the first line must be the header 'image,tags', got {header}")
            for fields in reader:
                line = reader.line_num
                if not any(f.strip() for f in fields):
                    continue
                if len(fields) != 2:
                    raise DatasetError(f"{path}, line {line}: expected 2 fields (image,tags), got {len(fields)}: "
                                       f"{fields}; separate class names with ';'")
                image, tags = fields[0].strip(), fields[1]
                split, _, stem = image.rpartition("/")
                stem = Path(stem).stem if Path(stem).suffix.lower() in IMAGE_SUFFIXES else stem
                key = f"{split}/{stem}" if split else stem
                if not stem:
                    raise DatasetError(f"{path}, line {line}: the image field is empty")
                if key in rows:
                    raise DatasetError(f"{path}, line {line}: image {key!r} already has a row (line {rows[key][1]})")
                if stem not in (stems.get(split, set()) if split else everywhere):
                    where = f"images/{split}/" if split else "any split (images/<split>/)"
                    raise DatasetError(f"{path}, line {line}: no image {stem!r} (.png, .jpg, .jpeg) in {where} "
                                       f"of {path.parent}")
                classes = []
                for name in (t.strip() for t in tags.split(";")):
                    if not name:
                        continue
                    if name not in index:
                        raise DatasetError(f"{path}, line {line}: unknown class {name!r} for image {stem!r}; the "
                                           f"classes of classes.yaml are: {', '.join(names)}")
                    classes.append(index[name])
                rows[key] = (sorted(set(classes)), line)
    except (UnicodeDecodeError, csv.Error) as e:
        raise DatasetError(f"{path} cannot be read as UTF-8 CSV: {e}") from None
    return rows


class FolderDataset(SegmentationDataset):
    """A user's own data in the layout ``FOLDER_LAYOUT``; the class list comes from ``classes.yaml``.

    Args:
        root: the dataset folder (``--data-root``).
        split: a sub-folder of ``images/`` (``train``, ``val``, ``test``, ...).
        transform: joint transform, see ``SegmentationDataset``.
        require_masks: raise unless every image of the split has a label map (what the fully
            supervised methods and evaluation need; ``check_masks`` checks it later as well).
        tags: where tags come from (auto | csv | masks); None: ``classes.yaml``'s ``tags`` key.

    Raises:
        DatasetError: naming the file and what was expected, for a missing ``classes.yaml`` or
            ``images/<split>/`` (with the splits that exist), a malformed ``classes.yaml`` or
            ``tags.csv`` (unknown class, row without image, duplicate row), a label map without
            its image, an image without tags (or without a label map when masks are required);
            on loading, a label value outside the classes or a label map of another size.
    """

    def __init__(self, root: str | Path, split: str = "train", transform=None, require_masks: bool = False,
                 tags: str | None = None):
        super().__init__(transform)
        self.root = require_dir(Path(root), FOLDER_LAYOUT)
        self.split = split
        self.info, self.label_ignore, source = read_classes(self.root / "classes.yaml")
        source = tags or source
        if source not in TAG_SOURCES:
            raise DatasetError(f"tags must be one of {', '.join(TAG_SOURCES)}, got {source!r}")
        image_root = self.root / "images"
        if not image_root.is_dir():
            raise DatasetError(f"no images/ folder in {self.root}\nexpected layout:\n{FOLDER_LAYOUT}")
        splits = sorted(p.name for p in image_root.iterdir() if p.is_dir())
        self.image_dir = image_root / split
        if split not in splits:
            raise DatasetError(f"no folder {self.image_dir} for split {split!r}; the splits of {self.root} are: "
                               f"{', '.join(splits) or 'none (images/ has no sub-folder)'}")
        self.images = image_files(self.image_dir)
        if not self.images:
            raise DatasetError(f"no images (.png, .jpg, .jpeg) in {self.image_dir}")
        by_stem: dict[str, Path] = {}
        for p in self.images:
            if p.stem in by_stem:
                raise DatasetError(f"{by_stem[p.stem]} and {p} share the name {p.stem!r}; their label map and "
                                   "tags would be the same: rename one")
            by_stem[p.stem] = p

        self.mask_dir = self.root / "masks" / split
        found = {p.stem: p for p in self.mask_dir.glob("*.png")} if self.mask_dir.is_dir() else {}
        for stem, mask in sorted(found.items()):
            if stem not in by_stem:
                raise DatasetError(f"label map {mask} has no image: expected {self.image_dir / stem}"
                                   ".png, .jpg or .jpeg (delete or rename the label map)")
        self.masks: list[Path | None] = [found.get(p.stem) for p in self.images]

        self.tags_file = self.root / "tags.csv"
        rows = {}
        if source == "csv" and not self.tags_file.is_file():
            raise DatasetError(f"classes.yaml asks for tags: csv but {self.tags_file} is missing\n"
                               f"expected layout:\n{FOLDER_LAYOUT}")
        if source != "masks" and self.tags_file.is_file():
            stems = {d: {p.stem for p in image_files(image_root / d)} for d in splits}
            rows = read_tags_csv(self.tags_file, self.info.class_names, stems)
        self.tags: list[torch.Tensor | None] = []
        for image, mask in zip(self.images, self.masks):
            row = rows.get(f"{split}/{image.stem}", rows.get(image.stem))
            missing = {"csv": row is None, "masks": mask is None, "auto": row is None and mask is None}[source]
            if missing:
                label_map = self.mask_dir / f"{image.stem}.png"
                need = {"csv": f"a row in {self.tags_file} (classes.yaml: tags: csv)",
                        "masks": f"a label map {label_map} (classes.yaml: tags: masks)",
                        "auto": f"a label map {label_map} or a row in {self.tags_file}"}[source]
                raise DatasetError(f"image {image} has no image-level tags: expected {need}")
            self.tags.append(None if row is None or source == "masks" else self._multi_hot(row[0]))
        if require_masks:
            self.check_masks(f"split {split!r} of {self.root}")

    def _multi_hot(self, classes: list[int]) -> torch.Tensor:
        tags = torch.zeros(self.num_classes)
        tags[classes] = 1.0
        if self.info.background is not None:  # every image is taken to contain it
            tags[self.info.background] = 1.0
        return tags

    def __len__(self) -> int:
        return len(self.images)

    def describe(self, i: int) -> str:
        return str(self.images[i])

    def images_without_masks(self) -> list[str]:
        return [f"{image} (no {self.mask_dir / (image.stem + '.png')})"
                for image, mask in zip(self.images, self.masks) if mask is None]

    def read_labels(self, i: int) -> np.ndarray | None:
        """Sample i's label map with ``IGNORE_INDEX`` for ignored pixels (None if it has none)."""
        path = self.masks[i]
        if path is None:
            return None
        mask = read_mask(path)
        bad = (mask < 0) | ((mask >= self.num_classes) & (mask != self.label_ignore))
        if bad.any():
            raise DatasetError(f"label map {path}: values {np.unique(mask[bad])[:10].tolist()} are neither classes "
                               f"(0..{self.num_classes - 1}, names of classes.yaml) nor ignore_index "
                               f"{self.label_ignore}")
        if self.label_ignore != IGNORE_INDEX:
            mask[mask == self.label_ignore] = IGNORE_INDEX
        return mask

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        image = read_image(self.images[i])
        mask = self.read_labels(i)
        if mask is not None and mask.shape != image.shape[:2]:
            raise DatasetError(f"label map {self.masks[i]} is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image "
                               f"{self.images[i]} is {image.shape[1]}x{image.shape[0]}; they must have the same size")
        return image, mask

    def image_level_tags(self, i: int, mask: np.ndarray | None) -> torch.Tensor:
        if self.tags[i] is not None:
            return self.tags[i].clone()
        return super().image_level_tags(i, mask)

    def image_tags(self) -> torch.Tensor:
        """Tags of every sample from tags.csv or its label map (no image is decoded)."""
        tags = [self.image_level_tags(i, self.read_labels(i) if self.tags[i] is None else None)
                for i in range(len(self))]
        return torch.stack(tags)

