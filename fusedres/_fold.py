"""Eval BN folded once per module: the per-channel (scale, shift) the eval kernels read, cached on the host.

The eval conv kernel takes plain per-channel vectors (no division or square root on the device). They are
folded from a BN's running statistics (and its conv's bias) with ``functional.bn_scale_shift``'s formula in
float64, rounded once to the epilogue dtype, and cached per BN module until any source tensor changes:

* the key of a cached fold is, per source tensor: the tensor object, its data pointer, its version counter
  (``t._version``), dtype and device. In-place writes (``copy_`` of ``load_state_dict``, an optimizer step,
  the training chain's running-statistics update), new tensors (``.to()``, ``load_state_dict(assign=True)``)
  and ``.data =`` (``.half()`` on parameters) all change it. The cache holds each source's storage, so a freed
  address cannot come back under the same key (``.half().float()``).
* writes through ``.data`` (``bn.weight.data.mul_(3)``) bump a version counter of their own that the
  parameter does not see: ``model.eval()`` / ``model.train()`` drops the folds of the fused modules (the
  blocks and stems call ``invalidate``), so call it after such writes.
* no cache (a fold per call) where a version counter cannot be trusted or read:
  - under ``torch.compile`` the fold is traced as ordinary ops into the graph (dynamo does not guard on
    version counters, so a cache read there could go stale silently; Inductor fuses the fold into one small
    kernel per graph);
  - while a CUDA graph is captured, the fold is captured with the convs, so every replay folds the BN
    tensors it reads at their fixed addresses (no host sync; its few [K] buffers come from the graph's pool
    once, at capture, and no replay allocates);
  - inference tensors (made under ``torch.inference_mode()``) have no version counter.
"""
import weakref
from typing import Dict, NamedTuple, Optional, Tuple

import torch
from torch import Tensor, nn

from .kernels.conv import projection_fold
from .reference import bn_scale_shift_reference


class BNFold(NamedTuple):
    """An eval-mode BatchNorm (and the conv's bias) to fold into the conv's per-channel scale/shift.
    [K] tensors of any floating dtype."""
    running_mean: Tensor
    running_var: Tensor
    weight: Optional[Tensor]      # gamma (None: affine=False)
    bias: Optional[Tensor]        # beta
    eps: float
    conv_bias: Optional[Tensor] = None


def fold(bn: BNFold, dtype: torch.dtype = torch.float32) -> Tuple[Tensor, Tensor]:
    """(scale, shift) of ``bn`` in ``dtype``: computed in float64 (so the IEEE-rounded fp32 of the kernels'
    old in-tile fold is matched or bettered), rounded once; not differentiable (eval-mode BN)."""
    return _cast(_fold64(bn), dtype)


def _fold64(bn: BNFold) -> Tuple[Tensor, Tensor]:
    with torch.no_grad():
        scale, shift = bn_scale_shift_reference(bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
        if bn.conv_bias is not None:
            shift = shift + scale * bn.conv_bias.to(scale.dtype)
    return scale, shift


def _cast(pair, dtype):
    return tuple(t if t.dtype == dtype else t.to(dtype) for t in pair)


# Parameter and buffer names read per launch, and torch's classes that define no class attribute under any of them.
_TENSOR_NAMES = ("weight", "bias", "running_mean", "running_var")
_PLAIN_CLASSES = frozenset(cls for cls in (nn.Conv2d, nn.BatchNorm2d, nn.SyncBatchNorm)
                           if not any(hasattr(cls, name) for name in _TENSOR_NAMES))


def tensor_attr(m: nn.Module, name: str, *default):
    """getattr(m, name) for a parameter or buffer name, ~0.9 us cheaper where it can be: nn.Module.__getattr__ runs
    only after Python's own lookup failed (an AttributeError raised and caught), and for an instance of one of
    _PLAIN_CLASSES that lookup can only find the instance __dict__. So: not in __dict__, then __getattr__'s own order
    (_parameters, then _buffers); anything else (a subclass, a submodule, a missing name) through getattr, with
    ``default`` as getattr's."""
    if type(m) in _PLAIN_CLASSES:
        d = m.__dict__
        if name not in d:
            params = d["_parameters"]
            if name in params:
                return params[name]
            buffers = d["_buffers"]
            if name in buffers:
                return buffers[name]
    return getattr(m, name, *default)


def of_module(conv: nn.Module, bn: nn.Module) -> BNFold:
    """A conv -> BN pair's BNFold: the modules' own tensors."""
    return BNFold(tensor_attr(bn, "running_mean"), tensor_attr(bn, "running_var"), tensor_attr(bn, "weight"),
                  tensor_attr(bn, "bias"), bn.eps, tensor_attr(conv, "bias", None))


class _Entry(NamedTuple):
    key: tuple     # per source (id, data_ptr, _version, dtype, device) or None, then the eps: when folded
    held: tuple    # the sources and their storages: no id or freed address returns under the same key
    value: tuple   # the folded tensors


# BN module -> {(kind, dtype): _Entry}. Weak keys: a collected module drops its folds; nothing is stored on
# the module, so state_dict, pickling and deepcopy do not see the cache.
_CACHE: "weakref.WeakKeyDictionary[nn.Module, Dict[tuple, _Entry]]" = weakref.WeakKeyDictionary()


def _cached(bn: nn.Module, name: tuple, sources: tuple, eps: tuple, compute):
    # one pass over the sources (per launch): uncachable under compile, for inference tensors, during a capture
    if torch.compiler.is_compiling():
        return compute()
    cuda = False
    for t in sources:
        if t is not None:
            if t.is_inference():  # no version counter to read
                return compute()
            cuda = cuda or t.is_cuda
    if cuda and torch.cuda.is_current_stream_capturing():
        return compute()
    key = tuple([None if t is None else (id(t), t.data_ptr(), t._version, t.dtype, t.device) for t in sources]) + eps
    entries = _CACHE.get(bn)
    if entries is None:
        entries = _CACHE[bn] = {}
    entry = entries.get(name)
    if entry is None or entry.key != key:
        held = tuple((t, t.untyped_storage()) for t in sources if t is not None)
        entry = entries[name] = _Entry(key, held, compute())
    return entry.value


def _sources(b: BNFold) -> tuple:
    return (b.running_mean, b.running_var, b.weight, b.bias, b.conv_bias)


def eval_affine(conv: nn.Module, bn: nn.Module, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """The cached (scale, shift) in ``dtype`` of an eval conv -> BN pair (see the module docstring)."""
    # of_module's tensors in _sources' order, its BNFold built only to refold (per launch otherwise)
    sources = (tensor_attr(bn, "running_mean"), tensor_attr(bn, "running_var"), tensor_attr(bn, "weight"),
               tensor_attr(bn, "bias"), tensor_attr(conv, "bias", None))
    eps = bn.eps
    return _cached(bn, ("affine", dtype), sources, (eps,), lambda: fold(BNFold(*sources[:4], eps, sources[4]), dtype))


def eval_projection(conv: nn.Module, bn: nn.Module, conv_d: nn.Module, bn_d: nn.Module,
                    dtype: torch.dtype) -> Tensor:
    """The cached projection epilogue ([4, K], ``kernels.conv.projection_fold``) in ``dtype`` of a block's last
    conv -> BN pair with its projection shortcut's conv -> BN pair folded in."""
    b, d = of_module(conv, bn), of_module(conv_d, bn_d)
    return _cached(bn, ("projection", dtype), _sources(b) + _sources(d), (b.eps, d.eps),
                   lambda: projection_fold(*_fold64(b), *_fold64(d), dtype))


def invalidate(module: nn.Module) -> None:
    """Drop the cached folds of every BN in ``module`` (after writes through ``.data``; train()/eval() call it)."""
    for m in module.modules():
        _CACHE.pop(m, None)
