"""Convolution backward: dgrad (kernels/dgrad.py) and wgrad (kernels/wgrad.py), re-exported here."""
from .dgrad import conv_dgrad, dgrad_flops, dgrad_phases
from .wgrad import conv_wgrad

__all__ = ["conv_dgrad", "conv_wgrad", "dgrad_flops", "dgrad_phases"]
