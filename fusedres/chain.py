"""The math of a training-mode conv/BN chain on the Triton launchers (the bodies of the training ops).

A chain is a block or the stem: units ``conv_i -> bn_i`` where each conv reads
``relu(bn_{i-1}(y_{i-1}))`` through its prologue (that activation is never stored), then a tail
``act(bn_L(y_L) * row_scale[n] + shortcut)``; a projection shortcut is one more layer, ``bn_d(conv_d(x))``,
on the chain input. Per unit the forward is conv with the BN-statistics epilogue -> finalize (batch
mean/var, new running statistics like nn.BatchNorm2d, scale/shift). Saved for backward: the chain input,
the raw conv outputs, the chain output and per-channel statistics (``SavedChain``).

The tail options (``ChainSpec.tail``): "relu" and "none" (the activation), and "attention": the tail is
deferred to ``attention_tail``, because an attention module (SE, ECA) between the two needs the pooled
branch. Then the chain returns the per-image mean of y_L instead of ``out``, with y_L and the tail BNs'
mean and invstd as differentiable outputs, and its backward takes their gradients (``AttentionGrads``).

Backward, from the tail down: BN reductions of the activation-gated gradient -> BN backward -> for each
conv, wgrad (recomputing its input relu(bn(y)) in the prologue) and dgrad (whose epilogue gates by the
previous ReLU and emits the previous BN's reductions; the first conv's dgrad adds the shortcut's gradient).

The custom ops (``fusedres.ops``) carry only tensors, lists and numbers; the named tuples here give their
flat argument and result lists names, with ``pack`` / ``unpack`` as the one place that knows the order.
Nothing here calls back up through ``torch.ops``.
"""
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _sync, kernels
from .kernels import bn as bn_k
from .kernels import tail as tail_k
from .kernels._launch import empty_activation, prologue_math, stats_dtype
from .kernels.conv import ConvStats, conv_bn_stats
from .kernels.dgrad import conv_dgrad, conv_dgrad_bn
from .kernels.wgrad import conv_wgrad

PROJECTION = "projection"
RESIDUAL_KINDS = ("identity", "A")   # the shortcut is (a strided view of) the chain input itself
GEOMETRY_INTS = 7                    # per conv: stride h/w, padding h/w, dilation h/w, groups
TAILS = ("relu", "none", "attention")  # the chain's end: act = ReLU / identity, or deferred (attention_tail)
CUMULATIVE = -1.0                    # momentum=None (cumulative average) in the ops' float list


def absent(like: Tensor) -> Tensor:
    """The marker for a missing tensor in an op's result list (a list cannot hold None): 1-D, empty.
    Each call gives a new tensor, since an op's outputs may not alias each other."""
    return like.new_empty(0)


def present(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None or (t.dim() == 1 and t.numel() == 0) else t


def geometry_of(conv) -> List[int]:
    """An nn.Conv2d's geometry as the GEOMETRY_INTS ints the ops carry."""
    return [*conv.stride, *conv.padding, *conv.dilation, conv.groups]


class BNState(NamedTuple):
    """One BN as the chain reads and updates it: the one encoding of a BN's state in the library.
    running_mean/var None: batch statistics without an update (track_running_stats=False, or a BN that does
    not update). momentum None: cumulative average, whose factor 1/num_batches reads ``num_batches``
    (num_batches_tracked after this step's increment)."""
    gamma: Optional[Tensor]
    beta: Optional[Tensor]
    running_mean: Optional[Tensor]
    running_var: Optional[Tensor]
    num_batches: Optional[Tensor]
    momentum: Optional[float]
    eps: float

    @classmethod
    def of(cls, bn) -> "BNState":
        """The state of an nn.BatchNorm2d in a training forward: it updates its running statistics when in
        training mode and tracking them (nn.BatchNorm2d's rule)."""
        update = bn.training and bn.track_running_stats and bn.running_mean is not None
        momentum = None if bn.momentum is None else float(bn.momentum)
        # the cumulative average's factor reads this step's count: num_batches_tracked itself is incremented
        # with the running statistics, after the op (fusedres._running)
        count = bn.num_batches_tracked + 1 if update and momentum is None else None
        return cls(bn.weight, bn.bias, bn.running_mean if update else None, bn.running_var if update else None,
                   count, momentum, float(bn.eps))

    @property
    def updates(self) -> bool:
        return self.running_mean is not None

    def running_update(self, new_mean: Tensor, new_var: Tensor) -> Optional[bn_k.RunningUpdate]:
        """What bn_finalize needs to write the new running statistics to new_mean / new_var."""
        if not self.updates:
            return None
        return bn_k.RunningUpdate(self.running_mean, self.running_var, new_mean, new_var, self.momentum,
                                  self.num_batches)


class ChainParams(NamedTuple):
    """The chain's tensor arguments, in the op's order. Lists hold one entry per layer (the units' convs in
    order, then the projection's): the BNStates' tensors, column by column. row_scale: [N] per-sample
    factor of the branch (stochastic depth's keep mask / keep probability), or None."""
    weights: List[Tensor]
    gammas: List[Optional[Tensor]]
    betas: List[Optional[Tensor]]
    running_means: List[Optional[Tensor]]
    running_vars: List[Optional[Tensor]]
    num_batches: List[Optional[Tensor]]
    row_scale: Optional[Tensor]

    @classmethod
    def build(cls, weights: Sequence[Tensor], states: Sequence[BNState], row_scale: Optional[Tensor] = None):
        return cls(list(weights), *([getattr(s, f) for s in states] for f in BNState._fields[:5]), row_scale)


class ChainSpec(NamedTuple):
    """Everything about a chain that is not a tensor, in the ops' argument order.
    geometry: GEOMETRY_INTS per layer; momentums/eps: per BN (BNState's, momentum None as CUMULATIVE);
    shortcut_kind: "none", "identity", "A" (strided, zero-padded channels) or PROJECTION; recompute_last: do
    not save the last unit's raw output, recompute it in backward; group: a fusedres._sync group number, or
    NO_GROUP; tail: one of TAILS."""
    geometry: List[int]
    momentums: List[float]
    eps: List[float]
    shortcut_kind: str
    shortcut_stride: int
    recompute_last: bool
    group: int
    tail: str

    @classmethod
    def build(cls, convs, states: Sequence[BNState], shortcut_kind: str, shortcut_stride: int = 1,
              recompute_last: bool = False, group: int = _sync.NO_GROUP, tail: str = "relu") -> "ChainSpec":
        return cls([g for c in convs for g in geometry_of(c)],
                   [CUMULATIVE if s.momentum is None else s.momentum for s in states], [s.eps for s in states],
                   shortcut_kind, shortcut_stride, recompute_last and tail != "attention", group, tail)

    def bn_state(self, params: ChainParams, i: int) -> BNState:
        momentum = None if self.momentums[i] == CUMULATIVE else self.momentums[i]
        return BNState(*(col[i] for col in params[1:6]), momentum, self.eps[i])

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
    """One BN's batch statistics (the stats dtype: fp32, fp64 for fp64 activations), [K] each. A BN that the next
    conv's prologue applies in packed 16-bit math holds scale and shift rounded to the activations' dtype (bf16):
    the factors the forward applied (see _finalize)."""
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
    """The result of fusedres::train_chain. Packed as [out, yd, residual_sink, *ys, *flatten(stats), then per
    BN its new running mean and var]; a missing tensor is packed as ``absent``."""
    out: Tensor                         # the chain output; for an attention tail the per-image mean of y_L [N, K]
    yd: Optional[Tensor]                # the projection's raw conv output
    # An attention tail with an identity shortcut: an all-zero tensor shaped like the input (zero strides:
    # one element of memory) that attention_tail adds; its gradient is the shortcut's, which this chain's
    # backward adds in its dgrad epilogue (autograd would otherwise sum two full-size gradients of x).
    residual_sink: Optional[Tensor]
    ys: List[Tensor]                    # the units' raw conv outputs (all but the last when recomputed)
    stats: List[BNStats]                # per BN
    running_means: List[Optional[Tensor]]  # per BN, new values for the module's buffers
    running_vars: List[Optional[Tensor]]

    def pack(self) -> List[Tensor]:
        new = [t if t is not None else absent(self.out) for pair in zip(self.running_means, self.running_vars)
               for t in pair]
        return [self.out, *(absent(self.out) if t is None else t for t in (self.yd, self.residual_sink)), *self.ys,
                *BNStats.flatten(self.stats), *new]

    @classmethod
    def unpack(cls, flat: Sequence[Optional[Tensor]], num_layers: int) -> "ChainOutputs":
        """The packed result, or the gradients autograd hands its backward (None where there is none)."""
        saved = len(flat) - 3 - 6 * num_layers
        stats = BNStats.unflatten(flat[3 + saved:3 + saved + 4 * num_layers])
        new = [present(t) for t in flat[3 + saved + 4 * num_layers:]]
        return cls(flat[0], present(flat[1]), present(flat[2]), list(flat[3:3 + saved]), stats, new[0::2], new[1::2])

    def differentiable(self, spec: ChainSpec) -> List[Tensor]:
        """The outputs gradients flow through: ``out``; for an attention tail also y_L, yd and the tail
        BNs' mean and invstd (attention_tail's inputs)."""
        if spec.tail != "attention":
            return [self.out]
        tail_bns = [spec.num_units - 1] + ([spec.num_units] if self.yd is not None else [])
        return [self.out, self.ys[-1], *(t for t in (self.yd, self.residual_sink) if t is not None),
                *(t for i in tail_bns for t in (self.stats[i].mean, self.stats[i].invstd))]


class SavedChain(NamedTuple):
    """What the chain's backward reads, saved by the op's autograd as one flat tuple (``flatten``)."""
    x: Tensor
    out: Tensor
    yd: Optional[Tensor]
    ys: List[Tensor]
    weights: List[Tensor]
    gammas: List[Optional[Tensor]]
    stats: List[BNStats]
    row_scale: Optional[Tensor]

    def flatten(self):
        """(tensors or None, the structure to rebuild it with: the lists' lengths). By hand: torch's pytree took
        ~50 us a chain (two calls per training step and chain)."""
        leaves = [self.x, self.out, self.yd, *self.ys, *self.weights, *self.gammas, *BNStats.flatten(self.stats),
                  self.row_scale]
        return leaves, (len(self.ys), len(self.weights), len(self.gammas), len(self.stats))

    @staticmethod
    def unflatten(leaves, structure) -> "SavedChain":
        n_ys, n_weights, n_gammas, n_stats = structure
        it = iter(leaves)
        x, out, yd = next(it), next(it), next(it)
        ys, weights, gammas = ([next(it) for _ in range(n)] for n in (n_ys, n_weights, n_gammas))
        stats = BNStats.unflatten([next(it) for _ in range(4 * n_stats)])
        row_scale = next(it)
        assert next(it, it) is it, "SavedChain.unflatten: more leaves than the structure holds"
        return SavedChain(x, out, yd, ys, weights, gammas, stats, row_scale)


class AttentionGrads(NamedTuple):
    """The gradients of an attention chain's extra outputs (ChainOutputs.differentiable), for its backward:
    d/dy_L and d/dyd at fixed batch statistics, and those of the tail BNs' statistics."""
    dy: Optional[Tensor]
    dmean: Optional[Tensor]
    dinvstd: Optional[Tensor]
    dyd: Optional[Tensor]
    dmean_d: Optional[Tensor]
    dinvstd_d: Optional[Tensor]
    dresidual: Optional[Tensor]   # the identity shortcut's gradient (through ChainOutputs.residual_sink)

    @classmethod
    def of(cls, grads: ChainOutputs, spec: ChainSpec) -> "AttentionGrads":
        last = grads.stats[spec.num_units - 1]
        proj = grads.stats[spec.num_units] if spec.shortcut_kind == PROJECTION else BNStats(None, None, None, None)
        return cls(grads.ys[-1], last.mean, last.invstd, grads.yd, proj.mean, proj.invstd, grads.residual_sink)


# The ChainParams fields the backward differentiates: ChainGrads holds d<field> for each, per layer.
TRAINED = ("weights", "gammas", "betas")


class ChainGrads(NamedTuple("ChainGradsFields", [("dx", Optional[Tensor])]
                            + [("d" + f, List[Optional[Tensor]]) for f in TRAINED])):
    """The result of fusedres::train_chain_backward, packed as [dx, then per layer dw, dgamma, dbeta];
    None (packed as ``absent``) where not needed or not there."""
    __slots__ = ()

    def pack(self, like: Tensor) -> List[Tensor]:
        return [absent(like) if t is None else t for t in (self.dx, *(g for layer in zip(*self[1:]) for g in layer))]

    @classmethod
    def unpack(cls, flat: Sequence[Tensor]) -> "ChainGrads":
        flat, n = [present(t) for t in flat], len(TRAINED)
        return cls(flat[0], *(flat[1 + i::n] for i in range(n)))

    def params(self, lists: ChainParams) -> ChainParams:
        """The gradients of the op's ChainParams arguments, field by field. ``lists``: per field, whether the
        op got it as a list holding a tensor; torch.library takes any other argument (a tensor, None, a list
        of None only) as one leaf, whose gradient here is None."""
        grads = dict(zip(TRAINED, self[1:]))
        return ChainParams(*(grads.get(name, [None] * len(self.dweights)) if is_list else None
                             for name, is_list in zip(ChainParams._fields, lists)))

    @staticmethod
    def lists_of(params: ChainParams) -> ChainParams:
        """What ``params`` needs to know of the op's arguments (kept in place of the tensors)."""
        return ChainParams(*(isinstance(a, (list, tuple)) and any(t is not None for t in a) for a in params))


def residual_sink(x: Tensor, shape) -> Tensor:
    """ChainOutputs.residual_sink: zeros shaped like the block output, one element of memory."""
    return x.new_empty_strided(shape, (0, 0, 0, 0)).zero_()


def conv_out_shape(x_shape, weight_shape, stride, padding, dilation) -> Tuple[int, int, int, int]:
    n, _, h, w = x_shape
    k, _, r, s = weight_shape
    return (n, k, kernels.conv.out_size(h, r, stride[0], padding[0], dilation[0]),
            kernels.conv.out_size(w, s, stride[1], padding[1], dilation[1]))


def _finalize(conv: ConvStats, state: BNState, group: int, feeds_prologue: bool = False):
    """BN statistics from a conv's per-tile partials, and the new running statistics (new tensors: the op
    does not mutate its inputs). Synchronized: this rank's statistics merged with the other ranks' (per-
    channel vectors only), then the same finalize over that one merged row updates the running statistics.
    feeds_prologue: the BN is applied by the next conv's prologue. Where that prologue rounds scale and shift to y's
    dtype (packed 16-bit math: _launch.prologue_math) in every k-step, the finalize rounds them once instead and
    the statistics hold them so (BNStats.scale / shift in y's dtype): the forward prologue, the backward's
    recompute and wgrad prologue (the same math) and dgrad's activation gate all read the factors the forward
    applied."""
    y, part_mean, part_m2, tile_m = conv
    m = y.shape[0] * y.shape[2] * y.shape[3]
    rounded = _rounded_factors(y, part_mean.shape[1]) if feeds_prologue else None
    new_rm = new_rv = None
    if state.updates:
        new_rm, new_rv = torch.empty_like(state.running_mean), torch.empty_like(state.running_var)
    if group != _sync.NO_GROUP:
        local = bn_k.bn_finalize(part_mean, part_m2, tile_m, m, None, None, state.eps)
        mean, var, total = _sync.merge_stats(local.mean, local.var, m, group)
        total = int(round(total))
        part_mean, part_m2, tile_m, m = mean[None], (var * total)[None], total, total
    s = bn_k.bn_finalize(part_mean, part_m2, tile_m, m, state.gamma, state.beta, state.eps,
                         state.running_update(new_rm, new_rv), prologue_out=rounded)
    return BNStats(s.mean, s.invstd, *(rounded if rounded is not None else (s.scale, s.shift))), new_rm, new_rv


def _rounded_factors(y: Tensor, k: int) -> Optional[Tuple[Tensor, Tensor]]:
    """Two [k] tensors of y's dtype for scale and shift where the next conv's prologue rounds them (else None);
    apart, not views of one buffer: they are op outputs, which may not alias."""
    if prologue_math(y) == "acc":
        return None
    return torch.empty(k, device=y.device, dtype=y.dtype), torch.empty(k, device=y.device, dtype=y.dtype)


def feeds_prologue(spec: "ChainSpec", i: int) -> bool:
    """Unit i's BN is applied by unit i + 1's prologue (the last unit's feeds the tail, the projection's the add)."""
    return i + 1 < spec.num_units


def chain_forward(x: Tensor, params: ChainParams, spec: ChainSpec) -> ChainOutputs:
    """The training forward of a chain (the body of fusedres::train_chain)."""
    h, prologue, ys, stats, new_rms, new_rvs = x, None, [], [], [], []

    def unit(inp, i, prologue=None):
        conv = conv_bn_stats(inp, params.weights[i], *spec.conv(i), prologue=prologue)
        s, rm, rv = _finalize(conv, spec.bn_state(params, i), spec.group, feeds_prologue(spec, i))
        stats.append(s)
        new_rms.append(rm)
        new_rvs.append(rv)
        return conv.out

    for i in range(spec.num_units):
        h = unit(h, i, prologue)
        ys.append(h)
        prologue = stats[-1].affine
    last, yd, tail = stats[-1], None, {}
    if spec.shortcut_kind == PROJECTION:
        yd = unit(x, spec.num_units)
        tail["shortcut"] = tail_k.Projection(yd, *stats[-1].affine)
    elif spec.shortcut_kind in RESIDUAL_KINDS:
        s = spec.shortcut_stride
        tail["residual"] = x[:, :, ::s, ::s]
    sink = None
    if spec.tail == "attention":
        out = tail_k.image_mean(ys[-1], stats_dtype(x))
        if spec.shortcut_kind == "identity":
            sink = residual_sink(x, ys[-1].shape)
    else:
        out = tail_k.bn_act(ys[-1], *last.affine, relu=spec.tail == "relu", row_scale=params.row_scale, **tail)
    return ChainOutputs(out, yd, sink, ys[:spec.num_saved], stats, new_rms, new_rvs)


def chain_forward_shapes(x: Tensor, params: ChainParams, spec: ChainSpec) -> ChainOutputs:
    """Empty tensors shaped like chain_forward's result (the fake of fusedres::train_chain)."""
    ys, shape = [], x.shape
    for i in range(spec.num_units):
        shape = conv_out_shape(shape, params.weights[i].shape, *spec.conv(i)[:3])
        ys.append(empty_activation(x, shape))
    yd = empty_activation(x, shape) if spec.shortcut_kind == PROJECTION else None
    sdt = stats_dtype(x)
    stats = []
    for i, w in enumerate(params.weights):
        k = w.shape[0]
        rounded = _rounded_factors(x, k) if feeds_prologue(spec, i) else None  # (y_i has x's dtype)
        stats.append(BNStats(x.new_empty(k, dtype=sdt), x.new_empty(k, dtype=sdt),
                             *(rounded or (x.new_empty(k, dtype=sdt), x.new_empty(k, dtype=sdt)))))
    new = [[None if t is None else torch.empty_like(t) for t in ts] for ts in (params.running_means,
                                                                               params.running_vars)]
    out = x.new_empty(shape[:2], dtype=sdt) if spec.tail == "attention" else empty_activation(x, shape)
    sink = x.new_empty_strided(shape, (0, 0, 0, 0)) if spec.tail == "attention" and spec.shortcut_kind == "identity" \
        else None
    return ChainOutputs(out, yd, sink, ys[:spec.num_saved], stats, *new)


def _attention_dy(y: Tensor, stats: BNStats, dy_fixed: Tensor, dmean: Optional[Tensor],
                  dinvstd: Optional[Tensor], global_sums, nc: Optional[Tensor] = None) -> Tensor:
    """d/dy of a BN input whose output's consumers handed back d/dy at fixed statistics, and the gradients
    of the batch mean and invstd: dy = dy_fixed + nc[n, k] + dmean/M - xhat * dinvstd * invstd^2 / M
    (invstd = (var + eps)^-1/2, so d invstd / dy = -invstd^3 (y - mean) / M)."""
    sum_g = -dmean if dmean is not None else torch.zeros_like(stats.mean)
    sum_gx = dinvstd * stats.invstd * stats.invstd if dinvstd is not None else torch.zeros_like(stats.mean)
    return tail_k.bn_bwd_apply(dy_fixed, None, y, None, stats.mean, stats.invstd,
                               *global_sums(y, sum_g, sum_gx), nc=nc, unit_gain=True)


def chain_backward(dout: Optional[Tensor], tail_grads: Optional[AttentionGrads], saved: SavedChain,
                   spec: ChainSpec, needs: List[bool]) -> ChainGrads:
    """The training backward of a chain (the body of fusedres::train_chain_backward).
    needs: [x, *weights] requires_grad. dout: the gradient of ``out``; tail_grads: an attention chain's."""
    units, kind, group = spec.num_units, spec.shortcut_kind, spec.group
    x, out, yd, weights, gammas, stats, row_scale = (saved.x, saved.out, saved.yd, saved.weights, saved.gammas,
                                                     saved.stats, saved.row_scale)
    ys = list(saved.ys)
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

    # Tail: g = dout gated by the chain's ReLU (times row_scale on the branch); the last BN's (and the
    # projection's) backward. An attention tail's own backward has run: its gradients come in tail_grads.
    last = units - 1
    relu_out = out if spec.tail == "relu" else None
    if spec.tail == "attention":
        pixels = ys[-1].shape[2] * ys[-1].shape[3]
        dy = _attention_dy(ys[-1], stats[last], tail_grads.dy, tail_grads.dmean, tail_grads.dinvstd, global_sums,
                           None if dout is None else (dout / pixels).to(stats[last].mean.dtype))
        if kind == PROJECTION:
            def projection_dy():
                return _attention_dy(yd, stats[units], tail_grads.dyd, tail_grads.dmean_d, tail_grads.dinvstd_d,
                                     global_sums)
    elif kind == PROJECTION:
        proj = stats[units]
        sums = tail_k.bn_bwd_reduce(dout, relu_out, ys[-1], stats[last].mean, stats[last].invstd, yd,
                                    proj.mean, proj.invstd, row_scale=row_scale)
        bn_grads(units, sums.sum_g_d, sums.sum_gx_d)
        bn_grads(last, sums.sum_g, sums.sum_gx)
        sum_g, sum_gx, sum_g_d, sum_gx_d, count = global_sums(ys[-1], *sums)
        dy = tail_k.bn_bwd_apply(dout, relu_out, ys[-1], gammas[last], stats[last].mean, stats[last].invstd, sum_g,
                                 sum_gx, count, row_scale=row_scale)

        def projection_dy():  # after the units' backward, as late as it is needed
            return tail_k.bn_bwd_apply(dout, relu_out, yd, gammas[units], proj.mean, proj.invstd, sum_g_d, sum_gx_d,
                                       count)
    else:
        sums = tail_k.bn_bwd_reduce(dout, relu_out, ys[-1], stats[last].mean, stats[last].invstd,
                                    row_scale=row_scale)
        bn_grads(last, sums.sum_g, sums.sum_gx)
        sum_g, sum_gx, count = global_sums(ys[-1], sums.sum_g, sums.sum_gx)
        dy = tail_k.bn_bwd_apply(dout, relu_out, ys[-1], gammas[last], stats[last].mean, stats[last].invstd, sum_g,
                                 sum_gx, count, row_scale=row_scale)

    dx = None
    for i in range(last, -1, -1):
        geo = spec.conv(i)
        conv_in = ys[i - 1] if i > 0 else x
        if needs[1 + i]:
            dweights[i] = conv_wgrad(dy, conv_in, weights[i], *geo,
                                              prologue=stats[i - 1].affine if i > 0 else None)
        if i > 0:
            prev = stats[i - 1]
            d = conv_dgrad_bn(dy, weights[i], conv_in.shape, *geo,
                                       (conv_in, prev.scale, prev.shift, prev.mean, prev.invstd))
            bn_grads(i - 1, d.sum_g, d.sum_gxhat)
            dy = tail_k.bn_bwd_apply(d.dx, None, conv_in, gammas[i - 1], prev.mean, prev.invstd,
                                     *global_sums(conv_in, d.sum_g, d.sum_gxhat))
        elif needs[0]:
            residual = None
            if kind in RESIDUAL_KINDS:
                residual = (dout, relu_out, spec.shortcut_stride) if spec.tail != "attention" else \
                    (tail_grads.dresidual, None, 1)
            dx = conv_dgrad(dy, weights[0], x.shape, *geo, residual=residual)

    if kind == PROJECTION:
        dyd, geo = projection_dy(), spec.conv(units)
        if needs[1 + units]:
            dweights[units] = conv_wgrad(dyd, x, weights[units], *geo)
        if needs[0]:
            dx = conv_dgrad(dyd, weights[units], x.shape, *geo, residual=(dx, None, 1), out=dx)
    return ChainGrads(dx, dweights, dgammas, dbetas)


def chain_backward_shapes(x: Tensor, weights: Sequence[Tensor], gammas: Sequence[Optional[Tensor]],
                          needs: Sequence[bool], spec: ChainSpec) -> ChainGrads:
    """Empty tensors shaped like chain_backward's result (the fake of fusedres::train_chain_backward). An
    attention chain gives no gradient to its tail BNs' gamma and beta: attention_tail does."""
    tail_bns = range(spec.num_units - 1, spec.num_layers) if spec.tail == "attention" else ()
    affine = [None if g is None or i in tail_bns else g for i, g in enumerate(gammas)]
    return ChainGrads(empty_activation(x, x.shape) if needs[0] else None,
                      [torch.empty_like(w) if need else None for w, need in zip(weights, needs[1:])],
                      [None if g is None else torch.empty_like(g) for g in affine],
                      [None if g is None else torch.empty_like(g) for g in affine])
