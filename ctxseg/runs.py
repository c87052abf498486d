"""Runs: a run folder's logs, opening a trained run, the one rule for reusing a run folder, and
training one the notebooks' way.

This module sits above ``ctxseg.engine`` and ``ctxseg.methods``: it is where a method's *name*
(stored in every config, checkpoint and export) becomes a method class, through the table in
``ctxseg.methods``. The engine is handed the class and never looks names up itself.

``open_run`` is the one way to get a trained model back (``ctxseg eval``, ``export``, the study,
the report, the plots, the embeddings and the notebooks all use it)::

    run = open_run("runs/demo/contextrast", heads=True)   # newest checkpoint, training heads included
    run.model, run.cfg, run.method, run.class_names, run.step, run.path

``reusable_state`` is the one rule by which ``demo``, ``study`` and the notebooks' ``train_or_reuse``
decide whether a run folder may be reused (finished) or resumed (interrupted): only when the
settings it was made with equal the asked ones, runtime keys aside; otherwise they refuse with
``RunSettingsError``, naming the folder and each differing key.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from ctxseg.config import TrainConfig, apply_overrides, from_plain, to_plain
from ctxseg.data.base import DatasetInfo
from ctxseg.data.download import DownloadError
from ctxseg.engine.checkpoint import CheckpointError, list_checkpoints, load_checkpoint
from ctxseg.engine.evaluate import build_model
from ctxseg.engine.resolve import resolve_config
from ctxseg.engine.trainer import Trainer, default_run_dir
from ctxseg.methods import Method, get_method
from ctxseg.models.pretrained import IMAGENET_MEAN, IMAGENET_STD
from ctxseg.models.segmenter import Segmenter


def load_run(path: str | Path) -> dict:
    """A run folder's logs as a dict: ``name``, ``path``, ``config`` (dict), ``train`` (logged
    training rows), ``evals`` (evaluation rows during and after training) and ``final`` (eval.json,
    or None while the run has not finished). Reads no weights (``open_run`` does)."""
    path = Path(path)
    log = path / "metrics.jsonl"
    if not log.is_file():
        raise FileNotFoundError(f"{path} is not a ctxseg run folder (no metrics.jsonl)")
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    final = path / "eval.json"
    cfg = path / "config.yaml"
    return {
        "name": path.name,
        "path": path,
        "config": yaml.safe_load(cfg.read_text()) if cfg.is_file() else {},
        "train": [r for r in rows if "loss" in r],
        "evals": [r for r in rows if "split" in r],
        "final": json.loads(final.read_text()) if final.is_file() else None,
    }


def run_config(plain: dict) -> TrainConfig:
    """The config of a trained model from its stored plain form (checkpoint or export metadata),
    as an instance of its method's config class."""
    cfg = from_plain(get_method(plain.get("method", "ce")).config_class, plain)
    if cfg.norm_mean is None or cfg.norm_std is None:
        # Runs from before the setting existed were all normalised with ImageNet's statistics.
        cfg = apply_overrides(cfg, {"norm_mean": IMAGENET_MEAN, "norm_std": IMAGENET_STD}, "checkpoint")
    if cfg.pretrained is None:
        cfg = apply_overrides(cfg, {"pretrained": False}, "checkpoint")  # its weights are loaded next
    return cfg


def run_file(path: str | Path, heads: bool = False) -> Path:
    """The file ``open_run(path, heads)`` reads. A ``.pt`` or ``.safetensors`` path is itself. In a
    run folder: without heads its ``model.safetensors``, else its newest ``ckpt/step_*.pt``; with
    heads (they live only in the checkpoints) the newest checkpoint, else ``model.safetensors``."""
    path = Path(path)
    if not path.is_dir():
        return path
    exported = path / "model.safetensors"
    ckpts = list_checkpoints(path / "ckpt")
    order = [ckpts[-1] if ckpts else None, exported if exported.is_file() else None]
    found = [p for p in (order if heads else order[::-1]) if p is not None]
    if not found:
        raise CheckpointError(f"{path} holds neither model.safetensors nor ckpt/step_*.pt")
    return found[0]


@dataclass
class TrainedRun:
    """What ``open_run`` returns."""

    cfg: TrainConfig  # resolved, an instance of the method's config class
    method: Method  # the method, built for the run's classes (a checkpoint's method state loaded)
    model: Segmenter  # in eval mode, on the device asked for
    class_names: list[str]
    step: int
    path: Path  # the file the weights came from
    has_heads: bool  # whether ``model`` carries the training-only heads


def run_info(cfg: TrainConfig, class_names, strict: bool = True) -> DatasetInfo:
    """The class metadata of the dataset a run was trained on (palette, background), checked
    against the class names stored with its weights: a difference is an error when ``strict``,
    else the stored names are used with a default palette."""
    from ctxseg.data import DATASETS
    from ctxseg.data.folder import read_classes

    names = tuple(class_names)
    info = getattr(DATASETS.get(cfg.data), "info", None)
    if info is None and cfg.data_root and (Path(cfg.data_root) / "classes.yaml").is_file():
        info = read_classes(Path(cfg.data_root) / "classes.yaml")[0]
    if info is not None and tuple(info.class_names) != names and strict:
        raise ValueError(f"class names {list(names)} differ from dataset {cfg.data!r}'s {list(info.class_names)}")
    if info is None or tuple(info.class_names) != names:  # e.g. a folder dataset no longer on disk
        from ctxseg.data.folder import default_palette

        return DatasetInfo(cfg.data, names, default_palette(len(names)))
    return info


def open_run(path: str | Path, heads: bool = False, device: torch.device | str = "cpu") -> TrainedRun:
    """Open a trained run: a run folder, a ``.pt`` checkpoint or a ``.safetensors`` export.

    Resolved config -> method (by the name in the config) -> model, with the training-only heads
    when ``heads`` is true and the file has them (checkpoints do, exports do not) -> weights.
    ``heads=False`` gives the deployable model (a run folder's ``model.safetensors`` first);
    ``heads=True`` the newest checkpoint, falling back to the export (``run_file``).
    """
    file = run_file(path, heads)
    if file.suffix == ".safetensors":
        plain, weights, names, step, method_state = *_read_export(file), None
    else:
        state = load_checkpoint(file)
        plain, weights, names, step = state["config"], state["model"], list(state["class_names"]), state["step"]
        method_state = state.get("method")
    cfg = run_config(plain)
    try:
        info = run_info(cfg, names, strict=heads)
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from None
    method = get_method(cfg.method)(cfg, info, total_iters=cfg.iters or 0)
    has_heads = heads and any(k.startswith("heads.") for k in weights)
    if has_heads and method_state is not None:
        method.load_state_dict(method_state)
    model = build_model(cfg, len(names), heads=method.heads if has_heads else None, load_pretrained=False)
    if not has_heads:
        weights = {k: v for k, v in weights.items() if not k.startswith("heads.")}
    model.load_state_dict(weights, strict=True)
    return TrainedRun(cfg, method.to(device), model.to(device).eval(), list(names), int(step), file, has_heads)


def _read_export(path: Path) -> tuple[dict, dict, list[str], int]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"model file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        weights = load_file(str(path))
        plain = json.loads(meta["config"])
        names = json.loads(meta["class_names"])
    except Exception as e:  # noqa: BLE001 - safetensors and json raise many types
        raise CheckpointError(f"{path} is not a readable ctxseg safetensors export ({e})") from None
    return plain, weights, list(names), int(meta.get("step", -1))


def trainer(cfg: TrainConfig, **kwargs) -> Trainer:
    """``Trainer(cfg, <the method named cfg.method>, **kwargs)``."""
    return Trainer(cfg, get_method(cfg.method), **kwargs)


# ------------------------------------------------------------------------------------------------
# Reusing a run folder: one rule for demo, study and the notebooks.
# Keys in which a run folder may differ from the asked settings and still be reused: where it
# lives and how it runs, never what it computes (TrainConfig.runtime_keys: worker count,
# TensorBoard, checkpoint spacing, ...).
REUSE_IGNORED = ("out", *TrainConfig.runtime_keys)


class RunSettingsError(ValueError):
    """A run folder holds a run made with other settings than the asked ones."""


# Errors in what the user gave (a setting, a data file, a checkpoint, a download; DatasetError,
# PretrainedError and RunSettingsError are ValueErrors): the command line prints them as one line
# that names the setting or file, and a study stops at the first, since every run would hit it.
INPUT_ERRORS = (ValueError, FileExistsError, CheckpointError, DownloadError)


def run_state(path: str | Path) -> str:
    """``finished`` (eval.json), ``started`` (a checkpoint to resume from) or ``new``."""
    path = Path(path)
    if (path / "eval.json").is_file():
        return "finished"
    return "started" if list_checkpoints(path / "ckpt") else "new"


def settings_diff(saved: dict, cfg: TrainConfig, ignore: tuple[str, ...] = ()) -> list[tuple[str, object, object]]:
    """(key, saved value, asked value) for every setting where a run folder's config.yaml
    (``saved``) differs from ``cfg``, ignoring ``REUSE_IGNORED`` and ``ignore``. Both sides are
    resolved as training stores them; a key the saved file lacks (a run from an older version)
    counts as its default."""
    saved_plain = to_plain(resolve_config(from_plain(type(cfg), saved)))
    skip = (*REUSE_IGNORED, *ignore)
    return [(key, saved_plain.get(key), value) for key, value in to_plain(resolve_config(cfg)).items()
            if key not in skip and saved_plain.get(key) != value]


def reusable_state(run_dir: str | Path, cfg: TrainConfig, ignore: tuple[str, ...] = ()) -> str:
    """``run_state(run_dir)`` when the folder may be reused or resumed for ``cfg``: it is new, or
    its config.yaml equals ``cfg`` but for ``REUSE_IGNORED`` and ``ignore`` (the study also
    ignores ``eval_split``: it evaluates a finished run on another split instead). Otherwise
    ``RunSettingsError`` naming the folder and the differing keys."""
    run_dir = Path(run_dir)
    state = run_state(run_dir)
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        if state != "new":
            raise RunSettingsError(f"run folder {run_dir} has results but no config.yaml, so its settings cannot be "
                                   "checked; delete it or choose another output folder")
        return state
    try:
        saved = yaml.safe_load(saved_path.read_text()) or {}
    except yaml.YAMLError:
        raise RunSettingsError(f"{saved_path} is not valid YAML; delete the run folder or choose another "
                               "output folder") from None
    try:
        diffs = settings_diff(saved, cfg, ignore)
    except ValueError as e:
        raise RunSettingsError(f"{saved_path} cannot be read as a {type(cfg).__name__} ({e}); delete the run "
                               "folder or choose another output folder") from None
    if diffs:
        shown = ", ".join(f"{k} (folder: {json.dumps(a)}, asked: {json.dumps(b)})" for k, a, b in diffs)
        raise RunSettingsError(f"run folder {run_dir} was made with other settings: {shown}; delete it, choose "
                               "another output folder, or ask for the same settings")
    return state


def train_or_reuse(cfg: TrainConfig, fresh: bool = False, progress: bool = True) -> dict:
    """The notebooks' way to get a run: reuse it if it has finished (its ``eval.json``), resume it
    if it was interrupted after a checkpoint, else train it. ``fresh`` deletes the run folder
    first. A folder made with other settings is refused (``reusable_state``: delete it, pass
    ``fresh=True`` or choose another ``out``). Returns the final metrics."""
    asked = cfg.validate()
    run_dir = default_run_dir(asked)
    if fresh:
        shutil.rmtree(run_dir, ignore_errors=True)
    if reusable_state(run_dir, asked) == "finished":
        print(f"{run_dir} has finished: reusing it")
        return json.loads((run_dir / "eval.json").read_text())
    return trainer(asked, resume="auto", progress=progress).fit()
