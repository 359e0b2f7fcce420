"""The fused path runs our Triton kernels: no aten convolution or batch-norm op may run (DESIGN.md §2).

A TorchDispatchMode sees every aten op; Triton launches do not go through the dispatcher, so a
fused forward shows only allocations, views and tiny per-channel vector math.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fusedres
from helpers import randomize_bn

FORBIDDEN = ("convolution", "conv2d", "conv_depthwise", "cudnn", "mkldnn", "batch_norm")


class RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))

    def forbidden(self):
        return sorted({op for op in self.ops if any(word in op for word in FORBIDDEN)})


def test_recorder_sees_the_reference_convolution():
    """The check itself works: the reference block does show convolution and batch-norm ops."""
    block = fusedres.reference.BasicBlock(8, 8).eval()
    with RecordOps() as rec, torch.no_grad():
        block(torch.randn(1, 8, 5, 5))
    assert any("convolution" in op for op in rec.forbidden())
    assert any("batch_norm" in op for op in rec.forbidden())


@pytest.mark.parametrize("block_cls,planes", [(fusedres.FusedBasicBlock, 16), (fusedres.FusedBottleneck, 8)])
def test_fused_blocks_run_no_aten_conv_or_bn(block_cls, planes, device):
    cout = planes * block_cls.expansion
    ds = torch.nn.Sequential(fusedres.reference.conv1x1(16, cout, 2), torch.nn.BatchNorm2d(cout))
    block = randomize_bn(block_cls(16, planes, 2, ds)).eval().to(device)
    x = torch.randn(2, 16, 8, 8, device=device).to(memory_format=torch.channels_last)
    with RecordOps() as rec, torch.no_grad():
        block(x)
    assert rec.ops, "the recorder saw nothing: the check would be vacuous"
    assert rec.forbidden() == [], f"PyTorch conv/BN ran on the fused path: {rec.forbidden()}"


def test_fused_cifar_model_runs_no_aten_conv_or_bn(device):
    model = randomize_bn(fusedres.cifar_resnet(20, shortcut="B")).eval().to(device)
    with RecordOps() as rec, torch.no_grad():
        model(torch.randn(1, 3, 16, 16, device=device))
    assert rec.forbidden() == [], f"PyTorch conv/BN ran on the fused path: {rec.forbidden()}"


@pytest.mark.parametrize("block_cls,planes,shortcut", [(fusedres.FusedBasicBlock, 16, "projection"),
                                                       (fusedres.FusedBottleneck, 8, "projection"),
                                                       (fusedres.FusedBasicBlock, 32, "A")])
def test_fused_training_forward_backward_run_no_aten_conv_or_bn(block_cls, planes, shortcut, device):
    cout = planes * block_cls.expansion
    ds = torch.nn.Sequential(fusedres.reference.conv1x1(16, cout, 2), torch.nn.BatchNorm2d(cout)) \
        if shortcut == "projection" else fusedres.PadChannelsShortcut(16, cout, 2)
    block = block_cls(16, planes, 2, ds).train().to(device)
    x = torch.randn(2, 16, 8, 8, device=device, requires_grad=True)
    with RecordOps() as rec:
        block(x).sum().backward()
    assert rec.ops, "the recorder saw nothing: the check would be vacuous"
    assert rec.forbidden() == [], f"PyTorch conv/BN ran on the fused training path: {rec.forbidden()}"
    assert x.grad is not None and all(p.grad is not None for p in block.parameters())
