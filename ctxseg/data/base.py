"""What every ctxseg dataset shares: class metadata, file reading with clear errors, label checks,
and a ``__getitem__`` whose augmentation is a pure function of (sample index, augmentation seed).

A dataset subclass only implements ``__len__``, ``load(i) -> (image HxWx3 uint8, mask HxW int64)``
and ``describe(i)`` (a human-readable name of sample i for error messages); everything else lives
here so that CamVid, Cityscapes, ADE20K and the synthetic scenes behave the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import tv_tensors

IGNORE_INDEX = 255


class DatasetError(ValueError):
    """Bad dataset input: a missing root, a wrong layout, an unreadable file or invalid labels.

    Raised in a DataLoader worker, it reaches the main process rebuilt by torch from one string,
    ``"Caught DatasetError in DataLoader worker process 0.\nOriginal Traceback ..."``, whose last
    line holds the message. The constructor recognises that string and keeps only the message,
    so every entry point shows the one line that names the file; the worker's traceback stays in
    ``worker_traceback`` (None for an error raised in the main process).
    """

    def __init__(self, *args):
        self.worker_traceback = None
        if len(args) == 1 and isinstance(args[0], str):
            message, self.worker_traceback = _unwrap_worker_error(args[0], type(self))
            args = (message,)
        super().__init__(*args)


def _unwrap_worker_error(text: str, cls: type) -> tuple[str, str | None]:
    """(original message, worker traceback) of torch's re-raise text for ``cls``; (text, None) if
    ``text`` is not one."""
    head, _, rest = text.partition("\n")
    if not (head.startswith(f"Caught {cls.__name__} in ") and rest.startswith("Original Traceback")):
        return text, None
    worker_traceback = rest[len("Original "):]
    names = {cls.__qualname__, f"{cls.__module__}.{cls.__qualname__}"}
    lines = worker_traceback.rstrip("\n").splitlines()
    for k in range(len(lines) - 1, -1, -1):  # the exception line, followed by the rest of a long message
        name, colon, first = lines[k].partition(": ")
        if name in names:
            return "\n".join([first, *lines[k + 1 :]]), worker_traceback
    return text, None


@dataclass(frozen=True)
class DatasetInfo:
    """Class metadata of a dataset.

    Attributes:
        name: registry name, e.g. ``"camvid"``.
        class_names: one name per trainable class, in label order.
        palette: one RGB colour per class, for overlays.
        ignore_index: label value excluded from losses and metrics.
        background: index of a catch-all background class that every image is taken to contain
            (PASCAL VOC's class 0), or None when every class is a named thing or stuff class
            (the synthetic scenes, CamVid). Weakly supervised methods never ask the tags for it.
    """

    name: str
    class_names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    ignore_index: int = IGNORE_INDEX
    background: int | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def colorize(self, mask: np.ndarray | torch.Tensor) -> np.ndarray:
        """Map a label map (H, W) to an RGB image (H, W, 3) uint8; ignored pixels are black."""
        mask = np.asarray(mask.cpu() if isinstance(mask, torch.Tensor) else mask)
        lut = np.zeros((256, 3), dtype=np.uint8)
        lut[: self.num_classes] = np.asarray(self.palette, dtype=np.uint8)
        return lut[mask.astype(np.int64).clip(0, 255)]


def read_image(path: str | Path) -> np.ndarray:
    """Read an RGB image as (H, W, 3) uint8, naming the file when it cannot be decoded."""
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))
    except FileNotFoundError:
        raise DatasetError(f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"cannot read image {path}: corrupt or not an image ({e})") from None


def read_mask(path: str | Path) -> np.ndarray:
    """Read a single-channel label map (palette or greyscale PNG) as (H, W) int64."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "I;16"):
                raise DatasetError(
                    f"label map {path} has mode {im.mode!r}; expected a single-channel PNG "
                    "(mode L or P) holding class indices"
                )
            return np.asarray(im).astype(np.int64)
    except FileNotFoundError:
        raise DatasetError(f"label file not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        if isinstance(e, DatasetError):
            raise
        raise DatasetError(f"cannot read label map {path}: corrupt or not an image ({e})") from None


def check_sample(image: np.ndarray, mask: np.ndarray, num_classes: int, where: str) -> None:
    """Raise a DatasetError naming ``where`` unless mask matches image size and labels are valid."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise DatasetError(f"{where}: image has shape {image.shape}, expected (H, W, 3)")
    if mask.shape != image.shape[:2]:
        raise DatasetError(
            f"{where}: label map is {mask.shape[1]}x{mask.shape[0]} (WxH) but the image is "
            f"{image.shape[1]}x{image.shape[0]}; they must have the same size"
        )
    bad = (mask != IGNORE_INDEX) & ((mask < 0) | (mask >= num_classes))
    if bad.any():
        values = np.unique(mask[bad])[:10].tolist()
        raise DatasetError(
            f"{where}: label values {values} are outside [0, {num_classes}) and not "
            f"{IGNORE_INDEX} (ignore)"
        )


def require_dir(path: Path, layout: str) -> Path:
    """Return ``path`` if it is a directory, else raise an error that shows the expected layout."""
    if not path.is_dir():
        raise DatasetError(f"dataset folder not found: {path}\nexpected layout:\n{layout}")
    return path


class Validity(tv_tensors.Mask):
    """Which pixels of a sample are image (1) and which are padding a transform added (0).

    A ``tv_tensors.Mask`` subclass, so torchvision's v2 transforms move it exactly as they move the
    label map (nearest-neighbour resize, the same crop and flip), while ``RandomCrop`` pads it
    with its own fill (0) instead of the label map's 255."""


def tags_from_mask(mask: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Image-level tags (multi-hot float vector of length C) of the classes present in ``mask``."""
    # One count per label value (255, ignore, among them), no copy of the valid pixels; a value
    # past the classes and below 255 is check_sample's error, not this function's.
    counts = torch.bincount(mask.reshape(-1).long().clamp(max=IGNORE_INDEX), minlength=IGNORE_INDEX + 1)
    return (counts[:num_classes] > 0).float()


class SegmentationDataset(Dataset):
    """Base class: subclasses set ``info`` and implement ``__len__``, ``load`` and ``describe``.

    Indexing with an int gives an un-augmented sample; indexing with ``(i, seed)`` (what the
    trainer's sampler yields) runs the transform under ``torch.manual_seed(seed)`` in a forked RNG,
    so a sample's augmentation depends only on (i, seed): not on worker count, world size, or
    whether the run was resumed.

    Each item is a dict: ``image`` float (3, H, W), ``mask`` int64 (H, W) with 255 = ignore,
    ``valid`` bool (H, W): True where the pixel is image, False where a crop padded it (taken from
    the transform, never from the mask, whose 255s also mark VOC's object boundaries), ``tags``
    float (C,) multi-hot, ``index`` int. The tags are those of the whole image (``image_level_tags``:
    the classes in its un-augmented mask, unless the dataset has annotated tags), as an image-level
    annotation gives them: a crop can lose a tagged class (README, weak supervision, measures how
    often and how the weakly supervised methods draw their crops so that it does not).

    ``load`` may return ``None`` for the mask of an image that has none (a tags-only dataset):
    the item's mask is then all 255 and the dataset must override ``image_level_tags`` and
    ``images_without_masks`` (``has_masks``, ``check_masks``: what needs label maps asks them).
    """

    info: DatasetInfo

    def __init__(self, transform=None):
        self.transform = transform

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        raise NotImplementedError

    def image_level_tags(self, i: int, mask: np.ndarray | None) -> torch.Tensor:
        """(C,) multi-hot tags of sample i: by default the classes of its (un-augmented) mask."""
        if mask is None:
            raise DatasetError(f"{self.describe(i)}: no label map and no image-level tags for it")
        return tags_from_mask(torch.from_numpy(mask), self.num_classes)

    def describe(self, i: int) -> str:
        return f"{type(self).__name__}[{i}]"

    def images_without_masks(self) -> list[str]:
        """Descriptions of the samples that have no label map (a dataset whose ``load`` may return
        no mask overrides this; it must not decode any file)."""
        return []

    @property
    def has_masks(self) -> bool:
        """Whether every sample has a label map (what fully supervised training and evaluation need)."""
        return not self.images_without_masks()

    def check_masks(self, purpose: str) -> None:
        """Raise a DatasetError, saying ``purpose`` needs them, unless every sample has a label map."""
        missing = self.images_without_masks()
        if missing:
            raise DatasetError(f"{purpose} needs a label map for every image, but {len(missing)} of {len(self)} "
                               f"have none, e.g. {missing[0]}")

    def __len__(self) -> int:
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    def __getitem__(self, key):
        i, seed = key if isinstance(key, tuple) else (key, None)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {type(self).__name__} of length {len(self)}")
        image, mask = self.load(i)
        tags = self.image_level_tags(i, mask)
        if mask is None:
            mask = np.full(image.shape[:2], IGNORE_INDEX, dtype=np.int64)
        check_sample(image, mask, self.num_classes, self.describe(i))
        image = tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1))
        mask = tv_tensors.Mask(torch.from_numpy(np.ascontiguousarray(mask)))
        valid = Validity(torch.ones(mask.shape, dtype=torch.uint8))
        if self.transform is not None:
            if seed is None:
                image, mask, valid = self.transform(image, mask, valid)
            else:
                with torch.random.fork_rng(devices=[]):
                    # The CPU generator alone (what the transforms draw from): torch.manual_seed
                    # would also queue a seed for every accelerator backend, 0.5 ms an image.
                    torch.default_generator.manual_seed(seed)
                    image, mask, valid = self.transform(image, mask, valid)
        if image.dtype == torch.uint8:
            image = image.float() / 255.0
        return {
            "image": image.as_subclass(torch.Tensor),
            "mask": mask.as_subclass(torch.Tensor).long(),
            "valid": valid.as_subclass(torch.Tensor).bool(),
            "tags": tags,
            "index": i,
        }

    def tag_table(self) -> torch.Tensor:
        """``image_tags()``, computed once per dataset object (the class-aware sampler and a
        weakly supervised method's tag frequencies both read it)."""
        if getattr(self, "_tag_table", None) is None:
            self._tag_table = self.image_tags()
        return self._tag_table

    def image_tags(self) -> torch.Tensor:
        """(N, C) multi-hot image-level tags of every sample (what a class-aware batch sampler
        groups by). The default reads every sample; datasets with a cheaper way override it."""
        return torch.stack(
            [self.image_level_tags(i, self.load(i)[1]) for i in range(len(self))]
        ) if len(self) else torch.zeros(0, self.num_classes)


class FilePairDataset(SegmentationDataset):
    """A dataset of (image file, label file) pairs: CamVid, Cityscapes, ADE20K.

    Subclasses find the pairs in their layout, pass them to ``__init__`` and turn raw label
    values into training labels in ``map_labels``.

    Args:
        images: image files, in dataset order.
        labels: the label file of each image.
        where: what was scanned (named when it held no image).
        transform: joint ``(image, mask)`` transform.
    """

    def __init__(self, images, labels, where: str, transform=None):
        super().__init__(transform)
        self.images, self.labels = list(images), list(labels)
        if not self.images:
            raise DatasetError(f"{type(self).__name__}: no images found in {where}")
        for image, label in zip(self.images, self.labels):
            if not label.is_file():
                raise DatasetError(f"label file missing for image {image}: expected {label}")

    def map_labels(self, raw: np.ndarray, path: Path) -> np.ndarray:
        """Raw label values read from ``path`` -> class indices with 255 = ignore."""
        return raw

    def __len__(self) -> int:
        return len(self.images)

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return read_image(self.images[i]), self.map_labels(read_mask(self.labels[i]), self.labels[i])

    def describe(self, i: int) -> str:
        return str(self.images[i])

    def image_tags(self) -> torch.Tensor:
        """Tags of every sample from its label file alone (no image is decoded)."""
        tags = [
            tags_from_mask(torch.from_numpy(self.map_labels(read_mask(p), p)), self.num_classes)
            for p in self.labels
        ]
        return torch.stack(tags) if tags else torch.zeros(0, self.num_classes)
