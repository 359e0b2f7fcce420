"""Device code: Triton kernels and their launchers (installed as ``fusedres.kernels``)."""
from ._launch import INTERPRETED
from .conv import ProjectionShortcut, conv_bn_act, gpu_configs

__all__ = ["INTERPRETED", "ProjectionShortcut", "conv_bn_act", "gpu_configs"]
