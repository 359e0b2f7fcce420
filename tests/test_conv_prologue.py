"""The forward conv's BN-apply + ReLU prologue (issue 17 item 2): its arithmetic per dtype and its padding.

With an identity filter (K = C, one tap = the identity matrix) the conv's output is the activated input tile itself
(each output a single product by 1.0, exact in any accumulator), so these tests compare the prologue's transform
bit for bit where its rounding is specified:
- bf16: scale and shift rounded to bf16, then a * scale + shift rounded once (the GPU's packed fma.rn.relu.bf16x2;
  in the interpreter _tiles.bn_act's "rounded" fallback, which these tests check computes the same);
- fp16, fp32, fp64: fp32 (fp64) math, one rounding to the dtype at the end (to the tolerance table on a GPU, where
  the compiler may contract a * scale + shift into an FMA).
Geometries: 1x1 without padding (no pad select: IN_BOUNDS), its descriptor path, 1x1 stride 2, 3x3 with padding.
"""
import pytest
import torch
import torch.nn.functional as F

from fusedres import kernels
from fusedres.kernels import _launch
from fusedres.kernels import conv as conv_mod
from helpers import ON_GPU, TOL, rel_err

N, C, H, W = 2, 16, 5, 7
SMALL = dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16)
ALL = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# (name, stride, padding, filter size, the identity tap (r, s), config extras)
GEOMETRIES = [("1x1", 1, 0, 1, (0, 0), {}), ("1x1_tma", 1, 0, 1, (0, 0), {"TMA": True}),
              ("1x1_s2", 2, 0, 1, (0, 0), {}), ("3x3_pad", 1, 1, 3, (0, 0), {})]


@pytest.fixture
def launches(monkeypatch):
    """The keyword arguments of every fixed-config launch of the forward kernel."""
    seen = []
    real = conv_mod._conv_bn_act

    class Spy:
        def __getitem__(self, grid):
            def launch(**kw):
                seen.append(kw)
                return real[grid](**kw)
            return launch

    monkeypatch.setattr(conv_mod, "_conv_bn_act", Spy())
    return seen


def _identity(dtype, device, ksize, tap):
    w = torch.zeros(C, C, ksize, ksize, dtype=dtype, device=device)
    w[:, :, tap[0], tap[1]] = torch.eye(C, dtype=dtype, device=device)
    return w.to(memory_format=torch.channels_last)


def _inputs(dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, C, H, W, generator=g) * 2 + 0.5).to(dtype)
    scale = torch.rand(C, generator=g) + 0.5
    shift = torch.randn(C, generator=g) * 0.5 + 0.25  # relu(shift) > 0 on most channels: padding must stay 0
    # one element whose exact a * scale + shift lies just below a bf16 rounding midpoint: 1.5 * (1 + 2**-7) is the
    # midpoint between 1.5 + 2**-7 and 1.5 + 2**-6; minus 2**-30 one rounding goes down, while rounding first to
    # fp32 (which cannot hold the 2**-30) and then to bf16 ties to even, up
    x[0, 0, 0, 0] = 1.5
    scale[0], shift[0] = 1 + 2 ** -7, -2.0 ** -30
    x = x.to(device).to(memory_format=torch.channels_last)
    sdt = torch.float64 if dtype == torch.float64 else torch.float32  # the BN statistics' dtype (_launch.stats_dtype)
    return x, scale.to(device, sdt), shift.to(device, sdt)


def activated(x, scale, shift):
    """The specified prologue result in x's dtype (see the module docstring), on the host."""
    if x.dtype == torch.bfloat16:
        y = x.double() * scale.to(torch.bfloat16).double().view(1, -1, 1, 1) \
            + shift.to(torch.bfloat16).double().view(1, -1, 1, 1)
        return _round_once_bf16(torch.relu(y))
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.to(acc) * scale.to(acc).view(1, -1, 1, 1) + shift.to(acc).view(1, -1, 1, 1)
    return torch.relu(y).to(x.dtype)


def _round_once_bf16(v):
    """float64 v rounded once to the nearest bf16 (ties to even). torch's own cast goes through fp32 and may round
    twice, so: the cast's value and its two bf16 neighbours, the nearest (exact fp64 distances) wins."""
    c = v.to(torch.bfloat16)
    bits = c.view(torch.int16)
    cands = torch.stack([c, (bits + 1).view(torch.bfloat16), (bits - 1).view(torch.bfloat16)])
    dist = torch.nan_to_num((cands.double() - v).abs(), nan=float("inf"))  # a neighbour of 0 may be a NaN pattern
    odd = (cands.view(torch.int16) & 1).double()
    best = (dist + odd * 1e-300 * (dist == dist.min(0).values)).argmin(0)  # ties: the even significand
    out = cands.gather(0, best.unsqueeze(0)).squeeze(0)
    return torch.where(torch.isnan(v), v.to(torch.bfloat16), out)


def _expected_out(act, stride, pad, ksize, tap):
    """The identity-filter conv of the activated input (zero padding of the activated tensor), in float64."""
    return F.conv2d(act.double(), _identity(torch.float64, act.device, ksize, tap), stride=stride, padding=pad)


def _run(x, scale, shift, geo, device):
    _, stride, pad, ksize, tap, extra = geo
    w = _identity(x.dtype, device, ksize, tap)
    config = None if ON_GPU else dict(SMALL, **extra)
    return kernels.conv_bn_act(x, w, stride=(stride, stride), padding=(pad, pad), prologue=(scale, shift),
                               config=config)


@pytest.mark.parametrize("geo", GEOMETRIES, ids=[g[0] for g in GEOMETRIES])
@pytest.mark.parametrize("dtype", ALL, ids=str)
def test_prologue_transform_and_padding(dtype, geo, device, launches):
    x, scale, shift = _inputs(dtype, device)
    out = _run(x, scale, shift, geo, device)
    want = _expected_out(activated(x, scale, shift), *geo[1:5])
    assert out.shape == want.shape
    if dtype == torch.bfloat16 or not ON_GPU:  # specified to the bit (see the module docstring)
        torch.testing.assert_close(out.double(), want, rtol=0, atol=0, equal_nan=True)
    else:
        assert rel_err(out, want) <= TOL[dtype]
    if geo[0] == "3x3_pad":  # the tap (0, 0) reads the padding at the first output row and column: 0, not relu(shift)
        assert (out[:, :, 0, :] == 0).all() and (out[:, :, :, 0] == 0).all()
    if not ON_GPU:
        kw = launches[-1]
        assert kw["IN_BOUNDS"] == (geo[3] == 1), "a 1x1 conv without padding needs no pad select"
        assert kw["PROLOGUE_MATH"] == ("rounded" if dtype == torch.bfloat16 else "acc")


def test_bf16_prologue_rounds_once_from_rounded_factors(device):
    """The bf16 reference above is discriminating: the element built on a rounding midpoint comes out as one
    rounding gives it, and fp32 math (unrounded scale and shift, or a rounding through fp32) would differ."""
    x, scale, shift = _inputs(torch.bfloat16, device)
    out = _run(x, scale, shift, GEOMETRIES[0], device)
    assert out[0, 0, 0, 0].item() == 1.5 + 2 ** -7
    fp32_math = torch.relu(x.float() * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)).to(torch.bfloat16)
    assert fp32_math[0, 0, 0, 0].item() == 1.5 + 2 ** -6
    assert (fp32_math != out).sum() > 10, "unrounded factors would change many elements: the test would see them"


@pytest.mark.parametrize("geo", GEOMETRIES, ids=[g[0] for g in GEOMETRIES])
@pytest.mark.parametrize("dtype", ALL, ids=str)
def test_prologue_propagates_nan(dtype, geo, device):
    """A NaN input element reaches the output as torch.relu passes it, also where the shift is so negative that
    any number would be clamped to 0 (the identity filter's zeros spread it to every output channel of the pixels
    that read it: 0 * NaN). Elsewhere the output stays finite; a NaN shift makes every output NaN."""
    x, scale, shift = _inputs(dtype, device, seed=1)
    shift[3] = -1e4  # every number of channel 3 activates to 0
    x[1, 3, 2, 3] = float("nan")
    x[0, 5, 4, 6] = float("nan")
    out = _run(x, scale, shift, geo, device)
    want = _expected_out(activated(x, scale, shift), *geo[1:5])
    assert torch.isnan(want).any() and torch.equal(torch.isnan(out), torch.isnan(want))
    assert torch.isfinite(out[~torch.isnan(want)]).all()
    shift[9] = float("nan")
    assert torch.isnan(_run(x, scale, shift, geo, device)).all()


def test_prologue_math_choice():
    """The host's choice of the prologue arithmetic: 16-bit math for bf16 only (packed on an sm_80+ GPU, its
    portable twin in the interpreter), fp32 / fp64 math otherwise (fp16: see RESULTS.md, issue 17 item 2)."""
    bf16 = torch.empty(1, dtype=torch.bfloat16)
    assert _launch.prologue_math(bf16) == ("rounded" if _launch.INTERPRETED else "packed")
    for dt in (torch.float16, torch.float32, torch.float64):
        assert _launch.prologue_math(torch.empty(1, dtype=dt)) == "acc"


@pytest.mark.parametrize("geo", GEOMETRIES, ids=[g[0] for g in GEOMETRIES])
def test_bf16_prologue_takes_factors_rounded_beforehand(geo, device):
    """The training chain hands a bf16 conv its factors already rounded to bf16 (kernels/bn.py bn_finalize's
    prologue_out): the same output, bit for bit, as the fp32 factors the prologue rounds itself."""
    x, scale, shift = _inputs(torch.bfloat16, device, seed=2)
    out = _run(x, scale.to(torch.bfloat16), shift.to(torch.bfloat16), geo, device)
    torch.testing.assert_close(out, _run(x, scale, shift, geo, device), rtol=0, atol=0)
    torch.testing.assert_close(out.double(), _expected_out(activated(x, scale, shift), *geo[1:5]), rtol=0, atol=0)


def test_dgrad_gate_follows_the_forward_prologue(device):
    """With bf16 factors (the training chain's, rounded once by the finalize), dgrad's ReLU gate is closed exactly
    where the forward prologue's activation is 0, also on the boundary where fp32 factors would open it: scale
    1 + 2**-9 rounds to 1 and shift -1 stays, so y = 1 activates to relu(1 * 1 - 1) = 0 in the forward, while
    1 * (1 + 2**-9) - 1 > 0 in fp32."""
    from fusedres.kernels import dgrad as dgrad_k
    x, scale, shift = _inputs(torch.bfloat16, device, seed=3)
    x[0, 2, 1, 1], scale[2], shift[2] = 1.0, 1 + 2 ** -9, -1.0
    s16, t16 = scale.to(torch.bfloat16), shift.to(torch.bfloat16)
    geo = GEOMETRIES[0]
    act = _run(x, s16, t16, geo, device)  # the identity filter: the activated input itself
    assert act[0, 2, 1, 1].item() == 0.0
    g = torch.Generator().manual_seed(4)
    dy = (torch.randn(x.shape, generator=g) + 3.0).to(device, torch.bfloat16).to(memory_format=torch.channels_last)
    w = _identity(torch.bfloat16, device, 1, (0, 0))
    mean, invstd = torch.zeros_like(scale), torch.ones_like(scale)
    config = None if ON_GPU else dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16)
    dx = dgrad_k.conv_dgrad_bn(dy, w, x.shape, (1, 1), (0, 0), (1, 1), 1, (x, s16, t16, mean, invstd),
                               config=config).dx
    assert torch.equal(dx == 0, act == 0) and torch.equal(dx[act != 0], dy[act != 0])
    dx32 = dgrad_k.conv_dgrad_bn(dy, w, x.shape, (1, 1), (0, 0), (1, 1), 1, (x, scale, shift, mean, invstd),
                                 config=config).dx
    assert dx32[0, 2, 1, 1] != 0, "fp32 factors open the gate there: the case discriminates"
