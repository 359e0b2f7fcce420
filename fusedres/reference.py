"""The PyTorch reference that every fused op and block is checked against, and falls back to.

This is the only host module allowed to call PyTorch's convolution and batch-norm. The blocks here
have exactly torchvision's constructor signatures and child names, so their state_dicts are
interchangeable with torchvision's and with the fused twins in ``fusedres.blocks`` (which subclass them).
"""
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# DESIGN.md section 4: the largest ||out - ref|| / ||ref|| against float64 (fp32 with TF32 off).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}


def rel_err(out: Tensor, ref: Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (||out - ref|| where ref is 0)."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding, no bias (torchvision's helper)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation,
                     groups=groups, bias=False, dilation=dilation)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution, no bias (torchvision's helper)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class PadChannelsShortcut(nn.Module):
    """The paper's option-A shortcut: identity, subsampled by ``stride``, extra channels zero.

    Parameter-free, so it adds no state_dict keys. The fused blocks never run its forward: they read
    the strided view of the block input directly as the residual and add it to the first
    ``in_channels`` output channels only.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"PadChannelsShortcut: expected out_channels >= in_channels, "
                             f"but got out_channels={out_channels} and in_channels={in_channels}")
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.out_channels - self.in_channels))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


class _ShortcutTail(nn.Module):
    """The end both blocks share: relu(out + shortcut(x)), or relu(out) for the plain twin."""

    def _set_shortcut(self, downsample: Optional[nn.Module], stride: int, residual: bool) -> None:
        self.downsample, self.stride, self.residual = downsample, stride, residual

    def extra_repr(self) -> str:
        return "" if self.residual else "residual=False"

    def _add_shortcut_relu(self, out: Tensor, x: Tensor) -> Tensor:
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)


class BasicBlock(_ShortcutTail):
    """torchvision's BasicBlock; ``residual=False`` gives the paper's plain (no-shortcut) twin."""

    expansion: int = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1,
                 norm_layer: Optional[Callable[..., nn.Module]] = None, *, residual: bool = True) -> None:
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self._set_shortcut(downsample, stride, residual)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self._add_shortcut_relu(self.bn2(self.conv2(out)), x)


class Bottleneck(_ShortcutTail):
    """torchvision's Bottleneck (stride on the 3x3 conv, "ResNet V1.5")."""

    expansion: int = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1,
                 norm_layer: Optional[Callable[..., nn.Module]] = None, *, residual: bool = True) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self._set_shortcut(downsample, stride, residual)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self._add_shortcut_relu(self.bn3(self.conv3(out)), x)


def bn_scale_shift_reference(weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Tensor,
                             running_var: Tensor, eps: float, dtype: torch.dtype = torch.float64):
    """Eval-mode BN as y = scale * x + shift, per channel, computed in ``dtype``."""
    inv_std = torch.rsqrt(running_var.to(dtype) + eps)
    scale = inv_std if weight is None else weight.to(dtype) * inv_std
    shift = -running_mean.to(dtype) * scale
    if bias is not None:
        shift = shift + bias.to(dtype)
    return scale, shift


def conv_bn_act_reference(x: Tensor, weight: Tensor, scale: Tensor, shift: Tensor, stride=1, padding=0,
                          dilation=1, groups=1, residual: Optional[Tensor] = None, relu: bool = False,
                          shortcut_input: Optional[Tensor] = None, shortcut_weight: Optional[Tensor] = None,
                          shortcut_scale: Optional[Tensor] = None, shortcut_shift: Optional[Tensor] = None,
                          shortcut_stride: int = 1, dtype: Optional[torch.dtype] = torch.float64) -> Tensor:
    """What ``fusedres.functional.conv_bn_act`` computes, in ``dtype`` (float64 by default).

    ``relu(scale * conv(x, weight) + shift + residual + shortcut_scale * conv1x1(shortcut_input) + shortcut_shift)``,
    where a residual with fewer channels than the output is added to its first channels only
    (the paper's option-A shortcut). ``dtype=None`` computes in the input's dtype.
    """
    dt = dtype or x.dtype

    def cvt(t):
        return None if t is None else t.to(dt)

    def per_channel(v):
        return v.to(dt).view(1, -1, 1, 1)

    out = F.conv2d(cvt(x), cvt(weight), None, stride, padding, dilation, groups)
    out = out * per_channel(scale) + per_channel(shift)
    if shortcut_input is not None:
        sc = F.conv2d(cvt(shortcut_input), cvt(shortcut_weight), None, shortcut_stride)
        out = out + sc * per_channel(shortcut_scale) + per_channel(shortcut_shift)
    if residual is not None:
        res = cvt(residual)
        if res.shape[1] < out.shape[1]:
            res = F.pad(res, (0, 0, 0, 0, 0, out.shape[1] - res.shape[1]))
        out = out + res
    if relu:
        out = torch.relu(out)
    return out
