"""Training-mode fused blocks: batch-statistics BN inside the convs, forward and backward in Triton.

A block is a chain of units ``conv_i -> bn_i`` where each conv reads ``relu(bn_{i-1}(y_{i-1}))``
through its prologue (the activation is never stored), then a tail
``relu(bn_L(y_L) + shortcut)``. Per unit the forward is: conv with the BN-statistics epilogue ->
finalize (batch mean/var, running statistics like nn.BatchNorm2d, scale/shift). Saved for backward:
the block input, the raw conv outputs, the block output and per-channel statistics.

The kernels run behind the custom ops of ``fusedres.ops`` (fusedres::train_chain and its backward),
whose bodies are ``chain_forward`` / ``chain_backward`` below; ``train_forward`` is the module side.

Backward, from the tail down: BN reductions of the ReLU-gated gradient -> BN backward -> for each
conv, wgrad (recomputing its input relu(bn(y)) in the prologue) and dgrad (whose epilogue gates by the
previous ReLU and emits the previous BN's reductions; the first conv's dgrad adds the shortcut's
gradient). The stem is the same chain with one unit and no shortcut.
"""
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from . import _validate as check
from . import kernels
from . import _sync
from ._autocast import cast_for_autocast
from .kernels import bn as bn_k
from .kernels import conv_bwd


class Shortcut(NamedTuple):
    """kind: "none" (plain net), "identity", "A" (subsample by stride, zero-pad channels) or
    "projection" (conv + bn, a unit of its own on the block input)."""
    kind: str
    stride: int = 1
    conv: Optional[nn.Conv2d] = None
    bn: Optional[nn.BatchNorm2d] = None


# A chain as the custom ops see it (tensors, lists and numbers only, no modules):
#   layers: the units' convs in order, then the projection shortcut's conv when there is one;
#   geometry: 7 ints per layer: stride h/w, padding h/w, dilation h/w, groups;
#   momentums: per BN, -1.0 for momentum=None (cumulative average over num_batches_tracked);
#   running means/vars None: batch statistics without an update (eval without running stats,
#   track_running_stats=False).
# train_chain returns [out, yd | empty, *saved raw conv outputs, then per BN: mean, invstd, scale,
# shift, new running_mean | empty, new running_var | empty]; the BN outputs are new tensors, the
# caller copies them into the module's buffers.
STATS_PER_BN = 6
PROJECTION = "projection"


def geometry_of(conv: nn.Conv2d) -> List[int]:
    return [*conv.stride, *conv.padding, *conv.dilation, conv.groups]


def unpack_geometry(geometry: Sequence[int], i: int):
    g = geometry[7 * i:7 * i + 7]
    return (g[0], g[1]), (g[2], g[3]), (g[4], g[5]), g[6]


def num_units(num_layers: int, shortcut_kind: str) -> int:
    return num_layers - (1 if shortcut_kind == PROJECTION else 0)


def num_saved(units: int, recompute_last: bool) -> int:
    return units - 1 if recompute_last else units


def _none(x: Tensor) -> Tensor:
    """The marker for an absent tensor in a list the custom ops return."""
    return x.new_empty(0)


def _finalize(conv_out, gamma, beta, running_mean, running_var, num_batches, momentum: float, eps: float,
              gid: int):
    y, part_mean, part_m2, tile_m = conv_out
    m = y.shape[0] * y.shape[2] * y.shape[3]
    rm = None if running_mean is None else running_mean.clone()
    rv = None if running_var is None else running_var.clone()
    if gid == _sync.NO_GROUP:
        stats = bn_k.bn_finalize(part_mean, part_m2, tile_m, m, gamma, beta, rm, rv, num_batches,
                                 None if momentum < 0 else momentum, eps)
    else:  # this rank's statistics, merged with the other ranks' (per-channel vectors only)
        mean, _, _, _, var = bn_k.bn_finalize(part_mean, part_m2, tile_m, m, None, None, None, None, None, 0.0, eps,
                                              return_var=True)
        mean, var, total = _sync.merge_stats(mean, var, m, gid)
        invstd = torch.rsqrt(var + eps)
        scale = invstd if gamma is None else gamma.to(var.dtype) * invstd
        shift = -mean * scale if beta is None else beta.to(var.dtype) - mean * scale
        if rm is not None:
            factor = 1.0 / num_batches.to(var.dtype) if momentum < 0 else momentum
            rm.copy_(rm.to(var.dtype) * (1 - factor) + mean * factor)
            rv.copy_(rv.to(var.dtype) * (1 - factor) + var * (total / (total - 1)) * factor)
        stats = (mean, invstd, scale, shift)
    return [*stats, _none(y) if rm is None else rm, _none(y) if rv is None else rv]


def chain_forward(x: Tensor, weights: List[Tensor], gammas: List[Optional[Tensor]], betas: List[Optional[Tensor]],
                  running_means: List[Optional[Tensor]], running_vars: List[Optional[Tensor]],
                  num_batches: List[Optional[Tensor]], geometry: List[int], momentums: List[float],
                  eps: List[float], shortcut_kind: str, shortcut_stride: int, recompute_last: bool,
                  group: int) -> List[Tensor]:
    """The training forward of a chain on the Triton kernels (the body of fusedres::train_chain).
    group: a fusedres._sync group number, or NO_GROUP (-1) for this process's batch alone."""
    units = num_units(len(weights), shortcut_kind)
    bn_args = list(zip(gammas, betas, running_means, running_vars, num_batches, momentums, eps))
    h, prologue, ys, stats = x, None, [], []
    for i in range(units):
        res = kernels.conv_bn_act(h, weights[i], None, None, *unpack_geometry(geometry, i), prologue=prologue,
                                  stats=True)
        ys.append(res[0])
        stats += _finalize(res, *bn_args[i], group)
        prologue, h = stats[-4:-2], res[0]
    scale, shift = stats[-4:-2]
    yd = _none(x)
    if shortcut_kind == PROJECTION:
        res = kernels.conv_bn_act(x, weights[-1], None, None, *unpack_geometry(geometry, units), stats=True)
        yd = res[0]
        stats += _finalize(res, *bn_args[-1], group)
        out = bn_k.bn_act(ys[-1], scale, shift, shortcut=(yd, stats[-4], stats[-3]))
    elif shortcut_kind in ("identity", "A"):
        out = bn_k.bn_act(ys[-1], scale, shift, residual=x[:, :, ::shortcut_stride, ::shortcut_stride])
    else:
        out = bn_k.bn_act(ys[-1], scale, shift)
    return [out, yd, *ys[:num_saved(units, recompute_last)], *stats]


def chain_backward(dout: Tensor, x: Tensor, out: Tensor, yd: Optional[Tensor], ys: List[Tensor],
                   weights: List[Tensor], gammas: List[Optional[Tensor]], stats: List[Tensor], geometry: List[int],
                   shortcut_kind: str, shortcut_stride: int, recompute_last: bool, needs: List[bool],
                   group: int) -> List[Tensor]:
    """The training backward of a chain (the body of fusedres::train_chain_backward).

    stats: per BN (mean, invstd, scale, shift); needs: [x, *weights] requires_grad.
    Returns [dx | empty, then per layer: dw | empty, dgamma | empty, dbeta | empty]."""
    units = num_units(len(weights), shortcut_kind)
    bn = [stats[4 * i:4 * i + 4] for i in range(len(weights))]  # mean, invstd, scale, shift
    ys = list(ys)
    if len(ys) < units:  # recompute_last: the last unit's raw output again, same kernel and config as forward
        ys.append(kernels.conv_bn_act(ys[-1] if ys else x, weights[units - 1], None, None,
                                      *unpack_geometry(geometry, units - 1),
                                      prologue=bn[units - 2][2:] if ys else None, stats=True)[0])
    grads: List[Tensor] = [_none(x) for _ in range(1 + 3 * len(weights))]  # distinct: outputs may not alias

    def global_sums(y, *sums):
        """Synchronized BN: sums over every rank's pixels (the parameter gradients stay local, as in
        nn.SyncBatchNorm; DDP averages them), and how many pixels that is."""
        count = y.shape[0] * y.shape[2] * y.shape[3]
        if group == _sync.NO_GROUP:
            return (*sums, count)
        *sums, count = _sync.sum_across([*sums, sums[0].new_full((1,), float(count))], group)
        return (*sums, float(count.item()))

    def bn_grads(i, sum_g, sum_gx):
        if gammas[i] is not None:  # (d gamma, d beta) = (sum g*xhat, sum g)
            # copies: the sums are views of one reduction buffer, and op outputs may not alias
            grads[2 + 3 * i] = sum_gx.to(gammas[i].dtype, copy=True)
            grads[3 + 3 * i] = sum_g.to(gammas[i].dtype, copy=True)

    # Tail: g = dout gated by the block ReLU; the last BN's (and the projection's) backward.
    last = units - 1
    if shortcut_kind == PROJECTION:
        sum_g, sum_gx, sum_gxd = bn_k.bn_bwd_reduce(dout, out, ys[-1], *bn[last][:2], yd, *bn[units][:2])
        bn_grads(units, sum_g, sum_gxd)
    else:
        sum_g, sum_gx = bn_k.bn_bwd_reduce(dout, out, ys[-1], *bn[last][:2])
    bn_grads(last, sum_g, sum_gx)
    if shortcut_kind == PROJECTION:
        sum_g, sum_gx, sum_gxd, count = global_sums(ys[-1], sum_g, sum_gx, sum_gxd)
    else:
        sum_g, sum_gx, count = global_sums(ys[-1], sum_g, sum_gx)
    dy = bn_k.bn_bwd_apply(dout, out, ys[-1], gammas[last], *bn[last][:2], sum_g, sum_gx, count)

    dx = None
    for i in range(last, -1, -1):
        geo = unpack_geometry(geometry, i)
        conv_in = ys[i - 1] if i > 0 else x
        if needs[1 + i]:
            grads[1 + 3 * i] = conv_bwd.conv_wgrad(dy, conv_in, weights[i], *geo,
                                                   prologue=bn[i - 1][2:] if i > 0 else None)
        if i > 0:
            prev = bn[i - 1]
            g, sum_g_i, sum_gx_i = conv_bwd.conv_dgrad(dy, weights[i], conv_in.shape, *geo,
                                                       bn_relu=(conv_in, prev[2], prev[3], prev[0], prev[1]))
            bn_grads(i - 1, sum_g_i, sum_gx_i)
            dy = bn_k.bn_bwd_apply(g, None, conv_in, gammas[i - 1], prev[0], prev[1],
                                   *global_sums(conv_in, sum_g_i, sum_gx_i))
        elif needs[0]:
            residual = (dout, out, shortcut_stride) if shortcut_kind in ("identity", "A") else None
            dx = conv_bwd.conv_dgrad(dy, weights[0], x.shape, *geo, residual=residual)

    if shortcut_kind == PROJECTION:
        dyd = bn_k.bn_bwd_apply(dout, out, yd, gammas[units], *bn[units][:2], sum_g, sum_gxd, count)
        geo = unpack_geometry(geometry, units)
        if needs[1 + units]:
            grads[1 + 3 * units] = conv_bwd.conv_wgrad(dyd, x, weights[units], *geo)
        if needs[0]:
            dx = conv_bwd.conv_dgrad(dyd, weights[units], x.shape, *geo, residual=(dx, None, 1), out=dx)
    if dx is not None:
        grads[0] = dx
    return grads


def train_forward(op: str, x: Tensor, units: Sequence[Tuple[nn.Conv2d, nn.BatchNorm2d]], shortcut: Shortcut,
                  recompute_last: bool = False, group: int = _sync.NO_GROUP) -> Tensor:
    """Run a training-mode conv/BN chain (a block, or the stem with Shortcut("none")) on the fused kernels.

    Recompute_last: do not save the last conv's raw output but recompute it in backward from the saved
    previous one, or from the input for a one-unit chain (one more forward conv: for a bottleneck's 1x1
    conv3 about 8% of a training step's FLOPs, for the 7x7 stem about 3%, for less activation memory).
    Running statistics update as nn.BatchNorm2d's do: in training mode, when the BN tracks them.
    group: a fusedres._sync group number to synchronize the batch statistics over (nn.SyncBatchNorm's
    semantics), or NO_GROUP."""
    check.floating_input(op, x)
    layers = list(units) + ([(shortcut.conv, shortcut.bn)] if shortcut.kind == PROJECTION else [])
    x, *weights = cast_for_autocast(x, *[conv.weight for conv, _ in layers])
    check.conv_weight(op, "weight", weights[0], x, units[0][0].groups)
    for w in weights[1:]:
        check.tensor(op, "weight", w, 4, x.device, x.dtype)
    _check_shapes(op, x, units, shortcut)
    updates = [bn.training and bn.track_running_stats and bn.running_mean is not None for _, bn in layers]
    for (_, bn), update in zip(layers, updates):
        if update and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
    outs = torch.ops.fusedres.train_chain(
        x, weights, [bn.weight for _, bn in layers], [bn.bias for _, bn in layers],
        [bn.running_mean if u else None for (_, bn), u in zip(layers, updates)],
        [bn.running_var if u else None for (_, bn), u in zip(layers, updates)],
        [bn.num_batches_tracked if u and bn.momentum is None else None for (_, bn), u in zip(layers, updates)],
        [g for c, _ in layers for g in geometry_of(c)],
        [-1.0 if bn.momentum is None else float(bn.momentum) for _, bn in layers], [float(bn.eps) for _, bn in layers],
        shortcut.kind, shortcut.stride, recompute_last, group)
    first = len(outs) - STATS_PER_BN * len(layers)
    with torch.no_grad():
        for i, ((_, bn), update) in enumerate(zip(layers, updates)):
            if update:
                new = outs[first + STATS_PER_BN * i:first + STATS_PER_BN * (i + 1)]
                bn.running_mean.copy_(new[4])
                bn.running_var.copy_(new[5])
    return outs[0]


def _check_shapes(op: str, x: Tensor, units, shortcut: Shortcut) -> None:
    """More than one value per BN channel (as nn.BatchNorm2d demands in training), and a residual that
    fits the block output (as eager's ``out += identity`` requires)."""
    h, w = x.shape[2:]
    for conv, _ in units:
        # the kernel-size error first, as the eval path and eager give it
        check.output_size(op, torch.empty((x.shape[0], conv.in_channels, h, w), device="meta"), conv.weight,
                          conv.stride, conv.padding, conv.dilation)
        h = kernels.conv.out_size(h, conv.kernel_size[0], conv.stride[0], conv.padding[0], conv.dilation[0])
        w = kernels.conv.out_size(w, conv.kernel_size[1], conv.stride[1], conv.padding[1], conv.dilation[1])
        if x.shape[0] * h * w <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                             f"{torch.Size([x.shape[0], conv.out_channels, h, w])}")
    out_shape = (x.shape[0], units[-1][0].out_channels, h, w)
    if shortcut.kind == "identity":
        check.identity_channels(op, x, out_shape[1])
    if shortcut.kind in ("identity", "A"):
        check.residual(op, x[:, :, ::shortcut.stride, ::shortcut.stride], x, out_shape)
    elif shortcut.kind == "projection":
        hd = (x.shape[2] - 1) // shortcut.conv.stride[0] + 1
        wd = (x.shape[3] - 1) // shortcut.conv.stride[1] + 1
        if (hd, wd) != (h, w) or shortcut.conv.out_channels != out_shape[1]:
            raise RuntimeError(f"{op}: expected the downsample projection to give the block output's size "
                               f"{list(out_shape)}, but got [{x.shape[0]}, {shortcut.conv.out_channels}, {hd}, {wd}]")
