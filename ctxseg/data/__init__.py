"""Datasets: the synthetic default, CamVid, Cityscapes, ADE20K, PASCAL VOC, a folder of one's own
data; joint transforms; downloads.

``build_dataset(name, split, root, transform)`` is the one factory the trainer, the CLI and the
notebooks use; adding a dataset is one class and one line in ``DATASETS``.
"""

from __future__ import annotations

from ctxseg.data.ade20k import ADE20K
from ctxseg.data.base import (
    IGNORE_INDEX,
    DatasetError,
    DatasetInfo,
    SegmentationDataset,
    tags_from_mask,
)
from ctxseg.data.camvid import CamVid
from ctxseg.data.cityscapes import Cityscapes
from ctxseg.data.folder import FolderDataset
from ctxseg.data.synthetic import SyntheticScenes
from ctxseg.data.transforms import denormalize, eval_transform, train_transform
from ctxseg.data.voc import VOC

DATASETS: dict[str, type[SegmentationDataset]] = {
    "synthetic": SyntheticScenes,
    "camvid": CamVid,
    "cityscapes": Cityscapes,
    "ade20k": ADE20K,
    "voc": VOC,
    "folder": FolderDataset,
}

# Where each dataset lives when --data-root is not given (relative to the working directory); the
# folder dataset has no default: it is wherever the user's data is.
DEFAULT_ROOTS = {
    "camvid": "data/camvid",
    "cityscapes": "data/cityscapes",
    "ade20k": "data/ade20k",
    "voc": "data/VOCdevkit",
}


def build_dataset(name: str, split: str, root: str | None = None, transform=None, **kwargs):
    """Create dataset ``name`` for ``split``; ``root`` is ignored by the synthetic set."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    cls = DATASETS[name]
    if name == "synthetic":
        return cls(split=split, transform=transform, **kwargs)
    root = root or DEFAULT_ROOTS.get(name)
    if root is None:
        raise DatasetError(f"the {name} dataset has no default folder: give it with --data-root DIR (data_root)")
    return cls(root=root, split=split, transform=transform, **kwargs)


__all__ = [
    "ADE20K",
    "CamVid",
    "Cityscapes",
    "DATASETS",
    "DatasetError",
    "DatasetInfo",
    "FolderDataset",
    "IGNORE_INDEX",
    "SegmentationDataset",
    "SyntheticScenes",
    "VOC",
    "build_dataset",
    "denormalize",
    "eval_transform",
    "tags_from_mask",
    "train_transform",
]
