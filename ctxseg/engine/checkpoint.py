"""Checkpoints: tensors and plain types only, written atomically, loaded with weights_only=True.

A checkpoint is written to a temporary file in the same folder, flushed to disk, then renamed over
the target, so a run killed mid-write leaves the previous checkpoint intact. Step checkpoints are
named ``step_00001234.pt`` and the newest ``keep`` are kept.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

_STEP_RE = re.compile(r"^step_(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read: truncated, corrupt, or not a ctxseg checkpoint."""


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to ``path`` via a temp file + fsync + rename (never a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint on CPU with ``weights_only=True``; a damaged file raises CheckpointError
    naming it and the intact checkpoints beside it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged zip/pickle
        others = [p.name for p in list_checkpoints(path.parent) if p != path]
        hint = f"; other checkpoints in {path.parent}: {others}" if others else ""
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt and cannot be loaded ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}){hint}"
        ) from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"{path} is not a ctxseg checkpoint (no 'model' and 'config' entries)")
    return state


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Step checkpoints in ``folder``, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def save_step_checkpoint(state: dict[str, Any], folder: str | Path, step: int, keep: int) -> Path:
    """Write ``step_<step>.pt`` atomically, then delete all but the newest ``keep``."""
    path = atomic_save(state, Path(folder) / f"step_{step:08d}.pt")
    for old in list_checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from, as tensors and plain types."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(_tuplify(state["python"]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x
