"""timm's ResNet blocks (timm >= 1.0 ``timm.models.resnet.BasicBlock`` / ``Bottleneck``) on the fused kernels.

``convert()`` swaps a timm block's class for a cached subclass of it (``FusedTimm<Name>``) that keeps timm's
children (``conv1, bn1, act1, ..., aa, drop_block, drop_path, se, downsample``), so every state_dict key
stays. Fused when the activations are nn.ReLU, ``aa`` / ``drop_block`` are absent or nn.Identity, and the
downsample is a 1x1 conv + BN projection or resnet-D's ``AvgPool2d(2, 2)`` (or Identity) + 1x1 conv + BN.

* Plain blocks run the fused chain of ``fusedres.blocks`` (eval: 2 / 3 launches). resnet-D's average pool
  stays an eager pre-op of the shortcut in eval; in training "2x2 average, then 1x1 conv" runs as one 2x2
  stride-2 conv with the weight / 4 inside the chain (exact when the input height and width are even).
* Stochastic depth (``drop_path``, active in training): the block's own DropPath module draws the
  per-sample factor (the same RNG draws as timm's forward) and the tail kernel applies it to the branch.
* Attention (``se``: timm's SE or ECA module): the pooled branch goes through the module's own layers
  (``fusedres.attention.attention_gate``) and ``relu(bn(y) * gate + shortcut)`` is one kernel; in training
  the chain's tail is deferred to ``fusedres::attention_tail``, forward and backward in Triton. Other
  attention modules run the block as timm does (announced).
Every training path is the one chain route of ``fusedres.training.train_forward``.
"""
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from . import _dispatch
from . import _validate as check
from .attention import attention_gate, gate_reason
from .blocks import MIXED_MODES, _bn_mode, _FusedBlockMixin, _projection, packed_weight, pairs_reason
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
    se = children.get("se")
    if se is not None and gate_reason(se) is not None:
        return gate_reason(se)
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


class _TimmBlockMixin(_FusedBlockMixin):
    """The fused forward for timm's blocks (see the module docstring); falls back to timm's own forward."""

    residual = True
    process_group = None
    recompute_last_conv = False

    def _drop_path(self) -> Optional[nn.Module]:
        """The block's DropPath when it drops anything (training, rate > 0), else None."""
        dp = getattr(self, "drop_path", None)
        return dp if dp is not None and dp.training and float(getattr(dp, "drop_prob", 0.0)) > 0.0 else None

    def _layers_reason(self) -> Optional[str]:
        return timm_block_reason(self)

    def _route(self, x: Tensor) -> Tuple[Optional[str], Optional[str]]:
        if not isinstance(x, Tensor):
            return None, _bn_mode(self)
        reason = _dispatch.unsupported_device_reason(x.device) or self._layers_reason()
        mode = _bn_mode(self) if reason is None else None
        if mode == "mixed":
            return MIXED_MODES, None
        if mode == "train":
            proj = pooled_projection(self.downsample) if self.downsample is not None else None
            if proj is not None and proj[0] is not None and (x.shape[2] % 2 or x.shape[3] % 2):
                return "resnet-D's average-pool shortcut is fused in training for even input sizes only", None
        return reason, mode

    def forward(self, x: Tensor) -> Tensor:
        reason, mode = self._route(x)  # once per forward: the modules can change between calls, not within one
        if reason is not None or mode == "train" or getattr(self, "se", None) is None:
            return self._forward(x, reason, mode)  # falls back (announced) itself when reason is set
        return self._attention_eval(x)

    def _train(self, x: Tensor, shortcut: Shortcut, group: int) -> Tensor:
        return train_forward(type(self).__name__, x, self._units(), shortcut, self.recompute_last_conv, group,
                             drop_path=self._drop_path(), attention=getattr(self, "se", None))

    def _shortcut(self) -> Shortcut:
        if self.downsample is None:
            return Shortcut("identity")
        pool, conv, bn = pooled_projection(self.downsample)
        if pool is None:
            return Shortcut("projection", conv.stride[0], conv, bn)
        return Shortcut("projection", 2, _AvgThenConv(conv), bn)

    def _tail(self, x: Tensor, units=None) -> Dict:
        if self.downsample is None:
            units = self._units() if units is None else units
            check.identity_channels(type(self).__name__, x, units[-1][0].out_channels)
            return {"residual": x}
        pool, conv, bn = pooled_projection(self.downsample)
        return {"shortcut_input": x if pool is None else pool(x), "shortcut_weight": packed_weight(conv),
                "projection": (conv, bn), "shortcut_stride": conv.stride[0]}

    def _attention_eval(self, x: Tensor) -> Tensor:
        """Eval: the convs with folded BN (the branch's last one without ReLU), the projection as its own
        conv, then pool -> gate -> ``relu(branch * gate + shortcut)`` in one kernel."""
        *head, (conv, bn) = self._units()
        h = x
        for c, b in head:
            h = self._conv(h, c, b)
        branch = self._conv(h, conv, bn, relu=False)
        if self.downsample is None:
            check.identity_channels(type(self).__name__, x, branch.shape[1])
            shortcut = x
        else:
            pool, c, b = pooled_projection(self.downsample)
            shortcut = self._conv(x if pool is None else pool(x), c, b, relu=False)
        gate = attention_gate(self.se, torch.ops.fusedres.image_mean(branch))
        return torch.ops.fusedres.gated_tail(branch, gate, shortcut, True)


def swap_timm_block(block: nn.Module) -> Optional[str]:
    """Make a timm block fused in place (a cached subclass of its class); why not, when it cannot be."""
    reason = timm_block_reason(block)
    if reason is not None:
        return reason
    from ._pickle import fused_class  # one cache for the process; the class pickles by its recipe

    cls = type(block)
    units = ("1", "2", "3") if cls.__name__ == "Bottleneck" else ("1", "2")
    new = fused_class(_TimmBlockMixin, cls, f"FusedTimm{cls.__name__}",
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
        n += 2 + (block.downsample is not None)  # pool and tail; the projection is a launch of its own there
        eager.append(f"the {type(block.se).__name__} layers on the pooled [N, C]")
    return n, ", ".join(eager)
