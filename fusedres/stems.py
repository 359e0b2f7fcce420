"""Fused ResNet stems for ``convert()``: torchvision's ``conv1 -> bn1 -> relu`` and timm's plain 7x7 and
deep / deep_tiered stems (``conv1`` = Sequential(conv, BN, act, conv, BN, act, conv), then ``bn1`` / ``act1``).

A stem is a chain of conv -> BN -> ReLU units with no shortcut: in eval one ``conv_bn_act`` launch per
unit (BN folded), in training the batch-statistics chain of ``fusedres.training`` (forward and backward
in Triton, running statistics and SyncBatchNorm as the blocks). ``convert()`` swaps the model's class for a
subclass (cached per class) that overrides only the method holding the stem (torchvision's
``_forward_impl``, timm's ``forward_features``), so every child, parameter, buffer and state_dict key stays.
``fusedres._pickle`` makes that subclass picklable (``torch.save(model)``, ``copy.deepcopy``).
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from . import _dispatch, _fold
from . import _validate as check
from ._pickle import fused_class
from .blocks import eval_conv, layer_reason, pairs_reason, sync_group, uses_batch_stats
from .training import Shortcut, train_forward

Units = List[Tuple[nn.Conv2d, nn.Module]]


def run_stem(what: str, x: Tensor, units: Units) -> Optional[Tensor]:
    """relu(bn(conv(...))) for each unit on the fused kernels; None (announced) when they cannot run it."""
    layers = pairs_reason(units)
    reason = _dispatch.unsupported_device_reason(x.device) or layers
    modes = {uses_batch_stats(bn) for _, bn in units}
    if reason is None and len(modes) > 1:
        reason = "its BatchNorm layers mix batch statistics and running statistics (train/eval modes)"
    if reason is None and modes == {True}:
        group = sync_group([bn for _, bn in units])
        if not isinstance(group, str):  # a one-conv stem recomputes its output in backward: 3 input channels
            return train_forward(what, x, units, Shortcut("none"), recompute_last=len(units) == 1, group=group)
        reason = group
    if reason is None:
        out = x
        for conv, bn in units:  # each BN folded once (fusedres._fold)
            out = eval_conv(out, conv, bn)
        return out
    if layers is None:  # bad input: the fused path's argument error, on every machine (see blocks' _fall_back)
        check.chain_input(what, x, [conv.weight for conv, _ in units], units[0][0].groups)
    _dispatch.fallback(what, reason)
    return None


def _is_relu(m) -> bool:
    return type(m) is nn.ReLU


def stem_units(model: nn.Module, act: str) -> Tuple[Optional[Units], str]:
    """(the stem's conv/BN units, "") when ``model.conv1 -> bn1 -> act`` is a fusable stem, else (None, why)."""
    conv1, bn1, a = getattr(model, "conv1", None), getattr(model, "bn1", None), getattr(model, act, None)
    if not _is_relu(a):
        return None, f"its stem activation {act} is {type(a).__name__}, not nn.ReLU"
    if isinstance(conv1, nn.Sequential):  # timm's deep / deep_tiered stem
        layers = list(conv1)
        kinds = [type(m) for m in layers]
        if len(layers) != 7 or kinds[0::3] != [nn.Conv2d] * 3 or not all(_is_relu(m) for m in layers[2::3]):
            return None, ("its stem conv1 is a Sequential that is not timm's deep stem "
                          "(conv, BN, ReLU, conv, BN, ReLU, conv)")
        units = [(layers[0], layers[1]), (layers[3], layers[4]), (layers[6], bn1)]
    else:
        units = [(conv1, bn1)]
    for conv, bn in units:
        reason = layer_reason(conv, bn)
        if reason is not None:
            return None, f"its stem: {reason}"
    return units, ""


class _StemMixin:
    """Shared by the stem subclasses: the fused stem, or the model's own eager stem when it falls back."""

    _stem_act = "relu"

    def train(self, mode: bool = True):
        _fold.invalidate(self)  # eval() refolds the stem's BNs (see fusedres._fold)
        return super().train(mode)

    def _fused_stem(self, x: Tensor) -> Tensor:
        units, _ = stem_units(self, self._stem_act)
        out = None
        if units is not None and isinstance(x, Tensor):
            out = run_stem(f"{type(self).__name__} stem", x, units)
        if out is None:
            out = getattr(self, self._stem_act)(self.bn1(self.conv1(x)))
        return out


class TorchvisionStem(_StemMixin):
    """torchvision.models.ResNet with its stem fused (its ``_forward_impl``, stem replaced)."""

    def _forward_impl(self, x: Tensor) -> Tensor:
        x = self.maxpool(self._fused_stem(x))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class TimmStem(_StemMixin):
    """timm.models.resnet.ResNet with its stem fused (its ``forward_features``, stem replaced)."""

    _stem_act = "act1"

    def forward_features(self, x: Tensor) -> Tensor:
        if getattr(self, "grad_checkpointing", False):  # timm's checkpoint_seq path: left as timm runs it
            return super().forward_features(x)
        x = self.maxpool(self._fused_stem(x))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


_RESNET_CHILDREN = ("conv1", "bn1", "maxpool", "layer1", "layer2", "layer3", "layer4", "fc")


def _defined_by(cls: type, method: str) -> Optional[type]:
    return next((c for c in cls.__mro__ if method in vars(c)), None)


def stem_kind(model: nn.Module) -> Optional[type]:
    """TorchvisionStem / TimmStem when ``model`` is shaped like that library's ResNet (its stem method
    defined by a class named ResNet, its children by that name), else None."""
    if isinstance(model, _StemMixin) or not all(hasattr(model, n) for n in _RESNET_CHILDREN):
        return None
    tv, timm = _defined_by(type(model), "_forward_impl"), _defined_by(type(model), "forward_features")
    if tv is not None and tv.__name__ == "ResNet" and hasattr(model, "relu"):
        return TorchvisionStem
    if timm is not None and timm.__name__ == "ResNet" and hasattr(model, "act1"):
        return TimmStem
    return None


def swap_stem(model: nn.Module, mixin: type) -> Optional[str]:
    """Give ``model`` the fused stem in place (a cached subclass of its class); why not, when it cannot."""
    units, reason = stem_units(model, mixin._stem_act)
    if units is None:
        return reason
    cls = type(model)
    new = fused_class(mixin, cls, f"FusedStem{cls.__name__}", {"__module__": __name__})
    try:
        model.__class__ = new
    except TypeError as exc:
        return f"its class cannot be swapped ({exc})"
    return None
