"""The backward convs' descriptor paths (issue 17 item 3): 1x1 stride-1 dgrad (dx = dy @ w) and wgrad
(dw = dy^T @ x) with operands through device-side tensor descriptors (the kernels' TMA switch), against float64.

In the interpreter the path runs when a config asks for it (TMA=True, or FUSEDRES_TMA=1 for the fixed config); on an
sm_90 GPU the same tests run on the card. Ragged shapes: 70 pixels in 32-row tiles, 40 and 24 channels in 16-wide
blocks. fp32 keeps pointers on these paths (_conv_configs.BWD_TMA_DTYPES), so the dtypes are the 16-bit ones
(fp16 here; bf16 on a GPU: the interpreter's bf16 dot is wrong, DESIGN.md 5).
"""
import pytest
import torch

from fusedres.kernels import _conv_configs as cc
from fusedres.kernels import dgrad as dgrad_mod
from fusedres.kernels import wgrad as wgrad_mod
from helpers import ON_GPU, TOL, assert_close, launch_spy, rel_err

SM90 = ON_GPU and torch.cuda.get_device_capability() >= (9, 0)
RUNS = not ON_GPU or SM90  # where an eligible launch that asks for descriptors gets them
DTYPES16 = [torch.float16] + ([torch.bfloat16] if ON_GPU else [])
N, C, H, W, K = 2, 40, 5, 7, 24
DGRAD_CFG = dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, TMA=True)
WGRAD_CFG = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, TMA=True)
ONE = (1, 1)
ZERO = (0, 0)


@pytest.fixture
def dgrad_launches(monkeypatch):
    return launch_spy(monkeypatch, dgrad_mod, "_conv_dgrad")


@pytest.fixture
def wgrad_launches(monkeypatch):
    return launch_spy(monkeypatch, wgrad_mod, "_conv_wgrad_kernel")


def _act(dtype, device, shape, fmt=torch.channels_last):
    return torch.randn(*shape, device=device).to(dtype).to(memory_format=fmt)


def _w(dtype, device, k=K, c=C, r=1):
    return (torch.randn(k, c, r, r, device=device) / c ** 0.5).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES16, ids=str)
@pytest.mark.parametrize("epilogue", ["plain", "residual", "bn_grad"])
def test_descriptor_dgrad(epilogue, dtype, device, dgrad_launches):
    """dx = dy @ w on the descriptor path, with each epilogue: the shortcut's gradient gated by the block output's
    ReLU, and the BN gradient (the previous BN's ReLU gate and its sums, over stored values: rows past M loaded
    zeros and must not count)."""
    dy, w = _act(dtype, device, (N, K, H, W)), _w(dtype, device)
    ref = torch.nn.grad.conv2d_input((N, C, H, W), w.double(), dy.double())
    if epilogue == "bn_grad":
        y = _act(dtype, device, (N, C, H, W))
        scale, shift = torch.rand(C, device=device) + 0.5, torch.randn(C, device=device)
        mean, invstd = torch.randn(C, device=device), torch.rand(C, device=device) + 0.5
        out = dgrad_mod.conv_dgrad_bn(dy, w, (N, C, H, W), ONE, ZERO, ONE, 1, (y, scale, shift, mean, invstd),
                                      config=DGRAD_CFG)
        pre = y.double() * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1)
        ref = ref * (pre > 0)
        assert_close(out.dx, ref, dtype, "gated dx")
        xhat = (y.double() - mean.double().view(1, -1, 1, 1)) * invstd.double().view(1, -1, 1, 1)
        g = out.dx.double()  # the sums are of the stored values
        assert rel_err(out.sum_g, g.sum((0, 2, 3))) <= TOL[dtype]
        assert rel_err(out.sum_gxhat, (g * xhat).sum((0, 2, 3))) <= TOL[dtype]
    else:
        residual = None
        if epilogue == "residual":
            res, act_out = _act(dtype, device, (N, C, H, W)), _act(dtype, device, (N, C, H, W))
            residual = (res, act_out, 1)
            ref = ref + res.double() * (act_out.double() > 0)
        dx = dgrad_mod.conv_dgrad(dy, w, (N, C, H, W), ONE, ZERO, ONE, 1, residual=residual, config=DGRAD_CFG)
        assert dx.is_contiguous(memory_format=torch.channels_last)
        assert_close(dx, ref, dtype)
    assert dgrad_launches == [RUNS], "an eligible launch that asks for the descriptor path takes it"


@pytest.mark.parametrize("dtype", DTYPES16, ids=str)
@pytest.mark.parametrize("prologue", [False, True], ids=["plain", "prologue"])
def test_descriptor_wgrad(prologue, dtype, device, wgrad_launches):
    """dw = dy^T @ act(x) on the descriptor path; with the BN+ReLU prologue, a positive shift on every channel, so
    x rows past M (zeros) become relu(shift) != 0: they must meet zero dy rows."""
    dy, x, w = _act(dtype, device, (N, K, H, W)), _act(dtype, device, (N, C, H, W)), _w(dtype, device)
    pro = (torch.rand(C, device=device) + 0.5, torch.rand(C, device=device) + 0.1) if prologue else None
    dw = wgrad_mod.conv_wgrad(dy, x, w, ONE, ZERO, ONE, 1, prologue=pro, config=WGRAD_CFG)
    xin = x.double()
    if prologue:
        xin = torch.relu(xin * pro[0].double().view(1, -1, 1, 1) + pro[1].double().view(1, -1, 1, 1))
        xin = xin.to(dtype).double()  # the kernel rounds the activated tile to x's dtype before the MMA
    assert wgrad_launches == [RUNS]
    assert_close(dw, torch.nn.grad.conv2d_weight(xin, w.shape, dy.double()), dtype)


def _activated(x, pro, dtype):
    """x in float64, through the BN-ReLU prologue when pro = (scale, shift) is given, rounded to x's dtype as the
    kernel rounds the activated tile before the MMA."""
    if pro is None:
        return x.double()
    xa = torch.relu(x.double() * pro[0].double().view(1, -1, 1, 1) + pro[1].double().view(1, -1, 1, 1))
    return xa.to(dtype).double()


def _wgrad_taps_ref(x, w, dy, pro, dtype, padding):
    return torch.nn.grad.conv2d_weight(_activated(x, pro, dtype), w.shape, dy.double(), padding=padding)


@pytest.mark.parametrize("dtype", DTYPES16, ids=str)
@pytest.mark.parametrize("prologue", [False, True], ids=["plain", "prologue"])
@pytest.mark.parametrize("shape", [(2, 32, 5, 7, 24, 3), (3, 16, 4, 3, 16, 3), (1, 48, 6, 9, 40, 5)],
                         ids=["3x3", "3x3_narrow", "5x5"])
def test_descriptor_wgrad_taps(shape, prologue, dtype, device, wgrad_launches):
    """A same-padded stride-1 RxS wgrad on the descriptor path: each column tile is one tap's channels, the x box moves
    by the tap's row shift of the flattened pixels (negative at the first step, past M at the last), and the rows that
    wrap to a neighbouring image row or image are zeroed after the prologue (a positive shift: relu(shift) != 0 there,
    so a missed row shows). Ragged: 70-54 pixels in 32-row steps, 24 and 40 output channels in 16-wide blocks."""
    n, c, h, w_, k, r = shape
    dy, x, w = _act(dtype, device, (n, k, h, w_)), _act(dtype, device, (n, c, h, w_)), _w(dtype, device, k, c, r)
    w = w.to(memory_format=torch.channels_last)
    pro = (torch.rand(c, device=device) + 0.5, torch.rand(c, device=device) + 0.1) if prologue else None
    pad = (r // 2, r // 2)
    dw = wgrad_mod.conv_wgrad(dy, x, w, ONE, pad, ONE, 1, prologue=pro, config=WGRAD_CFG)
    assert wgrad_launches == [RUNS]
    assert_close(dw, _wgrad_taps_ref(x, w, dy, pro, dtype, pad), dtype)


@pytest.mark.parametrize("prologue", [False, True], ids=["plain", "prologue"])
@pytest.mark.parametrize("taps", [1, 3])
def test_descriptor_wgrad_128_pixel_steps(taps, prologue, device, monkeypatch, wgrad_launches):
    """The shipped descriptor tile's 128 pixels a step: 8 x 16 pixel tiles of a 3x3 tap's views that overhang a 9 x 19
    image both ways, and a 1x1 split into 3 whole-step shares of 7 x 41 x 2 pixels (the last one ragged at M)."""
    monkeypatch.setattr(wgrad_mod, "_num_splits", lambda *a: 3)
    dtype = torch.float16
    n, c, h, w_, k = (2, 32, 9, 19, 24) if taps == 3 else (2, 16, 7, 41, 24)
    dy, x, w = _act(dtype, device, (n, k, h, w_)), _act(dtype, device, (n, c, h, w_)), _w(dtype, device, k, c, taps)
    w = w.to(memory_format=torch.channels_last)
    pro = (torch.rand(c, device=device) + 0.5, torch.rand(c, device=device) + 0.1) if prologue else None
    pad = (taps // 2, taps // 2)
    dw = wgrad_mod.conv_wgrad(dy, x, w, ONE, pad, ONE, 1, prologue=pro, config=dict(WGRAD_CFG, BLOCK_K=128))
    assert wgrad_launches == [RUNS]
    assert_close(dw, _wgrad_taps_ref(x, w, dy, pro, dtype, pad), dtype)


@pytest.mark.parametrize("prologue", [False, True], ids=["plain", "prologue"])
def test_descriptor_wgrad_taps_empty_split(prologue, device, monkeypatch, wgrad_launches):
    """Split-K with a split that has no spatial tile of a tap's views (3 splits over 4 or 2 tiles): the loop's trip
    count is at least one (_tiles.k_steps), so that split takes one step past the views, zero-filled, and must add
    nothing (with the prologue, relu(shift) > 0 meets a zero dy row there). The interpreter runs one split unless
    told otherwise."""
    monkeypatch.setattr(wgrad_mod, "_num_splits", lambda *a: 3)
    dtype = torch.float16
    n, c, h, w_, k, r = 2, 32, 5, 7, 24, 3
    dy, x, w = _act(dtype, device, (n, k, h, w_)), _act(dtype, device, (n, c, h, w_)), _w(dtype, device, k, c, r)
    w = w.to(memory_format=torch.channels_last)
    pro = (torch.rand(c, device=device) + 0.5, torch.rand(c, device=device) + 0.1) if prologue else None
    dw = wgrad_mod.conv_wgrad(dy, x, w, ONE, ONE, ONE, 1, prologue=pro, config=WGRAD_CFG)
    assert wgrad_launches == [RUNS]
    assert_close(dw, _wgrad_taps_ref(x, w, dy, pro, dtype, ONE), dtype)


def _wgrad_pairs_ref(x, w, dy, pro, dtype):
    """dw of a same-padded stride-1 conv as the sum, per tap, over the pixel pairs inside the image (slices, float64):
    a padded tap is skipped, as oneDNN does, not multiplied as a zero (im2col: 0 * NaN = NaN)."""
    xa, g = _activated(x, pro, dtype), dy.double()
    _, _, h, w_ = x.shape
    r, s = w.shape[2:]
    dw = torch.empty(w.shape, dtype=torch.float64, device=x.device)
    for i in range(r):
        for j in range(s):
            dh, dw_ = i - r // 2, j - s // 2
            xs = xa[:, :, max(dh, 0):h + min(dh, 0), max(dw_, 0):w_ + min(dw_, 0)]
            gs = g[:, :, max(-dh, 0):h + min(-dh, 0), max(-dw_, 0):w_ + min(-dw_, 0)]
            dw[:, :, i, j] = torch.einsum("nkhw,nchw->kc", gs, xs)
    return dw


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter
@pytest.mark.parametrize("prologue", [False, True], ids=["plain", "prologue"])
def test_descriptor_wgrad_taps_special_values(prologue, device, wgrad_launches):
    """Inf in x at an image's first and last column and NaN in dy: NaN and Inf at the same places of dw as the sum
    over the pixel pairs each tap joins. A tile that read a neighbouring row's pixel where the tap leaves the image
    would put Inf * dy into taps the pixel never meets. A padded tap is skipped (a NaN dy does not meet the padding),
    so the NaNs are those of the pair sum, not im2col's (0 * NaN at the borders: more NaNs)."""
    dtype = torch.float16
    n, c, h, w_, k = 2, 16, 5, 6, 16
    dy, x, w = _act(dtype, device, (n, k, h, w_)), _act(dtype, device, (n, c, h, w_)), _w(dtype, device, k, c, 3)
    w = w.to(memory_format=torch.channels_last)
    with torch.no_grad():
        x[0, 3, 2, 0] = float("inf")
        x[1, 5, 4, w_ - 1] = float("-inf")
        dy[1, 7, 0, 2] = float("nan")
    pro = (torch.rand(c, device=device) + 0.5, torch.rand(c, device=device) + 0.1) if prologue else None
    dw = wgrad_mod.conv_wgrad(dy, x, w, ONE, ONE, ONE, 1, prologue=pro, config=WGRAD_CFG).double().cpu()
    ref = _wgrad_pairs_ref(x, w, dy, pro, dtype).cpu()
    assert wgrad_launches == [RUNS]
    for name, fn in (("NaN", torch.isnan), ("+Inf", lambda t: t == float("inf")),
                     ("-Inf", lambda t: t == float("-inf"))):
        assert torch.equal(fn(dw), fn(ref)), f"{name} at {fn(dw).sum()} places, the pair sum {fn(ref).sum()}"
    finite = ref.isfinite()
    assert finite.sum() > ref.numel() // 2
    assert_close(dw[finite], ref[finite], dtype)


def _ineligible(device):
    """(what, dy, x, w, stride, padding, groups): launches the descriptor paths must leave to pointers."""
    dt = torch.float16
    dy, x, w = _act(dt, device, (N, K, H, W)), _act(dt, device, (N, C, H, W)), _w(dt, device)
    big, big_dy = _act(dt, device, (N, C + 8, H, W)), _act(dt, device, (N, K + 8, H, W))
    return [
        ("stride 2", _act(dt, device, (N, K, 3, 4)), x, w, (2, 2), ZERO, 1),
        ("padding", _act(dt, device, (N, K, H + 2, W + 2)), x, w, ONE, (1, 1), 1),
        ("NCHW", dy.contiguous(), x.contiguous(), w, ONE, ZERO, 1),
        ("misaligned base", big_dy[:, 1:K + 1], big[:, 1:C + 1], w, ONE, ZERO, 1),  # 2 bytes past 16
        ("3x3 unpadded", _act(dt, device, (N, K, H - 2, W - 2)), x, _w(dt, device, r=3), ONE, ZERO, 1),
        ("3x3 stride 2", _act(dt, device, (N, K, 3, 4)), x, _w(dt, device, r=3), (2, 2), ONE, 1),
        ("groups", dy, x, _w(dt, device, K, C // 2), ONE, ZERO, 2),
        ("fp32", dy.float(), x.float(), w.float(), ONE, ZERO, 1),
    ]


@pytest.mark.parametrize("case", range(8))
def test_ineligible_backward_takes_pointer_path(case, device, dgrad_launches, wgrad_launches):
    what, dy, x, w, stride, padding, groups = _ineligible(device)[case]
    dx = dgrad_mod.conv_dgrad(dy, w, x.shape, stride, padding, ONE, groups, config=DGRAD_CFG)
    dw = wgrad_mod.conv_wgrad(dy, x, w, stride, padding, ONE, groups, config=WGRAD_CFG)
    assert dgrad_launches and not any(dgrad_launches), f"{what}: dgrad took the descriptor path"
    assert wgrad_launches == [False], f"{what}: wgrad took the descriptor path"
    ref_dx = torch.nn.grad.conv2d_input(x.shape, w.double(), dy.double(), stride, padding, groups=groups)
    ref_dw = torch.nn.grad.conv2d_weight(x.double(), w.shape, dy.double(), stride, padding, groups=groups)
    assert_close(dx, ref_dx, x.dtype, f"{what} dx")
    assert_close(dw, ref_dw, x.dtype, f"{what} dw")


@pytest.mark.skipif(ON_GPU, reason="the interpreter's fixed config (the GPU autotunes)")
@pytest.mark.parametrize("mode,expect", [("1", True), ("auto", False), ("0", False)])
def test_fusedres_tma_switch_backward(mode, expect, monkeypatch, dgrad_launches, wgrad_launches):
    """FUSEDRES_TMA=1: the fixed configs of dgrad and wgrad take the descriptor path; auto and 0: not."""
    monkeypatch.setenv("FUSEDRES_TMA", mode)
    dy, x, w = _act(torch.float16, "cpu", (N, K, H, W)), _act(torch.float16, "cpu", (N, C, H, W)), _w(torch.float16,
                                                                                                    "cpu")
    dx = dgrad_mod.conv_dgrad(dy, w, x.shape, ONE, ZERO, ONE, 1)
    dw = wgrad_mod.conv_wgrad(dy, x, w, ONE, ZERO, ONE, 1)
    assert dgrad_launches == [expect] and wgrad_launches == [expect]
    assert_close(dx, torch.nn.grad.conv2d_input(x.shape, w.double(), dy.double()), torch.float16)
    assert_close(dw, torch.nn.grad.conv2d_weight(x.double(), w.shape, dy.double()), torch.float16)


def test_backward_tma_configs_replace_a_pointer_tile(monkeypatch):
    """On sm_90 a 1x1-shaped 16-bit variant never tunes the 128x128x64 w8 pointer tile (variants are shared by
    eligible and ineligible launches); an eligible launch tunes the descriptor tile in its place, so no launch has
    more configs than before (compiles: benchmarks/cold_start.py). 4 warps for a plain dgrad, 8 with the BN
    gradient; nothing changes on sm_80 or for a variant that cannot take descriptors."""
    def run(prune, configs, arch, **a):
        monkeypatch.setattr(cc, "target_arch", lambda: arch)
        return [(cc.Tile.of(c), bool(c.kwargs.get("TMA"))) for c in prune(configs, {}, **a)]

    def check(prune, pointer_cfgs, tma_cfgs, a, incapable, desc):
        both = pointer_cfgs + tma_cfgs
        before = run(prune, pointer_cfgs, 90, **dict(a, **incapable))  # the set as before this path
        eligible, ineligible = run(prune, both, 90, **a), run(prune, pointer_cfgs, 90, **a)
        assert len(eligible) == len(before) and [t for t, tma in eligible if tma] == [desc]
        assert (cc.TMA_REPLACES, False) in before and (cc.TMA_REPLACES, False) not in eligible + ineligible
        assert ineligible == [p for p in before if p[0] != cc.TMA_REPLACES]
        assert run(prune, both, 80, **a) == run(prune, pointer_cfgs, 80, **a)

    dg = dict(CG=256, KG=1024, BN_GRAD=False, HAS_RESIDUAL=False, ONE_TAP=True, IDX64=False,
              dy_ptr=torch.empty(1, dtype=torch.bfloat16))
    idx64 = dict(IDX64=True)  # incapable; not fp32, which prunes its own spilling tiles too (cc.DTYPE_SPILLS)
    check(cc.dgrad_prune, dgrad_mod.gpu_configs(), cc.dgrad_tma_configs(), dg, idx64, cc.Tile(128, 128, 64, 4, 3))
    check(cc.dgrad_prune, dgrad_mod.gpu_configs(), cc.dgrad_tma_configs(), dict(dg, BN_GRAD=True), idx64,
          cc.Tile(128, 128, 64, 8, 3))
    # 64 channels (layer1): the descriptor tile fits to 128x64x64 w4 s3 and replaces that pointer tile, as many configs
    for over in (dict(ONE_TAP=False, BN_GRAD=True), dict(ONE_TAP=True)):
        d64 = dict(dg, CG=64, KG=64, **over)
        before = run(cc.dgrad_prune, dgrad_mod.gpu_configs(), 90, **dict(d64, IDX64=True))
        eligible = run(cc.dgrad_prune, dgrad_mod.gpu_configs() + cc.dgrad_tma_configs(), 90, **d64)
        assert [t for t, tma in eligible if tma] == [cc.Tile(128, 64, 64, 4, 3)], over
        assert (cc.Tile(128, 64, 64, 4, 3), False) in before and (cc.Tile(128, 64, 64, 4, 3), False) not in eligible
        assert len(eligible) == len(before)
    # wgrad's descriptor tile steps over 128 pixels (8 x 16 with taps), over 64 (8 x 8) where 16 columns overhang
    wg = dict(CG=1024, KG=256, NCOL=1024, R=1, S=1, W=7, X_AS_A=True, STEM_CPAD=0, IDX64=False)
    check(cc.wgrad_prune, wgrad_mod.gpu_configs(), cc.wgrad_tma_configs(), wg, dict(X_AS_A=False),
          cc.Tile(128, 128, 128, 4, 3))
    # 3x3 with the prologue (ResNet-50's conv2): one tap's channels per column tile
    wg3 = dict(CG=256, KG=256, NCOL=2304, R=3, S=3, W=14, X_AS_A=True, STEM_CPAD=0, IDX64=False, PROLOGUE_BN=True,
               dy_ptr=torch.empty(1, dtype=torch.bfloat16))
    check(cc.wgrad_prune, wgrad_mod.gpu_configs(), cc.wgrad_tma_configs(), wg3, dict(X_AS_A=False),
          cc.Tile(128, 128, 128, 4, 3))
    check(cc.wgrad_prune, wgrad_mod.gpu_configs(), cc.wgrad_tma_configs(), dict(wg3, W=7), dict(X_AS_A=False),
          cc.Tile(128, 128, 64, 4, 3))
    # 64 channels (layer1, 56 wide): the descriptor tile fits to 64 columns and replaces its pointer twin
    wg64 = dict(wg3, CG=64, KG=64, NCOL=576, W=56)
    before = run(cc.wgrad_prune, wgrad_mod.gpu_configs(), 90, **dict(wg64, X_AS_A=False))
    eligible = run(cc.wgrad_prune, wgrad_mod.gpu_configs() + cc.wgrad_tma_configs(), 90, **wg64)
    desc = cc.Tile(64, 64, 64, 4, 3)
    assert (desc, False) in before and len(eligible) == len(before)
    assert (desc, True) in eligible and (desc, False) not in eligible
    for tile, tma in eligible:
        assert not tma or wg64["CG"] % tile.block_m == 0, "a descriptor column tile within one tap"


@pytest.mark.skipif(not SM90, reason="descriptor configs compile for sm_90 GPUs only")
@pytest.mark.parametrize("which", ["dgrad", "wgrad"])
def test_every_backward_descriptor_config(which, device):
    """Each shipped backward descriptor config (fitted as the autotuner fits it) on the card, every 16-bit dtype,
    ragged M and channels: dgrad plain and with the BN gradient + residual, wgrad plain and with the prologue."""
    tiles = cc.arch_tiles(cc.DGRAD_TMA_TILES if which == "dgrad" else cc.WGRAD_TMA_TILES)
    for tile in tiles:
        for dtype in DTYPES16:
            dy, x, w = _act(dtype, device, (3, 136, 9, 7)), _act(dtype, device, (3, 72, 9, 7)), _w(dtype, device,
                                                                                                  136, 72)
            if which == "dgrad":
                kc = dict(tile.fit(n=72, k=136).kwargs(), TMA=True)
                dx = dgrad_mod.conv_dgrad(dy, w, x.shape, ONE, ZERO, ONE, 1, config=kc)
                assert_close(dx, torch.nn.grad.conv2d_input(x.shape, w.double(), dy.double()), dtype, f"{tile}")
                res, act_out = _act(dtype, device, x.shape), _act(dtype, device, x.shape)
                sc, sh = torch.rand(72, device=device) + 0.5, torch.randn(72, device=device)
                mean, invstd = torch.randn(72, device=device), torch.rand(72, device=device) + 0.5
                out = dgrad_mod.conv_dgrad_bn(dy, w, x.shape, ONE, ZERO, ONE, 1, (x, sc, sh, mean, invstd),
                                              residual=(res, act_out, 1), config=kc)
                pre = x.double() * sc.double().view(1, -1, 1, 1) + sh.double().view(1, -1, 1, 1)
                ref = (torch.nn.grad.conv2d_input(x.shape, w.double(), dy.double()) * (pre > 0)
                       + res.double() * (act_out.double() > 0))  # the BN gate, then the shortcut's gradient
                assert_close(out.dx, ref, dtype, f"{tile} bn_grad + residual")
            else:
                kc = dict(tile.fit(m=72, n=136).kwargs(), TMA=True)
                dw = wgrad_mod.conv_wgrad(dy, x, w, ONE, ZERO, ONE, 1, config=kc)
                assert_close(dw, torch.nn.grad.conv2d_weight(x.double(), w.shape, dy.double()), dtype, f"{tile}")
                pro = (torch.rand(72, device=device) + 0.5, torch.rand(72, device=device) + 0.1)
                dw = wgrad_mod.conv_wgrad(dy, x, w, ONE, ZERO, ONE, 1, prologue=pro, config=kc)
                xin = torch.relu(x.double() * pro[0].double().view(1, -1, 1, 1) + pro[1].double().view(1, -1, 1, 1))
                assert_close(dw, torch.nn.grad.conv2d_weight(xin.to(dtype).double(), w.shape, dy.double()), dtype,
                             f"{tile} prologue")
                w3 = _w(dtype, device, 136, 64, 3).to(memory_format=torch.channels_last)  # taps: 64-wide columns
                kc3 = dict(tile.fit(m=64, n=136).kwargs(), TMA=True)
                dw = wgrad_mod.conv_wgrad(dy, x[:, :64], w3, ONE, ONE, ONE, 1, prologue=(pro[0][:64], pro[1][:64]),
                                          config=kc3)
                assert_close(dw, _wgrad_taps_ref(x[:, :64], w3, dy, (pro[0][:64], pro[1][:64]), dtype, ONE), dtype,
                             f"{tile} 3x3 prologue")
