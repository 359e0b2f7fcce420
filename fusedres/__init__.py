"""fusedres: Triton kernels that fuse ResNet convolutions with batch-norm, ReLU and the residual add.

    import fusedres
    model = fusedres.resnet50().eval()          # or fusedres.convert(torchvision_model)
    with torch.inference_mode():
        y = model(x.to(memory_format=torch.channels_last))
"""
from . import functional, ops, reference
from ._dispatch import FusedResFallbackError, FusedResFallbackWarning
from ._precompile import PrecompileReport, precompile
from .blocks import FusedBasicBlock, FusedBottleneck
from .convert import convert, summary
from .models import (
    ResNet,
    cifar_resnet,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
    resnet152,
    resnext50_32x4d,
    wide_resnet50_2,
)
from .reference import PadChannelsShortcut

__version__ = "0.1.0"  # the one version source (pyproject.toml reads it)

__all__ = [
    "FusedBasicBlock", "FusedBottleneck", "PadChannelsShortcut", "ResNet", "convert", "functional", "reference",
    "ops", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "wide_resnet50_2",
    "cifar_resnet", "FusedResFallbackWarning", "FusedResFallbackError", "summary", "precompile", "PrecompileReport",
]
