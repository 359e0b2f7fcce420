"""Training-mode fused blocks, the module side: validate, call fusedres::train_chain, update the BN buffers.

A train-mode block (or the stem) is a conv/BN chain whose forward and backward run on the Triton
kernels behind the custom op ``fusedres::train_chain`` (``fusedres.ops``); the chain math itself is in
``fusedres.chain``. Layering: module (blocks, models) -> this file (validation, buffers) -> op -> chain
math -> launchers -> kernels.
"""
from typing import NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from . import _running, _sync, kernels, ops
from . import _validate as check
from .attention import attention_gate, pooled_bn
from .chain import PROJECTION, RESIDUAL_KINDS, BNState, ChainOutputs, ChainParams, ChainSpec
from .kernels._launch import empty_activation


class Shortcut(NamedTuple):
    """kind: "none" (plain net), "identity", "A" (subsample by stride, zero-pad channels) or
    "projection" (conv + bn, a unit of its own on the block input)."""
    kind: str
    stride: int = 1
    conv: Optional[nn.Conv2d] = None
    bn: Optional[nn.BatchNorm2d] = None


def train_forward(op: str, x: Tensor, units: Sequence[Tuple[nn.Conv2d, nn.BatchNorm2d]], shortcut: Shortcut,
                  recompute_last: bool = False, group: int = _sync.NO_GROUP, activation: str = "relu",
                  drop_path: Optional[nn.Module] = None, attention: Optional[nn.Module] = None) -> Tensor:
    """Run a training-mode conv/BN chain (a block, or the stem with Shortcut("none")) on the fused kernels:
    ``act(attention(bn_L(y_L)) * drop_path + shortcut)``, every fused training path's one route.

    Recompute_last: do not save the last conv's raw output but recompute it in backward from the saved
    previous one, or from the input for a one-unit chain (one more forward conv: for a bottleneck's 1x1
    conv3 about 8% of a training step's FLOPs, for the 7x7 stem about 3%, for less activation memory).
    Running statistics update as nn.BatchNorm2d's do: in training mode, when the BN tracks them.
    group: a fusedres._sync group number to synchronize the batch statistics over (nn.SyncBatchNorm's
    semantics), or NO_GROUP. activation: "relu" or "none" at the end.
    drop_path: stochastic depth (timm's DropPath, active): the module itself draws the per-sample factor
    from PyTorch's RNG as it would for the branch, and the tail kernel applies it.
    attention: an SE / ECA module (``attention.gate_reason`` is None): its gate of the pooled branch scales
    the branch in the tail (``fusedres::attention_tail``)."""
    layers = list(units) + ([(shortcut.conv, shortcut.bn)] if shortcut.kind == PROJECTION else [])
    x, weights = check.chain_input(op, x, [conv.weight for conv, _ in layers], units[0][0].groups)
    out_shape = _check_shapes(op, x, units, shortcut)
    bns = [bn for _, bn in layers]
    _running.settle([t for bn in bns for t in (bn.running_mean, bn.num_batches_tracked) if t is not None])
    states = [BNState.of(bn) for bn in bns]
    counters = [bn.num_batches_tracked for bn, s in zip(bns, states)
                if s.updates and bn.num_batches_tracked is not None]
    if x.shape[0] == 0:
        _running.update(counters, [], [])
        return _empty_batch(x, weights + [t for bn in bns for t in (bn.weight, bn.bias)], out_shape)
    row_scale = None
    if drop_path is not None:  # the factor drop_path(branch) multiplies the branch by, drawn as it would be
        row_scale = drop_path(torch.ones((x.shape[0], 1, 1, 1), device=x.device, dtype=x.dtype)).view(-1)
    tail = "attention" if attention is not None else activation
    params = ChainParams.build(weights, states, row_scale)
    spec = ChainSpec.build([c for c, _ in layers], states, shortcut.kind, shortcut.stride, recompute_last, group, tail)
    res = ChainOutputs.unpack(ops.train_chain(x, *params, *spec), len(layers))
    # the op returns new running statistics (it mutates nothing): into the buffers, with the counts
    _running.update(counters, [t for s in states if s.updates for t in (s.running_mean, s.running_var)],
                    [t for pair in zip(res.running_means, res.running_vars) for t in pair if t is not None])
    if attention is None:
        return res.out
    last, bn = res.stats[len(units) - 1], units[-1][1]
    gate = attention_gate(attention, pooled_bn(res.out, last.mean, last.invstd, bn.weight, bn.bias).to(x.dtype))
    proj = [None] * 5
    if shortcut.kind == PROJECTION:
        proj = [res.yd, res.stats[-1].mean, res.stats[-1].invstd, shortcut.bn.weight, shortcut.bn.bias]
    # the identity shortcut's values come detached: its gradient flows through res.residual_sink (see there)
    residual = x.detach() if shortcut.kind == "identity" else None
    return ops.attention_tail(res.ys[-1], last.mean, last.invstd, bn.weight, bn.bias, gate, row_scale, residual,
                              res.residual_sink, *proj, activation == "relu")


def _empty_batch(x: Tensor, params, out_shape) -> Tensor:
    """nn.BatchNorm2d's empty batch: an empty output, running statistics kept (num_batches_tracked still
    counts the step), and in backward zero gradients for every parameter and an empty one for x. A
    zero-element broadcast of a 0 * sum links the output to them, so autograd gives zeros, not None."""
    link = sum(t.sum() for t in [x, *params] if t is not None and t.requires_grad) * 0
    return empty_activation(x, out_shape) + link


def _check_shapes(op: str, x: Tensor, units, shortcut: Shortcut) -> Tuple[int, int, int, int]:
    """More than one value per BN channel (as nn.BatchNorm2d demands in training: an empty batch is
    fine), and a residual that fits the block output (as eager's ``out += identity`` requires). Returns
    the block output's shape."""
    h, w = x.shape[2:]
    for conv, _ in units:  # the kernel-size error first, as the eval path and eager give it
        h, w = check.output_size(op, torch.empty((x.shape[0], conv.in_channels, h, w), device="meta"), conv.weight,
                                 conv.stride, conv.padding, conv.dilation)
        if x.shape[0] * h * w == 1 or (x.shape[0] and not h * w):  # empty batches are fine, empty images not
            raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                             f"{torch.Size([x.shape[0], conv.out_channels, h, w])}")
    out_shape = (x.shape[0], units[-1][0].out_channels, h, w)
    if shortcut.kind == "identity":
        check.identity_channels(op, x, out_shape[1])
    if shortcut.kind in RESIDUAL_KINDS:
        check.residual(op, x[:, :, ::shortcut.stride, ::shortcut.stride], x, out_shape)
    elif shortcut.kind == PROJECTION:
        hd, wd = (kernels.conv.out_size(size, 1, s, 0, 1) for size, s in zip(x.shape[2:], shortcut.conv.stride))
        if (hd, wd) != (h, w) or shortcut.conv.out_channels != out_shape[1]:
            raise RuntimeError(f"{op}: expected the downsample projection to give the block output's size "
                               f"{list(out_shape)}, but got [{x.shape[0]}, {shortcut.conv.out_channels}, {hd}, {wd}]")
    return out_shape
