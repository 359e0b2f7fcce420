"""The math of a training-mode conv/BN chain on the Triton launchers (the bodies of the training ops).

A chain is a block or the stem: units ``conv_i -> bn_i`` where each conv reads
``relu(bn_{i-1}(y_{i-1}))`` through its prologue (that activation is never stored), then a tail
``relu(bn_L(y_L) + shortcut)``; a projection shortcut is one more layer, ``bn_d(conv_d(x))``, on the
chain input. Per unit the forward is conv with the BN-statistics epilogue -> finalize (batch mean/var,
new running statistics like nn.BatchNorm2d, scale/shift). Saved for backward: the chain input, the
raw conv outputs, the chain output and per-channel statistics.

Backward, from the tail down: BN reductions of the ReLU-gated gradient -> BN backward -> for each conv,
wgrad (recomputing its input relu(bn(y)) in the prologue) and dgrad (whose epilogue gates by the
previous ReLU and emits the previous BN's reductions; the first conv's dgrad adds the shortcut's
gradient).

The custom ops (``fusedres.ops``) carry only tensors, lists and numbers; the named tuples here give
their flat argument and result lists names, with ``pack`` / ``unpack`` as the one place that knows
the order. Nothing here calls back up through ``torch.ops``.
"""
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _sync, kernels
from .kernels import bn as bn_k
from .kernels import conv_bwd
from .kernels._launch import empty_activation, stats_dtype
from .kernels.conv import ConvStats, conv_bn_stats

PROJECTION = "projection"
RESIDUAL_KINDS = ("identity", "A")   # the shortcut is (a strided view of) the chain input itself
GEOMETRY_INTS = 7                    # per conv: stride h/w, padding h/w, dilation h/w, groups


def absent(like: Tensor) -> Tensor:
    """The marker for a missing tensor in an op's result list (a list cannot hold None): 1-D, empty.
    Each call gives a new tensor, since an op's outputs may not alias each other."""
    return like.new_empty(0)


def present(t: Tensor) -> Optional[Tensor]:
    return None if t.dim() == 1 and t.numel() == 0 else t


def geometry_of(conv) -> List[int]:
    """An nn.Conv2d's geometry as the GEOMETRY_INTS ints the ops carry."""
    return [*conv.stride, *conv.padding, *conv.dilation, conv.groups]


class ChainParams(NamedTuple):
    """The chain's tensors, one entry per layer (the units' convs in order, then the projection's).
    gammas/betas None: affine=False. running_means/vars None: batch statistics without an update
    (track_running_stats=False, or a BN that does not update). num_batches: the already incremented
    num_batches_tracked where momentum is None (cumulative average), else None."""
    weights: List[Tensor]
    gammas: List[Optional[Tensor]]
    betas: List[Optional[Tensor]]
    running_means: List[Optional[Tensor]]
    running_vars: List[Optional[Tensor]]
    num_batches: List[Optional[Tensor]]


class ChainSpec(NamedTuple):
    """Everything about a chain that is not a tensor, in the ops' argument order.
    geometry: GEOMETRY_INTS per layer; momentums: per BN, -1.0 for momentum=None; shortcut_kind: "none",
    "identity", "A" (strided, zero-padded channels) or PROJECTION; recompute_last: do not save the last
    unit's raw output, recompute it in backward; group: a fusedres._sync group number, or NO_GROUP."""
    geometry: List[int]
    momentums: List[float]
    eps: List[float]
    shortcut_kind: str
    shortcut_stride: int
    recompute_last: bool
    group: int

    @property
    def num_layers(self) -> int:
        return len(self.eps)

    @property
    def num_units(self) -> int:
        return self.num_layers - (self.shortcut_kind == PROJECTION)

    @property
    def num_saved(self) -> int:
        return self.num_units - self.recompute_last

    def conv(self, i: int) -> Tuple[Tuple[int, int], Tuple[int, int], Tuple[int, int], int]:
        """(stride, padding, dilation, groups) of layer i, as the launchers take them."""
        g = self.geometry[GEOMETRY_INTS * i:GEOMETRY_INTS * (i + 1)]
        return (g[0], g[1]), (g[2], g[3]), (g[4], g[5]), g[6]


class BNStats(NamedTuple):
    """One BN's batch statistics (the stats dtype: fp32, fp64 for fp64 activations), [K] each."""
    mean: Tensor
    invstd: Tensor
    scale: Tensor   # gamma * invstd
    shift: Tensor   # beta - mean * scale

    @property
    def affine(self) -> Tuple[Tensor, Tensor]:
        """(scale, shift): what the next conv's prologue applies before its ReLU."""
        return self.scale, self.shift

    @staticmethod
    def flatten(stats: Sequence["BNStats"]) -> List[Tensor]:
        return [t for s in stats for t in s]

    @staticmethod
    def unflatten(flat: Sequence[Tensor]) -> List["BNStats"]:
        return [BNStats(*flat[i:i + 4]) for i in range(0, len(flat), 4)]


class ChainOutputs(NamedTuple):
    """The result of fusedres::train_chain. Packed as [out, yd, *ys, *flatten(stats), then per BN its
    new running mean and var]; a missing tensor is packed as ``absent``."""
    out: Tensor                         # the chain output, relu(bn_L(y_L) + shortcut)
    yd: Optional[Tensor]                # the projection's raw conv output
    ys: List[Tensor]                    # the units' raw conv outputs (all but the last when recomputed)
    stats: List[BNStats]                # per BN
    running_means: List[Optional[Tensor]]  # per BN, new values for the module's buffers
    running_vars: List[Optional[Tensor]]

    def pack(self) -> List[Tensor]:
        new = [t if t is not None else absent(self.out) for pair in zip(self.running_means, self.running_vars)
               for t in pair]
        return [self.out, absent(self.out) if self.yd is None else self.yd, *self.ys, *BNStats.flatten(self.stats),
                *new]

    @classmethod
    def unpack(cls, flat: Sequence[Tensor], num_layers: int) -> "ChainOutputs":
        saved = len(flat) - 2 - 6 * num_layers
        stats = BNStats.unflatten(flat[2 + saved:2 + saved + 4 * num_layers])
        new = [present(t) for t in flat[2 + saved + 4 * num_layers:]]
        return cls(flat[0], present(flat[1]), list(flat[2:2 + saved]), stats, new[0::2], new[1::2])


class ChainGrads(NamedTuple):
    """The result of fusedres::train_chain_backward, packed as [dx, then per layer dw, dgamma, dbeta];
    None (packed as ``absent``) where not needed or not there."""
    dx: Optional[Tensor]
    dweights: List[Optional[Tensor]]
    dgammas: List[Optional[Tensor]]
    dbetas: List[Optional[Tensor]]

    def pack(self, like: Tensor) -> List[Tensor]:
        return [absent(like) if t is None else t
                for t in (self.dx, *(g for layer in zip(self.dweights, self.dgammas, self.dbetas) for g in layer))]

    @classmethod
    def unpack(cls, flat: Sequence[Tensor]) -> "ChainGrads":
        flat = [present(t) for t in flat]
        return cls(flat[0], flat[1::3], flat[2::3], flat[3::3])


def conv_out_shape(x_shape, weight_shape, stride, padding, dilation) -> Tuple[int, int, int, int]:
    n, _, h, w = x_shape
    k, _, r, s = weight_shape
    return (n, k, kernels.conv.out_size(h, r, stride[0], padding[0], dilation[0]),
            kernels.conv.out_size(w, s, stride[1], padding[1], dilation[1]))


def _finalize(conv: ConvStats, params: ChainParams, spec: ChainSpec, i: int):
    """BN i's statistics from its conv's per-tile partials, and its new running statistics (new tensors:
    the op does not mutate its inputs)."""
    y, part_mean, part_m2, tile_m = conv
    gamma, beta, rm, rv, num_batches = (params.gammas[i], params.betas[i], params.running_means[i],
                                        params.running_vars[i], params.num_batches[i])
    momentum, eps = spec.momentums[i], spec.eps[i]
    m = y.shape[0] * y.shape[2] * y.shape[3]
    new_rm = new_rv = None
    if spec.group == _sync.NO_GROUP:
        if rm is not None:
            new_rm, new_rv = torch.empty_like(rm), torch.empty_like(rv)
        stats = bn_k.bn_finalize(part_mean, part_m2, tile_m, m, gamma, beta, rm, rv, num_batches,
                                 None if momentum < 0 else momentum, eps, running_out=(new_rm, new_rv))
        return BNStats(*stats), new_rm, new_rv
    # this rank's statistics, merged with the other ranks' (per-channel vectors only)
    mean, _, _, _, var = bn_k.bn_finalize(part_mean, part_m2, tile_m, m, None, None, None, None, None, 0.0, eps,
                                          return_var=True)
    mean, var, total = _sync.merge_stats(mean, var, m, spec.group)
    invstd = torch.rsqrt(var + eps)
    scale = invstd if gamma is None else gamma.to(var.dtype) * invstd
    shift = -mean * scale if beta is None else beta.to(var.dtype) - mean * scale
    if rm is not None:
        factor = 1.0 / num_batches.to(var.dtype) if momentum < 0 else momentum
        new_rm = (rm.to(var.dtype) * (1 - factor) + mean * factor).to(rm.dtype)
        new_rv = (rv.to(var.dtype) * (1 - factor) + var * (total / (total - 1)) * factor).to(rv.dtype)
    return BNStats(mean, invstd, scale, shift), new_rm, new_rv


def chain_forward(x: Tensor, params: ChainParams, spec: ChainSpec) -> ChainOutputs:
    """The training forward of a chain (the body of fusedres::train_chain)."""
    h, prologue, ys, stats, new_rms, new_rvs = x, None, [], [], [], []

    def unit(inp, i, prologue=None):
        conv = conv_bn_stats(inp, params.weights[i], *spec.conv(i), prologue=prologue)
        s, rm, rv = _finalize(conv, params, spec, i)
        stats.append(s)
        new_rms.append(rm)
        new_rvs.append(rv)
        return conv.out

    for i in range(spec.num_units):
        h = unit(h, i, prologue)
        ys.append(h)
        prologue = stats[-1].affine
    last, yd = stats[-1], None
    if spec.shortcut_kind == PROJECTION:
        yd = unit(x, spec.num_units)
        projection = stats[-1]
        out = bn_k.bn_act(ys[-1], *last.affine, shortcut=(yd, *projection.affine))
    elif spec.shortcut_kind in RESIDUAL_KINDS:
        s = spec.shortcut_stride
        out = bn_k.bn_act(ys[-1], *last.affine, residual=x[:, :, ::s, ::s])
    else:
        out = bn_k.bn_act(ys[-1], *last.affine)
    return ChainOutputs(out, yd, ys[:spec.num_saved], stats, new_rms, new_rvs)


def chain_forward_shapes(x: Tensor, params: ChainParams, spec: ChainSpec) -> ChainOutputs:
    """Empty tensors shaped like chain_forward's result (the fake of fusedres::train_chain)."""
    ys, shape = [], x.shape
    for i in range(spec.num_units):
        shape = conv_out_shape(shape, params.weights[i].shape, *spec.conv(i)[:3])
        ys.append(empty_activation(x, shape))
    yd = empty_activation(x, shape) if spec.shortcut_kind == PROJECTION else None
    sdt = stats_dtype(x)
    stats = [BNStats(*(x.new_empty(w.shape[0], dtype=sdt) for _ in range(4))) for w in params.weights]
    new = [[None if t is None else torch.empty_like(t) for t in ts] for ts in (params.running_means,
                                                                               params.running_vars)]
    return ChainOutputs(empty_activation(x, shape), yd, ys[:spec.num_saved], stats, *new)


def chain_backward(dout: Tensor, x: Tensor, out: Tensor, yd: Optional[Tensor], ys: List[Tensor],
                   weights: List[Tensor], gammas: List[Optional[Tensor]], stats: List[BNStats], spec: ChainSpec,
                   needs: List[bool]) -> ChainGrads:
    """The training backward of a chain (the body of fusedres::train_chain_backward).
    needs: [x, *weights] requires_grad. yd, ys, stats: as chain_forward returned them."""
    units, kind, group = spec.num_units, spec.shortcut_kind, spec.group
    ys = list(ys)
    if len(ys) < units:  # recompute_last: the last unit's raw output again, same kernel and config as forward
        ys.append(conv_bn_stats(ys[-1] if ys else x, weights[units - 1], *spec.conv(units - 1),
                                prologue=stats[units - 2].affine if ys else None).out)
    dgammas: List[Optional[Tensor]] = [None] * len(weights)
    dbetas: List[Optional[Tensor]] = [None] * len(weights)
    dweights: List[Optional[Tensor]] = [None] * len(weights)

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
            dgammas[i] = sum_gx.to(gammas[i].dtype, copy=True)
            dbetas[i] = sum_g.to(gammas[i].dtype, copy=True)

    # Tail: g = dout gated by the chain's ReLU; the last BN's (and the projection's) backward.
    last = units - 1
    if kind == PROJECTION:
        proj = stats[units]
        sum_g, sum_gx, sum_gxd = bn_k.bn_bwd_reduce(dout, out, ys[-1], stats[last].mean, stats[last].invstd, yd,
                                                    proj.mean, proj.invstd)
        bn_grads(units, sum_g, sum_gxd)
        bn_grads(last, sum_g, sum_gx)
        sum_g, sum_gx, sum_gxd, count = global_sums(ys[-1], sum_g, sum_gx, sum_gxd)
    else:
        sum_g, sum_gx = bn_k.bn_bwd_reduce(dout, out, ys[-1], stats[last].mean, stats[last].invstd)
        bn_grads(last, sum_g, sum_gx)
        sum_g, sum_gx, count = global_sums(ys[-1], sum_g, sum_gx)
    dy = bn_k.bn_bwd_apply(dout, out, ys[-1], gammas[last], stats[last].mean, stats[last].invstd, sum_g, sum_gx,
                           count)

    dx = None
    for i in range(last, -1, -1):
        geo = spec.conv(i)
        conv_in = ys[i - 1] if i > 0 else x
        if needs[1 + i]:
            dweights[i] = conv_bwd.conv_wgrad(dy, conv_in, weights[i], *geo,
                                              prologue=stats[i - 1].affine if i > 0 else None)
        if i > 0:
            prev = stats[i - 1]
            d = conv_bwd.conv_dgrad_bn(dy, weights[i], conv_in.shape, *geo,
                                       (conv_in, prev.scale, prev.shift, prev.mean, prev.invstd))
            bn_grads(i - 1, d.sum_g, d.sum_gxhat)
            dy = bn_k.bn_bwd_apply(d.dx, None, conv_in, gammas[i - 1], prev.mean, prev.invstd,
                                   *global_sums(conv_in, d.sum_g, d.sum_gxhat))
        elif needs[0]:
            residual = (dout, out, spec.shortcut_stride) if kind in RESIDUAL_KINDS else None
            dx = conv_bwd.conv_dgrad(dy, weights[0], x.shape, *geo, residual=residual)

    if kind == PROJECTION:
        dyd = bn_k.bn_bwd_apply(dout, out, yd, gammas[units], proj.mean, proj.invstd, sum_g, sum_gxd, count)
        geo = spec.conv(units)
        if needs[1 + units]:
            dweights[units] = conv_bwd.conv_wgrad(dyd, x, weights[units], *geo)
        if needs[0]:
            dx = conv_bwd.conv_dgrad(dyd, weights[units], x.shape, *geo, residual=(dx, None, 1), out=dx)
    return ChainGrads(dx, dweights, dgammas, dbetas)


def chain_backward_shapes(dout: Tensor, x: Tensor, weights: Sequence[Tensor], gammas: Sequence[Optional[Tensor]],
                          needs: Sequence[bool]) -> ChainGrads:
    """Empty tensors shaped like chain_backward's result (the fake of fusedres::train_chain_backward)."""
    return ChainGrads(empty_activation(dout, x.shape) if needs[0] else None,
                      [torch.empty_like(w) if need else None for w, need in zip(weights, needs[1:])],
                      [None if g is None else torch.empty_like(g) for g in gammas],
                      [None if g is None else torch.empty_like(g) for g in gammas])
