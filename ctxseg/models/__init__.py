"""The shared segmenter and its building blocks."""

from ctxseg.models.segmenter import STAGE_STRIDES, Head, Segmenter, conv_bn_relu, upsample_to

__all__ = ["Head", "STAGE_STRIDES", "Segmenter", "conv_bn_relu", "upsample_to"]
