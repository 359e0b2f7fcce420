"""timm-shaped ResNets for the conversion tests, where timm does not import (beside
the local torch 2.13 CPU build, torchvision from PyPI fails: 'operator torchvision::nms does not exist', and
timm needs torchvision). Written here from the libraries' documented structure and forward semantics:
the attribute names, child order, state_dict keys and the order of operations are theirs, no code is copied.
"""
from typing import Optional, Sequence

import torch
from torch import nn


class DropPath(nn.Module):
    """timm's stochastic depth: per-sample keep mask (bernoulli(keep) / keep, drawn with x.new_empty)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        if keep > 0.0:
            mask.div_(keep)
        return x * mask


class SEModule(nn.Module):
    """timm's squeeze-excite: mean -> 1x1 conv (bias) -> ReLU -> 1x1 conv -> sigmoid gate."""

    def __init__(self, channels: int):
        super().__init__()
        rd = max(channels // 4, 2)
        self.fc1, self.bn, self.act = nn.Conv2d(channels, rd, 1, bias=True), nn.Identity(), nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(rd, channels, 1, bias=True)

    def forward(self, x):
        s = self.fc2(self.act(self.bn(self.fc1(x.mean((2, 3), keepdim=True)))))
        return x * torch.sigmoid(s)


class EcaModule(nn.Module):
    """timm's efficient channel attention: mean -> 1-D conv across channels -> sigmoid gate."""

    def __init__(self, channels: int, kernel_size: int = 3):
        super().__init__()
        self.conv = nn.Conv1d(1, 1, kernel_size, padding=(kernel_size - 1) // 2, bias=False)

    def forward(self, x):
        y = self.conv(x.mean((2, 3)).view(x.shape[0], 1, -1))
        return x * torch.sigmoid(y).view(x.shape[0], -1, 1, 1)


ATTN = {None: None, "se": SEModule, "eca": EcaModule}


class _Tail:
    def _attention_drop_path_add_act(self, x, shortcut, act):
        """timm's block end: se, drop_path, downsample of the shortcut, in-place add, activation."""
        if self.se is not None:
            x = self.se(x)
        if self.drop_path is not None:
            x = self.drop_path(x)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x += shortcut
        return act(x)


class BasicBlock(_Tail, nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, cardinality=1, base_width=64, attn=None,
                 drop_path: float = 0.0):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.drop_block = nn.Identity()
        self.act1 = nn.ReLU(inplace=True)
        self.aa = nn.Identity()
        self.conv2 = nn.Conv2d(planes, out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out)
        self.se = ATTN[attn](out) if attn else None
        self.act2 = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.drop_path = DropPath(drop_path) if drop_path > 0 else None

    def forward(self, x):
        shortcut = x
        x = self.aa(self.act1(self.drop_block(self.bn1(self.conv1(x)))))
        return self._attention_drop_path_add_act(self.bn2(self.conv2(x)), shortcut, self.act2)


class Bottleneck(_Tail, nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, cardinality=1, base_width=64, attn=None,
                 drop_path: float = 0.0):
        super().__init__()
        width = int(planes * (base_width / 64)) * cardinality
        out = planes * self.expansion
        self.conv1, self.bn1, self.act1 = nn.Conv2d(inplanes, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=cardinality, bias=False)
        self.bn2, self.drop_block, self.act2, self.aa = nn.BatchNorm2d(width), nn.Identity(), nn.ReLU(), nn.Identity()
        self.conv3, self.bn3 = nn.Conv2d(width, out, 1, bias=False), nn.BatchNorm2d(out)
        self.se = ATTN[attn](out) if attn else None
        self.act3 = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.drop_path = DropPath(drop_path) if drop_path > 0 else None

    def forward(self, x):
        shortcut = x
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.aa(self.act2(self.drop_block(self.bn2(self.conv2(x)))))
        return self._attention_drop_path_add_act(self.bn3(self.conv3(x)), shortcut, self.act3)


def downsample(inplanes: int, out: int, stride: int, avg_down: bool) -> nn.Sequential:
    """timm's downsample_conv (1x1 conv + BN) or downsample_avg (resnet-D: AvgPool2d(2, 2) + 1x1 conv + BN)."""
    if not avg_down:
        return nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out))
    pool = nn.Identity() if stride == 1 else nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False)
    return nn.Sequential(pool, nn.Conv2d(inplanes, out, 1, bias=False), nn.BatchNorm2d(out))


class ResNet(nn.Module):
    """timm.models.resnet.ResNet's layout: stem ('' 7x7, 'deep', 'deep_tiered'), bn1/act1/maxpool, 4 stages,
    forward_features / forward_head."""

    def __init__(self, block, layers: Sequence[int] = (1, 1, 1, 1), widths=(8, 16, 32, 64), num_classes=10,
                 stem_type: str = "", avg_down: bool = False, cardinality: int = 1, base_width: int = 64,
                 attn: Optional[str] = None, drop_path_rate: float = 0.0):
        super().__init__()
        inplanes = widths[0]
        if "deep" in stem_type:
            c0, c1 = ((3 * (inplanes // 2) // 4, inplanes // 2) if "tiered" in stem_type else (inplanes // 2,) * 2)
            self.conv1 = nn.Sequential(nn.Conv2d(3, c0, 3, 2, 1, bias=False), nn.BatchNorm2d(c0), nn.ReLU(),
                                       nn.Conv2d(c0, c1, 3, 1, 1, bias=False), nn.BatchNorm2d(c1), nn.ReLU(),
                                       nn.Conv2d(c1, inplanes, 3, 1, 1, bias=False))
        else:
            self.conv1 = nn.Conv2d(3, inplanes, 7, 2, 3, bias=False)
        self.bn1, self.act1, self.maxpool = nn.BatchNorm2d(inplanes), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
        total, k = sum(layers), 0
        for i, (planes, n) in enumerate(zip(widths, layers)):
            stride, out, blocks = (1 if i == 0 else 2), planes * block.expansion, []
            for j in range(n):
                ds = downsample(inplanes, out, stride, avg_down) if j == 0 and (stride != 1 or inplanes != out) \
                    else None
                blocks.append(block(inplanes, planes, stride if j == 0 else 1, ds, cardinality, base_width, attn,
                                    drop_path_rate * k / max(total - 1, 1)))
                inplanes, k = out, k + 1
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.global_pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(inplanes, num_classes)
        self.grad_checkpointing = False

    def forward_features(self, x):
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, x):
        return self.fc(torch.flatten(self.global_pool(x), 1))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


# name: (block, ResNet keyword arguments): the families of issue 11, narrow (interpreter-cheap)
FAMILIES = {
    "resnet18": (BasicBlock, {}),
    "resnet50": (Bottleneck, {}),
    "resnet18d": (BasicBlock, dict(stem_type="deep", avg_down=True)),
    "resnet50d": (Bottleneck, dict(stem_type="deep", avg_down=True)),
    "resnet26t": (Bottleneck, dict(stem_type="deep_tiered", avg_down=True)),
    "seresnet50": (Bottleneck, dict(attn="se")),
    "ecaresnet26t": (Bottleneck, dict(stem_type="deep_tiered", avg_down=True, attn="eca")),
    "wide_resnet50_2": (Bottleneck, dict(base_width=128)),
    "resnext50_32x4d": (Bottleneck, dict(cardinality=4, base_width=16)),  # grouped 3x3 convs
}


def timm_like(name: str, **kwargs) -> ResNet:
    block, kw = FAMILIES[name]
    return ResNet(block, **{**kw, **kwargs})
