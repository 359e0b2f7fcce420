"""Convolution backward: dgrad (kernels/dgrad.py) and wgrad (kernels/wgrad.py), re-exported here."""
from .dgrad import DgradBN, conv_dgrad, conv_dgrad_bn, dgrad_flops, dgrad_phases
from .wgrad import conv_wgrad

__all__ = ["DgradBN", "conv_dgrad", "conv_dgrad_bn", "conv_wgrad", "dgrad_flops", "dgrad_phases"]
