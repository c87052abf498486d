"""PASCAL VOC 2012 semantic segmentation, with the SBD-augmented ``train_aug`` split.

21 classes: background (0) and the 20 VOC object classes; 255 marks object boundaries and
"difficult" regions and is ignored. Every image contains some background, so ``DatasetInfo``
names class 0 as ``background`` for weakly supervised methods.

The data is the standard VOCdevkit tree of ``VOCtrainval_11-May-2012.tar``. The ``train_aug``
split (10,582 images) needs ``SegmentationClassAug/``: label maps of the SBD annotations
(Hariharan et al., 2011) converted to VOC's class indices, which also hold the VOC train and val
masks; it is distributed separately from VOC, see ``download_voc``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

from ctxseg.data.base import DatasetError, DatasetInfo, FilePairDataset, require_dir
from ctxseg.data.download import DownloadError, download, extract_archive, sha256sum

VOC_CLASSES = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
# The colour map of the VOC development kit (the bits of the class index spread over R, G, B);
# the palette PNGs of SegmentationClass use it, and give 255 (boundary) the colour (224, 224, 192).
VOC_PALETTE = (
    (0, 0, 0),
    (128, 0, 0),
    (0, 128, 0),
    (128, 128, 0),
    (0, 0, 128),
    (128, 0, 128),
    (0, 128, 128),
    (128, 128, 128),
    (64, 0, 0),
    (192, 0, 0),
    (64, 128, 0),
    (192, 128, 0),
    (64, 0, 128),
    (192, 0, 128),
    (64, 128, 128),
    (192, 128, 128),
    (0, 64, 0),
    (128, 64, 0),
    (0, 192, 0),
    (128, 192, 0),
    (0, 64, 128),
)
VOC_INFO = DatasetInfo("voc", VOC_CLASSES, VOC_PALETTE, background=0)

VOC_SPLITS = ("train", "val", "trainval", "train_aug")
# Accepted names of the train_aug list, the first one preferred (and written by this module).
TRAIN_AUG_LISTS = ("train_aug.txt", "trainaug.txt")

VOC_URL = "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar"
# The VOC site publishes only this MD5; our downloader verifies SHA-256, which nobody publishes for
# this file, so none is hard-coded (see download_voc). The MD5 is still checked, and reported,
# when a download is accepted unverified.
VOC_MD5 = "6cd6e144f989b92b3379bac3b3de84fd"
VOC_SHA256: str | None = None

VOC_LAYOUT = """\
<root>/                        (e.g. data/VOCdevkit; VOC2012/ itself or the parent of VOCdevkit/
|                               may be given as root too)
`-- VOC2012/
    |-- JPEGImages/            2007_000032.jpg ...   RGB images of varying size
    |-- SegmentationClass/     2007_000032.png ...   palette PNGs: 0 = background, 1-20 = classes,
    |                                                255 = boundary (ignored)
    |-- SegmentationClassAug/  2007_000032.png ...   SBD-converted label maps, same values
    |                                                (optional; needed for split="train_aug")
    `-- ImageSets/
        `-- Segmentation/
            |-- train.txt                            1,464 image ids, one per line
            |-- val.txt                              1,449
            |-- trainval.txt                         2,913
            `-- train_aug.txt                        10,582 (or trainaug.txt; optional)
This is VOCtrainval_11-May-2012.tar of http://host.robots.ox.ac.uk/pascal/VOC/voc2012/ (plus the
SegmentationClassAug archive); see ctxseg.data.voc.download_voc."""

_AUG_HOWTO = (
    "get SegmentationClassAug (the SBD annotations converted to VOC label maps, e.g. the widely "
    "used SegmentationClassAug.zip) and install it with ctxseg.data.voc.download_voc(root, "
    "aug_url=..., aug_sha256=...) or `python -m ctxseg download voc --aug-url URL --aug-sha256 HEX`; "
    "or unpack it into VOC2012/SegmentationClassAug/ yourself and run "
    "ctxseg.data.voc.write_train_aug_list(root)"
)


def _is_voc2012(path: Path) -> bool:
    return (path / "JPEGImages").is_dir() and (path / "ImageSets" / "Segmentation").is_dir()


def _find_voc2012(root: Path) -> Path | None:
    """The VOC2012 folder when ``root`` is it, holds it, or holds ``VOCdevkit/VOC2012``; else None."""
    for candidate in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if _is_voc2012(candidate):
            return candidate
    return None


def locate_voc2012(root: str | Path) -> Path:
    """Return the ``VOC2012`` folder of a VOC tree given at any of the three accepted levels.

    Raises:
        DatasetError: ``root`` is missing or holds no VOC2012 folder with ``JPEGImages/`` and
            ``ImageSets/Segmentation/``; the message shows the expected layout.
    """
    root = require_dir(Path(root), VOC_LAYOUT)
    found = _find_voc2012(root)
    if found is None:
        raise DatasetError(
            f"no PASCAL VOC 2012 folder (with JPEGImages/ and ImageSets/Segmentation/) found in {root}, "
            f"{root / 'VOC2012'} or {root / 'VOCdevkit' / 'VOC2012'}\nexpected layout:\n{VOC_LAYOUT}"
        )
    return found


def read_id_list(path: Path) -> list[str]:
    """Image ids of a list file, in file order.

    A line is an id (``2007_000032``); only its first field counts, so lists of the form
    ``/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png`` give the same ids.
    """
    ids = []
    for line in path.read_text().splitlines():
        fields = line.split()
        if fields:
            ids.append(Path(fields[0]).stem)
    return ids


def _train_aug_list(voc: Path) -> Path | None:
    for name in TRAIN_AUG_LISTS:
        path = voc / "ImageSets" / "Segmentation" / name
        if path.is_file():
            return path
    return None


class VOC(FilePairDataset):
    """PASCAL VOC 2012 segmentation: 21 classes (0 = background), 255 ignored.

    Samples are the ids of ``ImageSets/Segmentation/<split>.txt`` in file order. Labels come from
    ``SegmentationClassAug/`` when that folder exists (it holds the VOC masks as well as the SBD
    ones), else from ``SegmentationClass/``.

    Args:
        root: the folder holding ``VOC2012/`` (``VOCdevkit``), the ``VOC2012`` folder itself, or
            the parent of ``VOCdevkit``.
        split: ``"train"`` (1,464 images), ``"val"`` (1,449), ``"trainval"`` (2,913) or
            ``"train_aug"`` (10,582; needs ``SegmentationClassAug/`` and ``train_aug.txt``).
        transform: joint ``(image, mask)`` transform, see ``SegmentationDataset``.

    Raises:
        DatasetError: unknown split; missing folders or list file (the message shows the expected
            layout); ``train_aug`` without ``SegmentationClassAug/`` (the message says how to get
            it); an empty list; a listed id without its image or label file.
    """

    info = VOC_INFO

    def __init__(self, root: str | Path, split: str = "train", transform=None):
        if split not in VOC_SPLITS:
            raise DatasetError(f"unknown VOC split {split!r}; choose one of {VOC_SPLITS}")
        self.root = locate_voc2012(root)
        self.split = split
        aug_dir = self.root / "SegmentationClassAug"
        if split == "train_aug":
            if not aug_dir.is_dir():
                raise DatasetError(
                    f"split 'train_aug' needs {aug_dir}, which is missing: {_AUG_HOWTO}\n"
                    f"expected layout:\n{VOC_LAYOUT}"
                )
            list_file = _train_aug_list(self.root)
            if list_file is None:
                raise DatasetError(
                    f"split 'train_aug' needs the id list "
                    f"{self.root / 'ImageSets' / 'Segmentation' / TRAIN_AUG_LISTS[0]} (or "
                    f"{TRAIN_AUG_LISTS[1]}), which is missing; ctxseg.data.voc.write_train_aug_list"
                    f"({str(self.root)!r}) builds it from SegmentationClassAug/\n"
                    f"expected layout:\n{VOC_LAYOUT}"
                )
        else:
            list_file = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
            if not list_file.is_file():
                raise DatasetError(f"list file not found: {list_file}\nexpected layout:\n{VOC_LAYOUT}")
        image_dir = require_dir(self.root / "JPEGImages", VOC_LAYOUT)
        label_dir = aug_dir if aug_dir.is_dir() else require_dir(self.root / "SegmentationClass", VOC_LAYOUT)
        self.ids = read_id_list(list_file)
        images = [image_dir / f"{i}.jpg" for i in self.ids]
        labels = [label_dir / f"{i}.png" for i in self.ids]
        for image_id, image, label in zip(self.ids, images, labels):
            if not image.is_file():
                raise DatasetError(f"{list_file} lists {image_id!r}, but its image is missing: {image}")
            if not label.is_file():
                raise DatasetError(f"{list_file} lists {image_id!r}, but its label file is missing: {label}")
        super().__init__(images, labels, f"{list_file} (no ids)", transform)


def write_train_aug_list(voc2012_dir: str | Path) -> Path:
    """Write ``ImageSets/Segmentation/train_aug.txt`` from the label maps in ``SegmentationClassAug``.

    ``train_aug`` is (SBD train + SBD val + VOC train) minus VOC val. SegmentationClassAug holds a
    label map for exactly the images of SBD train + val and VOC train + val, so the list is its ids
    minus those of ``val.txt``, keeping ids whose JPEG is present (10,582 on the full data). Ids
    are written sorted, one per line; the file is replaced atomically.

    Args:
        voc2012_dir: the VOC2012 folder (the folder holding it, or ``VOCdevkit``'s parent, also work).

    Returns:
        The path of the list written.

    Raises:
        DatasetError: no VOC2012 folder, no ``SegmentationClassAug/``, no ``val.txt``, or no id left.
    """
    voc = locate_voc2012(voc2012_dir)
    aug_dir = voc / "SegmentationClassAug"
    if not aug_dir.is_dir():
        raise DatasetError(f"cannot build the train_aug list: {aug_dir} is missing; {_AUG_HOWTO}")
    val_file = voc / "ImageSets" / "Segmentation" / "val.txt"
    if not val_file.is_file():
        raise DatasetError(f"cannot build the train_aug list: {val_file} is missing\nexpected layout:\n{VOC_LAYOUT}")
    val = set(read_id_list(val_file))
    ids = sorted(
        p.stem for p in aug_dir.iterdir()
        if p.suffix == ".png" and p.stem not in val and (voc / "JPEGImages" / f"{p.stem}.jpg").is_file()
    )  # fmt: skip
    if not ids:
        raise DatasetError(f"cannot build the train_aug list: {aug_dir} holds no label map of a non-val image")
    dest = voc / "ImageSets" / "Segmentation" / TRAIN_AUG_LISTS[0]
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text("".join(f"{i}\n" for i in ids))
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _md5sum(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _warn_unverified(url: str, archive: Path, name: str, md5: str | None = None) -> None:
    lines = [f"WARNING: {url} was NOT verified (verify=False).", f"Its sha256 is {sha256sum(archive)}."]
    if md5 is not None:
        got = _md5sum(archive)
        verdict = "matches" if got == md5 else "does NOT match"
        lines.append(f"Its md5 {got} {verdict} the published md5 of {name} ({md5}).")
    lines.append("Check it against a trusted copy and pass the sha256 next time.")
    bar = "!" * 78
    print("\n" + "\n".join([bar, *lines, bar]) + "\n", file=sys.stderr)


def _install_aug(
    voc: Path, work: Path, url: str, sha256: str | None, verify: bool, timeout: float, progress: bool
) -> None:
    """Fetch the SegmentationClassAug archive into ``work`` and move its label folder into ``voc``;
    then install its train_aug list, or build one with ``write_train_aug_list``."""
    archive = download(
        url, work / "SegmentationClassAug.archive", sha256=sha256 if verify else None,
        timeout=timeout, progress=progress,
    )
    if not verify:
        _warn_unverified(url, archive, "the SegmentationClassAug archive")
    extracted = extract_archive(archive, work / "aug")
    # macOS-made zips carry __MACOSX/ shadow folders of the same name; they hold no label maps.
    found = [
        d for d in extracted.rglob("SegmentationClassAug")
        if d.is_dir() and "__MACOSX" not in d.parts and any(d.glob("*.png"))
    ]  # fmt: skip
    if len(found) != 1:
        raise DownloadError(
            f"archive from {url} does not contain exactly one SegmentationClassAug/ folder with PNG "
            f"label maps (found {len(found)})"
        )
    lists = sorted(
        p for name in TRAIN_AUG_LISTS for p in extracted.rglob(name) if "__MACOSX" not in p.parts
    )  # fmt: skip
    shutil.move(str(found[0]), voc / "SegmentationClassAug")
    if lists:
        dest = voc / "ImageSets" / "Segmentation" / TRAIN_AUG_LISTS[0]
        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(f"{i}\n" for i in read_id_list(lists[0])))
        os.replace(tmp, dest)
    else:
        write_train_aug_list(voc)


def download_voc(
    root: str | Path,
    url: str = VOC_URL,
    sha256: str | None = VOC_SHA256,
    aug_url: str | None = None,
    aug_sha256: str | None = None,
    verify: bool = True,
    timeout: float = 60,
    progress: bool = True,
) -> Path:
    """Download VOC 2012 trainval (about 2 GB) and optionally SegmentationClassAug into ``root``.

    ``root`` becomes the ``VOCdevkit`` folder: ``root/VOC2012/JPEGImages``, ... Everything is
    fetched and unpacked inside a temporary folder next to ``root`` and renamed into place last, so
    an interrupted run leaves no half-filled ``root``. With ``aug_url``, the archive's
    ``SegmentationClassAug/`` is put into ``VOC2012/`` and ``ImageSets/Segmentation/train_aug.txt``
    is taken from the archive when it holds a ``train_aug.txt``/``trainaug.txt`` list, else built
    by ``write_train_aug_list``.

    If VOC is already installed at ``root`` nothing is downloaded; if it lacks only the aug part and
    ``aug_url`` is given, only the aug archive is fetched and added (atomically as well); if it has
    SegmentationClassAug but no train_aug list, the list is built without any download.

    There is no canonical host of SegmentationClassAug, so ``aug_url`` has no default. The copy
    most weakly supervised code bases point to is the ``SegmentationClassAug.zip`` shared on
    Dropbox in the README of DrSleep/tensorflow-deeplab-resnet,
    https://www.dropbox.com/s/oeu149j8qtbs1x0/SegmentationClassAug.zip?dl=1 (12,031 PNGs in a
    ``SegmentationClassAug/`` folder, no id list); it is a third-party copy with no published
    checksum, so pin the sha256 of a copy you have checked.

    Args:
        root: destination VOCdevkit folder (e.g. ``data/VOCdevkit``); must be absent or empty
            unless it already holds VOC.
        url: URL of ``VOCtrainval_11-May-2012.tar``; the default is the official VOC server.
        sha256: expected SHA-256 of that tar. Only an MD5 is published (``VOC_MD5``), so it is
            required: download the tar once, check ``md5sum`` gives ``VOC_MD5``, run ``sha256sum``
            and pass the result.
        aug_url: URL of a SegmentationClassAug zip or tar, or None to skip it.
        aug_sha256: expected SHA-256 of the aug archive; required with ``aug_url`` unless
            ``verify`` is False.
        verify: pass False to skip the checksums on purpose; the computed hashes are then printed
            (and the VOC tar's MD5 is compared with the published one) so that they can be pinned.
        timeout: socket timeout in seconds.
        progress: show progress bars.

    Returns:
        ``root`` as a Path.

    Raises:
        DownloadError: a missing sha256 while ``verify`` is True, a failed or mismatching download,
            an unsafe archive, an archive without the expected folder, or a non-empty ``root``
            without VOC in it.
    """
    root = Path(root)
    existing = _find_voc2012(root) if root.is_dir() else None
    if existing is not None and (existing / "SegmentationClassAug").is_dir():
        if _train_aug_list(existing) is None:
            write_train_aug_list(existing)
        return root
    if existing is not None and aug_url is None:
        return root
    if existing is None and root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DownloadError(f"refusing to install PASCAL VOC into {root}: it exists and is not empty")
    if verify:
        if existing is None and sha256 is None:
            raise DownloadError(
                f"no sha256 given for {url}: only an MD5 ({VOC_MD5}) of VOCtrainval_11-May-2012.tar "
                "is published, and downloads are verified by SHA-256. Download it once, check that "
                "`md5sum` prints that MD5, run `sha256sum` on the file and pass "
                "download_voc(root, sha256=...); or pass verify=False to accept it unverified "
                "(its MD5 is then checked and reported)."
            )
        if aug_url is not None and aug_sha256 is None:
            raise DownloadError(
                f"no aug_sha256 given for {aug_url}: no checksum of SegmentationClassAug is "
                "published. Download it once from a source you trust, run `sha256sum` on the file "
                "and pass aug_sha256=...; or pass verify=False to accept it unverified."
            )
    if existing is not None:
        # VOC is in place: add SegmentationClassAug; the work folder sits inside VOC2012 so that
        # the final move is a rename on one filesystem.
        with tempfile.TemporaryDirectory(prefix=".aug.tmp-", dir=existing) as tmp:
            _install_aug(existing, Path(tmp), aug_url, aug_sha256, verify, timeout, progress)
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    # The temporary folder sits next to root so that the final rename stays on one filesystem.
    with tempfile.TemporaryDirectory(prefix=f".{root.name}.tmp-", dir=root.parent) as tmp:
        work = Path(tmp)
        archive = download(
            url, work / "VOCtrainval_11-May-2012.tar", sha256=sha256 if verify else None,
            timeout=timeout, progress=progress,
        )
        if not verify:
            _warn_unverified(url, archive, "VOCtrainval_11-May-2012.tar", VOC_MD5)
        extracted = extract_archive(archive, work / "extracted")
        archive.unlink()  # 2 GB that the unpacked copy makes redundant
        found = [c for c in (extracted / "VOC2012", *extracted.glob("*/VOC2012")) if _is_voc2012(c)]
        if len(found) != 1 or not (found[0] / "SegmentationClass").is_dir():
            raise DownloadError(
                f"archive from {url} does not contain exactly one VOC2012/ folder with JPEGImages/, "
                f"SegmentationClass/ and ImageSets/Segmentation/ (found {len(found)})"
            )
        devkit = work / "VOCdevkit"
        devkit.mkdir()
        voc = devkit / "VOC2012"
        found[0].rename(voc)
        if aug_url is not None:
            _install_aug(voc, work, aug_url, aug_sha256, verify, timeout, progress)
        if root.is_dir():
            root.rmdir()
        devkit.rename(root)
    return root
