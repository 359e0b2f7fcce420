"""The forward conv's descriptor path (issue 17 item 3): 1x1 stride-1 convs whose operands load through device-side
tensor descriptors (the kernel's TMA switch), against the float64 reference.

In the interpreter the path runs when a config asks for it (config TMA=True, or FUSEDRES_TMA=1 for the fixed
config); on an sm_90 GPU the same tests run it on the card, and test_every_descriptor_config runs each shipped
descriptor config there. Small shapes with ragged tiles: M, K and C not multiples of their blocks.
"""
import contextvars
import types

import pytest
import torch
import torch.nn.functional as F

from fusedres import kernels
from fusedres.kernels import _conv_configs as cc
from fusedres.kernels import _launch
from fusedres.kernels import conv as conv_mod
from fusedres.reference import conv_bn_act_reference
from helpers import DTYPES, ON_GPU, TOL, assert_close, launch_spy, rel_err

SM90 = ON_GPU and torch.cuda.get_device_capability() >= (9, 0)
RUNS = not ON_GPU or SM90  # where an eligible launch that asks for descriptors gets them (sm_80: pointers)
# The tile of the interpreter runs: 70 pixels in 3 tiles (the last 6 rows), 40 channels in 3 steps (the last 8),
# 24 output channels in 2 tiles. On the GPU the autotuner's tile sizes (16 is tl.dot's least).
SMALL = dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, TMA=True)
N, C, H, W, K = 2, 40, 5, 7, 24


@pytest.fixture
def launches(monkeypatch):
    """Every fixed-config launch of the forward kernel, as the TMA value it ran with."""
    return launch_spy(monkeypatch, conv_mod, "_conv_bn_act")


def _x(dtype, device, shape=(N, C, H, W), fmt=torch.channels_last):
    return torch.randn(*shape, device=device).to(dtype).to(memory_format=fmt)


def _w(dtype, device, k=K, c=C):
    return (torch.randn(k, c, 1, 1, device=device) / c ** 0.5).to(dtype)


def _affine(n, device):
    return torch.rand(n, device=device) + 0.5, torch.randn(n, device=device)


def _tiles_mean_m2(y64: torch.Tensor, block_m: int):
    """Per-tile channel means and sums of squared deviations of a float64 [N, K, P, Q] output (rows in NHWC
    order, as the kernel's pixel tiles)."""
    rows = y64.permute(0, 2, 3, 1).reshape(-1, y64.shape[1])
    means, m2s = [], []
    for t in rows.split(block_m):
        mu = t.mean(0)
        means.append(mu)
        m2s.append((t - mu).pow(2).sum(0))
    return torch.stack(means), torch.stack(m2s)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("residual", [False, True], ids=["eval", "eval_res"])
def test_descriptor_eval_epilogue(residual, dtype, device, launches):
    x, w = _x(dtype, device), _w(dtype, device)
    scale, shift = _affine(K, device)
    res = _x(dtype, device, (N, K, H, W)) if residual else None
    out = kernels.conv_bn_act(x, w, scale, shift, residual=res, relu=True, config=SMALL)
    assert launches == [RUNS], "an eligible launch that asks for the descriptor path takes it"
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close(out, conv_bn_act_reference(x, w, scale, shift, residual=res, relu=True), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("prologue", [False, True], ids=["stats", "prologue_stats"])
def test_descriptor_stats_and_prologue(prologue, dtype, device, launches):
    """STATS partials and the BN+ReLU prologue: rows past M load zeros, which the prologue turns into
    relu(shift) != 0 (a positive shift on every channel here), so a partial that counted them would be wrong."""
    x, w = _x(dtype, device), _w(dtype, device)
    pro = (torch.rand(C, device=device) + 0.5, torch.rand(C, device=device) + 0.1) if prologue else None
    y, pm, pm2, tile_m = kernels.conv.conv_bn_stats(x, w, prologue=pro, config=SMALL)
    assert launches == [RUNS] and tile_m == SMALL["BLOCK_M"]
    xin = x.double()
    if prologue:
        xin = torch.relu(xin * pro[0].double().view(1, -1, 1, 1) + pro[1].double().view(1, -1, 1, 1))
        xin = xin.to(dtype).double()  # the kernel rounds the activated tile to x's dtype before the MMA
    y64 = F.conv2d(xin, w.double())
    assert_close(y, y64, dtype, "raw output")
    mean64, m2_64 = _tiles_mean_m2(y64, tile_m)
    assert pm.shape == mean64.shape
    # the partials come from the fp32 accumulator (no output rounding): held to the dtype's tolerance all the same
    assert rel_err(pm, mean64) <= TOL[dtype], f"per-tile means: {rel_err(pm, mean64):.2e}"
    assert rel_err(pm2, m2_64) <= TOL[dtype], f"per-tile M2: {rel_err(pm2, m2_64):.2e}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_descriptor_projection_shortcut(dtype, device, launches):
    """The projection epilogue on the descriptor path (its shortcut GEMM on int32 pointers, stride 2), with a
    dead shortcut column (scale_d 0: not read, projection_fold's live row)."""
    x, w = _x(dtype, device), _w(dtype, device)
    scale, shift = _affine(K, device)
    xd, wd = _x(dtype, device, (N, 16, 2 * H, 2 * W)), _w(dtype, device, K, 16)
    sd, td = _affine(K, device)
    sd[3] = 0.0
    out = kernels.conv_bn_act(x, w, scale, shift, relu=True, shortcut=(xd, wd, sd, td, 2), config=SMALL)
    assert launches == [RUNS]
    ref = conv_bn_act_reference(x, w, scale, shift, relu=True, shortcut_input=xd, shortcut_weight=wd,
                                shortcut_scale=sd, shortcut_shift=td, shortcut_stride=2)
    assert_close(out, ref, dtype)


def _ineligible(device):
    """(what, x, w, conv kwargs): launches the descriptor path must leave to pointers."""
    dt = torch.float16
    big = _x(dt, device, (N, C + 8, H, W))
    return [
        ("stride 2", _x(dt, device), _w(dt, device), dict(stride=(2, 2))),
        ("padding", _x(dt, device), _w(dt, device), dict(padding=(1, 1))),
        ("NCHW input", _x(dt, device, fmt=torch.contiguous_format), _w(dt, device), {}),
        ("misaligned base", big[:, 1:C + 1], _w(dt, device), {}),  # 2 bytes past a 16-byte boundary
        ("row stride not 16 B", _x(dt, device, (N, 12, H, W)), _w(dt, device, K, 12), {}),  # 24-byte rows
        ("3x3", _x(dt, device), (torch.randn(K, C, 3, 3, device=device) / C).to(dt), dict(padding=(1, 1))),
        ("groups", _x(dt, device), _w(dt, device, K, C // 2), dict(groups=2)),
        ("weight not channel-contiguous", _x(dt, device), _w(dt, device, C, K).transpose(0, 1), {}),
        ("fp64", _x(torch.float64, device), _w(torch.float64, device), {}),
    ]


@pytest.mark.parametrize("case", range(9))
def test_ineligible_launch_takes_pointer_path(case, device, launches):
    what, x, w, conv = _ineligible(device)[case]
    scale, shift = _affine(K, device)
    out = kernels.conv_bn_act(x, w, scale, shift, **conv, relu=True, config=SMALL)
    assert launches == [False], f"{what}: took the descriptor path"
    ref = conv_bn_act_reference(x, w, scale, shift, **conv, relu=True)
    assert_close(out, ref, x.dtype, what)


@pytest.mark.skipif(ON_GPU, reason="the interpreter's fixed config (the GPU autotunes)")
@pytest.mark.parametrize("mode,asks,expect", [("1", False, True), ("auto", False, False), ("0", True, False),
                                              ("auto", True, True)])
def test_fusedres_tma_switch(mode, asks, expect, monkeypatch, launches):
    """FUSEDRES_TMA=1: the fixed config takes the descriptor path; auto (default): only when a config asks;
    0: never, whatever a config asks."""
    monkeypatch.setenv("FUSEDRES_TMA", mode)
    x, w = _x(torch.float32, "cpu"), _w(torch.float32, "cpu")
    scale, shift = _affine(K, "cpu")
    out = kernels.conv_bn_act(x, w, scale, shift, relu=True, config=SMALL if asks else None)
    assert launches == [expect]
    assert_close(out, conv_bn_act_reference(x, w, scale, shift, relu=True), torch.float32)


def test_descriptor_scratch_keeps_a_users_allocator():
    """The launcher's allocator is set for a CUDA launch only when none is, and reset after it."""
    from triton.runtime import _allocation as alloc

    cuda_like = types.SimpleNamespace(is_cuda=True)

    def run():
        var = alloc._allocator
        assert isinstance(var.get(), alloc.NullAllocator)
        with _launch.descriptor_scratch(cuda_like):
            assert var.get() is _launch._scratch
        assert isinstance(var.get(), alloc.NullAllocator), "the allocator leaked out of the launch"
        with _launch.descriptor_scratch(None):
            assert isinstance(var.get(), alloc.NullAllocator)

        def users(size, alignment, stream):
            raise AssertionError("not called here")

        var.set(users)
        with _launch.descriptor_scratch(cuda_like):
            assert var.get() is users, "a user's allocator was replaced"
        assert var.get() is users

    contextvars.Context().run(run)  # a fresh context: whatever this process set stays as it was


def test_tma_configs_only_on_sm90_and_eligible_launches(monkeypatch):
    """conv_prune keeps descriptor configs on sm_90 for eligible launches only, 4-warp ones for STATS, none at
    4 warps with a residual (it spills)."""
    x = torch.empty(N, C, H, W, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    w = torch.empty(K, C, 1, 1, dtype=torch.bfloat16)
    args = dict(x_ptr=x, w_ptr=w, M=N * H * W, H=H, W=W, KG=K, CG=C, CD=0, R=1, S=1, stride_h=1, stride_w=1,
                pad_h=0, pad_w=0, STEM_CPAD=0, **_launch.stride_args("x", x), **_launch.stride_args("w", w, "kcrs"))

    def tma_tiles(arch, **over):
        monkeypatch.setattr(cc, "target_arch", lambda: arch)
        configs = cc.gpu_configs(stats=over.get("STATS", False)) + cc.tma_configs(stats=over.get("STATS", False))
        return [cc.Tile.of(c) for c in cc.conv_prune(configs, {}, **dict(args, **over)) if c.kwargs.get("TMA")]

    assert tma_tiles(80) == []
    assert {t.num_warps for t in tma_tiles(90)} == {4, 8}
    assert {t.num_warps for t in tma_tiles(90, STATS=True)} == {4}
    assert {t.num_warps for t in tma_tiles(90, HAS_RESIDUAL=True)} == {8}
    assert tma_tiles(90, stride_h=2, stride_w=2) == []
    assert cc.tma_eligible(args) and not cc.tma_eligible(dict(args, stride_x_c=C))


@pytest.mark.skipif(not SM90, reason="descriptor configs compile for sm_90 GPUs only")
@pytest.mark.parametrize("cfg_index", range(len(cc.tma_configs())))
def test_every_descriptor_config(cfg_index, device):
    """Each shipped descriptor config (fitted as the autotuner fits it) on the card: eval (+ residual), STATS with
    the prologue, the projection, every dtype, ragged M and C."""
    tile = cc.Tile.of(cc.tma_configs()[cfg_index])
    for dtype in DTYPES:
        x, w = _x(dtype, device, (3, 72, 9, 7)), _w(dtype, device, 136, 72)
        kc = dict(cc.conv_fit(tile, 136, 72).kwargs(), TMA=True)
        scale, shift = _affine(136, device)
        res = _x(dtype, device, (3, 136, 9, 7))
        out = kernels.conv_bn_act(x, w, scale, shift, residual=res, relu=True, config=kc)
        assert_close(out, conv_bn_act_reference(x, w, scale, shift, residual=res, relu=True), dtype,
                     f"{dtype} {tile} eval+residual")
        pro = (torch.rand(72, device=device) + 0.5, torch.rand(72, device=device) + 0.1)
        y = kernels.conv.conv_bn_stats(x, w, prologue=pro, config=kc).out
        xin = torch.relu(x.double() * pro[0].double().view(1, -1, 1, 1) + pro[1].double().view(1, -1, 1, 1))
        assert_close(y, F.conv2d(xin.to(dtype).double(), w.double()), dtype, f"{dtype} {tile} prologue+STATS")
        xd, wd = _x(dtype, device, (3, 40, 18, 14)), _w(dtype, device, 136, 40)
        sd, td = _affine(136, device)
        out = kernels.conv_bn_act(x, w, scale, shift, relu=True, shortcut=(xd, wd, sd, td, 2), config=kc)
        ref = conv_bn_act_reference(x, w, scale, shift, relu=True, shortcut_input=xd, shortcut_weight=wd,
                                    shortcut_scale=sd, shortcut_shift=td, shortcut_stride=2)
        assert_close(out, ref, dtype, f"{dtype} {tile} projection")
