"""The parallel two-pass BN reductions (kernels/bn.py): pass 1 over chunks of tiles x channels, then a
fixed-order combine. On a GPU the chunking follows the shape; the interpreter runs one pass unless a
test asks for chunks, so these tests force several chunk sizes (ragged last chunk, one tile per chunk)
and check them against float64 and for bitwise repeatability."""
import pytest
import torch

from fusedres.kernels import bn as bn_k
from helpers import rel_err


def tile_partials(y, tile):
    """Per-tile (mean, M2) of y [M, K] in fp64, as the conv STATS epilogue defines them."""
    parts = [y[i:i + tile] for i in range(0, y.shape[0], tile)]
    pm = torch.stack([p.mean(0) for p in parts])
    pm2 = torch.stack([((p - p.mean(0)) ** 2).sum(0) for p in parts])
    return pm, pm2


@pytest.mark.parametrize("chunk", [1, 3, 8, 1000])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_chunked_finalize_matches_float64(chunk, momentum, device):
    """Mean far above the spread (the naive formula would fail), ragged last tile and chunk; the
    running statistics follow nn.BatchNorm2d (unbiased variance, cumulative when momentum is None)."""
    k, tile, m = 70, 16, 16 * 37 - 5
    y = 300.0 + 0.5 * torch.randn(m, k, device=device, dtype=torch.float64)
    pm, pm2 = (t.float() for t in tile_partials(y, tile))
    gamma, beta = torch.rand(k, device=device) + 0.5, torch.randn(k, device=device)
    rm, rv = torch.randn(k, device=device), torch.rand(k, device=device) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    nbt = torch.tensor(3, device=device)
    running = bn_k.RunningUpdate(rm, rv, rm, rv, momentum, nbt if momentum is None else None)  # in place
    mean, invstd, scale, shift, var = bn_k.bn_finalize(pm, pm2, tile, m, gamma, beta, 1e-5, running, chunk=chunk)
    var_ref, mean_ref = torch.var_mean(y, dim=0, unbiased=False)
    assert rel_err(mean, mean_ref) < 3e-7  # fp32 partials and result: half an ulp of 300 each is 6e-8
    assert rel_err(var, var_ref) < 1e-5, f"chunk={chunk}: {rel_err(var, var_ref)}"
    assert rel_err(scale, gamma.double() * (var_ref + 1e-5).rsqrt()) < 1e-5
    assert rel_err(shift, beta.double() - mean_ref * gamma.double() * (var_ref + 1e-5).rsqrt()) < 1e-5
    f = 1 / 3 if momentum is None else momentum
    assert rel_err(rm, (1 - f) * rm0.double() + f * mean_ref) < 1e-6
    assert rel_err(rv, (1 - f) * rv0.double() + f * var_ref * m / (m - 1)) < 1e-6


@pytest.mark.parametrize("chunk", [2, 5])
def test_chunked_finalize_float64_affine_false(chunk, device):
    k, tile, m = 5, 8, 8 * 11 - 3
    y = 1e3 + torch.randn(m, k, device=device, dtype=torch.float64)
    pm, pm2 = tile_partials(y, tile)
    mean, invstd, scale, shift, _ = bn_k.bn_finalize(pm, pm2, tile, m, None, None, 1e-5, chunk=chunk)
    assert mean.dtype == torch.float64
    var_ref, mean_ref = torch.var_mean(y, dim=0, unbiased=False)
    assert rel_err(mean, mean_ref) < 1e-14
    assert rel_err(invstd, (var_ref + 1e-5).rsqrt()) < 1e-11
    assert torch.equal(scale, invstd) and rel_err(shift, -mean_ref * invstd) < 1e-12


def test_chunked_finalize_is_bitwise_repeatable(device):
    k, tile, m = 64, 32, 32 * 50
    pm, pm2 = (t.float() for t in tile_partials(torch.randn(m, k, device=device, dtype=torch.float64), tile))
    first = bn_k.bn_finalize(pm, pm2, tile, m, None, None, 1e-5, chunk=7)
    second = bn_k.bn_finalize(pm, pm2, tile, m, None, None, 1e-5, chunk=7)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("chunk", [1, 4, 9])
def test_chunked_sum_rows(chunk, device):
    src = torch.randn(37, 300, device=device)
    out = bn_k.sum_rows(src, chunk=chunk)
    assert rel_err(out, src.double().sum(0)) < 1e-6
    assert torch.equal(out, bn_k.sum_rows(src, chunk=chunk)), "not bitwise repeatable"
    half = torch.empty(300, device=device, dtype=torch.float16)
    assert bn_k.sum_rows(src, out=half, chunk=chunk) is half
    assert rel_err(half, src.double().sum(0)) < 2e-3


@pytest.mark.parametrize("chunk", [1, 3, 16, 37])
def test_sum_rows_last_pass_compiles_once(chunk, device, monkeypatch):
    """The last pass runs at one BLOCK_T whatever its row count (37 / chunk partial rows: 37, 13, 3, 1), so a training
    step compiles it once per dtype pair and BLOCK_L (cold start), and its masked rows change no sum."""
    seen, real = [], bn_k._sum_rows_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                seen.append((grid[1], kw["BLOCK_T"]))
                return real[grid](*args, **kw)
            return launch

    monkeypatch.setattr(bn_k, "_sum_rows_kernel", Spy())
    src = torch.randn(37, 300, device=device)
    out = bn_k.sum_rows(src, chunk=chunk)
    assert seen[-1] == (1, bn_k._LAST_PASS_BLOCK_T)
    assert rel_err(out, src.double().sum(0)) < 1e-6


def test_gpu_split_fills_the_machine():
    """The GPU's shape-only split: >= 132 programs (one per H100 SM) for a 64-channel BN over 12.5k
    tiles, in whole BLOCK_T blocks; one pass once the column blocks alone fill the GPU, or when each
    program reads little."""
    row = 512  # bytes per row and program: 64 channels of fp32 mean and M2
    chunk, block_t = bn_k._split(12544, 1, row, gpu=True)
    assert -(-12544 // chunk) >= 132 and chunk % block_t == 0 and block_t >= 8
    chunk, block_t = bn_k._split(3136, 4, row, gpu=True)
    assert -(-3136 // chunk) * 4 >= 132 and chunk % block_t == 0
    assert bn_k._split(100, 300, row, gpu=True)[0] >= 100  # the column blocks alone fill the GPU
    assert bn_k._split(49, 8, row, gpu=True)[0] >= 49  # 25 KB per program: a second launch costs more
    assert bn_k._split(12544, 1, row, gpu=False)[0] >= 12544  # the interpreter: one pass
    assert bn_k._split(12544, 1, row, 48) == (48, 16)
    assert bn_k._split(5, 1, row, 1) == (1, 1)


@pytest.mark.parametrize("chunk", [3, 1000])
def test_finalize_rounds_the_prologue_factors_once(chunk, device):
    """prologue_out gets scale and shift rounded to nearest (even) bf16 once, as the packed prologue rounds them
    (torch's fp32 -> bf16 cast is that rounding), and the fp32 results are unchanged by asking for them."""
    k, tile, m = 70, 16, 16 * 23 - 5
    y = 3.0 + torch.randn(m, k, device=device, dtype=torch.float64) * (torch.rand(k, device=device) + 0.1)
    pm, pm2 = (t.float() for t in tile_partials(y, tile))
    gamma, beta = torch.randn(k, device=device), torch.randn(k, device=device)
    out = (torch.empty(k, device=device, dtype=torch.bfloat16), torch.empty(k, device=device, dtype=torch.bfloat16))
    plain = bn_k.bn_finalize(pm, pm2, tile, m, gamma, beta, 1e-5, chunk=chunk)
    stats = bn_k.bn_finalize(pm, pm2, tile, m, gamma, beta, 1e-5, chunk=chunk, prologue_out=out)
    assert all(torch.equal(a, b) for a, b in zip(plain, stats))
    assert torch.equal(out[0], stats.scale.to(torch.bfloat16)) and torch.equal(out[1], stats.shift.to(torch.bfloat16))
    assert (out[0].float() != stats.scale).sum() > k // 2, "the factors are rounded, not copies"
