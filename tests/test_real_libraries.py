"""convert() on the real libraries' models (CI installs torch 2.14.1, torchvision 0.29.1 and timm; skipped
cleanly where either does not import): every torchvision ResNet builder and timm's resnet-D / SE / ResNeXt-D /
resnet-T, at full width, in eval against the float64 copy of the library's own eager model; one training step
of a timm model with stochastic depth against float64 by the 2x-eager rule. The look-alike models of
tests/timm_like.py and tests/torchvision_like.py cover the same code paths where the libraries are absent.

Full-width models are slow in the Triton interpreter (1x3x32x32 input): parametrizations that took more than
~20 s on 2 CPU cores carry ``pytest.mark.slow``."""
import copy
import re

import pytest
import torch
from test_timm import _train_step, assert_within_twice_eager, build, converted

import fusedres
from helpers import assert_close, randomize_bn, real_library

# torchvision 0.29.1's ResNet builders (test_torchvision_builder_list_is_complete keeps the list honest)
TORCHVISION = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d",
               "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2"]
TIMM = ["resnet50d", "seresnet50", "resnext50d_32x4d", "resnet26t"]
# interpreter seconds of the fused forward, measured on 2 shared CPU cores: > ~20 s is slow
# (> ~8 s since issue 19 item 10: the fast set keeps torchvision's resnet18 and timm's resnet26t; CI runs all)
SLOW = {"resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
        "wide_resnet50_2", "wide_resnet101_2", "resnet50d", "seresnet50", "resnext50d_32x4d"}


def _params(names):
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in names]


def _blocks(model):
    return sum(type(m).__name__ in ("BasicBlock", "Bottleneck") for m in model.modules())


def assert_eval_parity_all_fused(model, device, attention=False):
    """convert(model) fuses its stem and every block (SE models: the attention's layers may stay eager, nothing
    else), and its eval output matches the float64 copy of the eager model within the fp32 tolerance."""
    model = randomize_bn(model).to(device).eval()
    ref = copy.deepcopy(model).double()
    blocks = _blocks(model)
    converted(model)  # its one warning (if any) names only attention layers
    with open("/dev/null", "w") as null:
        text = fusedres.summary(model, file=null)
    assert " eager " not in text and "stem fused" in text, text
    n = blocks + 1  # the blocks and the stem
    last = re.fullmatch(rf"{n} of {n} blocks / stems fused; (\d+) conv / BN layer\(s\) eager(: )?(.*)",
                        text.splitlines()[-1])
    assert last, text
    eager = [name for name in last.group(3).split(", ") if name]
    assert len(eager) == int(last.group(1)) and all(".se." in name for name in eager) and (attention or not eager), \
        text
    x = torch.randn(1, 3, 32, 32, device=device)
    with torch.no_grad():
        out, want = model(x.to(memory_format=torch.channels_last)), ref(x.double())
    assert_close(out, want, torch.float32, type(model).__name__)


def test_torchvision_builder_list_is_complete():
    tv = real_library("torchvision")
    builders = [n for n in tv.models.list_models(module=tv.models)
                if tv.models.get_model_builder(n).__module__ == "torchvision.models.resnet"]
    assert sorted(builders) == sorted(TORCHVISION)


@pytest.mark.parametrize("name", _params(TORCHVISION))
def test_torchvision_builder_eval_parity(name, device):
    tv = real_library("torchvision")
    assert_eval_parity_all_fused(getattr(tv.models, name)(num_classes=10), device)


@pytest.mark.parametrize("name", _params(TIMM))
def test_timm_model_eval_parity(name, device):
    real_library("timm")
    assert_eval_parity_all_fused(build(name, "timm"), device, attention=name.startswith("se"))


@pytest.mark.slow  # a real timm ResNet-50-d training step, interpreted: ~17 s
def test_timm_drop_path_training_step_twice_eager(device):
    """One training step of resnet50d with stochastic depth (timm's DropPath masks, drawn in timm's order from
    the same seed), narrowed: output, every gradient and the running statistics against float64, within 2x
    eager's error; the seed drops some sample, so the masked path is exercised."""
    real_library("timm")
    rate = 0.5  # the 4 blocks' rates: 0, 1/6, 1/3, 1/2 (timm's linear rule; the first has no DropPath)
    model = randomize_bn(build("resnet50d", "timm", narrow=True, drop_path_rate=rate)).to(device).train()
    eager, ref = copy.deepcopy(model), copy.deepcopy(model).double()
    converted(model)
    x = torch.randn(2, 3, 64, 64, device=device)  # 2x2 pixels at the last stage: 8 values per BN channel
    grad_out = torch.randn(2, 10, device=device, dtype=torch.float64)
    results = []
    for m, inp in ((model, x), (eager, x), (ref, x.double())):
        torch.manual_seed(5)  # the same drop_path masks for all three
        results.append(_train_step(m, inp, grad_out))
    assert_within_twice_eager(*results)
    torch.manual_seed(5)
    masks = [torch.empty(2, 1, 1, 1, device=device).bernoulli_(1 - rate * k / 3) for k in (1, 2, 3)]
    assert any((mask == 0).any() for mask in masks), "no sample dropped: the test would be vacuous"
