"""Shared test helpers: the tolerance table of DESIGN.md section 4, random BN statistics, ReLU margins."""
import copy
import importlib

import pytest
import torch
from torch import nn

import fusedres
from fusedres import reference
from fusedres.reference import TOLERANCE as TOL  # noqa: F401  (the tests' name for it)
from fusedres.reference import rel_err

ON_GPU = torch.cuda.is_available()
# bf16 tl.dot is broken in the Triton interpreter (DESIGN.md section 5): bf16 is tested on the GPU only.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "output") -> None:
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    err = rel_err(out, ref)
    assert err <= TOL[dtype], f"{what}: relative error {err:.3e} > {TOL[dtype]:.0e} for {dtype}"


def relu_margin(ref: nn.Module, x: torch.Tensor):
    """Smallest |ReLU input| of the float64 reference block in train mode on x, and the output shape.

    ReLU's gradient jumps at 0: where a pre-activation lies within fp32 rounding of 0, any fp32
    implementation may take the other side and its gradient differs from float64's by O(1) there
    (seen: one element at -8e-8 in 12096 gave a 3.7e-3 input-gradient error), so tests redraw such inputs."""
    probe = copy.deepcopy(ref).train()
    seen = []
    probe.relu.register_forward_pre_hook(lambda mod, inp: seen.append(inp[0].abs().min().item()))
    with torch.no_grad():
        shape = probe(x.double()).shape
    return min(seen), shape


def randomize_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BN parameters and running statistics, so eval-mode folding is really exercised."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.running_mean is not None:
                    m.running_mean.normal_(0, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
                if m.weight is not None:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0, 0.5)
    return model


def projection(cin, cout, stride):
    return nn.Sequential(reference.conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))


# name: (block kind, inplanes, planes, stride, shortcut kind, extra kwargs)
BLOCKS = {
    "basic_identity": ("basic", 16, 16, 1, "identity", {}),
    "basic_proj_s2": ("basic", 16, 32, 2, "projection", {}),
    "basic_optionA_s2": ("basic", 16, 32, 2, "A", {}),
    "basic_optionC_s1": ("basic", 16, 16, 1, "projection", {}),
    "basic_plain_s2": ("basic", 16, 32, 2, "none", {}),
    "bottleneck_identity": ("bottleneck", 64, 16, 1, "identity", {}),
    "bottleneck_proj_s1": ("bottleneck", 32, 16, 1, "projection", {}),
    "bottleneck_proj_s2": ("bottleneck", 64, 32, 2, "projection", {}),
    "bottleneck_resnext_s2": ("bottleneck", 64, 32, 2, "projection", dict(groups=8, base_width=8)),
    "bottleneck_wide": ("bottleneck", 64, 16, 1, "identity", dict(base_width=128)),
    "bottleneck_dilated": ("bottleneck", 64, 16, 1, "identity", dict(dilation=2)),
}


def build_pair(name):
    kind, cin, planes, stride, sc, extra = BLOCKS[name]
    fused_cls, ref_cls = (fusedres.FusedBasicBlock, reference.BasicBlock) if kind == "basic" else \
        (fusedres.FusedBottleneck, reference.Bottleneck)
    cout = planes * ref_cls.expansion

    def make(cls):
        ds = {"identity": None, "none": None, "projection": projection(cin, cout, stride),
              "A": fusedres.PadChannelsShortcut(cin, cout, stride)}[sc]
        return cls(cin, planes, stride, ds, **extra, residual=sc != "none")

    fused = randomize_bn(make(fused_cls)).eval()
    ref = make(ref_cls).eval()
    ref.load_state_dict(fused.state_dict(), strict=True)
    return fused, ref, cin


def real_library(name: str):
    """The real ``torchvision`` / ``timm`` module, or skip the test where it does not import (absent, or built
    for another torch: it raises more than ImportError then)."""
    try:
        return importlib.import_module(name)
    except Exception as exc:
        pytest.skip(f"{name} does not import here: {type(exc).__name__}: {exc}")


def launch_spy(monkeypatch, module, name: str, record=lambda kw: bool(kw.get("TMA", False))) -> list:
    """Replaces the kernel ``module.name`` (launched as kernel[grid](**kwargs)) by a spy that records, per launch,
    ``record(kwargs)`` (by default whether it ran the descriptor path: its TMA keyword), then launches it; the list
    of those values."""
    seen, real = [], getattr(module, name)

    class Spy:
        def __getitem__(self, grid):
            def launch(**kw):
                seen.append(record(kw))
                return real[grid](**kw)
            return launch

    monkeypatch.setattr(module, name, Spy())
    return seen
