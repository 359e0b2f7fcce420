"""The fused ops as functions on tensors.

``conv_bn_act`` is the whole inference-time fusion in one launch::

    relu?( scale * conv(input, weight) + shift
           + residual                                            (optional; fewer channels = zero-padded)
           + shortcut_scale * conv1x1(shortcut_input, shortcut_weight, stride=shortcut_stride)
             + shortcut_shift )                                  (optional projection shortcut)

``bn_scale_shift`` folds an eval-mode ``nn.BatchNorm2d`` (and an optional conv bias) into scale/shift;
``bn=BNFold(...)`` folds the BN's own tensors on every call (a few [K] ops; the fused modules fold once and
cache, ``fusedres._fold``, and pass scale/shift).
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import (
    _dispatch,
    _fold,
    ops,  # noqa: F401  (registers torch.ops.fusedres.*)
)
from . import _validate as check
from ._autocast import cast_for_autocast
from ._fold import BNFold
from .kernels._launch import stats_dtype
from .reference import conv_bn_act_reference

_OP = "fusedres.functional.conv_bn_act"


def bn_scale_shift(running_mean: Tensor, running_var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                   eps: float, conv_bias: Optional[Tensor] = None, dtype: torch.dtype = torch.float32
                   ) -> Tuple[Tensor, Tensor]:
    """Eval-mode BN(conv(x) + conv_bias) as ``scale * conv(x) + shift``, per channel, in ``dtype`` (fp32):
    computed in float64, rounded once (``fusedres._fold.fold``, what the fused modules cache)."""
    return _fold.fold(BNFold(running_mean, running_var, weight, bias, eps, conv_bias), dtype)


def conv_bn_act(input: Tensor, weight: Tensor, scale: Optional[Tensor] = None, shift: Optional[Tensor] = None,
                stride=1, padding=0, dilation=1, groups: int = 1, *, residual: Optional[Tensor] = None,
                relu: bool = False, shortcut_input: Optional[Tensor] = None,
                shortcut_weight: Optional[Tensor] = None, shortcut_scale: Optional[Tensor] = None,
                shortcut_shift: Optional[Tensor] = None, shortcut_stride: int = 1, bn: Optional[BNFold] = None,
                shortcut_bn: Optional[BNFold] = None, shortcut_fold: Optional[Tensor] = None) -> Tensor:
    """Fused convolution + per-channel affine (folded BN) + residual/shortcut + ReLU. See module doc.

    ``scale``/``shift`` default to 1 and 0 (a plain conv). They and the shortcut's are applied in fp32
    (fp64 for fp64 input). ``bn`` (a ``BNFold`` of an eval BN's running mean, running var, weight, bias, eps
    and the conv's bias) replaces scale/shift, folded on the host with ``bn_scale_shift``'s formula in
    float64; ``shortcut_bn`` likewise replaces shortcut_scale/shortcut_shift. ``shortcut_fold`` ([4, K],
    ``fusedres.kernels.conv.projection_fold`` of the four) replaces scale/shift and the shortcut's pair, so
    the launch does no math on them. The output has input's dtype (the autocast dtype under torch.autocast)
    and memory format.
    """
    x = check.floating_input(_OP, input)
    x, weight, residual, shortcut_input, shortcut_weight = cast_for_autocast(x, weight, residual, shortcut_input,
                                                                             shortcut_weight)
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"{_OP}: expected groups to be a positive int, but got {groups!r}")
    stride = check.pair(_OP, "stride", stride, 1)
    padding = check.pair(_OP, "padding", padding, 0)
    dilation = check.pair(_OP, "dilation", dilation, 1)
    check.conv_weight(_OP, "weight", weight, x, groups)
    k = weight.shape[0]
    epi_dtype = stats_dtype(x)
    if bn is not None:  # (the checks of a given one; per launch the modules pass scale/shift)
        bn = _checked_bn(bn, "bn", "scale", scale, shift, k, x.device)
    if scale is not None:
        check.per_channel(_OP, "scale", scale, k, x.device)
    if shift is not None:
        check.per_channel(_OP, "shift", shift, k, x.device)
    p, q = check.output_size(_OP, x, weight, stride, padding, dilation)
    if residual is not None:
        check.residual(_OP, residual, x, (x.shape[0], k, p, q))

    if shortcut_bn is not None:
        shortcut_bn = _checked_bn(shortcut_bn, "shortcut_bn", "shortcut_scale", shortcut_scale, shortcut_shift, k,
                                  x.device)
    if shortcut_fold is not None:
        _check_fold(shortcut_fold, k, x.device, scale, shift, bn, shortcut_scale, shortcut_shift, shortcut_bn)
    given = shortcut_fold if shortcut_fold is not None else shortcut_bn  # either one stands for the pair
    shortcut_parts = (shortcut_input, shortcut_weight, *((given, given) if given is not None else
                                                         (shortcut_scale, shortcut_shift)))
    shortcut = None
    if not (shortcut_parts[0] is None and shortcut_parts[1] is None and shortcut_parts[2] is None
            and shortcut_parts[3] is None):  # (any(...) of a generator, written out: per launch)
        if any(t is None for t in shortcut_parts):
            names = ("shortcut_input", "shortcut_weight", "shortcut_scale", "shortcut_shift")
            raise ValueError(f"{_OP}: expected shortcut_input, shortcut_weight, shortcut_scale and shortcut_shift "
                             f"to be given together, but got None for "
                             f"{[n for n, t in zip(names, shortcut_parts) if t is None]}")
        sd = check.pair(_OP, "shortcut_stride", shortcut_stride, 1)
        if sd[0] != sd[1]:
            raise ValueError(f"{_OP}: expected shortcut_stride to be equal along both axes, "
                             f"but got {shortcut_stride!r}")
        check.tensor(_OP, "shortcut_input", shortcut_input, 4, x.device, x.dtype)
        check.conv_weight(_OP, "shortcut_weight", shortcut_weight, shortcut_input, 1, "shortcut_input")
        if shortcut_weight.shape[0] != k or shortcut_weight.shape[2:] != (1, 1):
            raise ValueError(f"{_OP}: expected shortcut_weight of size [{k}, {shortcut_input.shape[1]}, 1, 1] "
                             f"(a 1x1 projection to the output's channels), but got {list(shortcut_weight.shape)}")
        pd, qd = check.output_size(_OP, shortcut_input, shortcut_weight, sd, (0, 0), (1, 1))
        if (pd, qd) != (p, q):
            raise RuntimeError(f"{_OP}: expected shortcut_input to give a {p}x{q} output at stride {sd[0]}, but got "
                               f"shortcut_input of size {list(shortcut_input.shape)} giving {pd}x{qd}")
        if given is None:
            check.per_channel(_OP, "shortcut_scale", shortcut_scale, k, x.device)
            check.per_channel(_OP, "shortcut_shift", shortcut_shift, k, x.device)
        shortcut = sd[0]

    if bn is not None:  # per call: the fused modules pass their cached fold as scale/shift instead
        scale, shift = _fold.fold(bn, epi_dtype)
    if shortcut_bn is not None:
        shortcut_scale, shortcut_shift = _fold.fold(shortcut_bn, epi_dtype)
    reason = _dispatch.unsupported_device_reason(x.device)
    if reason is not None:
        _dispatch.fallback(_OP, reason)
        if shortcut_fold is not None:  # mult * (ratio * acc + offset + live * acc_d)
            ratio, offset, mult, live = shortcut_fold.to(epi_dtype)
            scale, shift, shortcut_scale, shortcut_shift = mult * ratio, mult * offset, mult * live, 0 * mult
        scale = torch.ones(k, device=x.device, dtype=epi_dtype) if scale is None else scale
        shift = torch.zeros(k, device=x.device, dtype=epi_dtype) if shift is None else shift
        ref_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        out = conv_bn_act_reference(x, weight, scale, shift, stride, padding, dilation, groups, residual, relu,
                                    shortcut_input, shortcut_weight, shortcut_scale, shortcut_shift,
                                    shortcut_stride, dtype=ref_dtype)
        return out.to(x.dtype)

    # The kernel reads per-channel vectors at stride 1 in the epilogue dtype: views (e.g. t[::2]) become
    # dense K-element copies (none for the modules' cached folds, already dense in that dtype).
    scale, shift = _dense(scale, epi_dtype), _dense(shift, epi_dtype)
    if shortcut is not None:  # (all None without a shortcut)
        shortcut_scale, shortcut_shift = _dense(shortcut_scale, epi_dtype), _dense(shortcut_shift, epi_dtype)
        shortcut_fold = _dense(shortcut_fold, epi_dtype)
    # The custom op fusedres::conv_bn_act (fusedres.ops): traceable by torch.compile / export; its
    # backward raises (eval-mode BN is folded), so nothing is silently non-differentiable.
    return torch.ops.fusedres.conv_bn_act(x, weight, scale, shift, list(stride), list(padding), list(dilation),
                                          groups, residual, relu, shortcut_input, shortcut_weight, shortcut_scale,
                                          shortcut_shift, shortcut if shortcut is not None else 1, shortcut_fold)


def _dense(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    if t is None or (t.dtype == dtype and t.is_contiguous()):
        return t  # the modules' cached folds: no aten call per launch
    return t.to(dtype).contiguous()


def _check_fold(fold: Tensor, k: int, device, *others) -> None:
    """shortcut_fold: a floating [4, K] tensor on the input's device, given instead of the four affines."""
    if any(t is not None for t in others):
        raise ValueError(f"{_OP}: expected either shortcut_fold or scale/shift/bn and the shortcut's scale/shift/bn, "
                         f"but got both")
    if not isinstance(fold, Tensor) or tuple(fold.shape) != (4, k) or fold.device != device \
            or not fold.is_floating_point():
        what = f"{type(fold).__name__}" if not isinstance(fold, Tensor) else \
            f"a {fold.dtype} tensor of size {list(fold.shape)} on {fold.device}"
        raise ValueError(f"{_OP}: expected shortcut_fold to be a floating [4, {k}] tensor on {device} "
                         f"(kernels.conv.projection_fold), but got {what}")


def _checked_bn(bn, name: str, scale_name: str, scale, shift, k: int, device) -> Optional[BNFold]:
    """A BNFold argument checked like scale/shift (one element per output channel, same device), given
    instead of the scale/shift pair."""
    if bn is None:
        return None
    if not isinstance(bn, BNFold):
        raise TypeError(f"{_OP}: expected {name} to be a fusedres.kernels.BNFold, but got {type(bn).__name__}")
    if scale is not None or shift is not None:
        raise ValueError(f"{_OP}: expected either {name} or {scale_name}/{scale_name.replace('scale', 'shift')}, "
                         f"but got both")
    for field in ("running_mean", "running_var", "weight", "bias", "conv_bias"):
        t = getattr(bn, field)
        if t is not None or field.startswith("running"):
            check.per_channel(_OP, f"{name}.{field}", t, k, device)
    if not isinstance(bn.eps, (int, float)) or isinstance(bn.eps, bool) or bn.eps < 0:
        raise ValueError(f"{_OP}: expected {name}.eps to be a float >= 0, but got {bn.eps!r}")
    return bn
