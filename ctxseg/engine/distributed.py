"""torchrun support: process-group setup from the environment, rank helpers, device choice."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> this process's CUDA device when CUDA is available, else CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


def device_type(name: str) -> str:
    """``cuda`` or ``cpu`` (or another torch device type): what ``resolve_device(name)`` would
    give, without touching the device."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return torch.device(name).type
    except RuntimeError:
        raise ValueError(f"device {name!r} is not a torch device (auto, cpu, cuda, cuda:1, ...)") from None


def world_size_from_env() -> int:
    """The number of processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_world_size_from_env() -> int:
    """The number of processes torchrun started on this machine (1 without torchrun)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def available_cpus() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS and Windows have no affinity masks
        return os.cpu_count() or 1


def default_num_workers(cpus: int | None = None, local_world_size: int | None = None) -> int:
    """DataLoader workers per process when ``num_workers`` is not set: the cores each process of
    this machine gets, at least 1 and at most 8 (more workers than that rarely pay for their
    memory). The training loader's workers run at the lowest priority (``loader.train_loader``),
    so they fill the time the step leaves idle rather than compete with its threads: on 2 cores, 2
    such workers kept a CamVid step within 6-9 % of one on data held in memory, where 1 worker at
    normal priority (the earlier rule, cores less one) cost 20 % (README, Speed)."""
    cpus = available_cpus() if cpus is None else cpus
    local_world_size = local_world_size_from_env() if local_world_size is None else local_world_size
    return min(8, max(1, cpus // max(1, local_world_size)))


def resolve_sync_bn(asked: bool | None, world_size: int, device_type: str) -> bool:
    """Whether BatchNorm layers are synchronised across processes: ``None`` (auto) -> on for
    several processes on CUDA; ``True`` -> on wherever CUDA is used; ``False`` -> off. Never on CPU:
    PyTorch's SyncBatchNorm refuses CPU tensors when there are several processes."""
    if device_type != "cuda":
        return False
    return world_size > 1 if asked is None else bool(asked)


SYNC_BN_CPU_NOTE = (
    "note: sync_bn=true does not apply on CPU (PyTorch's SyncBatchNorm needs CUDA tensors); "
    "each process normalises with its own batch statistics"
)


def maybe_sync_bn(model: torch.nn.Module, cfg, dist: DistInfo, device: torch.device) -> torch.nn.Module:
    """``model`` with its BatchNorm layers converted to SyncBatchNorm when ``cfg.sync_bn``
    resolves to on for ``dist.world_size`` processes on ``device`` (``resolve_sync_bn``), else
    ``model`` unchanged. Call it before wrapping the model in DDP.

    timm's converter is used, not ``nn.SyncBatchNorm.convert_sync_batchnorm``: timm's encoders
    fuse BatchNorm and activation in ``BatchNormAct2d``, and PyTorch's converter would replace
    those by a plain SyncBatchNorm and silently drop the activation. Parameters and running
    statistics are kept (the same tensors), and the state-dict keys do not change, so checkpoints
    load either way."""
    if not resolve_sync_bn(cfg.sync_bn, dist.world_size, device.type):
        return model
    from timm.layers import convert_sync_batchnorm

    return convert_sync_batchnorm(model)


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group torchrun describes (WORLD_SIZE > 1), or run single-process.

    NCCL on CUDA, gloo on CPU."""
    world = world_size_from_env()
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def local_rank_from_env() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP broadcasts buffers at the start of each forward, but that forward then updates them with
    the local batch, so after the last step the ranks hold different statistics. Evaluating then
    would mix models; checkpoints and exports hold rank 0's, so rank 0's are the ones to use."""
    if dist.is_available() and dist.is_initialized():
        for buf in module.buffers():
            dist.broadcast(buf.data, src=0)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _padded_rows(x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """``x`` (N_r, ...) padded with zero rows to the largest N over the ranks (at least 1: some
    backends refuse 0 elements), and every rank's N in rank order (exchanged here)."""
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    top = max(1, *sizes)
    if x.shape[0] < top:
        x = torch.cat([x, x.new_zeros((top - x.shape[0], *x.shape[1:]))])
    return x.contiguous(), sizes


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (N_r, ...) of every rank along dim 0, in rank order; ``x`` itself when
    not distributed. Ranks may hold different N_r: rows are padded to the largest for the
    collective and trimmed afterwards. No gradient flows through (use it for detached keys)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    padded, sizes = _padded_rows(x)
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


# ------------------------------------------------------------------------------------------------
# Contrast across processes (``gather_contrast``) and per-rank sampling streams.
def resolve_gather_contrast(asked: bool | None, world_size: int) -> bool:
    """Whether the methods contrast over the global batch: ``None`` (auto) -> on with several
    processes; ``True`` / ``False`` force it (it only acts when there are several processes)."""
    return world_size > 1 if asked is None else bool(asked)


def contrast_world(cfg) -> int:
    """The number of processes a method contrasts across: the process group's size when
    ``cfg.gather_contrast`` is on and a group of several processes is up, else 1."""
    if not getattr(cfg, "gather_contrast", False):
        return 1
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


def contrast_gather(cfg):
    """``all_gather_with_grad`` when the methods contrast across several processes
    (``contrast_world`` > 1), else None: the ``gather`` argument of the methods' losses."""
    return all_gather_with_grad if contrast_world(cfg) > 1 else None


def all_gather_with_grad(x: torch.Tensor, same_shape: bool = False) -> list[torch.Tensor]:
    """Every rank's ``x`` (N_r, ...), in rank order, with the gradient flowing back to each rank's
    own ``x`` (``torch.distributed.nn.functional.all_gather``: the backward sums, over the ranks,
    the gradients every rank's loss gives each copy). Ranks may hold different N_r: the sizes are
    exchanged first and the rows padded to the largest for the collective, then trimmed
    (``same_shape``: the caller knows every rank's ``x`` has the same shape; no exchange).
    ``[x]`` when not distributed. Every rank must call it, in the same order."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [x]
    from torch.distributed.nn.functional import all_gather

    if same_shape:
        return list(all_gather(x.contiguous()))
    padded, sizes = _padded_rows(x)
    return [p[:s] for p, s in zip(all_gather(padded), sizes)]


def sum_gathered(gather, x: torch.Tensor) -> torch.Tensor:
    """The sum over the processes of ``x`` (the same shape on every rank) through ``gather``, a
    differentiable all-gather such as ``all_gather_with_grad`` (the gradient of every rank's loss
    flows back to each rank's ``x``); ``x`` itself when ``gather`` is None."""
    return x if gather is None else torch.cat(gather(x[None], same_shape=True)).sum(0)


def all_sum_with_grad(x: torch.Tensor) -> torch.Tensor:
    """``sum_gathered`` through ``all_gather_with_grad``: ``x`` when not distributed."""
    return sum_gathered(all_gather_with_grad, x)


SAMPLING_SEED_STRIDE = 1_000_003


def seed_sampling(seed: int, rank: int) -> None:
    """Offset this process's random stream (the one the methods draw anchors, pixels and queue
    keys from) by its rank. Call it after the model is built, so the initialisation draws the same
    numbers on every rank. Rank 0 keeps the stream a single-process run has; rank r > 0 reseeds
    with ``seed + r * SAMPLING_SEED_STRIDE`` (every device's CUDA generator too)."""
    if rank > 0:
        torch.manual_seed(seed + rank * SAMPLING_SEED_STRIDE)


def all_gather_objects(obj) -> list:
    """Every rank's picklable ``obj``, in rank order (``[obj]`` when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
