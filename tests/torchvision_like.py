"""A torchvision-shaped ResNet for the conversion tests, where torchvision does not import (beside the local
torch 2.13 CPU build, PyPI's torchvision fails: 'operator torchvision::nms does not exist'). Written here
from torchvision's documented layout: class name, attribute names, key names and forward order are its own.
"""
import torch
from torch import nn

from fusedres import reference


class ResNet(nn.Module):
    """torchvision.models.ResNet's stem, forward and key names around any stages: ``from_model`` adopts the
    children of fusedres's reference builders (``fused=False``), which have torchvision's layout."""

    def __init__(self, children: dict):
        super().__init__()
        for name, child in children.items():
            setattr(self, name, child)

    @classmethod
    def from_model(cls, model: nn.Module) -> "ResNet":
        return cls(dict(model.named_children()))

    def _forward_impl(self, x):
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def forward(self, x):
        return self._forward_impl(x)


def torchvision_resnet(bottleneck: bool, widths=(8, 16, 32, 64), layers=(1, 1, 1, 1), groups=1, base_width=64,
                       num_classes=10) -> ResNet:
    """A narrow torchvision-layout ResNet (cheap in the interpreter) made of fusedres's reference blocks."""
    block = reference.Bottleneck if bottleneck else reference.BasicBlock
    inplanes = widths[0]
    children = {"conv1": nn.Conv2d(3, inplanes, 7, 2, 3, bias=False), "bn1": nn.BatchNorm2d(inplanes),
                "relu": nn.ReLU(inplace=True), "maxpool": nn.MaxPool2d(3, 2, 1)}
    for i, (planes, n) in enumerate(zip(widths, layers)):
        stride, out = (1 if i == 0 else 2), planes * block.expansion
        blocks = []
        for j in range(n):
            ds = None
            if j == 0 and (stride != 1 or inplanes != out):
                ds = nn.Sequential(reference.conv1x1(inplanes, out, stride), nn.BatchNorm2d(out))
            blocks.append(block(inplanes, planes, stride if j == 0 else 1, ds, groups=groups, base_width=base_width))
            inplanes = out
        children[f"layer{i + 1}"] = nn.Sequential(*blocks)
    children["avgpool"] = nn.AdaptiveAvgPool2d(1)
    children["fc"] = nn.Linear(inplanes, num_classes)
    return ResNet(children)
