"""``convert(model)``: turn the torchvision-shaped residual blocks of any model into fused blocks, in place.

The swap changes each block's class (``block.__class__ = FusedBasicBlock``) rather than building a new
module: the block stays the same object, so its children, parameters, buffers, hooks (and their
removal handles), training flag, any reference the caller holds and every state_dict key and value are
untouched. Only the forward changes.
"""
import warnings
from typing import List, Optional

from torch import nn

from .blocks import FusedBasicBlock, FusedBottleneck, layer_reason, unfusable_reason
from .models import _FusedStemNet
from .reference import BasicBlock, Bottleneck

# The children of torchvision's blocks (``downsample`` too when it is not None).
_STRUCTURE = {
    FusedBasicBlock: {"conv1", "bn1", "conv2", "bn2", "relu"},
    FusedBottleneck: {"conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "relu"},
}


def _twin(module: nn.Module) -> Optional[type]:
    """The fused class for a block named (or derived from) BasicBlock / Bottleneck, else None."""
    name = type(module).__name__
    if name == "BasicBlock" or isinstance(module, BasicBlock):
        return FusedBasicBlock
    if name == "Bottleneck" or isinstance(module, Bottleneck):
        return FusedBottleneck
    return None


def _structure_reason(block: nn.Module, twin: type) -> Optional[str]:
    """Why ``block`` is not shaped like torchvision's block (None when it is)."""
    if not hasattr(block, "downsample"):
        return "it has no downsample attribute (torchvision's blocks have one, possibly None)"
    expected = _STRUCTURE[twin] | ({"downsample"} if block.downsample is not None else set())
    children = {name for name, _ in block.named_children()}
    if children != expected:
        missing, extra = sorted(expected - children), sorted(children - expected)
        return f"its children differ from torchvision's (missing {missing}, unexpected {extra})"
    if type(block.relu) is not nn.ReLU:
        return f"its activation is {type(block.relu).__name__}, not nn.ReLU"
    return None


def _swap_class(block: nn.Module, twin: type) -> Optional[str]:
    """Make ``block`` an instance of ``twin`` in place; why not, when Python refuses (e.g. __slots__)."""
    try:
        block.__class__ = twin
    except TypeError as exc:
        return f"its class cannot be swapped ({exc})"
    if not hasattr(block, "residual"):  # torchvision's blocks always add their shortcut
        block.residual = True
    return None


def convert(model: nn.Module) -> nn.Module:
    """Swap every torchvision-shaped BasicBlock / Bottleneck in ``model`` (``model`` itself included) for its
    fused twin, in place, and return ``model``.

    Blocks are found by duck typing: a class named ``BasicBlock`` / ``Bottleneck`` (or a subclass of
    ``fusedres.reference``'s) with torchvision's children. Blocks that are already fused are left alone;
    blocks the kernels cannot run (another norm layer, an unusual downsample, ...) stay as they are,
    named in one ``UserWarning``. fusedres's own ``ResNet`` / ``CifarResNet`` built with ``fused=False``
    also get their fused stem switched on.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fusedres.convert: expected model to be an nn.Module, but got {type(model).__name__}")
    skipped: List[str] = []
    for name, module in list(model.named_modules()):
        if isinstance(module, _FusedStemNet) and layer_reason(module.conv1, module.bn1) is None:
            module.fused = True  # fusedres's own ResNet / CifarResNet built with fused=False: fuse the stem too
        twin = _twin(module)
        if twin is None or isinstance(module, (FusedBasicBlock, FusedBottleneck)):
            continue
        reason = _structure_reason(module, twin) or unfusable_reason(module)
        if reason is None:
            reason = _swap_class(module, twin)
        if reason is not None:
            skipped.append(f"{name or '<model>'} ({type(module).__name__}: {reason})")
    if skipped:
        warnings.warn(f"fusedres.convert: left {len(skipped)} block(s) unfused, running as before: "
                      + "; ".join(skipped), UserWarning, stacklevel=2)
    return model
