"""ADE20K as released for the MIT Scene Parsing benchmark (ADEChallengeData2016), 150 classes.

Annotation PNGs hold 0 for "other"/unlabelled and 1..150 for the classes of ``objectInfo150``;
0 becomes 255 (ignore) and class k becomes k-1.
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

# Short names in objectInfo150 order (the first name of each entry of the official list).
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug",
    "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub",
    "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter",
    "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs",
    "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier", "awning",
    "streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel", "pole",
    "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van",
    "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool",
    "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball",
    "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light",
    "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board",
    "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip


def _bit_palette(n: int) -> tuple[tuple[int, int, int], ...]:
    """The PASCAL VOC colour map for ids 1..n: bits of the id spread over R, G and B.

    The map is injective on 0..255, so every class gets a distinct, deterministic colour; id 0
    (black) is skipped because black already marks ignored pixels in overlays.
    """
    colours = []
    for cid in range(1, n + 1):
        r = g = b = 0
        c = cid
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        colours.append((r, g, b))
    return tuple(colours)


ADE20K_PALETTE = _bit_palette(len(ADE20K_CLASSES))
ADE20K_INFO = DatasetInfo("ade20k", ADE20K_CLASSES, ADE20K_PALETTE)

_SPLIT_DIRS = {"train": "training", "val": "validation"}
_FOLDER = "ADEChallengeData2016"

ADE20K_LAYOUT = f"""\
<root>/                      (either this folder or its parent may be given as root)
|-- images/
|   |-- training/            ADE_train_00000001.jpg ...
|   `-- validation/          ADE_val_00000001.jpg ...
`-- annotations/
    |-- training/            ADE_train_00000001.png ...   0 = other, 1..150 = classes
    `-- validation/          ADE_val_00000001.png ...
This is {_FOLDER}.zip of the MIT Scene Parsing benchmark (http://sceneparsing.csail.mit.edu)."""


class ADE20K(FilePairDataset):
    """ADE20K SceneParsing (150 classes); label 0 becomes 255 and class k becomes k-1.

    Args:
        root: the ``ADEChallengeData2016`` folder, or the folder containing it.
        split: ``"train"`` (images/training) or ``"val"`` (images/validation).
        transform: joint ``(image, mask)`` transform, see ``SegmentationDataset``.

    Raises:
        DatasetError: unknown split, missing folders (the message shows the expected layout),
            an empty split, or an image without its annotation file.
    """

    info = ADE20K_INFO

    def __init__(self, root: str | Path, split: str = "train", transform=None):
        if split not in _SPLIT_DIRS:
            raise DatasetError(
                f"unknown ADE20K split {split!r}; choose one of {tuple(_SPLIT_DIRS)}"
            )
        root = require_dir(Path(root), ADE20K_LAYOUT)
        if not (root / "images").is_dir() and (root / _FOLDER).is_dir():
            root = root / _FOLDER
        self.root = root
        self.split = split
        image_dir = require_dir(root / "images" / _SPLIT_DIRS[split], ADE20K_LAYOUT)
        label_dir = require_dir(root / "annotations" / _SPLIT_DIRS[split], ADE20K_LAYOUT)
        images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() == ".jpg")
        super().__init__(images, [label_dir / (p.stem + ".png") for p in images], f"{image_dir} (*.jpg)", transform)

    def map_labels(self, raw: np.ndarray, path: Path) -> np.ndarray:
        # Checked on the raw values so that the error quotes what is actually in the file.
        bad = (raw < 0) | (raw > self.num_classes)
        if bad.any():
            raise DatasetError(
                f"{path}: label values {np.unique(raw[bad])[:10].tolist()} are outside "
                f"[0, {self.num_classes}] (0 = other/ignore, 1..{self.num_classes} = classes)"
            )
        mask = raw - 1
        mask[raw == 0] = IGNORE_INDEX
        return mask
