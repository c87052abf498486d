"""Segmentation metrics: confusion matrix, (m)IoU, accuracies and Boundary IoU.

Everything here is pure ``torch`` and runs on the device of its inputs (CPU or GPU);
no tensor is copied to the host except the final scalars returned by
:meth:`SegMetrics.compute` (and the single bools behind the argument checks).

Conventions:
    * Label maps are integer tensors of shape ``(N, H, W)`` or ``(H, W)``.
    * The confusion matrix has ground truth on the rows and predictions on the columns.
    * Pixels whose ground truth equals ``ignore_index`` are not counted anywhere.
    * A class that appears neither in the ground truth nor in the predictions has an
      undefined IoU (``nan`` in tensors, ``None`` in :meth:`SegMetrics.compute`) and is
      left out of every mean; it is *not* counted as an IoU of 0.

Example:
    >>> m = SegMetrics(num_classes=19, class_names=names)
    >>> for images, labels in loader:
    ...     m.update(model(images).argmax(1), labels)
    >>> m.all_reduce()          # no-op outside torch.distributed
    >>> results = m.compute()   # plain, JSON-serialisable dict
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "confusion_matrix",
    "iou_from_confusion",
    "pixel_accuracy",
    "mean_accuracy",
    "boundary_region",
    "boundary_counts",
    "SegMetrics",
]

# Upper bound on the number of elements of one (batch x class-chunk x H x W) working
# tensor in :func:`_boundary_counts_per_class` (float32: 4 bytes each, i.e. ~128 MiB).
_MAX_CHUNK_ELEMENTS = 1 << 25


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` in float64, ``nan`` where ``den == 0``."""
    num, den = num.double(), den.double()
    return torch.where(den > 0, num / den.clamp_min(1), torch.full_like(den, math.nan))


def _valid_mask(target: torch.Tensor, ignore_index: int | None) -> torch.Tensor:
    if ignore_index is None:
        return torch.ones_like(target, dtype=torch.bool)
    return target != ignore_index


def _check_label_maps(pred: torch.Tensor, target: torch.Tensor) -> None:
    if pred.shape != target.shape:
        raise ValueError(
            f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}"
        )
    for name, t in (("pred", pred), ("target", target)):
        if t.is_floating_point() or t.is_complex():
            raise TypeError(f"{name} must be an integer label map, got dtype {t.dtype}")


def confusion_matrix(
    pred: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    ignore_index: int | None = 255,
) -> torch.Tensor:
    """Confusion matrix of a label-map prediction against its ground truth.

    Computed with one ``torch.bincount(target * C + pred, minlength=C * C)`` over the
    valid pixels (``target != ignore_index``), on the inputs' device.

    Args:
        pred: Integer predicted labels, any shape (typically ``(N, H, W)`` or ``(H, W)``).
        target: Integer ground-truth labels, same shape as ``pred``.
        num_classes: Number of classes ``C``.
        ignore_index: Ground-truth value to skip; ``None`` disables ignoring.

    Returns:
        ``LongTensor`` of shape ``(C, C)``; entry ``[i, j]`` counts pixels of ground-truth
        class ``i`` predicted as class ``j``.

    Raises:
        ValueError: If shapes differ, a prediction lies outside ``[0, C)``, or a
            non-ignored ground-truth label lies outside ``[0, C)``.
        TypeError: If an input is not an integer tensor.
    """
    _check_label_maps(pred, target)
    c = int(num_classes)
    pred = pred.reshape(-1).long()
    target = target.reshape(-1).long()
    if pred.numel() and bool(((pred < 0) | (pred >= c)).any()):
        raise ValueError(
            f"prediction labels must lie in [0, {c}); got min {int(pred.min())}, max {int(pred.max())}"
        )
    bad = (target < 0) | (target >= c)
    if ignore_index is not None:
        valid = target != ignore_index
        bad &= valid
    if target.numel() and bool(bad.any()):
        raise ValueError(
            f"ground-truth labels must lie in [0, {c}) or equal ignore_index={ignore_index}; "
            f"got e.g. {int(target[bad][0])}"
        )
    index = target * c + pred
    if ignore_index is not None:
        # Ignored pixels go to an extra bin (cheaper than boolean compaction, no sync).
        index = torch.where(valid, index, c * c)
    return torch.bincount(index, minlength=c * c + 1)[: c * c].reshape(c, c)


def iou_from_confusion(cm: torch.Tensor) -> torch.Tensor:
    """Per-class intersection over union from a confusion matrix.

    Args:
        cm: ``(C, C)`` confusion matrix (rows ground truth, columns prediction).

    Returns:
        Float64 tensor of shape ``(C,)``: ``TP / (TP + FP + FN)``, ``nan`` where the class is
        absent from both ground truth and prediction (union 0).
    """
    cm = cm.double()
    inter = torch.diagonal(cm)
    return _safe_div(inter, cm.sum(0) + cm.sum(1) - inter)


def pixel_accuracy(cm: torch.Tensor) -> torch.Tensor:
    """Overall pixel accuracy, ``trace(cm) / sum(cm)``.

    Args:
        cm: ``(C, C)`` confusion matrix.

    Returns:
        0-dim float64 tensor (``nan`` if the matrix is empty).
    """
    cm = cm.double()
    total = cm.sum()
    return _safe_div(torch.diagonal(cm).sum(), total)


def mean_accuracy(cm: torch.Tensor) -> torch.Tensor:
    """Mean of the per-class recalls over classes present in the ground truth.

    Args:
        cm: ``(C, C)`` confusion matrix.

    Returns:
        0-dim float64 tensor (``nan`` if no class has ground-truth pixels).
    """
    cm = cm.double()
    return torch.nanmean(_safe_div(torch.diagonal(cm), cm.sum(1)))


def _pad_pool_max(x: torch.Tensor, d: int, pad_value: float) -> torch.Tensor:
    """Max over each (2d+1)x(2d+1) window of a ``(B, K, H, W)`` float tensor.

    The input is padded by ``d`` with ``pad_value`` so the output keeps the size ``H x W``;
    the square window is applied separably (a column pass, then a row pass).
    """
    k = 2 * d + 1
    x = F.pad(x, (d, d, d, d), mode="constant", value=pad_value)
    if x.device.type == "cpu":
        # On a CPU, k - 1 elementwise maxima of shifted views per axis beat max_pool2d's kernel
        # (about 4x on a batch of 360x480 label maps); the result is the same, max being exact.
        h, w = x.shape[-2] - 2 * d, x.shape[-1] - 2 * d
        rows = x[..., 0:h, :]
        for i in range(1, k):
            rows = torch.maximum(rows, x[..., i : i + h, :])
        out = rows[..., 0:w]
        for j in range(1, k):
            out = torch.maximum(out, rows[..., j : j + w])
        return out
    x = F.max_pool2d(x, kernel_size=(k, 1), stride=1)
    return F.max_pool2d(x, kernel_size=(1, k), stride=1)


def boundary_region(mask: torch.Tensor, d: int) -> torch.Tensor:
    """Inner boundary region of binary masks at pixel tolerance ``d``.

    Following Boundary IoU (Cheng, Girshick, Dollár, Berg, Kirillov, "Boundary IoU:
    Improving Object-Centric Image Segmentation Evaluation", CVPR 2021), the boundary
    region of a mask ``M`` is the set of pixels of ``M`` within distance ``d`` of its
    contour: ``M`` minus its erosion by a ``(2d+1) x (2d+1)`` square. This equals ``d``
    iterations of a 3x3 erosion on the zero-padded mask, as in the authors' reference
    ``mask_to_boundary``, so the image border counts as contour.

    The erosion is a max-pool of the complement ``~M`` padded with ones (pixels outside
    the image are "not mask"), vectorised over all leading dimensions.

    Args:
        mask: Bool tensor of shape ``(..., H, W)``, e.g. ``(N, H, W)`` or ``(N, C, H, W)``.
        d: Tolerance in pixels (``>= 0``; ``0`` gives an empty region).

    Returns:
        Bool tensor of the same shape as ``mask``.
    """
    if d < 0:
        raise ValueError(f"boundary tolerance d must be >= 0, got {d}")
    if mask.dim() < 2:
        raise ValueError(f"mask must have shape (..., H, W), got {tuple(mask.shape)}")
    mask = mask.bool()
    if d == 0 or mask.numel() == 0:
        return torch.zeros_like(mask)
    shape = mask.shape
    m = mask.reshape(-1, 1, shape[-2], shape[-1])
    dtype = torch.float16 if m.is_cuda else torch.float32
    outside = _pad_pool_max((~m).to(dtype), d, pad_value=1.0) > 0  # some non-mask pixel within d
    return (m & outside).reshape(shape)


def _as_batch(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 2:
        return x.unsqueeze(0)
    if x.dim() != 3:
        raise ValueError(f"label maps must have shape (N, H, W) or (H, W), got {tuple(x.shape)}")
    return x


def boundary_counts(
    pred: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    d: int,
    ignore_index: int | None = 255,
    _check: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class Boundary IoU intersection and union pixel counts.

    For every class ``c`` this counts ``|G_d ∩ P_d|`` and ``|G_d ∪ P_d|`` where ``G_d``
    (``P_d``) is :func:`boundary_region` of ``target == c`` (``pred == c``) at tolerance
    ``d`` (Cheng et al., CVPR 2021). Both masks are built on the full label maps, then
    pixels whose ground truth is ``ignore_index`` are dropped from the counts (so the edge
    of an ignore area *is* a ground-truth contour, as it is for ``target == c``).

    All classes are handled at once without a per-class loop: a pixel with label ``l``
    lies in the boundary region of class ``l`` exactly when its ``(2d+1) x (2d+1)``
    window holds another label or leaves the image, i.e. when the window's max and min
    differ with the map padded by a sentinel (and it is in no other class's mask). This
    is equivalent to running :func:`boundary_region` on every one-hot channel (checked in
    the tests) but costs ``O(N H W)`` instead of ``O(N C H W)``.

    Args:
        pred: Integer predictions ``(N, H, W)`` or ``(H, W)`` with values in ``[0, C)``.
        target: Integer ground truth of the same shape.
        num_classes: Number of classes ``C``.
        d: Boundary tolerance in pixels.
        ignore_index: Ground-truth value to exclude; ``None`` disables ignoring.

    Returns:
        ``(intersection, union)``: two ``LongTensor`` of shape ``(C,)``.

    Raises:
        ValueError: On shape mismatch or labels outside ``[0, C)`` (ignored ground truth
            excepted).
    """
    _check_label_maps(pred, target)
    c = int(num_classes)
    pred, target = _as_batch(pred).long(), _as_batch(target).long()
    if d <= 0 or pred.numel() == 0:
        z = torch.zeros(c, dtype=torch.long, device=pred.device)
        return z, z.clone()

    def on_boundary(labels: torch.Tensor) -> torch.Tensor:
        # float32 is exact for integer labels up to 2**24; -1 is never a pred/GT class.
        x = labels.unsqueeze(1).float()
        hi = _pad_pool_max(x, d, pad_value=-1.0)
        lo = -_pad_pool_max(-x, d, pad_value=1.0)
        return (hi != lo).squeeze(1)

    valid = _valid_mask(target, ignore_index)
    if _check:
        bad_gt = valid & ((target < 0) | (target >= c))
        if bool(bad_gt.any() | ((pred < 0) | (pred >= c)).any()):
            raise ValueError(
                f"labels must lie in [0, {c}) (ground truth may also equal ignore_index={ignore_index})"
            )
    gb, pb = on_boundary(target), on_boundary(pred)
    g_sel = gb & valid
    p_sel = pb & valid
    both = g_sel & p_sel & (target == pred)

    def count(sel: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # Unselected pixels go to an extra bin ``c`` (no boolean compaction, no sync).
        return torch.bincount(torch.where(sel, labels, c).reshape(-1), minlength=c + 1)[:c]

    inter = count(both, target)
    return inter, count(g_sel, target) + count(p_sel, pred) - inter


def _boundary_counts_per_class(
    pred: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    d: int,
    ignore_index: int | None = 255,
    max_chunk_elements: int = _MAX_CHUNK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for :func:`boundary_counts`: explicit per-class masks, in class chunks.

    Builds the one-hot masks of ``chunk`` classes at a time (bounded by
    ``max_chunk_elements`` elements) and erodes them with :func:`boundary_region`.
    Slower than :func:`boundary_counts` by a factor ~C; kept as an executable definition.
    """
    pred, target = _as_batch(pred).long(), _as_batch(target).long()
    c = int(num_classes)
    n, h, w = target.shape
    valid = _valid_mask(target, ignore_index).unsqueeze(1)
    chunk = max(1, min(c, max_chunk_elements // max(1, n * h * w)))
    inter = torch.zeros(c, dtype=torch.long, device=target.device)
    union = torch.zeros_like(inter)
    for start in range(0, c, chunk):
        cls = torch.arange(start, min(c, start + chunk), device=target.device).view(1, -1, 1, 1)
        g = boundary_region(target.unsqueeze(1) == cls, d) & valid
        p = boundary_region(pred.unsqueeze(1) == cls, d) & valid
        inter[start : start + chunk] = (g & p).sum(dim=(0, 2, 3))
        union[start : start + chunk] = (g | p).sum(dim=(0, 2, 3))
    return inter, union


def _to_optional_floats(values: torch.Tensor) -> list[float | None]:
    return [None if math.isnan(v) else float(v) for v in values.tolist()]


def _nanmean_float(values: torch.Tensor) -> float:
    if values.numel() == 0 or bool(torch.isnan(values).all()):
        return math.nan
    return float(torch.nanmean(values))


class SegMetrics:
    """Accumulates a confusion matrix and Boundary IoU counts over a dataset.

    Counters live on ``device`` (by default the device of the first ``update``), so
    accumulation on GPU never leaves the GPU. In data-parallel evaluation each rank calls
    :meth:`update` on its shard, then :meth:`all_reduce` once, then :meth:`compute`.

    Args:
        num_classes: Number of classes ``C``.
        ignore_index: Ground-truth label to ignore (``None``: none).
        boundary_px: Boundary IoU tolerance ``d`` in pixels.
        class_names: Optional ``C`` names used as keys of the per-class dicts
            (default: ``"0"``, ``"1"``, ...).
        device: Where the counters live; default: the device of the first update.

    Attributes:
        confmat: ``(C, C)`` LongTensor (ground truth rows, prediction columns), or ``None``
            before the first update.
        boundary_inter: ``(C,)`` LongTensor of boundary intersections.
        boundary_union: ``(C,)`` LongTensor of boundary unions.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int | None = 255,
        boundary_px: int = 3,
        class_names: Sequence[str] | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if boundary_px < 0:
            raise ValueError(f"boundary_px must be >= 0, got {boundary_px}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"got {len(class_names)} class names for {num_classes} classes")
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.boundary_px = int(boundary_px)
        names = class_names if class_names is not None else range(num_classes)
        self.class_names = [str(n) for n in names]
        self.device = torch.device(device) if device is not None else None
        self.confmat: torch.Tensor | None = None
        self.boundary_inter: torch.Tensor | None = None
        self.boundary_union: torch.Tensor | None = None
        self._reduced: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        if self.device is not None:
            self._allocate(self.device)

    def _allocate(self, device: torch.device) -> None:
        c = self.num_classes
        self.confmat = torch.zeros(c, c, dtype=torch.long, device=device)
        self.boundary_inter = torch.zeros(c, dtype=torch.long, device=device)
        self.boundary_union = torch.zeros(c, dtype=torch.long, device=device)

    def reset(self) -> None:
        """Zero every counter (keeping their device)."""
        if self.confmat is not None:
            self.confmat.zero_()
            self.boundary_inter.zero_()
            self.boundary_union.zero_()
        self._reduced = None

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of predictions.

        Args:
            pred: Integer predicted labels ``(N, H, W)`` (or ``(H, W)``), values in ``[0, C)``.
            target: Integer ground truth of the same shape (``ignore_index`` allowed).

        Raises:
            ValueError: On shape mismatch or out-of-range labels.
        """
        if self.confmat is None:
            self._allocate(self.device if self.device is not None else pred.device)
        dev = self.confmat.device
        pred, target = pred.to(dev, non_blocking=True), target.to(dev, non_blocking=True)
        cm = confusion_matrix(pred, target, self.num_classes, self.ignore_index)
        # Labels were validated by confusion_matrix just above.
        inter, union = boundary_counts(
            pred, target, self.num_classes, self.boundary_px, self.ignore_index, _check=False
        )
        self.confmat += cm
        self.boundary_inter += inter
        self.boundary_union += union
        self._reduced = None

    def _local(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.confmat is None:
            self._allocate(self.device if self.device is not None else self._default_device())
        return self.confmat, self.boundary_inter, self.boundary_union

    @staticmethod
    def _default_device() -> torch.device:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    @torch.no_grad()
    def all_reduce(self) -> None:
        """Sum the counters over all ranks (no-op unless torch.distributed is initialised).

        Must be called by every rank (it is a collective). The local counters are kept;
        :meth:`compute` uses the global sums until the next :meth:`update` or
        :meth:`reset`, so calling it twice does not double count. With the NCCL backend
        the counters must be on the rank's GPU (pass ``device`` or update with CUDA
        tensors).
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        cm, inter, union = self._local()
        c = self.num_classes
        flat = torch.cat([cm.reshape(-1), inter, union])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        self._reduced = (flat[: c * c].reshape(c, c), flat[c * c : c * c + c], flat[c * c + c :])

    @torch.no_grad()
    def compute(self) -> dict[str, object]:
        """Final metrics as a plain, JSON-serialisable dict.

        Returns:
            Dict with keys:
                ``miou``: mean IoU over classes with a non-empty union (classes absent from
                both ground truth and prediction are excluded, not counted as 0);
                ``pixel_acc``; ``mean_acc`` (mean recall over classes present in the
                ground truth); ``boundary_iou`` (mean Boundary IoU over classes with a
                non-empty boundary union); ``per_class_iou`` and
                ``per_class_boundary_iou`` (``{name: float or None}``, ``None`` where
                undefined); ``boundary_px`` (int); ``num_pixels`` (int, counted pixels);
                ``confusion`` (the ``C x C`` confusion matrix as a list of rows of ints, ground
                truth on the rows and predictions on the columns, in ``class_names`` order).
            Means over an empty set are ``nan``.
        """
        cm, inter, union = self._reduced if self._reduced is not None else self._local()
        iou = iou_from_confusion(cm)
        biou = _safe_div(inter.double(), union.double())
        return {
            "miou": _nanmean_float(iou),
            "pixel_acc": float(pixel_accuracy(cm)),
            "mean_acc": float(mean_accuracy(cm)),
            "boundary_iou": _nanmean_float(biou),
            "per_class_iou": dict(zip(self.class_names, _to_optional_floats(iou))),
            "per_class_boundary_iou": dict(zip(self.class_names, _to_optional_floats(biou))),
            "boundary_px": self.boundary_px,
            "num_pixels": int(cm.sum()),
            "confusion": cm.tolist(),
        }

    def __repr__(self) -> str:
        return (
            f"SegMetrics(num_classes={self.num_classes}, ignore_index={self.ignore_index}, "
            f"boundary_px={self.boundary_px})"
        )
