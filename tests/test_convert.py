"""fusedres.convert: duck-typed, in-place swap of torchvision-shaped blocks, state_dict untouched; and
interop with real torchvision where it imports (it does not beside the local torch 2.13 CPU build)."""
import copy
import warnings

import pytest
import torch
from torch import nn

import fusedres
from fusedres.reference import BasicBlock as RefBasicBlock
from fusedres.reference import Bottleneck as RefBottleneck
from fusedres.reference import conv1x1, conv3x3
from helpers import assert_close, randomize_bn

FUSED = (fusedres.FusedBasicBlock, fusedres.FusedBottleneck)


class BasicBlock(nn.Module):
    """A third-party block with torchvision's structure and forward (not a fusedres class)."""

    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1, self.bn1 = conv3x3(inplanes, planes, stride), nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = conv3x3(planes, planes), nn.BatchNorm2d(planes)
        self.downsample, self.stride = downsample, stride

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


def small_resnet(block, fused=False):
    """A 4-stage torchvision-layout ResNet with one block per stage: cheap in the interpreter."""
    return fusedres.ResNet(block, [1, 1, 1, 1], num_classes=10, fused=fused)


def converted_with_twin(model, device):
    """(convert(model) on device in channels_last, an unconverted float64 copy), both in eval mode."""
    model = randomize_bn(model).to(device).eval()
    ref = copy.deepcopy(model).double()
    return fusedres.convert(model).to(memory_format=torch.channels_last), ref


def assert_parity(model, ref, x):
    with torch.no_grad():
        out, expected = model(x.to(memory_format=torch.channels_last)), ref(x.double())
    assert expected.abs().max() > 1e-3
    assert_close(out, expected, torch.float32, "converted model")


def assert_all_converted(model):
    names = [n for n, m in model.named_modules() if type(m).__name__ in ("BasicBlock", "Bottleneck")]
    assert not names, f"not converted: {names}"


@pytest.mark.parametrize("block", [RefBasicBlock, RefBottleneck], ids=lambda b: b.__name__)
def test_convert_reference_model(block, device):
    model = small_resnet(block)
    before = model.state_dict(keep_vars=True)
    blocks_before = [m for m in model.modules() if isinstance(m, block)]
    model, ref = converted_with_twin(model, device)
    assert_all_converted(model)
    blocks = [m for m in model.modules() if isinstance(m, FUSED)]
    assert [id(b) for b in blocks] == [id(b) for b in blocks_before]  # swapped in place: the same objects
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(before)
    assert all(after[k] is before[k] for k in before if k.endswith(("weight", "bias")))  # shared, not copied
    assert model.fused, "convert also switches on the fused stem of fusedres's own ResNet"
    assert_parity(model, ref, torch.randn(1, 3, 32, 32, device=device))


def test_convert_duck_typed_block(device):
    down = nn.Sequential(conv1x1(16, 32, 2), nn.BatchNorm2d(32))
    model = nn.Sequential(conv3x3(3, 16), nn.BatchNorm2d(16), nn.ReLU(),
                          BasicBlock(16, 16), BasicBlock(16, 32, 2, down), nn.AdaptiveAvgPool2d(1))
    model, ref = converted_with_twin(model, device)
    assert all(isinstance(model[i], fusedres.FusedBasicBlock) and model[i].residual for i in (3, 4))
    assert model[4].downsample is down
    assert_parity(model, ref, torch.randn(2, 3, 16, 16, device=device))


def test_convert_root_block_keeps_hooks_and_training_flag(device):
    block = BasicBlock(8, 8).to(device)
    calls = []
    handle = block.register_forward_hook(lambda m, i, o: calls.append(type(m).__name__))
    assert fusedres.convert(block) is block and isinstance(block, fusedres.FusedBasicBlock)
    assert block.training
    block.eval()
    with torch.no_grad():
        block(torch.randn(1, 8, 8, 8, device=device))
    assert calls == ["FusedBasicBlock"]
    handle.remove()
    with torch.no_grad():
        block(torch.randn(1, 8, 8, 8, device=device))
    assert calls == ["FusedBasicBlock"]


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_convert_preserves_training_flags(mode):
    model = small_resnet(RefBasicBlock)
    model.train(mode == "train")
    model.layer2.train(mode != "train")  # a mixed model stays mixed
    flags = {n: m.training for n, m in model.named_modules()}
    fusedres.convert(model)
    assert {n: m.training for n, m in model.named_modules()} == flags


def test_unfusable_blocks_stay_and_are_named_in_one_warning():
    model = small_resnet(RefBasicBlock)
    model.layer1[0].bn1 = nn.GroupNorm(4, 64)
    model.layer2[0].downsample = nn.Sequential(nn.AvgPool2d(2), conv1x1(64, 128), nn.BatchNorm2d(128))  # ResNet-D
    with pytest.warns(UserWarning) as record:
        fusedres.convert(model)
    messages = [str(w.message) for w in record if "fusedres.convert" in str(w.message)]
    assert len(messages) == 1
    assert "layer1.0" in messages[0] and "GroupNorm" in messages[0]
    assert "layer2.0" in messages[0] and "downsample" in messages[0]
    assert type(model.layer1[0]) is RefBasicBlock and type(model.layer2[0]) is RefBasicBlock
    assert isinstance(model.layer3[0], fusedres.FusedBasicBlock) and isinstance(model.layer4[0], FUSED)


def test_name_alike_blocks_with_another_structure_are_left_alone():
    class Bottleneck(nn.Module):  # e.g. a CIFAR repo's block: "shortcut", not "downsample"
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1, self.shortcut = conv1x1(4, 4), nn.BatchNorm2d(4), nn.Sequential()

    class NotABlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = conv1x1(4, 4), nn.BatchNorm2d(4)

    silu = BasicBlock(4, 4)
    silu.relu = nn.SiLU()
    model = nn.Sequential(Bottleneck(), NotABlock(), silu)
    with pytest.warns(UserWarning, match=r"0 \(Bottleneck: it has no downsample.*2 \(BasicBlock: .*SiLU"):
        fusedres.convert(model)
    assert [type(m) for m in model] == [Bottleneck, NotABlock, BasicBlock]


def test_convert_leaves_fused_models_alone():
    model = fusedres.cifar_resnet(20)
    before = {n: m for n, m in model.named_modules()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fusedres.convert(model) is model
    assert {n: m for n, m in model.named_modules()} == before


def test_convert_plain_reference_model_keeps_plain():
    model = fusedres.cifar_resnet(20, plain=True, fused=False)
    fusedres.convert(model)
    assert all(isinstance(b, fusedres.FusedBasicBlock) and not b.residual for s in (model.layer1, model.layer3)
               for b in s)


@pytest.mark.parametrize("bad", [None, 3, "resnet18", torch.zeros(1), nn.Conv2d])
def test_convert_rejects_non_modules(bad):
    with pytest.raises(TypeError, match=f"model.*nn.Module.*{type(bad).__name__}"):
        fusedres.convert(bad)


# ---------------------------------------------------------------- real torchvision (skipped where absent)


@pytest.fixture
def torchvision():
    try:
        import torchvision
    except Exception as exc:  # absent, or built for another torch (it raises more than ImportError then)
        pytest.skip(f"torchvision does not import here: {type(exc).__name__}: {exc}")
    return torchvision


@pytest.mark.parametrize("name", ["resnet18", pytest.param("resnet50", marks=pytest.mark.slow)])
def test_convert_torchvision_model(torchvision, name, device):
    model = getattr(torchvision.models, name)(num_classes=10)
    before = model.state_dict(keep_vars=True)
    model, ref = converted_with_twin(model, device)
    assert_all_converted(model)
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(before) and all(after[k] is before[k] for k in before)
    assert_parity(model, ref, torch.randn(1, 3, 32, 32, device=device))


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
                                  "wide_resnet50_2"])
def test_builders_match_torchvision_state_dict(torchvision, name):
    with torch.device("meta"):
        ours, theirs = getattr(fusedres, name)().state_dict(), getattr(torchvision.models, name)().state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)


def test_torchvision_resnet_accepts_fused_blocks(torchvision):
    model = torchvision.models.ResNet(fusedres.FusedBasicBlock, [2, 2, 2, 2])
    model.load_state_dict(torchvision.models.resnet18().state_dict(), strict=True)
    ours = fusedres.resnet18()
    ours.load_state_dict(model.state_dict(), strict=True)
    torchvision.models.resnet18().load_state_dict(ours.state_dict(), strict=True)
