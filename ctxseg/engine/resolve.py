"""Resolving a config: the automatic values made explicit for the machine a run starts on.

The config itself stays plain data (``ctxseg.config``); what needs the engine, the models, the CPU
count or torchrun's environment lives here, with the code that builds a run. Training stores the
resolved config, so a run never depends on these rules again.
"""

from __future__ import annotations

import dataclasses

from ctxseg.config import TrainConfig
from ctxseg.engine.distributed import (
    default_num_workers,
    device_type,
    resolve_gather_contrast,
    resolve_sync_bn,
    world_size_from_env,
)
from ctxseg.models.pretrained import PACKAGED, input_normalization


def resolve_config(cfg: TrainConfig) -> TrainConfig:
    """A copy of ``cfg`` with the automatic values made explicit: ``pretrained`` None -> whether
    the encoder's ImageNet weights ship with ctxseg; ``norm_mean`` / ``norm_std`` None -> the
    weights' normalisation; ``num_workers`` None -> ``default_num_workers()`` for this machine and
    the processes torchrun starts on it; ``sync_bn`` -> whether it applies (``resolve_sync_bn``: the
    device ``device`` names and torchrun's WORLD_SIZE); ``gather_contrast`` None -> whether torchrun
    started several processes (``resolve_gather_contrast``). A resolved config resolves to itself."""
    if cfg.num_workers is None:
        cfg = dataclasses.replace(cfg, num_workers=default_num_workers())
    sync_bn = resolve_sync_bn(cfg.sync_bn, world_size_from_env(), device_type(cfg.device))
    if cfg.sync_bn is not sync_bn:
        cfg = dataclasses.replace(cfg, sync_bn=sync_bn)
    gather = resolve_gather_contrast(cfg.gather_contrast, world_size_from_env())
    if cfg.gather_contrast is not gather:
        cfg = dataclasses.replace(cfg, gather_contrast=gather)
    if cfg.pretrained is None:
        cfg = dataclasses.replace(cfg, pretrained=cfg.encoder in PACKAGED)
    if cfg.norm_mean is None or cfg.norm_std is None:
        mean, std = input_normalization(cfg.encoder, cfg.pretrained)
        cfg = dataclasses.replace(cfg, norm_mean=cfg.norm_mean or mean, norm_std=cfg.norm_std or std)
    return cfg
