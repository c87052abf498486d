"""Cityscapes (fine annotations) with the 19 evaluation classes of the official benchmark.

The ``*_gtFine_labelIds.png`` maps hold the 34 raw label ids; they are mapped to the 19 train ids
with the lookup table of cityscapesScripts (``labels.py``), every other id becoming 255 (ignore).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ctxseg.data.base import (
    IGNORE_INDEX,
    DatasetError,
    DatasetInfo,
    FilePairDataset,
    require_dir,
)

CITYSCAPES_CLASSES = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)
CITYSCAPES_PALETTE = (
    (128, 64, 128),
    (244, 35, 232),
    (70, 70, 70),
    (102, 102, 156),
    (190, 153, 153),
    (153, 153, 153),
    (250, 170, 30),
    (220, 220, 0),
    (107, 142, 35),
    (152, 251, 152),
    (70, 130, 180),
    (220, 20, 60),
    (255, 0, 0),
    (0, 0, 142),
    (0, 0, 70),
    (0, 60, 100),
    (0, 80, 100),
    (0, 0, 230),
    (119, 11, 32),
)
CITYSCAPES_INFO = DatasetInfo("cityscapes", CITYSCAPES_CLASSES, CITYSCAPES_PALETTE)

# labelId -> trainId of the evaluated classes (cityscapesScripts labels.py).
_LABEL_TO_TRAIN = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip
LABEL_ID_TO_TRAIN_ID = np.full(256, IGNORE_INDEX, dtype=np.int64)
LABEL_ID_TO_TRAIN_ID[list(_LABEL_TO_TRAIN)] = list(_LABEL_TO_TRAIN.values())

CITYSCAPES_SPLITS = ("train", "val", "test")

CITYSCAPES_LAYOUT = """\
<root>/
|-- leftImg8bit/
|   |-- train/  aachen/aachen_000000_000019_leftImg8bit.png ...   (one folder per city)
|   |-- val/    frankfurt/ ...
|   `-- test/   ...
`-- gtFine/
    |-- train/  aachen/aachen_000000_000019_gtFine_labelIds.png ...
    |-- val/    ...
    `-- test/   ...
Download leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip from
https://www.cityscapes-dataset.com (registration required) and unzip both into <root>."""

_IMAGE_SUFFIX = "_leftImg8bit.png"
_LABEL_SUFFIX = "_gtFine_labelIds.png"


class Cityscapes(FilePairDataset):
    """Cityscapes fine annotations, 19 classes (train ids); all other label ids become 255.

    Args:
        root: folder holding ``leftImg8bit/`` and ``gtFine/``.
        split: ``"train"``, ``"val"`` or ``"test"`` (test labels are all void on the public site).
        transform: joint ``(image, mask)`` transform, see ``SegmentationDataset``.

    Raises:
        DatasetError: unknown split, missing folders (the message shows the expected layout),
            an empty split, or an image without its label file.
    """

    info = CITYSCAPES_INFO

    def __init__(self, root: str | Path, split: str = "train", transform=None):
        if split not in CITYSCAPES_SPLITS:
            raise DatasetError(
                f"unknown Cityscapes split {split!r}; choose one of {CITYSCAPES_SPLITS}"
            )
        self.root = require_dir(Path(root), CITYSCAPES_LAYOUT)
        self.split = split
        image_dir = require_dir(self.root / "leftImg8bit" / split, CITYSCAPES_LAYOUT)
        label_dir = require_dir(self.root / "gtFine" / split, CITYSCAPES_LAYOUT)
        images = sorted(image_dir.glob(f"*/*{_IMAGE_SUFFIX}"))
        labels = [label_dir / p.parent.name / (p.name[: -len(_IMAGE_SUFFIX)] + _LABEL_SUFFIX) for p in images]
        super().__init__(images, labels, f"{image_dir} (*/*{_IMAGE_SUFFIX})", transform)

    def map_labels(self, raw: np.ndarray, path: Path) -> np.ndarray:
        # 16-bit maps could hold ids the 256-entry table cannot index (negative ones would wrap).
        if raw.size and (raw.min() < 0 or raw.max() > 255):
            raise DatasetError(
                f"{path}: label ids range over [{raw.min()}, {raw.max()}], "
                "expected Cityscapes labelIds in [0, 255]"
            )
        return LABEL_ID_TO_TRAIN_ID[raw]
