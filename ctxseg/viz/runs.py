"""Reading a run folder written by the trainer."""

from __future__ import annotations

import json
from pathlib import Path

import yaml


def load_run(path: str | Path) -> dict:
    """A run folder as a dict: ``name``, ``path``, ``config`` (dict), ``train`` (logged training
    rows), ``evals`` (evaluation rows during and after training) and ``final`` (eval.json, or
    None while the run has not finished)."""
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
