"""Model builders: torchvision's ImageNet ResNets and the paper's CIFAR ResNets, fused or reference.

``ResNet`` has torchvision's architecture, initialisation and state_dict key names, so checkpoints load
both ways. With ``fused=True`` (the default) the builders use the fused blocks and the stem
(conv1 + bn1 + relu) runs as one fused launch in eval mode; ``fused=False`` gives the reference twin
with identical keys. In training mode the stem runs the batch-statistics chain of ``fusedres.training``.
``plain=True`` builds the paper's plain (no-shortcut) networks.
"""
from typing import Callable, List, Optional, Sequence, Type, Union

import torch
from torch import Tensor, nn

from . import _running
from .blocks import FusedBasicBlock, FusedBottleneck
from .reference import BasicBlock, Bottleneck, PadChannelsShortcut, conv1x1, conv3x3
from .stems import run_stem

Block = Type[Union[BasicBlock, Bottleneck]]


class _FusedStemNet(nn.Module):
    """Shared by ResNet and CifarResNet: the (fused) conv1+bn1+relu stem and torchvision's init."""

    fused: bool

    def _stem(self, x: Tensor) -> Tensor:
        """relu(bn1(conv1(x))) in one fused launch (eval), or as the fused batch-statistics chain (training)."""
        if self.fused and isinstance(x, Tensor):
            out = run_stem(f"{type(self).__name__} stem", x, [(self.conv1, self.bn1)])
            if out is not None:
                return out
        return self.relu(self.bn1(self.conv1(x)))

    def _init_weights(self) -> None:
        _running.install(self)  # running statistics written once per call (fusedres._running)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)


class ResNet(_FusedStemNet):
    """torchvision's ResNet (same arguments, key names and init), plus ``fused`` and ``plain``."""

    def __init__(self, block: Block, layers: Sequence[int], num_classes: int = 1000, zero_init_residual: bool = False,
                 groups: int = 1, width_per_group: int = 64, replace_stride_with_dilation: Optional[List[bool]] = None,
                 norm_layer: Optional[Callable[..., nn.Module]] = None, *, fused: bool = True,
                 plain: bool = False) -> None:
        super().__init__()
        self._norm_layer = nn.BatchNorm2d if norm_layer is None else norm_layer
        self.fused, self.plain = fused, plain
        self.inplanes, self.dilation = 64, 1
        if replace_stride_with_dilation is None:
            replace_stride_with_dilation = [False, False, False]
        if len(replace_stride_with_dilation) != 3:
            raise ValueError(f"ResNet: expected replace_stride_with_dilation to be None or a 3-element sequence, "
                             f"but got {replace_stride_with_dilation!r}")
        if len(layers) != 4:
            raise ValueError(f"ResNet: expected layers to have 4 entries (blocks per stage), but got {layers!r}")
        self.groups, self.base_width = groups, width_per_group
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = self._norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        dilate = replace_stride_with_dilation
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2, dilate=dilate[0])
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2, dilate=dilate[1])
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2, dilate=dilate[2])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        self._init_weights()
        if zero_init_residual:  # each residual branch starts as zero, so each block starts as the identity
            for m in self.modules():
                if isinstance(m, block):
                    last_bn = m.bn3 if hasattr(m, "bn3") else m.bn2
                    if last_bn.weight is not None:
                        nn.init.constant_(last_bn.weight, 0)

    def _make_layer(self, block: Block, planes: int, blocks: int, stride: int = 1,
                    dilate: bool = False) -> nn.Sequential:
        norm_layer, previous_dilation = self._norm_layer, self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        downsample = None
        out_planes = planes * block.expansion
        if not self.plain and (stride != 1 or self.inplanes != out_planes):
            downsample = nn.Sequential(conv1x1(self.inplanes, out_planes, stride), norm_layer(out_planes))
        extra = {"residual": False} if self.plain else {}
        layers = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width, previous_dilation,
                        norm_layer, **extra)]
        self.inplanes = out_planes
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, groups=self.groups, base_width=self.base_width,
                                dilation=self.dilation, norm_layer=norm_layer, **extra))
        return nn.Sequential(*layers)

    def _forward_impl(self, x: Tensor) -> Tensor:
        x = self.maxpool(self._stem(x))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def forward(self, x: Tensor) -> Tensor:
        return self._forward_impl(x)


def _no_weights(name: str, kwargs: dict) -> None:
    """torchvision's builder arguments: no pretrained weights here (nothing can be downloaded)."""
    kwargs.pop("progress", None)
    for arg, off in (("weights", None), ("pretrained", False)):
        value = kwargs.pop(arg, None)
        if value is not None and value is not off:
            raise ValueError(f"fusedres.{name}: pretrained weights are not available (nothing is downloaded): "
                             f"expected {arg}={off}, but got {arg}={value!r}. Build the model, then "
                             f"load_state_dict() a torchvision checkpoint: the key names are the same.")


def _resnet(name: str, bottleneck: bool, layers: List[int], fused: bool, plain: bool, kwargs: dict,
            **fixed) -> ResNet:
    _no_weights(name, kwargs)
    for arg, value in fixed.items():  # what makes the variant (ResNeXt groups, wide width) is not overridable
        if kwargs.setdefault(arg, value) != value:
            raise ValueError(f"fusedres.{name}: expected {arg}={value} (it defines {name}), but got {kwargs[arg]!r}")
    block = (FusedBottleneck if fused else Bottleneck) if bottleneck else (FusedBasicBlock if fused else BasicBlock)
    return ResNet(block, layers, fused=fused, plain=plain, **kwargs)


def resnet18(*, fused: bool = True, plain: bool = False, **kwargs) -> ResNet:
    """ResNet-18 (torchvision key names); ``fused=False`` gives the reference twin."""
    return _resnet("resnet18", False, [2, 2, 2, 2], fused, plain, kwargs)


def resnet34(*, fused: bool = True, plain: bool = False, **kwargs) -> ResNet:
    """ResNet-34 (torchvision key names); ``fused=False`` gives the reference twin."""
    return _resnet("resnet34", False, [3, 4, 6, 3], fused, plain, kwargs)


def resnet50(*, fused: bool = True, plain: bool = False, **kwargs) -> ResNet:
    """ResNet-50 (torchvision key names, stride on the 3x3 conv); ``fused=False`` gives the reference twin."""
    return _resnet("resnet50", True, [3, 4, 6, 3], fused, plain, kwargs)


def resnet101(*, fused: bool = True, plain: bool = False, **kwargs) -> ResNet:
    """ResNet-101 (torchvision key names); ``fused=False`` gives the reference twin."""
    return _resnet("resnet101", True, [3, 4, 23, 3], fused, plain, kwargs)


def resnet152(*, fused: bool = True, plain: bool = False, **kwargs) -> ResNet:
    """ResNet-152 (torchvision key names); ``fused=False`` gives the reference twin."""
    return _resnet("resnet152", True, [3, 8, 36, 3], fused, plain, kwargs)


def resnext50_32x4d(*, fused: bool = True, plain: bool = False, **kwargs) -> ResNet:
    """ResNeXt-50 32x4d: grouped 3x3 convs (32 groups of width 4 at the first stage)."""
    return _resnet("resnext50_32x4d", True, [3, 4, 6, 3], fused, plain, kwargs, groups=32, width_per_group=4)


def wide_resnet50_2(*, fused: bool = True, plain: bool = False, **kwargs) -> ResNet:
    """Wide ResNet-50-2: bottleneck width doubled (outer channels as in ResNet-50)."""
    return _resnet("wide_resnet50_2", True, [3, 4, 6, 3], fused, plain, kwargs, width_per_group=128)


class CifarResNet(_FusedStemNet):
    """The paper's CIFAR-10 ResNet (He et al. 2015, sec. 4.2): 6n+2 layers, 16/32/64 filters, no maxpool.

    ``shortcut``: "A" identity with zero-padded channels where the shape changes (no parameters), "B"
    projection where the shape changes, "C" projection on every block. ``plain=True``: no shortcuts.
    """

    def __init__(self, depth: int, shortcut: str = "A", num_classes: int = 10, *, fused: bool = True,
                 plain: bool = False) -> None:
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ValueError(f"cifar_resnet: expected depth = 6n+2 with n >= 1 (20, 32, 44, 56, 110, ...), "
                             f"but got depth={depth!r}")
        if shortcut not in ("A", "B", "C"):
            raise ValueError(f"cifar_resnet: expected shortcut to be 'A', 'B' or 'C', but got shortcut={shortcut!r}")
        self.depth, self.shortcut, self.fused, self.plain = depth, shortcut, fused, plain
        n = (depth - 2) // 6
        block = FusedBasicBlock if fused else BasicBlock
        self.inplanes = 16
        self.conv1 = conv3x3(3, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_stage(block, 16, n, stride=1)
        self.layer2 = self._make_stage(block, 32, n, stride=2)
        self.layer3 = self._make_stage(block, 64, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(64, num_classes)
        self._init_weights()

    def _shortcut(self, planes: int, stride: int) -> Optional[nn.Module]:
        reshapes = stride != 1 or self.inplanes != planes
        if self.plain or not (reshapes or self.shortcut == "C"):
            return None
        if self.shortcut == "A":
            return PadChannelsShortcut(self.inplanes, planes, stride)
        return nn.Sequential(conv1x1(self.inplanes, planes, stride), nn.BatchNorm2d(planes))

    def _make_stage(self, block: Block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for i in range(blocks):
            s = stride if i == 0 else 1
            layers.append(block(self.inplanes, planes, s, self._shortcut(planes, s), residual=not self.plain))
            self.inplanes = planes
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self._stem(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def cifar_resnet(depth: int, shortcut: str = "A", num_classes: int = 10, *, fused: bool = True,
                 plain: bool = False) -> CifarResNet:
    """The paper's CIFAR ResNet of ``depth`` = 6n+2 layers (20, 32, 44, 56, 110); see ``CifarResNet``."""
    return CifarResNet(depth, shortcut, num_classes, fused=fused, plain=plain)
