"""Device code: Triton kernels and their launchers (installed as ``fusedres.kernels``)."""
from ._launch import INTERPRETED
from .conv import BNFold, ProjectionShortcut, conv_bn_act, gpu_configs

__all__ = ["INTERPRETED", "BNFold", "ProjectionShortcut", "conv_bn_act", "gpu_configs"]
