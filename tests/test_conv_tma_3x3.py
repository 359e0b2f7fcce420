"""The forward conv's descriptor path with taps (issue 17 item 3): odd RxS stride-1 convs with "same" padding whose
operands load through device-side tensor descriptors (the kernel's TMA switch), against the float64 reference.

x is read as [N*H*W, C]: tap (r, s) is the row shift (r - pad) * W + (s - pad) of the output pixel tile, so the
first tiles load at negative row coordinates (zero-filled by the descriptor) and the rows that leave the image (above,
below, or a column wrapped into the next image row) are masked in registers; w is read as [K, R*S, C]. A GPU has not
run this yet: negative coordinates are the first thing benchmarks/gpu_check.sh verifies.

Small shapes, the interpreter's tile 32x16x16: 70 pixels in 3 tiles (each tile crosses image rows, the second the
image boundary), 40 channels in 3 steps (the last 8 wide), 24 output channels in 2 tiles.
"""
import pytest
import torch
import torch.nn.functional as F
from test_conv_tma import _affine, _tiles_mean_m2  # the flat pixel tiles' partials: the same on this path

from fusedres import kernels
from fusedres.kernels import _conv_configs as cc
from fusedres.kernels import _launch
from fusedres.kernels import conv as conv_mod
from fusedres.kernels import dgrad as dgrad_mod
from fusedres.reference import conv_bn_act_reference
from helpers import ON_GPU, TOL, assert_close, launch_spy, rel_err

SM90 = ON_GPU and torch.cuda.get_device_capability() >= (9, 0)
RUNS = not ON_GPU or SM90  # where an eligible launch that asks for descriptors gets them (sm_80: pointers)
SMALL = dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, TMA=True)
N, C, H, W, K = 2, 40, 5, 7, 24
# Channels in whole BLOCK_K blocks (C = 40 is not): the launch swaps the MMA's operands (kernels/conv.py W_AS_A:
# acc.T = w @ x.T, w as a [K, R*S*C] matrix), a path of its own
CF = 32
CHANNELS = pytest.mark.parametrize("c", [C, CF], ids=["ragged_c", "full_c"])
# 16-bit only on this path; bf16 runs in the interpreter too (its dot upcast: UPCAST_DOT)
DTYPES16 = [torch.float16, torch.bfloat16]


@pytest.fixture
def launches(monkeypatch):
    """Every fixed-config launch of the forward kernel, as the TMA value it ran with."""
    return launch_spy(monkeypatch, conv_mod, "_conv_bn_act")


@pytest.fixture
def swaps(monkeypatch, launches):
    """Every fixed-config launch of the forward kernel, as whether it swapped the MMA's operands (W_AS_A)."""
    return launch_spy(monkeypatch, conv_mod, "_conv_bn_act", record=lambda kw: bool(kw.get("TMA"))
                      and conv_mod._w_as_a(kw))


def _swapped(c, block_k=16):
    """Whether a descriptor launch of c channels swaps the MMA's operands (where it takes the descriptor path)."""
    return RUNS and c % block_k == 0


def _x(dtype, device, shape=(N, C, H, W), fmt=torch.channels_last):
    return (torch.randn(*shape, device=device) + 0.25).to(dtype).to(memory_format=fmt)


def _w(dtype, device, k=K, c=C, ksize=3, fmt=torch.channels_last):
    return (torch.randn(k, c, ksize, ksize, device=device) / (c * ksize * ksize) ** 0.5).to(dtype).to(
        memory_format=fmt)


def _prologue(c, device):
    """BN scale and a positive shift on every channel: relu(shift) > 0, so a padded tap that read the activated
    zero instead of 0 would show."""
    return torch.rand(c, device=device) + 0.5, torch.rand(c, device=device) + 0.25


def _activated(x, pro, dtype):
    a = torch.relu(x.double() * pro[0].double().view(1, -1, 1, 1) + pro[1].double().view(1, -1, 1, 1))
    return a.to(dtype).double()  # the kernel rounds the activated tile to x's dtype before the MMA


def _eval_parity(x, w, conv: dict, config, what: str = "output", residual=None):
    """An eval conv (BN affine, ReLU, optional residual) of x and w against the float64 reference, channels_last
    kept."""
    scale, shift = _affine(w.shape[0], x.device)
    out = kernels.conv_bn_act(x, w, scale, shift, **conv, residual=residual, relu=True, config=config)
    assert out.is_contiguous(memory_format=torch.channels_last) or not x.is_contiguous(
        memory_format=torch.channels_last)
    ref = conv_bn_act_reference(x, w, scale, shift, **conv, residual=residual, relu=True)
    assert_close(out, ref, x.dtype, what)


@CHANNELS
@pytest.mark.parametrize("dtype", DTYPES16, ids=str)
@pytest.mark.parametrize("residual", [False, True], ids=["eval", "eval_res"])
def test_taps_eval_epilogue(residual, dtype, c, device, launches, swaps):
    """Spatial tiles (no STATS): 2 x 16 pixels per tile at BLOCK_M 32, ragged on both axes of the 5 x 7 images."""
    res = _x(dtype, device, (N, K, H, W)) if residual else None
    _eval_parity(_x(dtype, device, (N, c, H, W)), _w(dtype, device, c=c), dict(padding=(1, 1)), SMALL, residual=res)
    assert launches == [RUNS], "an eligible launch that asks for the descriptor path takes it"
    assert swaps == [_swapped(c)]


def test_taps_projection_shortcut(device, launches):
    """A basic block's second conv in eval: 3x3 with the projection shortcut (stride 2, pointers) in its epilogue,
    over spatial tiles."""
    dtype = torch.float16
    x, w = _x(dtype, device), _w(dtype, device)
    scale, shift = _affine(K, device)
    xd, wd = _x(dtype, device, (N, 16, 2 * H, 2 * W)), _w(dtype, device, K, 16, ksize=1)
    sd, td = _affine(K, device)
    out = kernels.conv_bn_act(x, w, scale, shift, padding=(1, 1), relu=True, shortcut=(xd, wd, sd, td, 2),
                              config=SMALL)
    assert launches == [RUNS]
    ref = conv_bn_act_reference(x, w, scale, shift, padding=1, relu=True, shortcut_input=xd, shortcut_weight=wd,
                                shortcut_scale=sd, shortcut_shift=td, shortcut_stride=2)
    assert_close(out, ref, dtype)


@CHANNELS
@pytest.mark.parametrize("dtype", DTYPES16, ids=str)
@pytest.mark.parametrize("prologue", [False, True], ids=["stats", "prologue_stats"])
def test_taps_stats_and_prologue(prologue, dtype, c, device, launches, swaps):
    """STATS partials (the flat pixel tiles of the pointer path: the finalize's one-row-per-BLOCK_M count holds) and
    the BN+ReLU prologue with a positive shift: padded taps and rows past M must be 0, not relu(shift)."""
    x, w = _x(dtype, device, (N, c, H, W)), _w(dtype, device, c=c)
    pro = _prologue(c, device) if prologue else None
    y, pm, pm2, tile_m = kernels.conv.conv_bn_stats(x, w, padding=(1, 1), prologue=pro, config=SMALL)
    assert launches == [RUNS] and tile_m == SMALL["BLOCK_M"]
    assert swaps == [False], "flat STATS tiles keep the usual operands (kernels/conv.py _w_as_a)"
    xin = _activated(x, pro, dtype) if prologue else x.double()
    y64 = F.conv2d(xin, w.double(), padding=1)
    assert_close(y, y64, dtype, "raw output")
    mean64, m2_64 = _tiles_mean_m2(y64, tile_m)
    assert pm.shape == mean64.shape
    assert rel_err(pm, mean64) <= TOL[dtype], f"per-tile means: {rel_err(pm, mean64):.2e}"
    assert rel_err(pm2, m2_64) <= TOL[dtype], f"per-tile M2: {rel_err(pm2, m2_64):.2e}"


@pytest.mark.parametrize("c", [C, CF], ids=["ragged_c", "full_c"])
@pytest.mark.parametrize("entry", ["stats", "eval"])
@pytest.mark.parametrize("geometry", ["one_tile", "5x5", "narrow", "batch3_1x3"])
def test_taps_geometries(geometry, entry, c, device, launches, swaps):
    """Both tilings: "stats" (conv_bn_stats: flat pixel tiles, row shifts) and "eval" (conv_bn_act without STATS:
    spatial tiles, coordinate shifts, with the prologue where the case has one: masked by coordinates).
    one_tile: the whole 2x5x7 input in one 128-pixel tile (flat: every upper tap at a negative row coordinate, every
    lower one past the end; spatial: 8 x 16 pixels per image, ragged on both axes); 5x5 with padding 2 (two-row
    shifts, coordinates -2); narrow: 8 channels, fewer than BLOCK_K (one partial channel block per tap), W = 3 (most
    flat rows wrap); batch3_1x3: a 1x3 filter (padding (0, 1)) over 3 images, with the prologue (positive shift).
    c: the channels (narrow: 8, or 16 in one full block), in ragged or whole BLOCK_K blocks (W_AS_A)."""
    dtype = torch.float16
    cfg, pad, shape, k, rs, pro = SMALL, (1, 1), (N, c, H, W), K, (3, 3), None
    if geometry == "one_tile":
        cfg = dict(SMALL, BLOCK_M=128)
    elif geometry == "5x5":
        pad, rs = (2, 2), (5, 5)
    elif geometry == "narrow":
        shape, k = (2, 8 if c == C else 16, 6, 3), 16
    else:
        shape, pad, rs = (3, c, 4, 6), (0, 1), (1, 3)
        pro = _prologue(c, device)
    x = _x(dtype, device, shape)
    w = (torch.randn(k, shape[1], *rs, device=device) / (shape[1] * rs[0] * rs[1]) ** 0.5).to(dtype).to(
        memory_format=torch.channels_last)
    if entry == "stats":
        y = kernels.conv.conv_bn_stats(x, w, padding=pad, prologue=pro, config=cfg).out
    else:
        y = kernels.conv_bn_act(x, w, padding=pad, prologue=pro, relu=False, config=cfg)
    assert launches == [RUNS] and swaps == [_swapped(shape[1]) and pro is None and entry == "eval"]
    xin = _activated(x, pro, dtype) if pro is not None else x.double()
    assert_close(y, F.conv2d(xin, w.double(), padding=pad), dtype, geometry)


def test_tiling_per_launch():
    """TILE_W (kernels/conv.py _tile_w): spatial tiles for a descriptor launch with taps and no STATS, flat pixel
    tiles for STATS (the finalize counts BLOCK_M pixels per partial), for 1x1 and for pointers; and the grid's tile
    count for each (m_tiles)."""
    base = dict(R=3, S=3, TMA=True, STATS=False, BLOCK_M=128, M=N * H * W, P=H, Q=W)
    assert conv_mod._tile_w(base) == cc.SPATIAL_TILE_W
    assert conv_mod._tile_w(dict(base, BLOCK_M=8)) == 8
    for flat in (dict(STATS=True), dict(TMA=False), dict(R=1, S=1)):
        assert conv_mod._tile_w(dict(base, **flat)) == 0, flat
    assert conv_mod.m_tiles(base) == N * 1 * 1  # 8 x 16 pixels cover an image of 5 x 7
    assert conv_mod.m_tiles(dict(base, BLOCK_M=32)) == N * 3  # 2 x 16: 3 row tiles of 5 rows
    assert conv_mod.m_tiles(dict(base, STATS=True, BLOCK_M=32)) == 3  # 70 pixels in 32-pixel runs


def test_operand_swap_per_launch():
    """W_AS_A (kernels/conv.py _w_as_a): a descriptor launch over spatial tiles (taps, no STATS) whose channel blocks
    are whole and whose weights are dense channels_last rows ([K, R*S*C]: stride_w_s == CG), without a projection
    shortcut (its pointer GEMM shares the accumulator) and without the prologue (an x tile changed in registers, as
    the prologue's or the flat STATS tile's padding select, would be a fresh shared-memory operand each step: a wait
    for every wgmma per step): both MMA operands from shared memory. The rest: the usual operands."""
    base = dict(R=3, S=3, TMA=True, STATS=False, BLOCK_M=128, HAS_SHORTCUT=False, PROLOGUE_BN=False, CG=64,
                BLOCK_K=64, stride_w_s=64)
    assert conv_mod._w_as_a(base)
    for usual in (dict(TMA=False), dict(R=1, S=1), dict(STATS=True), dict(HAS_SHORTCUT=True), dict(PROLOGUE_BN=True),
                  dict(CG=40), dict(stride_w_s=128)):
        assert not conv_mod._w_as_a(dict(base, **usual)), usual


def _ineligible(device):
    """(what, x, w, conv kwargs): launches with taps the descriptor path must leave to pointers."""
    dt = torch.float16
    return [
        ("stride 2 over odd H and W (tests/test_conv_tma_stride2.py: even ones)", _x(dt, device), _w(dt, device),
         dict(stride=(2, 2), padding=(1, 1))),
        ("groups", _x(dt, device), _w(dt, device, K, C // 2), dict(groups=2, padding=(1, 1))),
        ("fp64", _x(torch.float64, device), _w(torch.float64, device), dict(padding=(1, 1))),
        ("fp32", _x(torch.float32, device), _w(torch.float32, device), dict(padding=(1, 1))),
        ("no padding (output smaller than the input)", _x(dt, device), _w(dt, device), {}),
        ("dilation 2", _x(dt, device), _w(dt, device), dict(padding=(2, 2), dilation=(2, 2))),
        ("NCHW weight (taps not dense)", _x(dt, device), _w(dt, device, fmt=torch.contiguous_format),
         dict(padding=(1, 1))),
        ("NCHW input", _x(dt, device, fmt=torch.contiguous_format), _w(dt, device), dict(padding=(1, 1))),
    ]


@pytest.mark.parametrize("case", range(8))
def test_ineligible_taps_take_pointer_path(case, device, launches):
    what, x, w, conv = _ineligible(device)[case]
    _eval_parity(x, w, conv, SMALL, what)
    assert launches == [False], f"{what}: took the descriptor path"


@pytest.mark.skipif(ON_GPU, reason="the interpreter's fixed config (the GPU autotunes)")
@pytest.mark.parametrize("mode,asks,expect", [("1", False, True), ("auto", False, False), ("0", True, False)])
def test_fusedres_tma_switch_taps(mode, asks, expect, monkeypatch, launches):
    """FUSEDRES_TMA=1: the fixed config takes the descriptor path with taps too; auto: only when a config asks;
    0: never."""
    monkeypatch.setenv("FUSEDRES_TMA", mode)
    _eval_parity(_x(torch.float16, "cpu"), _w(torch.float16, "cpu"), dict(padding=(1, 1)), SMALL if asks else None)
    assert launches == [expect]


def test_tma_configs_with_taps(monkeypatch):
    """conv_prune: an eligible 3x3 launch on sm_90 tunes one descriptor tile (4 warps; 8 with a residual); a STATS
    one in place of the pointer tile TMA_REPLACES, which a stride-2 STATS launch of the same variant does not tune
    either (replace_by_tma), an eval one beside it; no descriptor configs on sm_80. 256 channels: every tile keeps
    its blocks."""
    c = k = 256
    x = torch.empty(N, c, H, W, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    w = torch.empty(k, c, 3, 3, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    args = dict(x_ptr=x, w_ptr=w, M=N * H * W, H=H, W=W, KG=k, CG=c, CD=0, R=3, S=3, stride_h=1, stride_w=1,
                pad_h=1, pad_w=1, dil_h=1, dil_w=1, STEM_CPAD=0, **_launch.stride_args("x", x),
                **_launch.stride_args("w", w, "kcrs"))

    def tiles(arch, **over):
        monkeypatch.setattr(cc, "target_arch", lambda: arch)
        stats = over.get("STATS", False)
        configs = cc.gpu_configs(stats=stats) + cc.tma_configs(stats=stats)
        return [(cc.Tile.of(c), bool(c.kwargs.get("TMA"))) for c in cc.conv_prune(configs, {}, **dict(args, **over))]

    def tma_tiles(arch, **over):
        return [t for t, tma in tiles(arch, **over) if tma]

    assert cc.tma_eligible(args)
    assert tma_tiles(80) == [] and (cc.TMA_REPLACES, False) in tiles(80)
    assert [t.num_warps for t in tma_tiles(90)] == [4] and [t.num_warps for t in tma_tiles(90, STATS=True)] == [4]
    assert [t.num_warps for t in tma_tiles(90, HAS_RESIDUAL=True)] == [8]
    assert (cc.TMA_REPLACES, False) in tiles(90) and (cc.TMA_REPLACES, False) not in tiles(90, STATS=True)
    strided = tiles(90, stride_h=2, stride_w=2, STATS=True)
    assert strided and all(not tma for _, tma in strided) and (cc.TMA_REPLACES, False) not in strided
    assert (cc.TMA_REPLACES, False) in tiles(90, stride_h=2, stride_w=2)
    assert not cc.tma_eligible(dict(args, pad_h=0, pad_w=0))
    assert not cc.tma_eligible(dict(args, x_ptr=x.float(), w_ptr=w.float()))
    # 64 output channels (ResNet's layer1): TMA_REPLACES and a native tile both fit to 128x64x64 at 8 warps; the
    # descriptor tile (128x64x64 w4) replaces that pointer tile, so the launch keeps as many configs as before
    narrow = dict(args, KG=64, w_ptr=w[:64], STATS=True, **_launch.stride_args("w", w[:64], "kcrs"))
    with_tma = tiles(90, **narrow)
    nchw = x.contiguous()
    without = tiles(90, **dict(narrow, x_ptr=nchw, **_launch.stride_args("x", nchw)))  # NCHW: ineligible
    assert [t for t, tma in with_tma if tma] == [cc.Tile(128, 64, 64, 4, 3)]
    assert len(with_tma) == len(without) and (cc.Tile(128, 64, 64, 8, 3), False) in without
    assert not any(t[:3] == (128, 64, 64) for t, tma in with_tma if not tma)


@pytest.mark.skipif(not SM90, reason="descriptor configs compile for sm_90 GPUs only")
@pytest.mark.parametrize("cfg_index", range(len(cc.tma_configs())))
def test_every_descriptor_config_taps(cfg_index, device):
    """Each shipped descriptor config on the card with a 3x3 filter: eval (+ residual), STATS with the prologue,
    bf16 and fp16, ragged M and C, several images (negative and past-the-end row coordinates)."""
    tile = cc.Tile.of(cc.tma_configs()[cfg_index])
    kc = dict(cc.conv_fit(tile, 136, 72).kwargs(), TMA=True)
    for dtype in DTYPES16:
        x, w = _x(dtype, device, (3, 72, 9, 7)), _w(dtype, device, 136, 72)
        _eval_parity(x, w, dict(padding=(1, 1)), kc, f"{dtype} {tile} eval+residual",
                     residual=_x(dtype, device, (3, 136, 9, 7)))
        pro = _prologue(72, device)
        y = kernels.conv.conv_bn_stats(x, w, padding=(1, 1), prologue=pro, config=kc).out
        assert_close(y, F.conv2d(_activated(x, pro, dtype), w.double(), padding=1), dtype,
                     f"{dtype} {tile} prologue+STATS")


# ----------------------------------------------------------------------------------------------
# dgrad with taps (kernels/dgrad.py): a stride-1 dgrad is a conv of dy over spatial dx tiles, each tap a box move
# ----------------------------------------------------------------------------------------------

DGRAD_CFG = dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, TMA=True)


@pytest.fixture
def dgrad_launches(monkeypatch):
    return launch_spy(monkeypatch, dgrad_mod, "_conv_dgrad")


@pytest.fixture
def dgrad_swaps(monkeypatch, dgrad_launches):
    """Every fixed-config dgrad launch, as whether it swapped the MMA's operands (W_AS_A: dx channels in whole
    BLOCK_N blocks, dense weight taps)."""
    return launch_spy(monkeypatch, dgrad_mod, "_conv_dgrad", record=lambda kw: bool(kw.get("TMA"))
                      and dgrad_mod._w_as_a(kw))


def _assert_bn_sums(out, xhat, dtype):
    """The BN gradient's sums over the stored (gated, rounded) dx: of g and of g * xhat."""
    g = out.dx.double()
    for what, got, want in (("sum g", out.sum_g, g.sum((0, 2, 3))), ("sum g*xhat", out.sum_gxhat,
                                                                     (g * xhat).sum((0, 2, 3)))):
        assert rel_err(got, want) <= TOL[dtype], f"{what}: {rel_err(got, want):.2e}"


@CHANNELS
@pytest.mark.parametrize("dtype", DTYPES16, ids=str)
@pytest.mark.parametrize("split", [1, 4], ids=["whole", "quarters"])
@pytest.mark.parametrize("epilogue,rs,pad", [("plain", (3, 3), (1, 1)), ("residual", (3, 3), (1, 1)),
                                             ("bn_grad", (3, 3), (1, 1)), ("bn_grad", (5, 5), (2, 2)),
                                             ("plain", (1, 3), (0, 1))])
def test_taps_dgrad(epilogue, rs, pad, split, dtype, c, device, dgrad_launches, dgrad_swaps):
    """dx of a stride-1 "same" conv on the descriptor path (2 x 16-pixel spatial tiles of the 5 x 7 images: ragged on
    both axes, every border tap at a negative or past-the-edge coordinate), with each epilogue: the shortcut's
    gradient gated by the block output's ReLU, and the BN gradient (the previous BN's ReLU gate, and its sums over
    the stored values: the spatial tiles' partial rows, pixels outside the image not counted). quarters: the
    epilogue over 4 column slices (EPI_SPLIT; 24 channels in 16-wide tiles: the second tile's last two slices are
    past C). c: dx channels in ragged or whole BLOCK_N blocks (the operand swap, W_AS_A)."""
    cfg = dict(DGRAD_CFG, EPI_SPLIT=split) if split > 1 else DGRAD_CFG
    dy = _x(dtype, device, (N, K, H, W))
    w = (torch.randn(K, c, *rs, device=device) / (c * rs[0] * rs[1]) ** 0.5).to(dtype).to(
        memory_format=torch.channels_last)
    ref = torch.nn.grad.conv2d_input((N, c, H, W), w.double(), dy.double(), padding=pad)
    if epilogue == "bn_grad":
        y = _x(dtype, device, (N, c, H, W))
        scale, shift = torch.rand(c, device=device) + 0.5, torch.randn(c, device=device)
        mean, invstd = torch.randn(c, device=device), torch.rand(c, device=device) + 0.5
        out = dgrad_mod.conv_dgrad_bn(dy, w, (N, c, H, W), (1, 1), pad, (1, 1), 1, (y, scale, shift, mean, invstd),
                                      config=cfg)
        pre = y.double() * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1)
        assert_close(out.dx, ref * (pre > 0), dtype, "gated dx")
        _assert_bn_sums(out, (y.double() - mean.double().view(1, -1, 1, 1)) * invstd.double().view(1, -1, 1, 1), dtype)
    else:
        residual = None
        if epilogue == "residual":
            res, act_out = _x(dtype, device, (N, c, H, W)), _x(dtype, device, (N, c, H, W))
            residual = (res, act_out, 1)
            ref = ref + res.double() * (act_out.double() > 0)
        dx = dgrad_mod.conv_dgrad(dy, w, (N, c, H, W), (1, 1), pad, (1, 1), 1, residual=residual, config=cfg)
        assert dx.is_contiguous(memory_format=torch.channels_last)
        assert_close(dx, ref, dtype)
    assert dgrad_launches == [RUNS], "an eligible launch that asks for the descriptor path takes it"
    assert dgrad_swaps == [_swapped(c)]


@pytest.mark.parametrize("what", ["stride 2", "no padding", "NCHW weight"])
def test_ineligible_taps_dgrad_take_pointer_path(what, device, dgrad_launches):
    dt = torch.float16
    stride, pad, fmt, hw = (1, 1), (1, 1), torch.channels_last, (H, W)
    if what == "stride 2":
        stride, hw = (2, 2), (3, 4)
    elif what == "no padding":
        pad, hw = (0, 0), (H - 2, W - 2)
    else:
        fmt = torch.contiguous_format
    dy, w = _x(dt, device, (N, K, *hw)), _w(dt, device, fmt=fmt)
    dx = dgrad_mod.conv_dgrad(dy, w, (N, C, H, W), stride, pad, (1, 1), 1, config=DGRAD_CFG)
    assert dgrad_launches and not any(dgrad_launches), f"{what}: took the descriptor path"
    ref = torch.nn.grad.conv2d_input((N, C, H, W), w.double(), dy.double(), stride, pad)
    assert_close(dx, ref, dt, what)


def test_dgrad_taps_partials_and_configs(monkeypatch):
    """The BN partial rows of a dgrad with taps: one per spatial tile when it takes descriptors (phase_tiles), flat
    otherwise; on sm_90 its variant tunes one descriptor tile in place of TMA_REPLACES (4 warps, the BN gradient's
    epilogue over column quarters: EPI_SPLIT)."""
    base = dict(M=N * H * W, HP=H, WP=W, BLOCK_M=128, TMA=True, ONE_TAP=False)
    assert dgrad_mod.phase_tiles(base) == N and dgrad_mod.phase_tiles(dict(base, BLOCK_M=32)) == N * 3
    assert dgrad_mod.phase_tiles(dict(base, TMA=False, BLOCK_M=32)) == 3
    assert dgrad_mod.phase_tiles(dict(base, ONE_TAP=True, BLOCK_M=32)) == 3
    dy = torch.empty(N, 256, H, W, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    args = dict(dy_ptr=dy, CG=256, KG=256, ONE_TAP=False, BN_GRAD=True)
    monkeypatch.setattr(cc, "target_arch", lambda: 90)
    configs = dgrad_mod.gpu_configs() + cc.dgrad_tma_configs()
    pruned = cc.dgrad_prune(configs, {}, **args)
    tiles = [(cc.Tile.of(c), bool(c.kwargs.get("TMA"))) for c in pruned]
    assert [t.num_warps for t, tma in tiles if tma] == [4] and (cc.TMA_REPLACES, False) not in tiles
    assert [c.kwargs.get("EPI_SPLIT") for c in pruned if c.kwargs.get("TMA")] == [4]
    plain = [c for c in cc.dgrad_prune(configs, {}, **dict(args, BN_GRAD=False)) if c.kwargs.get("TMA")]
    assert [(c.num_warps, c.kwargs.get("EPI_SPLIT")) for c in plain] == [(4, None)], "no epilogue tiles: one slice"
    w = torch.empty(256, 256, 3, 3, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    assert cc.dgrad_tma_eligible(dy, w, (1, 1), (1, 1), 1, False)
    assert not cc.dgrad_tma_eligible(dy, w, (1, 1), (1, 1), 1, False, dilation=(2, 2))
    assert not cc.dgrad_tma_eligible(dy, w.contiguous(), (1, 1), (1, 1), 1, False)
