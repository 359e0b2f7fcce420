"""Model builders: torchvision key names, the paper's CIFAR nets, and whole-model parity of the fused
models against their float64 reference twins (FUSEDRES_STRICT=1: any fallback would be an error)."""
import pytest
import torch
from torch import nn

import fusedres
from fusedres import _dispatch
from fusedres.reference import BasicBlock
from helpers import DTYPES, assert_close, randomize_bn

BUILDERS = [fusedres.resnet18, fusedres.resnet34, fusedres.resnet50, fusedres.resnet101, fusedres.resnet152,
            fusedres.resnext50_32x4d, fusedres.wide_resnet50_2]
FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


def cifar(shortcut="A", plain=False):
    return lambda fused: fusedres.cifar_resnet(20, shortcut, fused=fused, plain=plain)


def imagenet(builder, **kw):
    return lambda fused: builder(fused=fused, **kw)


def twins(build, dtype, device, memory_format=torch.channels_last):
    """(fused model in dtype, its reference twin in float64 with the same weights), both in eval mode."""
    fused = randomize_bn(build(True))
    ref = build(False)
    fused = fused.to(device=device, dtype=dtype, memory_format=memory_format).eval()
    ref.load_state_dict(fused.state_dict(), strict=True)
    return fused, ref.to(device=device, dtype=torch.float64).eval()


def check_formats(model, memory_format):
    """Forward hooks asserting that every block (and the stem, seen as layer1's input) keeps the format."""
    bad = []

    def hook(name):
        def check(module, inputs, output):
            if not output.is_contiguous(memory_format=memory_format):
                bad.append(name)
        return check
    model.layer1.register_forward_pre_hook(lambda m, inputs: hook("stem")(m, None, inputs[0]))
    for name, m in model.named_modules():
        if isinstance(m, (fusedres.FusedBasicBlock, fusedres.FusedBottleneck)):
            m.register_forward_hook(hook(name))
    return bad


def run_parity(fused, ref, x, dtype, memory_format=torch.channels_last, what="logits"):
    bad = check_formats(fused, memory_format)
    with torch.no_grad():
        out, expected = fused(x.to(dtype=dtype, memory_format=memory_format)), ref(x.double())
    assert out.dtype == dtype
    assert not bad, f"outputs of {bad} lost the input's memory format {memory_format}"
    assert expected.abs().max() > 1e-3, "degenerate reference output: the test would prove nothing"
    assert_close(out, expected, dtype, what)


# ---------------------------------------------------------------- state_dict names and structure


@pytest.mark.parametrize("builder", BUILDERS, ids=lambda b: b.__name__)
def test_builder_twins_have_identical_state_dicts(builder):
    with torch.device("meta"):  # shapes and names only: nothing allocated or initialised
        fused, ref = builder(), builder(fused=False)
    assert type(fused.layer1[0]).__name__.startswith("Fused") and not type(ref.layer1[0]).__name__.startswith("Fused")
    sf, sr = fused.state_dict(), ref.state_dict()
    assert list(sf) == list(sr)
    assert all(sf[k].shape == sr[k].shape for k in sf)
    fused.load_state_dict(sr, strict=True)
    ref.load_state_dict(sf, strict=True)


@pytest.mark.parametrize("shortcut,plain", [("A", False), ("B", False), ("C", False), ("A", True)])
def test_cifar_twins_have_identical_state_dicts(shortcut, plain):
    fused, ref = cifar(shortcut, plain)(True), cifar(shortcut, plain)(False)
    assert list(fused.state_dict()) == list(ref.state_dict())
    fused.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(fused.state_dict(), strict=True)


def test_resnet_keys_and_shapes_follow_torchvision():
    sd = fusedres.resnet50().state_dict()
    assert list(sd)[:6] == ["conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var",
                            "bn1.num_batches_tracked"]
    assert sd["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    assert sd["layer2.0.conv2.weight"].shape == (128, 128, 3, 3)  # stride on the 3x3 conv ("V1.5")
    assert fusedres.resnet50().layer2[0].conv2.stride == (2, 2)
    assert sd["fc.weight"].shape == (1000, 2048)
    assert fusedres.resnext50_32x4d().layer1[0].conv2.groups == 32
    assert fusedres.wide_resnet50_2().layer1[0].conv2.weight.shape == (128, 128, 3, 3)
    assert fusedres.resnet18(num_classes=7).fc.out_features == 7


def test_resnet_init_matches_torchvision():
    m = fusedres.resnet18(zero_init_residual=True)
    w = m.layer3[1].conv1.weight  # kaiming normal, fan_out: std = sqrt(2 / (256 * 9))
    assert abs(w.std().item() / (2 / (256 * 9)) ** 0.5 - 1) < 0.05
    assert torch.equal(m.bn1.weight, torch.ones(64)) and torch.equal(m.bn1.bias, torch.zeros(64))
    assert all(b.bn2.weight.abs().sum() == 0 and b.bn1.weight.abs().sum() > 0 for b in m.modules()
               if isinstance(b, fusedres.FusedBasicBlock))
    assert all(b.bn3.weight.abs().sum() == 0 for b in fusedres.resnet50(zero_init_residual=True).modules()
               if isinstance(b, fusedres.FusedBottleneck))


def test_plain_resnet_has_no_shortcuts():
    m = fusedres.resnet18(plain=True)
    assert not any("downsample" in k for k in m.state_dict())
    assert all(not b.residual for b in m.modules() if isinstance(b, fusedres.FusedBasicBlock))
    assert list(m.state_dict()) == list(fusedres.resnet18(plain=True, fused=False).state_dict())


@pytest.mark.parametrize("kwargs", [{"weights": "DEFAULT"}, {"pretrained": True}])
def test_pretrained_weights_are_rejected(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=f"resnet50.*{name}"):
        fusedres.resnet50(**kwargs)
    fusedres.resnet18(weights=None, pretrained=False, progress=True)  # torchvision's "no weights" is fine


def test_variant_defining_arguments_cannot_be_overridden():
    with pytest.raises(ValueError, match="groups=32"):
        fusedres.resnext50_32x4d(groups=8)


def test_cifar_resnet20_structure():
    m = fusedres.cifar_resnet(20)
    stages = [m.layer1, m.layer2, m.layer3]
    assert [len(s) for s in stages] == [3, 3, 3]
    assert [s[0].conv2.out_channels for s in stages] == [16, 32, 64]
    assert [s[0].stride for s in stages] == [1, 2, 2]
    assert m.conv1.out_channels == 16 and m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1)
    assert not hasattr(m, "maxpool") and m.fc.in_features == 64 and m.fc.out_features == 10
    convs = [c for c in m.modules() if isinstance(c, nn.Conv2d)]
    assert len(convs) + 1 == 20  # 19 conv layers + fc
    n_params = sum(p.numel() for p in m.parameters())
    assert n_params == 269_722  # the paper's "0.27M"
    assert isinstance(m.layer2[0].downsample, fusedres.PadChannelsShortcut)
    assert m.layer2[1].downsample is None and m.layer1[0].downsample is None
    assert not any("downsample" in k for k in m.state_dict())  # option A: parameter-free


def test_cifar_shortcut_options_b_c_and_plain():
    count = {s: sum(p.numel() for p in fusedres.cifar_resnet(20, s).parameters()) for s in "ABC"}
    proj_b = (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)  # two projections (1x1 conv + BN) where shape changes
    assert count["B"] == count["A"] + proj_b
    proj_c = 3 * (16 * 16 + 2 * 16) + 2 * (32 * 32 + 2 * 32) + 2 * (64 * 64 + 2 * 64)  # and the other 7 blocks
    assert count["C"] == count["B"] + proj_c
    b, c = fusedres.cifar_resnet(20, "B"), fusedres.cifar_resnet(20, "C")
    assert b.layer1[0].downsample is None and isinstance(b.layer3[0].downsample, nn.Sequential)
    assert all(isinstance(blk.downsample, nn.Sequential) for s in (c.layer1, c.layer2, c.layer3) for blk in s)
    plain = fusedres.cifar_resnet(56, plain=True)
    assert len(plain.layer3) == 9
    assert all(blk.downsample is None and not blk.residual for s in (plain.layer1, plain.layer2, plain.layer3)
               for blk in s)


@pytest.mark.parametrize("depth", [21, 18, 2, 0, -4, 20.0, True])
def test_cifar_bad_depth(depth):
    with pytest.raises(ValueError, match=r"depth.*6n\+2.*" + repr(depth).replace(".", r"\.")):
        fusedres.cifar_resnet(depth)


@pytest.mark.parametrize("depth", [8, 20, 32, 44, 56, 110])
def test_cifar_depths(depth):
    m = fusedres.cifar_resnet(depth, fused=False)
    assert sum(isinstance(c, nn.Conv2d) for c in m.modules()) + 1 == depth


def test_cifar_bad_shortcut():
    with pytest.raises(ValueError, match="shortcut.*'D'"):
        fusedres.cifar_resnet(20, "D")


# ---------------------------------------------------------------- eval parity (the kernels run)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("builder", [fusedres.resnet18, pytest.param(fusedres.resnet50, marks=pytest.mark.slow)],
                         ids=lambda b: b.__name__)
def test_imagenet_resnet_eval_parity(builder, fmt, device):
    fused, ref = twins(imagenet(builder), torch.float32, device, FORMATS[fmt])
    run_parity(fused, ref, torch.randn(1, 3, 32, 32, device=device), torch.float32, FORMATS[fmt])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
# Option A with projections off stays in the fast set through "plain" (the same shortcut, no stage BN): "A" is slow.
@pytest.mark.parametrize("shortcut,plain", [pytest.param("A", False, marks=pytest.mark.slow), ("B", False),
                                            ("C", False), ("A", True)], ids=["A", "B", "C", "plain"])
def test_cifar_resnet_eval_parity(shortcut, plain, dtype, device):
    fused, ref = twins(cifar(shortcut, plain), dtype, device)
    run_parity(fused, ref, torch.randn(2, 3, 32, 32, device=device), dtype)


def test_cifar_resnet_eval_parity_contiguous(device):
    fused, ref = twins(cifar("A"), torch.float32, device, torch.contiguous_format)
    run_parity(fused, ref, torch.randn(2, 3, 32, 32, device=device), torch.float32, torch.contiguous_format)


@pytest.mark.parametrize("builder,layer,channels", [(fusedres.resnext50_32x4d, "layer1", 64),
                                                    (fusedres.wide_resnet50_2, "layer2", 256)],
                         ids=["resnext50_32x4d.layer1", "wide_resnet50_2.layer2"])
def test_wide_and_grouped_stage_eval_parity(builder, layer, channels, device):
    """One stage of each (the whole models are slow in the interpreter): grouped / wide 3x3 convs."""
    fused, ref = twins(imagenet(builder), torch.float32, device)
    x = torch.randn(1, channels, 8, 8, device=device)
    with torch.no_grad():
        out = getattr(fused, layer)(x.to(memory_format=torch.channels_last))
        expected = getattr(ref, layer)(x.double())
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close(out, expected, torch.float32, f"{builder.__name__}.{layer}")


@pytest.mark.slow  # a whole ResNet-50
def test_dilated_resnet50_eval_parity(device):
    build = imagenet(fusedres.resnet50, replace_stride_with_dilation=[False, False, True], num_classes=10)
    fused, ref = twins(build, torch.float32, device)
    assert fused.layer4[1].conv2.dilation == (2, 2)
    run_parity(fused, ref, torch.randn(1, 3, 32, 32, device=device), torch.float32)


# ---------------------------------------------------------------- training mode (fused batch statistics)


def small_imagenet_resnet(fused):
    """ImageNet layout (7x7 stem, maxpool, 4 stages with projections), one block per stage."""
    return fusedres.ResNet(fusedres.FusedBasicBlock if fused else BasicBlock, [1, 1, 1, 1], num_classes=10, fused=fused)


# Batch statistics over 2 values per channel are ill-conditioned (eager fp32 itself is off by ~1e-3 from
# float64 then): the inputs are sized so that the last stage still has >= 8 values per channel.
# The CIFAR net runs in float64, which checks the whole chain's logic to 1e-12: in fp32 its smallest
# parameter gradients (BN biases followed by another batch-statistics BN) measured 2.5e-6 to 9.5e-6 over
# seeds, too close to the table's 1e-5 for a stable test (eager CPU accumulates BN reductions in double).
@pytest.mark.parametrize("build,size,dtype", [(lambda fused: fusedres.cifar_resnet(8, "B", fused=fused), 32,
                                               torch.float64),
                                              pytest.param(small_imagenet_resnet, 48, torch.float32,
                                                           marks=pytest.mark.slow)],  # ~20 s: CI's full pass
                         ids=["cifar8B-float64", "imagenet_layout-float32"])
def test_train_step_parity(build, size, dtype, device):
    """Training forward, backward and running statistics of the whole model (stem included) on the kernels."""
    fused = randomize_bn(build(True)).to(device, dtype).train()
    ref = build(False)
    ref.load_state_dict(fused.state_dict(), strict=True)
    ref = ref.to(device, torch.float64).train()
    x = torch.randn(2, 3, size, size, device=device, dtype=torch.float64)
    out, expected = fused(x.to(dtype=dtype, memory_format=torch.channels_last)), ref(x)
    assert_close(out, expected, dtype, "train-mode logits")
    grad = torch.randn_like(expected)
    out.backward(grad.to(dtype))
    expected.backward(grad)
    params_ref, buffers_ref = dict(ref.named_parameters()), dict(ref.named_buffers())
    for name, p in fused.named_parameters():
        assert_close(p.grad, params_ref[name].grad, dtype, f"gradient of {name}")
    # Running statistics: fp32 accuracy at most, even for fp64 (bn_finalize mixes fp32 scalars, momentum and
    # M / (M - 1.0), into the fp64 update: ~1e-8 off).
    for name, b in fused.named_buffers():
        if b.dtype.is_floating_point:
            assert_close(b, buffers_ref[name], torch.float32, f"buffer {name}")
        else:
            assert torch.equal(b, buffers_ref[name]) and b.item() == 1, f"buffer {name}: {b} != {buffers_ref[name]}"


def test_stem_calls_fused_ops(monkeypatch, device):
    """Eval: the stem is one conv_bn_act launch (conv1+bn1+relu); training: the one-unit batch-stats chain."""
    import fusedres.stems as stems  # the models' stem runs stems.run_stem
    calls = []
    for name in ("eval_conv", "train_forward"):
        real = getattr(stems, name)
        monkeypatch.setattr(stems, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    fused, ref = twins(cifar("A"), torch.float32, device)
    x = torch.randn(2, 3, 32, 32, device=device)
    with torch.no_grad():
        assert_close(fused._stem(x), ref.relu(ref.bn1(ref.conv1(x.double()))), torch.float32, "eval stem")
        fused.train(), ref.train()
        assert_close(fused._stem(x), ref.relu(ref.bn1(ref.conv1(x.double()))), torch.float32, "train stem")
    assert calls == ["eval_conv", "train_forward"]
    assert_close(fused.bn1.running_mean, ref.bn1.running_mean, torch.float32, "stem running_mean")


def test_unfusable_stem_falls_back_announced(monkeypatch, device):
    """A stem the kernels do not cover runs PyTorch, announced once; strict mode makes that an error."""
    fused, ref = twins(cifar("A"), torch.float32, device)
    fused.bn1, ref.bn1 = nn.GroupNorm(4, 16).to(device), nn.GroupNorm(4, 16).to(device, torch.float64)
    ref.bn1.load_state_dict(fused.bn1.state_dict())
    x = torch.randn(2, 3, 32, 32, device=device)
    with pytest.raises(fusedres.FusedResFallbackError, match="CifarResNet stem.*GroupNorm"):
        fused(x)
    monkeypatch.delenv("FUSEDRES_STRICT", raising=False)
    monkeypatch.setattr(_dispatch, "_warned", set())
    with pytest.warns(fusedres.FusedResFallbackWarning, match="CifarResNet stem.*GroupNorm"), torch.no_grad():
        out = fused(x.to(memory_format=torch.channels_last))
    with torch.no_grad():
        assert_close(out, ref(x.double()), torch.float32, "logits with a PyTorch stem")
