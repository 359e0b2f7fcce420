"""Drop-in fused ResNet blocks.

``FusedBasicBlock`` / ``FusedBottleneck`` subclass the reference blocks, so they have torchvision's
constructor, child names and state_dict. In eval mode a basic block is 2 launches
(conv1+bn1+relu, conv2+bn2+shortcut+relu) and a bottleneck 3; a projection shortcut
(downsample = 1x1 conv + BN) is a second GEMM inside the last launch. In training mode the
batch-statistics path of ``fusedres.training`` runs, forward and backward on Triton kernels. Whatever the kernels do not
cover runs the reference forward, announced once (see ``fusedres._dispatch``).
"""
from typing import Dict, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from . import _dispatch, _fold, _sync
from . import _validate as check
from ._autocast import autocast_dtype
from .functional import bn_scale_shift, conv_bn_act
from .reference import BasicBlock, Bottleneck, PadChannelsShortcut
from .training import Shortcut, train_forward

# The norm layers the kernels implement. nn.SyncBatchNorm synchronizes its batch statistics over its
# process group when torch.distributed is initialized with more than one rank (see sync_group).
FUSED_NORMS = (nn.BatchNorm2d, nn.SyncBatchNorm)


def sync_group(bns, process_group=None) -> Union[int, str]:
    """The fusedres._sync group number a chain's batch statistics are synchronized over (NO_GROUP: none),
    or why the chain cannot be fused. As nn.SyncBatchNorm: only with torch.distributed initialized and
    more than one rank; a block's ``process_group`` option synchronizes plain BatchNorm2d layers too."""
    syncs = {type(bn) is nn.SyncBatchNorm for bn in bns}
    if process_group is None and syncs == {True}:
        groups = {id(bn.process_group) for bn in bns}
        if len(groups) > 1:
            return "its SyncBatchNorm layers use different process groups"
        process_group = bns[0].process_group
        if not _sync.world_is_up():
            return _sync.NO_GROUP
    elif process_group is None:
        return _sync.NO_GROUP if syncs == {False} else "it mixes SyncBatchNorm and BatchNorm2d layers"
    if not _sync.world_is_up():
        return "process_group is set but torch.distributed is not initialized"
    import torch.distributed as dist
    if dist.get_world_size(process_group) == 1:
        return _sync.NO_GROUP
    return _sync.group_id(process_group)


def folded_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """Eval BN (+ conv bias) as scale/shift computed now, in ``dtype`` (the fused paths use ``eval_conv``'s cache)."""
    return bn_scale_shift(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps, conv.bias, dtype)


def epilogue_dtype(x: Tensor) -> torch.dtype:
    """The dtype of the eval kernels' per-channel math for input x: fp64 for fp64 (outside autocast), else fp32."""
    return torch.float64 if x.dtype == torch.float64 and autocast_dtype(x.device.type) is None else torch.float32


def eval_conv(x: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu: bool = True,
              projection: Optional[Tuple[nn.Conv2d, nn.BatchNorm2d]] = None, **tail) -> Tensor:
    """One eval conv -> BN (-> shortcut) (-> ReLU) launch. The BN comes folded once per module (fusedres._fold,
    refolded when a BN tensor changes); ``projection`` (conv_d, bn_d): the shortcut's pair, folded with it."""
    dtype = epilogue_dtype(x)
    if projection is None:
        scale, shift = _fold.eval_affine(conv, bn, dtype)
    else:
        scale = shift = None
        tail["shortcut_fold"] = _fold.eval_projection(conv, bn, *projection, dtype)
    return conv_bn_act(x, packed_weight(conv), scale, shift, conv.stride, conv.padding, conv.dilation, conv.groups,
                       relu=relu, **tail)


def packed_weight(conv: nn.Conv2d) -> Tensor:
    """The conv weight in channels_last, so each B-tile row is contiguous: free when the model was
    converted with ``model.to(memory_format=torch.channels_last)``, a copy per call otherwise."""
    w = _fold.tensor_attr(conv, "weight")
    return w if w.is_contiguous(memory_format=torch.channels_last) else w.contiguous(memory_format=torch.channels_last)


def _projection(downsample: Optional[nn.Module]) -> Optional[Tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """(conv, bn) when downsample is torchvision's 1x1-conv + BN projection that the kernel fuses."""
    if not isinstance(downsample, nn.Sequential) or len(downsample) != 2:
        return None
    conv, bn = downsample[0], downsample[1]
    if type(conv) is not nn.Conv2d or type(bn) not in FUSED_NORMS:
        return None
    if (conv.kernel_size != (1, 1) or conv.padding != (0, 0) or conv.dilation != (1, 1) or conv.groups != 1
            or conv.stride[0] != conv.stride[1] or conv.bias is not None or conv.padding_mode != "zeros"):
        return None
    return conv, bn


def layer_reason(conv: nn.Module, bn: nn.Module) -> Optional[str]:
    """Why one conv -> BN pair cannot run on the fused kernels (None when it can). Shared by blocks and stems."""
    if type(conv) is not nn.Conv2d or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return (f"{type(conv).__name__} with padding={getattr(conv, 'padding', '?')!r}, "
                f"padding_mode={getattr(conv, 'padding_mode', '?')!r} is not fused")
    if type(bn) not in FUSED_NORMS:
        return f"norm layer {type(bn).__name__} is not nn.BatchNorm2d or nn.SyncBatchNorm"
    if _fold.tensor_attr(conv, "bias") is not None and uses_batch_stats(bn):
        return "a conv with a bias before a batch-statistics BatchNorm2d is not fused (the training chain has no bias)"
    return None


def pairs_reason(pairs) -> Optional[str]:
    """Why the first of these (conv, bn) pairs cannot be fused, or None when every one can."""
    for conv, bn in pairs:  # (a loop, not nested generators: per block and forward)
        reason = layer_reason(conv, bn)
        if reason is not None:
            return reason
    return None


def _named_children(module: nn.Module) -> Dict[str, nn.Module]:
    """dict(module.named_children()) without its generator: each child once, under its first name, None skipped."""
    children, seen = {}, set()
    for name, child in module._modules.items():
        if child is not None and id(child) not in seen:
            seen.add(id(child))
            children[name] = child
    return children


_PAIR_NAMES = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))


def unfusable_reason(block: nn.Module) -> Optional[str]:
    """Why this block's layers cannot run on the fused kernels (None when they can)."""
    children = _named_children(block)
    pairs = [(children[conv], children.get(bn)) for conv, bn in _PAIR_NAMES if conv in children]
    downsample = block.downsample
    if downsample is not None and not isinstance(downsample, PadChannelsShortcut):
        projection = _projection(downsample)
        if projection is None:
            return (f"its downsample ({type(downsample).__name__}) is not a 1x1 conv (no bias, no padding) + "
                    f"BatchNorm2d projection")
        pairs.append(projection)
    return pairs_reason(pairs)


def uses_batch_stats(bn: nn.BatchNorm2d) -> bool:
    """nn.BatchNorm2d's own rule: batch statistics in training, or when it keeps no running statistics."""
    return bn.training or _fold.tensor_attr(bn, "running_mean") is None


def submodules(block: nn.Module) -> list:
    """The modules of block.modules() (itself included, each once however often it is registered), walked through
    ``_modules`` without named_modules' generators and prefix strings: _bn_mode reads them on every forward."""
    found, seen = [block], {id(block)}
    for m in found:  # grows while it is walked: breadth first
        for child in m._modules.values():
            if child is not None and id(child) not in seen:
                seen.add(id(child))
                found.append(child)
    return found


def _bn_mode(block: nn.Module) -> str:
    """"train" (batch statistics) / "eval" (running statistics) when every BN of the block agrees, else
    "mixed" (e.g. a frozen bn.eval() inside a training block): each BN decides, as in eager."""
    modes = {uses_batch_stats(m) for m in submodules(block) if type(m) in FUSED_NORMS}
    return "mixed" if len(modes) > 1 else ("train" if modes == {True} else "eval")


MIXED_MODES = "the block's BatchNorm layers mix batch statistics and running statistics (train/eval modes)"


class _FusedBlockMixin:
    """Shared by both blocks: a chain of conv->bn units, then the shortcut and the final ReLU.

    Eval: one conv_bn_act launch per unit (BN folded), the shortcut in the last one's epilogue.
    Train: the batch-statistics chain of ``fusedres.training``, forward and backward in Triton.
    """

    _units_names: Tuple[str, ...]
    # Training: recompute the last conv's output in backward instead of saving it (see training.train_forward).
    recompute_last_conv: bool

    def __init__(self, *args, process_group=None, **kwargs):
        super().__init__(*args, **kwargs)  # the reference block's, torchvision's signature
        self.process_group = process_group

    def train(self, mode: bool = True):
        _fold.invalidate(self)  # eval() refolds: the one refresh after writes through .data (see fusedres._fold)
        return super().train(mode)

    def _units(self):
        return [(getattr(self, "conv" + i), getattr(self, "bn" + i)) for i in self._units_names]

    def _layers_reason(self) -> Optional[str]:
        """Why the block's layers cannot be fused (None when they can), whatever the input."""
        return unfusable_reason(self)

    def _fallback_reason(self, x: Tensor) -> Optional[str]:
        return self._route(x)[0]

    def _route(self, x: Tensor) -> Tuple[Optional[str], Optional[str]]:
        """(why this call falls back, None when it is fused; the BNs' _bn_mode when fused, else None): read once
        per forward (the modules can change between calls, not within one)."""
        if not isinstance(x, Tensor):
            return None, _bn_mode(self)  # the fused path's checks raise the argument error
        reason = _dispatch.unsupported_device_reason(x.device) or self._layers_reason()
        if reason is not None:
            return reason, None
        mode = _bn_mode(self)
        return (MIXED_MODES, None) if mode == "mixed" else (None, mode)

    def _fall_back(self, x: Tensor, reason: str) -> Tensor:
        """The reference forward, announced. Bad input first gets the argument error the fused path would give
        (on every machine: a CPU tensor without the interpreter must not turn it into the path's error);
        checked here only, so the fused path pays for its own checks once."""
        if isinstance(x, Tensor) and self._layers_reason() is None:
            units = self._units()
            check.chain_input(type(self).__name__, x, [conv.weight for conv, _ in units], units[0][0].groups)
        _dispatch.fallback(type(self).__name__, reason)
        return super().forward(x)

    def forward(self, x: Tensor) -> Tensor:
        return self._forward(x, *self._route(x))

    def _forward(self, x: Tensor, reason: Optional[str], mode: Optional[str]) -> Tensor:
        """The forward of a call whose _route gave (reason, mode)."""
        if reason is not None:
            return self._fall_back(x, reason)
        if mode == "train":
            shortcut = self._shortcut()
            bns = [bn for _, bn in self._units()] + ([shortcut.bn] if shortcut.bn is not None else [])
            group = sync_group(bns, getattr(self, "process_group", None))
            if isinstance(group, str):
                return self._fall_back(x, group)
            return self._train(x, shortcut, group)
        units = self._units()
        *head, (conv, bn) = units
        out = x
        for c, b in head:
            out = self._conv(out, c, b)
        return self._conv(out, conv, bn, **self._tail(x, units))

    def _train(self, x: Tensor, shortcut: Shortcut, group: int) -> Tensor:
        return train_forward(type(self).__name__, x, self._units(), shortcut, self.recompute_last_conv, group)

    def _conv(self, x: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu: bool = True, **tail) -> Tensor:
        return eval_conv(x, conv, bn, relu, **tail)

    def _shortcut(self) -> Shortcut:
        """The shortcut branch, for both the training chain and the eval tail."""
        if not self.residual:
            return Shortcut("none")
        downsample = self.downsample  # a submodule: nn.Module.__getattr__ per read
        if downsample is None:
            return Shortcut("identity")
        if isinstance(downsample, PadChannelsShortcut):
            return Shortcut("A", downsample.stride)
        conv, bn = _projection(downsample)
        return Shortcut("projection", conv.stride[0], conv, bn)

    def _tail(self, x: Tensor, units=None) -> Dict:
        """Keyword arguments of the last eval conv that add the shortcut branch (units: this call's _units())."""
        sc = self._shortcut()
        if sc.kind == "none":
            return {}
        if sc.kind == "identity":
            units = self._units() if units is None else units
            check.identity_channels(type(self).__name__, x, units[-1][0].out_channels)
        if sc.kind in ("identity", "A"):
            # a view (none at stride 1: no aten op): nothing is copied or padded
            return {"residual": x if sc.stride == 1 else x[:, :, ::sc.stride, ::sc.stride]}
        return {"shortcut_input": x, "shortcut_weight": packed_weight(sc.conv), "projection": (sc.conv, sc.bn),
                "shortcut_stride": sc.stride}


class FusedBasicBlock(_FusedBlockMixin, BasicBlock):
    """torchvision's BasicBlock: eval forward in 2 fused launches; training forward/backward in Triton.

    Keyword ``process_group``: synchronize the training batch statistics over it (nn.SyncBatchNorm's
    semantics) even with plain BatchNorm2d layers."""

    _units_names = ("1", "2")
    recompute_last_conv = False  # a 3x3 conv: half the block's forward FLOPs, too dear to recompute


class FusedBottleneck(_FusedBlockMixin, Bottleneck):
    """torchvision's Bottleneck: eval forward in 3 fused launches; training forward/backward in Triton.
    Keyword ``process_group``: as for FusedBasicBlock."""

    _units_names = ("1", "2", "3")
    recompute_last_conv = True  # a 1x1 conv, ~8% of the step, saves the widest (4x) activation
