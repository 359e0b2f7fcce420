"""Training-mode fused blocks: batch-statistics BN inside the convs, forward and backward in Triton.

A block is a chain of units ``conv_i -> bn_i`` where each conv reads ``relu(bn_{i-1}(y_{i-1}))``
through its prologue (the activation is never stored), then a tail
``relu(bn_L(y_L) + shortcut)``. Per unit the forward is: conv with the BN-statistics epilogue ->
finalize (batch mean/var, running statistics like nn.BatchNorm2d, scale/shift). Saved for backward:
the block input, the raw conv outputs, the block output and per-channel statistics.

Backward, from the tail down: BN reductions of the ReLU-gated gradient -> BN backward -> for each
conv, wgrad (recomputing its input relu(bn(y)) in the prologue) and dgrad (whose epilogue gates by the
previous ReLU and emits the previous BN's reductions; the first conv's dgrad adds the shortcut's
gradient). The stem is the same chain with one unit and no shortcut.
"""
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from . import _validate as check
from . import kernels
from .kernels import bn as bn_k
from .kernels import conv_bwd


class Shortcut(NamedTuple):
    """kind: "none" (plain net), "identity", "A" (subsample by stride, zero-pad channels) or
    "projection" (conv + bn, a unit of its own on the block input)."""
    kind: str
    stride: int = 1
    conv: Optional[nn.Conv2d] = None
    bn: Optional[nn.BatchNorm2d] = None


def _geometry(conv: nn.Conv2d):
    return conv.stride, conv.padding, conv.dilation, conv.groups


def _batch_stats(bn: nn.BatchNorm2d, conv_out: Tuple):
    """Finalize one BN from the conv's STATS partials: (mean, invstd, scale, shift).

    Running statistics update as nn.BatchNorm2d's do: in training mode, when it tracks them."""
    y, part_mean, part_m2, tile_m = conv_out
    m = y.shape[0] * y.shape[2] * y.shape[3]
    if m <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {y.shape}")
    update = bn.training and bn.track_running_stats and bn.running_mean is not None
    if update and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
    return bn_k.bn_finalize(part_mean, part_m2, tile_m, m, bn.weight, bn.bias,
                            bn.running_mean if update else None, bn.running_var if update else None,
                            bn.num_batches_tracked, bn.momentum, bn.eps)


def _grads(bn: nn.BatchNorm2d, sum_g: Tensor, sum_gx: Tensor):
    """(d gamma, d beta) = (sum g*xhat, sum g), or None for affine=False."""
    if bn.weight is None:
        return None, None
    return sum_gx.to(bn.weight.dtype), sum_g.to(bn.bias.dtype)


class ChainSpec(NamedTuple):
    """units: (conv, bn) pairs in order; recompute_last: do not save the last conv's raw output but
    recompute it in backward from the saved previous one (one more forward conv of the last unit,
    for a 1x1 bottleneck conv3 about 8% of a training step's FLOPs, for less activation memory)."""
    units: Tuple[Tuple[nn.Conv2d, nn.BatchNorm2d], ...]
    shortcut: Shortcut
    recompute_last: bool = False


def _recompute_last(spec: ChainSpec, ys: List[Tensor], stats) -> Tensor:
    """The last unit's raw conv output again: same kernel, same fixed config, same bits as forward."""
    conv = spec.units[-1][0]
    return kernels.conv_bn_act(ys[-1], conv.weight, None, None, *_geometry(conv), prologue=stats[-2][2:],
                               stats=True)[0]


class _TrainChainFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec, x, *params):
        units, shortcut = spec.units, spec.shortcut
        convs = [c for c, _ in units]
        bns = [b for _, b in units]
        weights = params[0::3]
        h, prologue, ys, stats = x, None, [], []
        for conv, bn, w in zip(convs, bns, weights):
            res = kernels.conv_bn_act(h, w, None, None, *_geometry(conv), prologue=prologue, stats=True)
            ys.append(res[0])
            stats.append(_batch_stats(bn, res))
            prologue, h = stats[-1][2:], res[0]
        y_last, (_, _, scale, shift) = ys[-1], stats[-1]
        yd, stats_d = None, None
        if shortcut.kind == "projection":
            res = kernels.conv_bn_act(x, params[3 * len(units)], None, None, *_geometry(shortcut.conv), stats=True)
            yd, stats_d = res[0], _batch_stats(shortcut.bn, res)
            out = bn_k.bn_act(y_last, scale, shift, shortcut=(yd, stats_d[2], stats_d[3]))
        elif shortcut.kind in ("identity", "A"):
            out = bn_k.bn_act(y_last, scale, shift, residual=x[:, :, ::shortcut.stride, ::shortcut.stride])
        else:
            out = bn_k.bn_act(y_last, scale, shift)
        ctx.spec, ctx.stats, ctx.stats_d = spec, stats, stats_d
        ctx.save_for_backward(x, out, yd, *(ys[:-1] if spec.recompute_last else ys))
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        x, out, yd, *ys = ctx.saved_tensors
        spec, stats, stats_d = ctx.spec, ctx.stats, ctx.stats_d
        units, shortcut, n_units = spec.units, spec.shortcut, len(spec.units)
        if spec.recompute_last:
            ys.append(_recompute_last(spec, ys, stats))
        grads: List[Optional[Tensor]] = [None] * (3 * n_units + (3 if yd is not None else 0))

        # Tail: g = dout gated by the block ReLU; BN_L (and the projection's BN) backward.
        mean, invstd = stats[-1][:2]
        if yd is not None:
            sum_g, sum_gx, sum_gxd = bn_k.bn_bwd_reduce(dout, out, ys[-1], mean, invstd, yd, *stats_d[:2])
        else:
            sum_g, sum_gx = bn_k.bn_bwd_reduce(dout, out, ys[-1], mean, invstd)
        last_bn = units[-1][1]
        grads[3 * n_units - 2:3 * n_units] = _grads(last_bn, sum_g, sum_gx)
        dy = bn_k.bn_bwd_apply(dout, out, ys[-1], last_bn.weight, mean, invstd, sum_g, sum_gx)

        for i in range(n_units - 1, -1, -1):
            conv, w = units[i][0], units[i][0].weight
            geo = _geometry(conv)
            prev = stats[i - 1] if i > 0 else None
            conv_in = ys[i - 1] if i > 0 else x
            if ctx.needs_input_grad[2 + 3 * i]:
                grads[3 * i] = conv_bwd.conv_wgrad(dy, conv_in, w, *geo, prologue=None if prev is None else prev[2:])
            if i > 0:
                g, sum_g_i, sum_gx_i = conv_bwd.conv_dgrad(dy, w, conv_in.shape, *geo,
                                                           bn_relu=(conv_in, prev[2], prev[3], prev[0], prev[1]))
                bn_prev = units[i - 1][1]
                grads[3 * i - 2:3 * i] = _grads(bn_prev, sum_g_i, sum_gx_i)
                dy = bn_k.bn_bwd_apply(g, None, conv_in, bn_prev.weight, prev[0], prev[1], sum_g_i, sum_gx_i)
            elif ctx.needs_input_grad[1]:
                residual = (dout, out, shortcut.stride) if shortcut.kind in ("identity", "A") else None
                dx = conv_bwd.conv_dgrad(dy, w, x.shape, *geo, residual=residual)

        if yd is not None:
            bn_d, conv_d = shortcut.bn, shortcut.conv
            grads[3 * n_units + 1:3 * n_units + 3] = _grads(bn_d, sum_g, sum_gxd)
            dyd = bn_k.bn_bwd_apply(dout, out, yd, bn_d.weight, *stats_d[:2], sum_g, sum_gxd)
            if ctx.needs_input_grad[2 + 3 * n_units]:
                grads[3 * n_units] = conv_bwd.conv_wgrad(dyd, x, conv_d.weight, *_geometry(conv_d))
            if ctx.needs_input_grad[1]:
                dx = conv_bwd.conv_dgrad(dyd, conv_d.weight, x.shape, *_geometry(conv_d), residual=(dx, None, 1),
                                         out=dx)
        return (None, dx if ctx.needs_input_grad[1] else None, *grads)


def train_forward(op: str, x: Tensor, units: Sequence[Tuple[nn.Conv2d, nn.BatchNorm2d]], shortcut: Shortcut,
                  recompute_last: bool = False) -> Tensor:
    """Run a training-mode conv/BN chain (a block, or the stem with Shortcut("none")) on the fused kernels."""
    check.floating_input(op, x)
    check.conv_weight(op, "weight", units[0][0].weight, x, units[0][0].groups)
    for conv, _ in units[1:]:
        check.tensor(op, "weight", conv.weight, 4, x.device, x.dtype)
    _check_shortcut_shape(op, x, units, shortcut)
    params: List[Optional[Tensor]] = []
    for conv, bn in list(units) + ([(shortcut.conv, shortcut.bn)] if shortcut.kind == "projection" else []):
        params += [conv.weight, bn.weight, bn.bias]
    spec = ChainSpec(tuple(units), shortcut, recompute_last and len(units) > 1)
    return _TrainChainFn.apply(spec, x, *params)


def _check_shortcut_shape(op: str, x: Tensor, units, shortcut: Shortcut) -> None:
    """The residual must fit the block output, as eager's ``out += identity`` requires."""
    h, w = x.shape[2:]
    for conv, _ in units:
        h = kernels.conv.out_size(h, conv.kernel_size[0], conv.stride[0], conv.padding[0], conv.dilation[0])
        w = kernels.conv.out_size(w, conv.kernel_size[1], conv.stride[1], conv.padding[1], conv.dilation[1])
    out_shape = (x.shape[0], units[-1][0].out_channels, h, w)
    if shortcut.kind in ("identity", "A"):
        check.residual(op, x[:, :, ::shortcut.stride, ::shortcut.stride], x, out_shape)
    elif shortcut.kind == "projection":
        hd = (x.shape[2] - 1) // shortcut.conv.stride[0] + 1
        wd = (x.shape[3] - 1) // shortcut.conv.stride[1] + 1
        if (hd, wd) != (h, w) or shortcut.conv.out_channels != out_shape[1]:
            raise RuntimeError(f"{op}: expected the downsample projection to give the block output's size "
                               f"{list(out_shape)}, but got [{x.shape[0]}, {shortcut.conv.out_channels}, {hd}, {wd}]")
