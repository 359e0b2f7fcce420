"""Block-level contract (eval mode): parity with the reference blocks (float64), state_dict both ways,
launches, memory format, fallbacks. Training mode is in test_training.py."""
import copy

import pytest
import torch
from torch import nn

import fusedres
from fusedres import reference
from helpers import BLOCKS, DTYPES, TOL, assert_close, build_pair, projection, rel_err


@pytest.mark.parametrize("fmt", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(BLOCKS))
def test_block_eval_parity(name, dtype, fmt, device):
    fused, ref, cin = build_pair(name)
    fused, ref = fused.to(device, dtype), ref.to(device, torch.float64)
    memfmt = torch.channels_last if fmt == "nhwc" else torch.contiguous_format
    x = torch.randn(2, cin, 9, 9, device=device, dtype=dtype).to(memory_format=memfmt)
    with torch.no_grad():
        out = fused(x)
        want = ref(x.double())
    assert out.dtype == dtype
    assert out.is_contiguous(memory_format=memfmt), "the block must keep the input's memory format"
    assert_close(out, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_error_within_twice_eager(dtype, device):
    """DESIGN.md section 4: |fused - ref64| <= 2 |eager - ref64| (+atol), eager = the same block in dtype."""
    fused, ref, cin = build_pair("bottleneck_proj_s2")
    eager = copy.deepcopy(ref).to(device, dtype)
    fused, ref = fused.to(device, dtype), ref.to(device, torch.float64)
    x = torch.randn(4, cin, 8, 8, device=device, dtype=dtype).to(memory_format=torch.channels_last)
    with torch.no_grad():
        want = ref(x.double())
        e_fused, e_eager = rel_err(fused(x), want), rel_err(eager(x), want)
    assert e_fused <= 2 * e_eager + TOL[torch.float32], f"fused {e_fused:.2e} vs eager {e_eager:.2e}"


@pytest.mark.parametrize("name", ["basic_proj_s2", "bottleneck_proj_s2"])
def test_state_dict_round_trip_with_reference(name):
    fused, ref, _ = build_pair(name)
    assert list(fused.state_dict()) == list(ref.state_dict())
    fused2, _, _ = build_pair(name)
    fused2.load_state_dict(ref.state_dict(), strict=True)   # reference -> fused
    ref.load_state_dict(fused2.state_dict(), strict=True)   # fused -> reference
    for k, v in fused.state_dict().items():
        assert torch.equal(v, fused2.state_dict()[k]), k


def test_torchvision_names_and_signature():
    b = fusedres.FusedBottleneck(64, 16, 2, projection(64, 64, 2), 1, 64, 1, None)
    assert fusedres.FusedBasicBlock.expansion == 1 and fusedres.FusedBottleneck.expansion == 4
    assert set(dict(b.named_children())) == {"conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "relu", "downsample"}
    assert "downsample.0.weight" in b.state_dict() and "downsample.1.running_var" in b.state_dict()
    with pytest.raises(ValueError, match="groups=1"):
        fusedres.FusedBasicBlock(8, 8, groups=2)


@pytest.mark.parametrize("name", ["basic_proj_s2", "bottleneck_proj_s2"])
def test_launch_count(name, monkeypatch, device):
    """Basic block = 2 launches, bottleneck = 3, the projection shortcut inside the last one."""
    fused, _, cin = build_pair(name)
    fused.to(device)
    calls = []
    real = fusedres.kernels.conv_bn_act
    monkeypatch.setattr(fusedres.kernels, "conv_bn_act", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        fused(torch.randn(1, cin, 8, 8, device=device))
    assert len(calls) == (2 if name.startswith("basic") else 3)


def test_backward_in_eval_fails_loudly(device):
    fused, _, cin = build_pair("basic_identity")
    fused.to(device)
    out = fused(torch.randn(1, cin, 6, 6, device=device, requires_grad=True))
    assert out.requires_grad
    with pytest.raises(NotImplementedError, match="eval-mode"):
        out.sum().backward()


def test_mixed_bn_modes_fall_back_with_reason(monkeypatch, device):
    """A frozen BN (bn.eval() inside a training block) must keep eager semantics: announced reference."""
    monkeypatch.delenv("FUSEDRES_STRICT")
    monkeypatch.setattr(fusedres._dispatch, "_warned", set())
    fused, ref, cin = build_pair("basic_identity")
    fused.to(device).train()
    ref.to(device).train()
    fused.bn1.eval()
    ref.bn1.eval()
    x = torch.randn(4, cin, 6, 6, device=device)
    with pytest.warns(fusedres.FusedResFallbackWarning, match="train/eval modes"):
        out = fused(x)
    torch.testing.assert_close(out, ref.float()(x))


def test_strict_mode_refuses_fallback(device):
    fused, _, cin = build_pair("basic_identity")
    fused.to(device).train()
    fused.bn2.eval()
    with pytest.raises(fusedres.FusedResFallbackError, match="FUSEDRES_STRICT=1"):
        fused(torch.randn(2, cin, 6, 6, device=device))


def test_unfusable_structure_falls_back_with_reason(monkeypatch, device):
    monkeypatch.delenv("FUSEDRES_STRICT")
    monkeypatch.setattr(fusedres._dispatch, "_warned", set())
    ds = nn.Sequential(nn.AvgPool2d(2), reference.conv1x1(8, 16), nn.BatchNorm2d(16))
    block = fusedres.FusedBasicBlock(8, 16, 2, ds).eval().to(device)
    with pytest.warns(fusedres.FusedResFallbackWarning, match="downsample"):
        block(torch.randn(1, 8, 6, 6, device=device))
