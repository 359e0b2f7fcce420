"""Device code: Triton kernels and their launchers (installed as ``fusedres.kernels``)."""
from ._launch import INTERPRETED

if INTERPRETED:  # before any launch: triton < 3.7's interpreter with numpy >= 2.4 (see _interpreter)
    from ._interpreter import patch_scalar_index
    patch_scalar_index()

from .conv import ProjectionShortcut, conv_bn_act, gpu_configs

__all__ = ["INTERPRETED", "ProjectionShortcut", "conv_bn_act", "gpu_configs"]
