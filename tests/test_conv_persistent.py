"""The forward conv's persistent descriptor launches and their descriptor epilogue (issue 17 item 4), against the
float64 reference and against one program per tile.

A 16-bit 1x1 descriptor launch (a plain GEMM over pixel rows) runs PERSISTENT: min(tiles, SMs) programs walk the
(m-tile, n-tile) grid (INTERPRETER_PROGRAMS = 2 in the interpreter, so every program here walks several tiles), and
with a dense NHWC output (and residual) its epilogue goes through descriptors (OUT_DESC). Each tile's math is the
same either way: FUSEDRES_PERSISTENT=0 must give the same bits.
"""
import pytest
import torch

from fusedres import kernels
from fusedres.kernels import _conv_configs as cc
from fusedres.kernels import conv as conv_mod
from fusedres.reference import conv_bn_act_reference
from helpers import DTYPES, ON_GPU, assert_close, launch_spy

SM90 = ON_GPU and torch.cuda.get_device_capability() >= (9, 0)
RUNS = not ON_GPU or SM90  # where an eligible launch that asks for descriptors gets them
# 3 x 4 pixels x 2 images = 96 rows in 3 tiles of 32 (+ a ragged fourth with H = 7), 40 channels in 3 steps,
# 40 output channels in 3 tiles of 16 (the last 8): 9-12 tiles over 2 programs in the interpreter
SMALL = dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, TMA=True)
N, C, H, W, K = 2, 40, 7, 8, 40


def _x(dtype, device, shape=(N, C, H, W)):
    return torch.randn(*shape, device=device).to(dtype).to(memory_format=torch.channels_last)


def _w(dtype, device, k=K, c=C, r=1):
    w = (torch.randn(k, c, r, r, device=device) / (c * r * r) ** 0.5).to(dtype)
    return w.to(memory_format=torch.channels_last)  # dense taps: the descriptor's [K, R*S, C] view


def _affine(n, device):
    return torch.rand(n, device=device) + 0.5, torch.randn(n, device=device)


def _switches(kw):
    """What a launch ran: (OUT_DESC, PERSISTENT, programs on axis 0), as the kernel's heuristics and grid set them."""
    meta = dict(kw, TILE_W=conv_mod._tile_w(kw), OUT_DESC=conv_mod._out_desc(kw), PERSISTENT=conv_mod._persistent(kw))
    tiles = conv_mod.m_tiles(meta) * -(-meta["KG"] // meta["BLOCK_N"])
    return meta["OUT_DESC"], meta["PERSISTENT"], min(tiles, cc.persistent_programs(kw["x_ptr"])) \
        if meta["PERSISTENT"] else tiles


@pytest.fixture
def launches(monkeypatch):
    return launch_spy(monkeypatch, conv_mod, "_conv_bn_act", record=_switches)


def _both_ways(monkeypatch, run):
    """run() persistent, then with FUSEDRES_PERSISTENT=0 (one program per tile)."""
    monkeypatch.setenv("FUSEDRES_PERSISTENT", "1")
    walked = run()
    monkeypatch.setenv("FUSEDRES_PERSISTENT", "0")
    return walked, run()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("residual", [None, "identity", "option_a"])
def test_persistent_eval_epilogue(residual, dtype, device, monkeypatch, launches):
    """BN + residual + ReLU through descriptors, the tiles walked by 2 programs: the reference's numbers, and the
    same bits as one program per tile. Option A: a residual of fewer channels (the descriptor loads zeros past
    RES_C)."""
    x, w = _x(dtype, device), _w(dtype, device)
    scale, shift = _affine(K, device)
    res = {None: None, "identity": _x(dtype, device, (N, K, H, W)),
           "option_a": _x(dtype, device, (N, K - 16, H, W))}[residual]
    walked, per_tile = _both_ways(monkeypatch, lambda: kernels.conv_bn_act(x, w, scale, shift, residual=res,
                                                                           relu=True, config=SMALL))
    if RUNS:
        # 16-bit: walked with the descriptor epilogue, then one program per tile; fp32 one program per tile either
        # way (its staged output tile would overflow shared memory, and walked it spilled: kernels/conv.py)
        wide = dtype == torch.float32
        programs = 4 * 3 if wide else cc.persistent_programs(x) if not ON_GPU else launches[0][2]
        assert launches == [(not wide, not wide, programs), (not wide, False, 4 * 3)]
    assert torch.equal(walked, per_tile), "a walked tile computes what its own program does"
    ref = conv_bn_act_reference(x, w, scale, shift, residual=res, relu=True)
    assert_close(walked, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("taps", [1, 3])
def test_persistent_stats_with_prologue(taps, dtype, device, monkeypatch, launches):
    """The training forward (prologue + STATS) walked: output and per-tile partials as one program per tile. With
    taps (3x3, its descriptor tile over flat rows) one program per tile either way."""
    if taps == 3 and dtype == torch.float32:
        pytest.skip("fp32 keeps pointers with taps (TAPS_TMA_DTYPES)")
    x, w = _x(dtype, device), _w(dtype, device, r=taps)
    pro = (torch.rand(C, device=device) + 0.5, torch.rand(C, device=device) + 0.1)
    walked, per_tile = _both_ways(monkeypatch, lambda: kernels.conv.conv_bn_stats(
        x, w, padding=(taps // 2, taps // 2), prologue=pro, config=SMALL))
    if RUNS:
        walks = dtype != torch.float32 and taps == 1
        assert [s[:2] for s in launches] == [(walks, walks), (walks, False)]
    for a, b, what in zip(walked[:3], per_tile[:3], ("output", "tile means", "tile M2")):
        assert torch.equal(a, b), f"{what} differ between a walked tile and its own program"
    xin = torch.relu(x.double() * pro[0].double().view(1, -1, 1, 1) + pro[1].double().view(1, -1, 1, 1))
    y64 = torch.nn.functional.conv2d(xin.to(dtype).double(), w.double(), padding=taps // 2)
    assert_close(walked.out, y64, dtype, "raw output")


def test_descriptor_epilogue_needs_a_dense_nhwc_residual(device, monkeypatch, launches):
    """A residual that is no [M, C] matrix (every other pixel of a larger map) keeps the pointer epilogue on the
    persistent walk; a channel slice of a wider channels_last map (rows at a wider, 16-byte stride) is one."""
    dtype = torch.bfloat16
    x, w = _x(dtype, device), _w(dtype, device)
    scale, shift = _affine(K, device)
    strided = _x(dtype, device, (N, K, 2 * H, 2 * W))[:, :, ::2, ::2]
    sliced = _x(dtype, device, (N, K + 16, H, W))[:, 8:K + 8]  # base and rows 16-byte aligned
    for res in (strided, sliced):
        out = kernels.conv_bn_act(x, w, scale, shift, residual=res, relu=True, config=SMALL)
        assert_close(out, conv_bn_act_reference(x, w, scale, shift, residual=res, relu=True), dtype)
    if RUNS:
        assert [s[:2] for s in launches] == [(False, True), (True, True)]


def test_persistent_programs(monkeypatch):
    """One program per SM on a card (the device's count, cached), 132 for the static check's meta tensors, 2 in the
    interpreter; FUSEDRES_PERSISTENT turns the walk off."""
    assert cc.persistent_programs(torch.empty(1, device="meta")) == 132
    assert cc.persistent_programs(torch.empty(1)) == cc.INTERPRETER_PROGRAMS == 2
    args = dict(TMA=True, R=1, S=1, STATS=False, BLOCK_M=32, out_ptr=torch.empty(1, dtype=torch.bfloat16))
    assert not conv_mod._persistent(dict(args, out_ptr=torch.empty(1))), "fp32: one tile per program"
    assert conv_mod._persistent(args) and not conv_mod._persistent(dict(args, TMA=False))
    assert not conv_mod._persistent(dict(args, R=3, S=3)), "eval with taps: spatial tiles, one per program"
    assert not conv_mod._persistent(dict(args, R=3, S=3, STATS=True)), "with taps: one tile per program"
    for off in ("0", "off", "false"):
        monkeypatch.setenv("FUSEDRES_PERSISTENT", off)
        assert not conv_mod._persistent(args)
