"""convert() on timm's ResNet family: blocks (basic, bottleneck, resnet-D, SE / ECA, wide, ResNeXt), stems
(7x7, deep, deep_tiered) and stochastic depth, against float64 in eval and training.

Models come from tests/timm_like.py (timm's layout and forward, written here), and from real timm where it
imports (not beside the local torch 2.13 CPU build: timm needs torchvision, which does not import there)."""
import copy
import warnings

import pytest
import torch
from test_no_torch_compute import RecordOps
from timm_like import FAMILIES, timm_like
from torch import nn

import fusedres
from helpers import TOL, assert_close, randomize_bn, rel_err

FAMILY_NAMES = list(FAMILIES)


def _real_timm():
    try:
        import timm
    except Exception as exc:  # absent, or its torchvision built for another torch
        pytest.skip(f"timm does not import here: {type(exc).__name__}: {exc}")
    return timm


def build(name, source="like", narrow=False, **kwargs):
    """A model of the family; real timm's narrowed to 1 block per stage and 16..128 channels if ``narrow``."""
    if source == "timm":
        if narrow:
            kwargs = dict(layers=(1, 1, 1, 1), channels=(16, 32, 64, 128), stem_width=8, **kwargs)
        return _real_timm().create_model(name, num_classes=10, **kwargs)
    return timm_like(name, **kwargs)


def converted(model):
    """convert(model), asserting its one warning (if any) names only attention layers."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fusedres.convert(model)
    messages = [str(w.message) for w in record if "fusedres.convert" in str(w.message)]
    assert len(messages) <= 1
    if messages:
        assert "unfused" not in messages[0] and ".se." in messages[0], messages[0]
    return model


# Real timm models over ~8 s interpreted (issue 19 item 10): slow, CI runs them; their look-alikes stay fast.
SLOW_TIMM = {"resnext50_32x4d", "wide_resnet50_2", "seresnet50", "resnet50d", "resnet50", "ecaresnet26t"}


@pytest.mark.parametrize("name, source", [
    pytest.param(n, s, marks=pytest.mark.slow) if s == "timm" and n in SLOW_TIMM else (n, s)
    for n in FAMILY_NAMES for s in ("like", "timm")])
def test_eval_parity_and_everything_fused(name, source, device):
    model = randomize_bn(build(name, source)).to(device).eval()
    ref = copy.deepcopy(model).double()
    keys = list(model.state_dict())
    converted(model)
    assert list(model.state_dict()) == keys
    text = fusedres.summary(model, file=open("/dev/null", "w"))
    assert " eager " not in text and "stem fused" in text, text
    assert "partly fused" not in text
    assert ("layers on the pooled" in text) == ("se" in name or "eca" in name), text  # SE / ECA: only their FCs
    x = torch.randn(2, 3, 32, 32, device=device)
    with torch.no_grad():
        out, want = model(x.to(memory_format=torch.channels_last)), ref(x.double())
    assert_close(out, want, torch.float32, name)


def _train_step(model, x, grad_out):
    model.zero_grad()
    x = x.clone().requires_grad_(True)
    out = model(x)
    out.backward(grad_out.to(out.dtype))
    grads = {"output": out.detach(), "input grad": x.grad}
    grads.update({f"grad {n}": p.grad for n, p in model.named_parameters()})
    grads.update({n: b for n, b in model.named_buffers() if b.dtype.is_floating_point})
    return grads


def assert_within_twice_eager(fused, eager, ref):
    for what in ref:
        e_fused, e_eager = rel_err(fused[what], ref[what]), rel_err(eager[what], ref[what])
        assert e_fused <= 2 * e_eager + TOL[torch.float32], f"{what}: fused {e_fused:.2e}, eager {e_eager:.2e}"


@pytest.mark.parametrize("source", ["like", "timm"])
@pytest.mark.parametrize("name", ["resnet18d", "seresnet50"])  # plain bottlenecks: test_convert_stems.py
def test_train_parity_twice_eager(name, source, device):
    """Output, every gradient and the running statistics after one step, against float64 (DESIGN's rule)."""
    model = randomize_bn(build(name, source, narrow=True)).to(device).train()
    eager, ref = copy.deepcopy(model), copy.deepcopy(model).double()
    converted(model)
    x = torch.randn(2, 3, 64, 64, device=device)  # 2x2 pixels at the last stage: 8 values per BN channel
    grad_out = torch.randn(2, 10, device=device, dtype=torch.float64)
    assert_within_twice_eager(_train_step(model, x, grad_out), _train_step(eager, x, grad_out),
                              _train_step(ref, x.double(), grad_out))
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), eager.buffers()) if not a.dtype.is_floating_point)


@pytest.mark.parametrize("source", ["like", "timm"])
def test_drop_path_same_seed_matches_timm(source, device):
    """Stochastic depth in training: the block's own DropPath draws the per-sample masks from PyTorch's RNG
    in the same order as timm's forward, so the same seed gives the same masks (some samples dropped)."""
    model = randomize_bn(build("resnet18d", source, narrow=True, drop_path_rate=0.6)).to(device).train()
    eager, ref = copy.deepcopy(model), copy.deepcopy(model).double()
    converted(model)
    x = torch.randn(2, 3, 64, 64, device=device)
    grad_out = torch.randn(2, 10, device=device, dtype=torch.float64)
    results = []
    for m, inp in ((model, x), (eager, x), (ref, x.double())):
        torch.manual_seed(3)
        results.append(_train_step(m, inp, grad_out))
    assert_within_twice_eager(*results)
    torch.manual_seed(3)
    masks = [torch.empty(2, 1, 1, 1, device=device).bernoulli_(1 - 0.2 * k) for k in (1, 2, 3)]  # blocks 1-3
    assert any((mask == 0).any() for mask in masks), "no sample dropped: the test would be vacuous"


def test_drop_path_in_eval_is_the_plain_block(device):
    model = randomize_bn(timm_like("resnet18", drop_path_rate=0.5)).to(device).eval()
    ref = copy.deepcopy(model).double()
    converted(model)
    x = torch.randn(2, 3, 32, 32, device=device)
    with RecordOps() as rec, torch.no_grad():
        out = model(x)
    assert rec.forbidden() == [] and not any("bernoulli" in op for op in rec.ops)
    assert_close(out, ref(x.double()), torch.float32)


def test_state_dict_round_trip_both_ways():
    model = randomize_bn(timm_like("resnet26t"))
    plain = timm_like("resnet26t")
    converted(model)
    assert list(model.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(model.state_dict(), strict=True)
    model.load_state_dict(randomize_bn(timm_like("resnet26t")).state_dict(), strict=True)
    assert type(model.layer1[0]).__name__ == "FusedTimmBottleneck" and hasattr(model.layer1[0], "act3")
    classes = {n: type(m) for n, m in model.named_modules()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fusedres.convert(model)  # converting twice changes nothing
    assert {n: type(m) for n, m in model.named_modules()} == classes


@pytest.mark.parametrize("train", [False, True])
def test_compile_fullgraph_converted_timm_model(train, device):
    torch.manual_seed(0)
    model = converted(randomize_bn(timm_like("resnet18")).to(device).train(train))
    uncompiled = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    x = torch.randn(2, 3, 32, 32, device=device)
    outs = []
    for m in (compiled, uncompiled):
        with torch.set_grad_enabled(train):  # eval-mode fused convs have no backward
            out = m(x)
        if train:
            out.square().mean().backward()
        outs.append(out.detach())
    assert_close(outs[0], outs[1].double(), torch.float32)
    if train:
        for (name, p), q in zip(model.named_parameters(), uncompiled.parameters()):
            assert_close(p.grad, q.grad.double(), torch.float32, f"grad {name}")


@pytest.mark.parametrize("name", ["resnet50d", "resnet18"])
def test_training_runs_no_aten_conv_or_bn(name, device):
    model = converted(timm_like(name)).to(device).train()
    x = torch.randn(2, 3, 32, 32, device=device, requires_grad=True)
    with RecordOps() as rec:
        model(x).sum().backward()
    assert rec.forbidden() == [], f"PyTorch conv/BN ran on the fused path: {rec.forbidden()}"
    assert all(p.grad is not None for p in model.parameters())


def test_what_cannot_be_fused_is_named_in_one_warning():
    model = timm_like("resnet50")
    model.layer1[0].aa = nn.AvgPool2d(1)
    model.layer2[0].drop_block = nn.Dropout()
    model.layer3[0].act2 = nn.SiLU()
    model.act1 = nn.SiLU()
    with pytest.warns(UserWarning) as record:
        fusedres.convert(model)
    messages = [str(w.message) for w in record if "fusedres.convert" in str(w.message)]
    assert len(messages) == 1
    for text in ("layer1.0", "aa", "layer2.0", "drop_block", "layer3.0", "SiLU", "stem", "conv1", "bn1",
                 "layer1.0.conv2"):
        assert text in messages[0], (text, messages[0])
    assert type(model.layer4[0]).__name__ == "FusedTimmBottleneck"
    assert type(model.layer1[0]).__name__ == "Bottleneck"
