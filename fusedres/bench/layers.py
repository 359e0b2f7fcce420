"""One conv launch of a model, alone, for the layer-level measurements of ``fusedres.bench.measure``: as eager
PyTorch runs it, and as the fused blocks launch it (same weights)."""
from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from .shapes import ConvShape


class EagerLayer(nn.Module):
    """One conv launch as eager PyTorch does it: conv, BN (+ projection conv, BN) (+ residual) (+ ReLU)."""

    def __init__(self, shape: ConvShape):
        super().__init__()
        self.shape = shape
        self.conv = nn.Conv2d(shape.c, shape.k, (shape.r, shape.s), shape.stride, shape.padding, shape.dilation,
                              shape.groups, bias=False)
        self.bn = nn.BatchNorm2d(shape.k)
        if shape.tail == "projection":
            self.conv_d = nn.Conv2d(shape.sc_c, shape.k, 1, shape.sc_stride, bias=False)
            self.bn_d = nn.BatchNorm2d(shape.k)

    def forward(self, x, res=None, xd=None):
        y = self.bn(self.conv(x))
        if xd is not None:
            y = y + self.bn_d(self.conv_d(xd))
        if res is not None:
            s = self.shape.res_stride
            res = res[:, :, ::s, ::s] if s > 1 else res
            if res.shape[1] < y.shape[1]:
                res = F.pad(res, (0, 0, 0, 0, 0, y.shape[1] - res.shape[1]))
            y = y + res
        return F.relu(y, inplace=True) if self.shape.relu else y


class FusedLayer(nn.Module):
    """The same launch through ``fusedres.functional.conv_bn_act``, sharing EagerLayer's weights."""

    def __init__(self, eager: EagerLayer):
        super().__init__()
        self.eager = eager

    def forward(self, x, res=None, xd=None):
        from ..blocks import eval_conv, packed_weight
        e, sh = self.eager, self.eager.shape
        if self.training:  # batch statistics: the one-unit chain of fusedres.training (as the stem runs)
            from ..training import Shortcut, train_forward
            return train_forward("layer", x, [(e.conv, e.bn)], Shortcut("none"))
        kw = {}  # as the blocks launch it: the eval BNs folded once (fusedres._fold)
        if res is not None:
            kw["residual"] = res[:, :, ::sh.res_stride, ::sh.res_stride] if sh.res_stride > 1 else res
        if xd is not None:
            kw.update(shortcut_input=xd, shortcut_weight=packed_weight(e.conv_d), projection=(e.conv_d, e.bn_d),
                      shortcut_stride=sh.sc_stride)
        return eval_conv(x, e.conv, e.bn, sh.relu, **kw)


def layer_inputs(shape: ConvShape, n: int, device, dt, gen) -> List[torch.Tensor]:
    def t(*size):
        return torch.randn(*size, device=device, generator=gen).to(dt).contiguous(memory_format=torch.channels_last)
    inputs = [t(n, shape.c, shape.h, shape.w)]
    if shape.tail == "residual":
        inputs.append(t(n, shape.res_c, shape.p * shape.res_stride, shape.q * shape.res_stride))
    elif shape.tail == "projection":
        inputs += [None, t(n, shape.sc_c, shape.sc_h, shape.sc_w)]
    return inputs
