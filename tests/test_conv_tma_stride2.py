"""The forward conv's descriptor path at stride 2 (issue 17 item 3): an eval 3x3 conv with "same" padding over even H
and W reads x [N, H, W, C] through its parity view [N, H/2, 2, W/2, 2C] (kernels/conv.py STRIDE2), so a tap is a box
at (pair offset, parity) and the padding row and column above and left of the image (tap offset -1: pair -1, parity
1) are zero-filled by the descriptor. Against the float64 reference; the launches that must keep pointers keep them.

The interpreter's tile 32x16x16 is 2 x 16 output pixels: the 4 x 5 outputs of an 8 x 10 image are ragged on both
axes, 32 channels are 2 blocks per tap (each within one pixel of a pair), 24 output channels 2 tiles.
"""
import pytest
import torch
from test_conv_tma import _affine
from test_conv_tma_3x3 import DTYPES16, RUNS, _activated, _eval_parity, _prologue, _w, _x

from fusedres import kernels
from fusedres.kernels import _conv_configs as cc
from fusedres.kernels import _launch
from fusedres.kernels import conv as conv_mod
from fusedres.reference import conv_bn_act_reference
from helpers import assert_close, launch_spy

SMALL = dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, TMA=True)
N, C, H, W, K = 2, 32, 8, 10, 24
S2 = dict(stride=(2, 2), padding=(1, 1))


@pytest.fixture
def launches(monkeypatch):
    """Every fixed-config launch of the forward kernel: (TMA, STRIDE2) as it ran."""
    return launch_spy(monkeypatch, conv_mod, "_conv_bn_act",
                      record=lambda kw: (bool(kw.get("TMA")), conv_mod._stride2(kw)))


@pytest.mark.parametrize("dtype", DTYPES16, ids=str)
@pytest.mark.parametrize("shape", [(N, C, H, W), (3, 48, 6, 4), (1, 16, 2, 2)], ids=["8x10", "6x4_c48", "2x2"])
def test_stride2_eval(shape, dtype, device, launches):
    """BN + ReLU at stride 2 over spatial tiles: ragged tiles, several images, 1 x 1 outputs (every tap but the
    centre's lower-right ones in the padding)."""
    x, w = _x(dtype, device, shape), _w(dtype, device, K, shape[1])
    _eval_parity(x, w, S2, SMALL)
    assert launches == [(RUNS, RUNS)], "an eligible stride-2 launch that asks for descriptors takes the parity view"


@pytest.mark.parametrize("dtype", DTYPES16, ids=str)
def test_stride2_residual_and_prologue(dtype, device, launches):
    """The residual epilogue, and the BN+ReLU prologue with a positive shift: the padded taps must read 0, not
    relu(shift) (masked by coordinates, as at stride 1)."""
    x, w = _x(dtype, device, (N, C, H, W)), _w(dtype, device, K, C)
    _eval_parity(x, w, S2, SMALL, "residual", residual=_x(dtype, device, (N, K, H // 2, W // 2)))
    pro = _prologue(C, device)
    scale, shift = _affine(K, device)
    out = kernels.conv_bn_act(x, w, scale, shift, **S2, prologue=pro, relu=True, config=SMALL)
    ref = conv_bn_act_reference(_activated(x, pro, dtype), w, scale, shift, **S2, relu=True)
    assert_close(out, ref, dtype, "prologue")
    assert launches == [(RUNS, RUNS)] * 2


def _strided(device):
    """(what, x, conv kwargs, config): stride-2 launches with taps that keep pointers."""
    dt = torch.float16
    wide = _x(dt, device, (N, C + 16, H, W))
    return [
        ("odd H", _x(dt, device, (N, C, H + 1, W)), S2, SMALL),
        ("odd W", _x(dt, device, (N, C, H, W - 1)), S2, SMALL),
        ("channels not a multiple of 16", _x(dt, device, (N, 24, H, W)), S2, SMALL),
        ("a channel slice (pixels wider than C)", wide[:, 8:C + 8], S2, SMALL),
        ("BLOCK_K not dividing C", _x(dt, device, (N, 48, H, W)), S2, dict(SMALL, BLOCK_K=32)),
        ("no padding", _x(dt, device, (N, C, H, W)), dict(stride=(2, 2)), SMALL),
    ]


@pytest.mark.parametrize("case", range(6))
def test_stride2_ineligible_keeps_pointers(case, device, launches):
    what, x, conv, config = _strided(device)[case]
    _eval_parity(x, _w(x.dtype, device, K, x.shape[1]), conv, config, what)
    assert launches == [(False, False)], f"{what}: took the descriptor path"


def test_stride2_stats_keeps_pointers(device, launches):
    """STATS partials are per flat BLOCK_M pixels: a stride-2 training forward keeps pointers."""
    x, w = _x(torch.float16, device, (N, C, H, W)), _w(torch.float16, device, K, C)
    kernels.conv.conv_bn_stats(x, w, **S2, config=SMALL)
    assert launches == [(False, False)]


def test_stride2_configs(monkeypatch):
    """conv_prune on sm_90: an eligible stride-2 eval launch tunes the descriptor tile beside the pointer ones; its
    BLOCK_K must divide C (else none)."""
    def args_of(c):
        x = torch.empty(N, c, 56, 56, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
        w = torch.empty(128, c, 3, 3, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
        return dict(x_ptr=x, w_ptr=w, M=N * 28 * 28, H=56, W=56, KG=128, CG=c, CD=0, R=3, S=3, stride_h=2,
                    stride_w=2, pad_h=1, pad_w=1, dil_h=1, dil_w=1, STEM_CPAD=0, **_launch.stride_args("x", x),
                    **_launch.stride_args("w", w, "kcrs"))

    def tiles(c):
        monkeypatch.setattr(cc, "target_arch", lambda: 90)
        return [cc.Tile.of(cfg) for cfg in cc.conv_prune(cc.gpu_configs() + cc.tma_configs(), {}, **args_of(c))
                if cfg.kwargs.get("TMA")], cc.tma_eligible(args_of(c))

    assert tiles(128) == ([cc.Tile(128, 128, 64, 4, 3)], True)
    assert tiles(80) == ([], True), "C = 80: eligible, but the 64-channel blocks would cross into the other pixel"
    assert not cc.tma_eligible(dict(args_of(128), STATS=True))
