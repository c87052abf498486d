"""Methods: name -> class. Adding a method is one module here and one line in ``METHODS``."""

from __future__ import annotations

from ctxseg.methods.base import Method, cross_entropy
from ctxseg.methods.ce import CEConfig, CrossEntropy
from ctxseg.methods.contextrast import Contextrast, ContextrastConfig
from ctxseg.methods.dscnet import DSCNet, DSCNetConfig
from ctxseg.methods.pixel_contrast import PixelContrast, PixelContrastConfig
from ctxseg.methods.wsss import WSSSCam, WSSSConfig

METHODS: dict[str, type[Method]] = {
    "ce": CrossEntropy,
    "pixel_contrast": PixelContrast,
    "contextrast": Contextrast,
    "wsss_cam": WSSSCam,
    "dscnet": DSCNet,
}


def get_method(name: str) -> type[Method]:
    """The method class registered as ``name``."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name]


__all__ = [
    "CEConfig", "Contextrast", "ContextrastConfig", "CrossEntropy", "DSCNet", "DSCNetConfig", "METHODS", "Method",
    "PixelContrast", "PixelContrastConfig", "WSSSCam", "WSSSConfig", "cross_entropy", "get_method",
]
