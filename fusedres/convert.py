"""``convert(model)``: turn the torchvision-shaped residual blocks of any model into fused blocks, in place.

torchvision's and timm's ResNet stems and timm's blocks are fused too (``fusedres.stems``,
``fusedres.timm_blocks``); ``summary(model)`` prints, per block and stem, what runs fused.

The swap changes each block's class (``block.__class__ = FusedBasicBlock``) rather than building a new
module: the block stays the same object, so its children, parameters, buffers, hooks (and their
removal handles), training flag, any reference the caller holds and every state_dict key and value are
untouched. Only the forward changes.
"""
import sys
import warnings
from typing import List, Optional, Set, Tuple

from torch import nn

from . import _running
from .blocks import FusedBasicBlock, FusedBottleneck, layer_reason, unfusable_reason
from .models import _FusedStemNet
from .reference import BasicBlock, Bottleneck
from .stems import _StemMixin, stem_kind, stem_units, swap_stem
from .timm_blocks import _TimmBlockMixin, eval_launches, is_timm_block, swap_timm_block, timm_block_reason

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
    """Fuse, in place, every torchvision- or timm-shaped BasicBlock / Bottleneck in ``model`` (``model``
    itself included) and the stem of a torchvision / timm / fusedres ResNet, and return ``model``.

    Blocks are found by duck typing: a class named ``BasicBlock`` / ``Bottleneck`` (or a subclass of
    ``fusedres.reference``'s) with torchvision's children, or timm's (``act1``, ``aa``, ``se``, ...).
    Blocks that are already fused are left alone. Whatever the kernels cannot run (another norm layer or
    activation, DropBlock, anti-aliasing, an unusual downsample, ...) stays as it is, and one
    ``UserWarning`` names every block and stem left unfused and every conv / BN layer that stays eager.
    ``fusedres.summary(model)`` shows the result block by block.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fusedres.convert: expected model to be an nn.Module, but got {type(model).__name__}")
    skipped: List[str] = []
    for name, module in list(model.named_modules()):
        where = name or "<model>"
        if isinstance(module, _FusedStemNet):
            if layer_reason(module.conv1, module.bn1) is None:
                module.fused = True  # fusedres's own ResNet / CifarResNet built with fused=False
        elif stem_kind(module) is not None:
            reason = swap_stem(module, stem_kind(module))
            if reason is not None:
                skipped.append(f"{where} stem ({type(module).__name__}: {reason})")
        if is_timm_block(module):
            reason = swap_timm_block(module)
            if reason is not None:
                skipped.append(f"{where} ({type(module).__name__}: {reason})")
            continue
        twin = _twin(module)
        if twin is None or isinstance(module, (FusedBasicBlock, FusedBottleneck, _TimmBlockMixin)):
            continue
        reason = _structure_reason(module, twin) or unfusable_reason(module)
        if reason is None:
            reason = _swap_class(module, twin)
        if reason is not None:
            skipped.append(f"{where} ({type(module).__name__}: {reason})")
    _running.install(model)  # running statistics written once per call (fusedres._running)
    eager = eager_layers(model)
    if skipped or eager:
        parts = [f"left {len(skipped)} block(s) / stem(s) unfused, running as before: " + "; ".join(skipped)] \
            if skipped else []
        if eager:
            parts.append(f"{len(eager)} conv / BatchNorm layer(s) stay eager: " + ", ".join(eager))
        warnings.warn("fusedres.convert: " + ". ".join(parts), UserWarning, stacklevel=2)
    return model


def _is_fused_block(module: nn.Module) -> bool:
    return isinstance(module, (FusedBasicBlock, FusedBottleneck, _TimmBlockMixin))


def _fused_layers(model: nn.Module) -> Set[int]:
    """ids of the conv / BN modules that fused blocks and stems run on the kernels (attention modules: not)."""
    covered: Set[int] = set()
    for module in model.modules():
        if _is_fused_block(module):
            attn = getattr(module, "se", None)
            skip = {id(m) for m in attn.modules()} if isinstance(attn, nn.Module) else set()
            covered |= {id(m) for m in module.modules() if id(m) not in skip}
        elif isinstance(module, _StemMixin):
            units, _ = stem_units(module, module._stem_act)
            covered |= {id(m) for unit in (units or []) for m in unit}
        elif isinstance(module, _FusedStemNet) and module.fused:
            covered |= {id(module.conv1), id(module.bn1)}
    return covered


_CONV_NORM = (nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def eager_layers(model: nn.Module) -> List[str]:
    """The names of the conv / BatchNorm layers of ``model`` that no fused block or stem runs."""
    covered = _fused_layers(model)
    return [name or "<model>" for name, m in model.named_modules()
            if isinstance(m, _CONV_NORM) and id(m) not in covered]


def _block_line(module: nn.Module) -> Optional[Tuple[str, str]]:
    """(status, detail) for a block or stem, None for other modules."""
    if isinstance(module, _StemMixin) or (isinstance(module, _FusedStemNet) and module.fused):
        units, reason = (stem_units(module, module._stem_act) if isinstance(module, _StemMixin)
                         else ([(module.conv1, module.bn1)], layer_reason(module.conv1, module.bn1)))
        if units is None or (reason and not isinstance(module, _StemMixin)):
            return "stem eager", reason
        return "stem fused", f"{len(units)} launch(es) (eval), conv+BN+ReLU x{len(units)}"
    if isinstance(module, _FusedStemNet) or stem_kind(module) is not None:
        return "stem eager", "not converted (call fusedres.convert)" if not isinstance(module, _FusedStemNet) \
            else "fused=False (call fusedres.convert)"
    if isinstance(module, _TimmBlockMixin):
        reason = timm_block_reason(module)
        if reason:
            return "eager", reason
        n, eager = eval_launches(module)
        return "fused", f"{n} launch(es) (eval)" + (f"; eager: {eager}" if eager else "")
    if isinstance(module, (FusedBasicBlock, FusedBottleneck)):
        reason = unfusable_reason(module)
        return ("eager", reason) if reason else ("fused", f"{len(module._units_names)} launch(es) (eval)")
    if is_timm_block(module):
        return "eager", timm_block_reason(module) or "not converted (call fusedres.convert)"
    twin = _twin(module)
    if twin is not None:
        return "eager", _structure_reason(module, twin) or unfusable_reason(module) or \
            "not converted (call fusedres.convert)"
    return None


def summary(model: nn.Module, file=None) -> str:
    """One line per block and stem of ``model``: fused or not, why not, fused launches per eval forward;
    then the conv / BN layers that stay eager. Printed to ``file`` (default sys.stdout) and returned."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fusedres.summary: expected model to be an nn.Module, but got {type(model).__name__}")
    lines, fused, total = [], 0, 0
    for name, module in model.named_modules():
        line = _block_line(module)
        if line is None:
            continue
        total += 1
        fused += line[0] != "eager" and line[0] != "stem eager"
        lines.append(f"{name or '<model>':<24} {type(module).__name__:<26} {line[0]:<13} {line[1]}")
    eager = eager_layers(model)
    lines.append(f"{fused} of {total} blocks / stems fused; {len(eager)} conv / BN layer(s) eager"
                 + (": " + ", ".join(eager) if eager else ""))
    text = "\n".join(lines)
    print(text, file=file if file is not None else sys.stdout)
    return text
