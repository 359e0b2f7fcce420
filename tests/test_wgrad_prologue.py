"""wgrad's BN-apply + ReLU prologue (issue 17 item 2, backward part): the weight gradient reads the activated input
the forward conv computed, bit for bit (the same _tiles.bn_act, the same PROLOGUE_MATH per launch).

With a one-hot dy (output channel k reads pixel k alone, with weight 1; as many output channels as pixels), every
dw[k, c, r, s] is a single product by 1.0 of the activated input at pixel k's tap (r, s), exact in any accumulator,
or 0 where that tap reads the padding. So dw holds every activated element of the input and is compared bit for bit
with the forward prologue's host specification (tests/test_conv_prologue.py: bf16 by one rounding from bf16-rounded
scale and shift; fp16, fp32, fp64 in fp32 / fp64 math, one rounding), on a GPU to the tolerance table for the dtypes
whose arithmetic the compiler may contract. Geometries: 1x1 without padding (no pad select: IN_BOUNDS), its descriptor
path, 1x1 stride 2, 3x3 with padding with one tap per column tile (a padded tap zeroes the dy row), with taps
across a tile (the activated tile is selected to 0 there) and on the descriptor path (each tap's pixel-pair views:
a padded tap is never paired).
"""
import pytest
import torch
from test_conv_prologue import ALL, C, H, N, W, _identity, _inputs, activated

from fusedres import kernels
from fusedres.kernels import wgrad as wgrad_mod
from helpers import ON_GPU, TOL, launch_spy, rel_err

# (name, stride, padding, filter size, config extras); BLOCK_M 16 = C: one tap per column tile (TAP_PER_TILE)
GEOMETRIES = [("1x1", 1, 0, 1, {}), ("1x1_tma", 1, 0, 1, {"TMA": True}), ("1x1_s2", 2, 0, 1, {}),
              ("3x3_pad", 1, 1, 3, {}), ("3x3_pad_taps_across", 1, 1, 3, {"BLOCK_M": 32}),
              ("3x3_pad_tma", 1, 1, 3, {"TMA": True})]
SMALL = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32)


@pytest.fixture
def launches(monkeypatch):
    """The keyword arguments of every fixed-config launch of the wgrad kernel."""
    return launch_spy(monkeypatch, wgrad_mod, "_conv_wgrad_kernel", record=dict)


def _one_hot_dy(x, stride, pad, ksize):
    """[N, K, P, Q] with dy[n, k, p, q] = 1 at the k-th of the M output pixels (row-major), 0 elsewhere; K = M
    rounded up to 8 (16-byte rows: the descriptor path's rule), the channels past M zero."""
    p = (x.shape[2] + 2 * pad - ksize) // stride + 1
    q = (x.shape[3] + 2 * pad - ksize) // stride + 1
    m = x.shape[0] * p * q
    dy = torch.eye(-(-m // 8) * 8, m, dtype=x.dtype, device=x.device).view(-1, x.shape[0], p, q).permute(1, 0, 2, 3)
    return dy.contiguous(memory_format=torch.channels_last)


def _wgrad(x, scale, shift, geo, device):
    _, stride, pad, ksize, extra = geo
    dy = _one_hot_dy(x, stride, pad, ksize)
    w = torch.empty(dy.shape[1], C, ksize, ksize, dtype=x.dtype, device=device).to(memory_format=torch.channels_last)
    config = None if ON_GPU else dict(SMALL, **extra)
    dw = wgrad_mod.conv_wgrad(dy, x, w, (stride, stride), (pad, pad), (1, 1), 1, prologue=(scale, shift),
                              config=config)
    return dw, dy, w


def _expected(x, scale, shift, dy, w, geo):
    """dw of the activated input (the forward's, zero padded after the activation), in float64."""
    return torch.nn.grad.conv2d_weight(activated(x, scale, shift).double(), w.shape, dy.double(), geo[1], geo[2])


def _skip_unsupported(dtype, geo):
    if geo[4].get("TMA") and dtype not in (torch.float16, torch.bfloat16):
        pytest.skip("the descriptor path takes 16-bit operands only (_conv_configs.BWD_TMA_DTYPES)")


@pytest.mark.parametrize("geo", GEOMETRIES, ids=[g[0] for g in GEOMETRIES])
@pytest.mark.parametrize("dtype", ALL, ids=str)
def test_wgrad_prologue_is_the_forwards(dtype, geo, device, launches):
    _skip_unsupported(dtype, geo)
    x, scale, shift = _inputs(dtype, device)
    dw, dy, w = _wgrad(x, scale, shift, geo, device)
    want = _expected(x, scale, shift, dy, w, geo)
    if dtype == torch.bfloat16 or not ON_GPU:  # specified to the bit
        torch.testing.assert_close(dw.double(), want, rtol=0, atol=0, equal_nan=True)
    else:
        assert rel_err(dw, want) <= TOL[dtype]
    if geo[3] == 3:  # output pixel 0 reads the padding at taps r = 0 and s = 0: 0 there, not relu(shift) > 0
        assert (dw[0, :, 0, :] == 0).all() and (dw[0, :, :, 0] == 0).all()
        assert (shift > 0).sum() > C // 2, "relu(shift) must be nonzero on most channels for the check to bite"
    if not ON_GPU:
        kw = launches[-1]
        assert kw["IN_BOUNDS"] == (geo[3] == 1), "a 1x1 conv without padding needs no pad select"
        assert kw["PROLOGUE_MATH"] == ("rounded" if dtype == torch.bfloat16 else "acc")
        assert kw["TAP_PER_TILE"] == (geo[4].get("BLOCK_M", SMALL["BLOCK_M"]) == C)
        assert bool(kw.get("TMA")) == bool(geo[4].get("TMA"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_wgrad_reads_what_the_forward_activated(dtype, device):
    """Against the forward kernel itself: its identity-filter output is its activated tile (test_conv_prologue);
    wgrad's one-hot dw holds the same elements, to the bit (the backward must use the values the forward used)."""
    x, scale, shift = _inputs(dtype, device, seed=2)
    fwd = kernels.conv_bn_act(x, _identity(dtype, device, 1, (0, 0)), prologue=(scale, shift),
                              config=None if ON_GPU else dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16))
    dw, _, _ = _wgrad(x, scale, shift, GEOMETRIES[0], device)
    from_wgrad = dw[:N * H * W, :, 0, 0].view(N, -1, C).permute(0, 2, 1)  # [pixel, channel] -> [N, C, H*W]
    torch.testing.assert_close(from_wgrad, fwd.reshape(N, C, -1), rtol=0, atol=0, equal_nan=True)


def test_wgrad_bf16_prologue_rounds_once_from_rounded_factors(device):
    """The element built on a rounding midpoint (test_conv_prologue._inputs) comes out as one rounding from
    bf16-rounded factors gives it, not as fp32 math would (wgrad's prologue before issue 17 item 2's backward
    part)."""
    x, scale, shift = _inputs(torch.bfloat16, device)
    dw, _, _ = _wgrad(x, scale, shift, GEOMETRIES[0], device)
    assert dw[0, 0, 0, 0].item() == 1.5 + 2 ** -7


@pytest.mark.parametrize("geo", GEOMETRIES, ids=[g[0] for g in GEOMETRIES])
@pytest.mark.parametrize("dtype", ALL, ids=str)
def test_wgrad_prologue_propagates_nan(dtype, geo, device):
    """A NaN input element reaches dw as torch.relu passes it, also where the shift clamps every number of its
    channel to 0 (dy's zeros spread it over the output channels: 0 * NaN); a NaN shift makes its channel's
    columns NaN and no other."""
    _skip_unsupported(dtype, geo)
    x, scale, shift = _inputs(dtype, device, seed=1)
    shift[3] = -1e4  # every number of channel 3 activates to 0
    x[1, 3, 2, 3] = float("nan")
    x[0, 5, 4, 6] = float("nan")
    dw, dy, w = _wgrad(x, scale, shift, geo, device)
    want = _expected(x, scale, shift, dy, w, geo)
    assert torch.isnan(want).any() and torch.equal(torch.isnan(dw), torch.isnan(want))
    assert torch.isfinite(dw[~torch.isnan(want)]).all()
    shift[9] = float("nan")
    dw, _, _ = _wgrad(x, scale, shift, geo, device)
    assert torch.isnan(dw[:, 9]).all() and not torch.isnan(dw[:, 10:]).any()
