"""timm's ResNet blocks (timm >= 1.0 ``timm.models.resnet.BasicBlock`` / ``Bottleneck``) on the fused kernels.

``convert()`` swaps a timm block's class for a cached subclass of it (``FusedTimm<Name>``) that keeps timm's
children (``conv1, bn1, act1, ..., aa, drop_block, drop_path, se, downsample``), so every state_dict key
stays. Fused when the activations are nn.ReLU, ``aa`` / ``drop_block`` are absent or nn.Identity, and the
downsample is a 1x1 conv + BN projection or resnet-D's ``AvgPool2d(2, 2)`` (or Identity) + 1x1 conv + BN.

* Plain blocks run the fused chain of ``fusedres.blocks`` (eval: 2 / 3 launches). resnet-D's average pool
  stays an eager pre-op of the shortcut in eval; in training "2x2 average, then 1x1 conv" runs as one 2x2
  stride-2 conv with the weight / 4 inside the chain (exact when the input height and width are even).
* Blocks with an attention module (``se``: timm's SE / ECA / ...) or an active ``drop_path`` (training,
  rate > 0) run the *split* path: the head convs fused as usual, the last conv + BN fused without ReLU,
  then the block's own ``se`` and ``drop_path`` modules eagerly (so drop_path draws its mask from
  PyTorch's RNG exactly as timm does), and an eager ``relu(branch + shortcut)``; the projection shortcut is
  one fused conv + BN. In training the last conv + BN is ``conv_bn_train`` below (Triton kernels, forward
  and backward). Not fused there: the attention, the per-sample mask multiply and the add + ReLU tail.
"""
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from . import _dispatch, _sync, kernels
from . import _validate as check
from ._autocast import cast_for_autocast
from .blocks import (
    FUSED_NORMS,
    _bn_mode,
    _FusedBlockMixin,
    _projection,
    eval_bn,
    packed_weight,
    pairs_reason,
    sync_group,
)
from .kernels import bn as bn_k
from .kernels import conv_bwd
from .training import Shortcut, train_forward

_REQUIRED = {"BasicBlock": {"conv1", "bn1", "act1", "conv2", "bn2", "act2"},
             "Bottleneck": {"conv1", "bn1", "act1", "conv2", "bn2", "act2", "conv3", "bn3", "act3"}}
_OPTIONAL = {"drop_block", "aa", "se", "downsample", "drop_path"}


def is_timm_block(module: nn.Module) -> bool:
    """A block named BasicBlock / Bottleneck with timm's activation names (act1, ...)."""
    name = type(module).__name__
    return name in _REQUIRED and hasattr(module, "act1") and not isinstance(module, _TimmBlockMixin)


def pooled_projection(ds: nn.Module) -> Optional[Tuple[Optional[nn.Module], nn.Conv2d, nn.Module]]:
    """(pool or None, conv, bn) for timm's 1x1 projection or resnet-D's avg-pool + 1x1 projection, else None."""
    if isinstance(ds, nn.Sequential) and len(ds) == 3:
        pool, conv, bn = ds
        proj = _projection(nn.Sequential(conv, bn))
        if proj is None or conv.stride != (1, 1):
            return None
        if isinstance(pool, nn.Identity):
            return None, conv, bn
        ks, st = pool.kernel_size if isinstance(pool, nn.AvgPool2d) else 0, getattr(pool, "stride", 0)
        if type(pool) is nn.AvgPool2d and ks in (2, (2, 2)) and st in (2, (2, 2)) and pool.padding in (0, (0, 0)) \
                and pool.divisor_override is None:
            return pool, conv, bn
        return None
    proj = _projection(ds)
    return None if proj is None else (None, *proj)


def timm_block_reason(block: nn.Module) -> Optional[str]:
    """Why this timm block cannot run fused (None when it can, possibly through the split path)."""
    required = _REQUIRED[type(block).__name__.replace("FusedTimm", "")]
    children = dict(block.named_children())
    missing, extra = sorted(required - set(children)), sorted(set(children) - required - _OPTIONAL)
    if missing or extra:
        return f"its children differ from timm's (missing {missing}, unexpected {extra})"
    for name in sorted(n for n in children if n.startswith("act")):
        if type(children[name]) is not nn.ReLU:
            return f"its activation {name} is {type(children[name]).__name__}, not nn.ReLU"
    for name in ("drop_block", "aa"):
        if name in children and not isinstance(children[name], nn.Identity):
            return f"its {name} ({type(children[name]).__name__}) is not fused"
    dp = getattr(block, "drop_path", None)
    if dp is not None and not isinstance(dp, nn.Identity) and not hasattr(dp, "drop_prob"):
        return f"its drop_path ({type(dp).__name__}) is not timm's DropPath"
    pairs = [(children[f"conv{i}"], children[f"bn{i}"]) for i in "123" if f"conv{i}" in children]
    ds = getattr(block, "downsample", None)
    if ds is not None:
        proj = pooled_projection(ds)
        if proj is None:
            return (f"its downsample ({type(ds).__name__}) is not a 1x1 conv + BN projection, optionally after "
                    f"AvgPool2d(2, 2) (resnet-D)")
        pairs.append(proj[1:])
    return pairs_reason(pairs)


class _AvgThenConv:
    """AvgPool2d(2, 2) then a 1x1 conv, as one 2x2 stride-2 conv with the 1x1 weight / 4 on each tap: the
    same sum for even input sizes (ceil_mode only matters for odd ones). Duck-types nn.Conv2d for the chain."""

    kernel_size, stride, padding, dilation, groups = (2, 2), (2, 2), (0, 0), (1, 1), 1

    def __init__(self, conv: nn.Conv2d):
        self.weight = conv.weight.expand(-1, -1, 2, 2) / 4  # autograd carries the gradient to the 1x1 weight
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels


class _ConvBNTrain(torch.autograd.Function):
    """bn(conv(x)) with batch statistics and no ReLU, on the Triton kernels (running stats updated)."""

    @staticmethod
    def forward(ctx, x, weight, gamma, beta, geo, bn_state):
        stride, padding, dilation, groups = geo
        y, part_mean, part_m2, tile_m = kernels.conv.conv_bn_stats(x, weight, stride, padding, dilation, groups)
        mean, invstd, scale, shift = bn_k.bn_finalize(part_mean, part_m2, tile_m, y.shape[0] * y.shape[2] * y.shape[3],
                                                      gamma, beta, *bn_state)
        ctx.geo = geo
        ctx.save_for_backward(x, weight, gamma, y, mean, invstd)
        return bn_k.bn_act(y, scale, shift, relu=False)

    @staticmethod
    def backward(ctx, dout):
        x, weight, gamma, y, mean, invstd = ctx.saved_tensors
        sum_g, sum_gx = bn_k.bn_bwd_reduce(dout, None, y, mean, invstd)
        dy = bn_k.bn_bwd_apply(dout, None, y, gamma, mean, invstd, sum_g, sum_gx)
        dx = conv_bwd.conv_dgrad(dy, weight, x.shape, *ctx.geo) if ctx.needs_input_grad[0] else None
        dw = conv_bwd.conv_wgrad(dy, x, weight, *ctx.geo) if ctx.needs_input_grad[1] else None
        dgamma = sum_gx.to(gamma.dtype, copy=True) if gamma is not None and ctx.needs_input_grad[2] else None
        dbeta = sum_g.to(gamma.dtype, copy=True) if gamma is not None and ctx.needs_input_grad[3] else None
        return dx, dw, dgamma, dbeta, None, None


def conv_bn_train(op: str, x: Tensor, conv: nn.Conv2d, bn: nn.Module) -> Tensor:
    """Training-mode bn(conv(x)) (batch statistics, running statistics updated like nn.BatchNorm2d), no ReLU."""
    x, weight = cast_for_autocast(x, conv.weight)
    check.conv_weight(op, "weight", weight, x, conv.groups)
    update = bn.training and bn.track_running_stats and bn.running_mean is not None
    if update and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
    momentum = None if bn.momentum is None else float(bn.momentum)
    state = ((bn.running_mean, bn.running_var, bn.num_batches_tracked, momentum, float(bn.eps)) if update
             else (None, None, None, 0.0, float(bn.eps)))
    geo = (tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation), conv.groups)
    return _ConvBNTrain.apply(x, weight, bn.weight, bn.bias, geo, state)


class _TimmBlockMixin(_FusedBlockMixin):
    """The fused forward for timm's blocks (see the module docstring); falls back to timm's own forward."""

    residual = True
    process_group = None
    recompute_last_conv = False

    def _drop_path_active(self) -> bool:
        dp = getattr(self, "drop_path", None)
        return dp is not None and dp.training and float(getattr(dp, "drop_prob", 0.0)) > 0.0

    def _split(self) -> bool:
        return getattr(self, "se", None) is not None or self._drop_path_active()

    def _fallback_reason(self, x: Tensor) -> Optional[str]:
        if not isinstance(x, Tensor):
            return None
        reason = _dispatch.unsupported_device_reason(x.device) or timm_block_reason(self)
        mode = _bn_mode(self) if reason is None else None
        if mode == "mixed":
            return "the block's BatchNorm layers mix batch statistics and running statistics (train/eval modes)"
        if mode == "train" and not self._split():
            proj = pooled_projection(self.downsample) if self.downsample is not None else None
            if proj is not None and proj[0] is not None and (x.shape[2] % 2 or x.shape[3] % 2):
                return "resnet-D's average-pool shortcut is fused in training for even input sizes only"
        return reason

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(x, Tensor) and self._split() and self._fallback_reason(x) is None:
            return self._split_forward(x)
        return _FusedBlockMixin.forward(self, x)

    def _shortcut(self) -> Shortcut:
        if self.downsample is None:
            return Shortcut("identity")
        pool, conv, bn = pooled_projection(self.downsample)
        if pool is None:
            return Shortcut("projection", conv.stride[0], conv, bn)
        return Shortcut("projection", 2, _AvgThenConv(conv), bn)

    def _tail(self, x: Tensor) -> Dict:
        if self.downsample is None:
            check.identity_channels(type(self).__name__, x, self._units()[-1][0].out_channels)
            return {"residual": x}
        pool, conv, bn = pooled_projection(self.downsample)
        return {"shortcut_input": x if pool is None else pool(x), "shortcut_weight": packed_weight(conv),
                "shortcut_bn": eval_bn(conv, bn), "shortcut_stride": conv.stride[0]}

    def _split_forward(self, x: Tensor) -> Tensor:
        """Fused convs, eager attention / drop_path / add + ReLU (see the module docstring)."""
        what = type(self).__name__
        *head, (conv, bn) = self._units()
        proj = pooled_projection(self.downsample) if self.downsample is not None else None
        if _bn_mode(self) == "train":
            bns = [m for m in self.modules() if type(m) in FUSED_NORMS]
            group = sync_group(bns)
            if group != _sync.NO_GROUP:
                _dispatch.fallback(what, group if isinstance(group, str) else
                                   "synchronized BatchNorm is not fused in attention / drop_path blocks")
                return super(_FusedBlockMixin, self).forward(x)
            h = train_forward(what, x, head, Shortcut("none"))
            branch = conv_bn_train(what, h, conv, bn)
            shortcut = x if proj is None else conv_bn_train(what, x if proj[0] is None else proj[0](x), *proj[1:])
        else:
            h = x
            for c, b in head:
                h = self._conv(h, c, b)
            branch = self._conv(h, conv, bn, relu=False)
            shortcut = x if proj is None else self._conv(x if proj[0] is None else proj[0](x), *proj[1:], relu=False)
        if getattr(self, "se", None) is not None:
            branch = self.se(branch)
        if self._drop_path_active():
            branch = self.drop_path(branch)
        if proj is None:
            check.identity_channels(what, x, branch.shape[1])
        return torch.relu(branch + shortcut)


_CLASSES: Dict[type, type] = {}


def swap_timm_block(block: nn.Module) -> Optional[str]:
    """Make a timm block fused in place (a cached subclass of its class); why not, when it cannot be."""
    reason = timm_block_reason(block)
    if reason is not None:
        return reason
    cls = type(block)
    new = _CLASSES.get(cls)
    if new is None:
        units = ("1", "2", "3") if cls.__name__ == "Bottleneck" else ("1", "2")
        new = _CLASSES[cls] = type(f"FusedTimm{cls.__name__}", (_TimmBlockMixin, cls),
                                   {"__module__": __name__, "_units_names": units,
                                    "recompute_last_conv": len(units) == 3})  # as FusedBottleneck
    try:
        block.__class__ = new
    except TypeError as exc:
        return f"its class cannot be swapped ({exc})"
    return None


def eval_launches(block: nn.Module) -> Tuple[int, str]:
    """(fused launches of an eval forward, what runs eagerly besides) for a fused timm block."""
    n = len(block._units_names)
    eager = []
    if block.downsample is not None and pooled_projection(block.downsample)[0] is not None:
        eager.append("shortcut avg-pool")
    if getattr(block, "se", None) is not None:
        n += 1 if block.downsample is not None else 0  # the projection is a launch of its own there
        eager += [f"attention {type(block.se).__name__}", "add + ReLU tail"]
    return n, ", ".join(eager)
