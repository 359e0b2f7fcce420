"""Batch-norm statistics of the training path: the finalize (batch statistics, running statistics) and the
deterministic column sums the backward reductions end in (the block tail and BN backward: ``tail.py``).

All work on [pixels, channels] tiles of logical [N, C, P, Q] tensors through their strides
(see ``_tiles``); per-channel math is fp32 (fp64 for fp64 activations).
"""
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._launch import INTERPRETED, cdiv, clamp_block, device_guard, fp32_hi_lo, next_power_of_2
from ._tiles import round_fp64_to


@triton.jit
def _merge_tiles(part_mean_ptr, part_m2_ptr, t_lo, t_hi, M, K, TILE_M, offs_k, mask_k,
                 BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per-channel (mean, M2) over the pixels of tiles [t_lo, t_hi): tile t holds the mean and M2 of its
    min(TILE_M, M - t*TILE_M) pixels. Within a block of tiles by the parallel formula, across blocks by
    Chan's pairwise update (never sum(y^2) - sum(y)^2/n): stable when the mean dwarfs the spread."""
    mean_a = tl.zeros((BLOCK_K,), dtype=part_mean_ptr.dtype.element_ty)
    m2_a = tl.zeros((BLOCK_K,), dtype=part_mean_ptr.dtype.element_ty)
    for t0 in tl.range(t_lo, t_hi, BLOCK_T, num_stages=3):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask_t = offs_t < t_hi
        cnt = tl.minimum(tl.maximum(M - offs_t * TILE_M, 0), TILE_M).to(mean_a.dtype)
        cnt = tl.where(mask_t, cnt, 0.0)
        idx = offs_t.to(tl.int64)[:, None] * K + offs_k[None, :]
        msk = mask_t[:, None] & mask_k[None, :]
        pm = tl.load(part_mean_ptr + idx, mask=msk, other=0.0)
        pm2 = tl.load(part_m2_ptr + idx, mask=msk, other=0.0)
        n_b = tl.sum(cnt, axis=0)
        mean_b = tl.sum(cnt[:, None] * pm, axis=0) / n_b
        dev = tl.where(msk, pm - mean_b[None, :], 0.0)
        m2_b = tl.sum(pm2, axis=0) + tl.sum(cnt[:, None] * dev * dev, axis=0)
        n_a = ((t0 - t_lo) * TILE_M).to(mean_a.dtype)  # pixels merged so far (every earlier tile is full)
        n_ab = n_a + n_b
        delta = mean_b - mean_a
        mean_a = mean_a + delta * (n_b / n_ab)
        m2_a = m2_a + m2_b + delta * delta * (n_a * n_b / n_ab)
    return mean_a, m2_a


@triton.jit(do_not_specialize=["T", "M", "CHUNK"])  # loop bounds only: no variant per value
def _bn_chunk_stats_kernel(
    part_mean_ptr, part_m2_ptr,    # [T, K] per-tile channel means and M2
    chunk_mean_ptr, chunk_m2_ptr,  # [cdiv(T, CHUNK), K] out: the same for chunks of CHUNK tiles
    T, M, K, TILE_M, CHUNK,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Pass 1 of a parallel finalize: one program per (chunk of tiles, channel block), so a 64-channel BN
    is not reduced by one CTA. The chunks are again (mean, M2) partials, of CHUNK * TILE_M pixels."""
    c = tl.program_id(0)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    t_lo = c * CHUNK
    mean, m2 = _merge_tiles(part_mean_ptr, part_m2_ptr, t_lo, tl.minimum(t_lo + CHUNK, T), M, K, TILE_M,
                            offs_k, mask_k, BLOCK_T, BLOCK_K)
    out = c.to(tl.int64) * K + offs_k
    tl.store(chunk_mean_ptr + out, mean, mask=mask_k)
    tl.store(chunk_m2_ptr + out, m2, mask=mask_k)


@triton.jit
def _bn_finalize_kernel(
    part_mean_ptr, part_m2_ptr,   # [T, K] per-tile channel means and M2 (from the conv STATS epilogue)
    gamma_ptr, beta_ptr,          # [K] affine parameters (HAS_AFFINE)
    rmean_ptr, rvar_ptr,          # [K] running statistics, read (UPDATE_RUNNING)
    rmean_out_ptr, rvar_out_ptr,  # [K] their new values (may be rmean_ptr / rvar_ptr: in place)
    nbt_ptr,                      # num_batches_tracked, already incremented (CUMULATIVE: momentum=None)
    mean_ptr, invstd_ptr, scale_ptr, shift_ptr, var_ptr,  # [K] outputs (var: biased batch variance)
    pscale_ptr, pshift_ptr,       # [K] out (PROLOGUE_COPY): scale and shift rounded once to the next conv's dtype
    T, M, K, TILE_M,              # tiles, pixels per channel, channels, pixels per full tile
    eps, eps_lo, momentum, momentum_lo,  # each a float as fp32 hi + lo parts (see fp32_hi_lo): exact for fp64
    HAS_AFFINE: tl.constexpr, UPDATE_RUNNING: tl.constexpr, CUMULATIVE: tl.constexpr, PROLOGUE_COPY: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Batch mean / biased variance of all T (mean, M2) partials (tiles, or pass 1's chunks; see
    _merge_tiles), then invstd, scale/shift and the running statistics; one program per channel block."""
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    mean_a, m2_a = _merge_tiles(part_mean_ptr, part_m2_ptr, 0, T, M, K, TILE_M, offs_k, mask_k, BLOCK_T, BLOCK_K)
    var = m2_a / (tl.zeros_like(m2_a) + M)
    invstd = 1.0 / tl.sqrt(var + ((tl.zeros_like(var) + eps) + eps_lo))
    scale = invstd
    shift = -mean_a * invstd
    if HAS_AFFINE:
        gamma = tl.load(gamma_ptr + offs_k, mask=mask_k, other=1.0).to(var.dtype)
        beta = tl.load(beta_ptr + offs_k, mask=mask_k, other=0.0).to(var.dtype)
        scale = gamma * invstd
        shift = beta - mean_a * scale
    tl.store(mean_ptr + offs_k, mean_a, mask=mask_k)
    tl.store(invstd_ptr + offs_k, invstd, mask=mask_k)
    tl.store(var_ptr + offs_k, var, mask=mask_k)
    tl.store(scale_ptr + offs_k, scale, mask=mask_k)
    tl.store(shift_ptr + offs_k, shift, mask=mask_k)
    if PROLOGUE_COPY:
        # what the packed prologue rounds them to in every k-step of its main loop (_tiles.bn_act), rounded here
        # once: the same values (to nearest even; exact afterwards, so the interpreter's truncating cast is right)
        dt: tl.constexpr = pscale_ptr.dtype.element_ty
        tl.store(pscale_ptr + offs_k, round_fp64_to(scale.to(tl.float64), dt).to(tl.float32).to(dt), mask=mask_k)
        tl.store(pshift_ptr + offs_k, round_fp64_to(shift.to(tl.float64), dt).to(tl.float32).to(dt), mask=mask_k)
    if UPDATE_RUNNING:
        if CUMULATIVE:
            factor = 1.0 / tl.load(nbt_ptr).to(var.dtype)
        else:
            factor = (tl.zeros_like(var) + momentum) + momentum_lo
        rm = tl.load(rmean_ptr + offs_k, mask=mask_k, other=0.0)
        rv = tl.load(rvar_ptr + offs_k, mask=mask_k, other=0.0)
        m_f = tl.zeros_like(var) + M  # in the stats dtype: fp64 stays exact
        unbiased = var * (m_f / (m_f - 1.0))
        tl.store(rmean_out_ptr + offs_k, (rm.to(var.dtype) * (1 - factor) + mean_a * factor).to(rm.dtype),
                 mask=mask_k)
        tl.store(rvar_out_ptr + offs_k, (rv.to(var.dtype) * (1 - factor) + unbiased * factor).to(rv.dtype),
                 mask=mask_k)


@triton.jit(do_not_specialize=["T", "ROWS"])  # loop bounds only: no variant per value
def _sum_rows_kernel(src_ptr, dst_ptr, T, L, ROWS, BLOCK_T: tl.constexpr, BLOCK_L: tl.constexpr):
    """dst[c, l] = sum of src[t, l] over the ROWS rows t of chunk c = program_id(1), in a fixed order
    (deterministic, no atomics); one chunk of all T rows is the plain column sum."""
    offs_l = tl.program_id(0).to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)
    mask_l = offs_l < L
    c = tl.program_id(1)
    t_lo = c * ROWS
    t_hi = tl.minimum(t_lo + ROWS, T)
    acc = tl.zeros((BLOCK_L,), dtype=src_ptr.dtype.element_ty)
    for t0 in tl.range(t_lo, t_hi, BLOCK_T, num_stages=3):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        msk = (offs_t < t_hi)[:, None] & mask_l[None, :]
        acc += tl.sum(tl.load(src_ptr + offs_t.to(tl.int64)[:, None] * L + offs_l[None, :], mask=msk, other=0.0), 0)
    tl.store(dst_ptr + c.to(tl.int64) * L + offs_l, acc.to(dst_ptr.dtype.element_ty), mask=mask_l)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

# Programs a two-pass reduction aims for on a GPU: >= 2 per SM of a 132-SM H100/H200. A constant, not
# the card's SM count, so the summation order (hence every bit of the result) depends on the shape only.
_GPU_PROGRAMS = 264
# A one-pass program reading at most this many bytes costs about what a second launch does (a guess from
# ~30 GB/s per latency-bound CTA and ~2 us per launch; not measured): small reductions keep one pass.
_ONE_PASS_BYTES = 64 * 1024
_LAST_PASS_BLOCK_T = 32  # sum_rows' last pass


def _split(rows: int, col_blocks: int, row_bytes: int = 0, chunk=None, gpu=not INTERPRETED):
    """(rows per program of pass 1, its BLOCK_T); rows per program >= rows means one pass. Chunks of a
    multiple of 8 rows (BLOCK_T 8..32 divides them), as many as give _GPU_PROGRAMS programs; one pass in
    the interpreter, where per-program overhead dominates, and where a program reads rows * row_bytes
    <= _ONE_PASS_BYTES."""
    if chunk is None:
        if not gpu or col_blocks >= _GPU_PROGRAMS or rows * row_bytes <= _ONE_PASS_BYTES:
            chunk = max(rows, 1)
        else:
            chunk = cdiv(cdiv(rows, cdiv(_GPU_PROGRAMS, col_blocks)), 8) * 8
    chunk = max(1, chunk)
    return chunk, min(32, chunk & -chunk, next_power_of_2(rows))


def _finalize_blocks(t: int, k: int):
    return (clamp_block(64, t, 1), clamp_block(128, k, 1)) if INTERPRETED else (clamp_block(32, t, 1),
                                                                                clamp_block(64, k, 1))


class RunningUpdate(NamedTuple):
    """How bn_finalize updates one BN's running statistics, as nn.BatchNorm2d does: it reads ``mean`` /
    ``var`` and writes the new values to ``new_mean`` / ``new_var`` (the same tensors: in place).
    momentum None: cumulative average with factor 1 / num_batches (num_batches_tracked after this step)."""
    mean: torch.Tensor
    var: torch.Tensor
    new_mean: torch.Tensor
    new_var: torch.Tensor
    momentum: Optional[float]
    num_batches: Optional[torch.Tensor]


class BatchStats(NamedTuple):
    """One BN's batch statistics [K] (the stats dtype): what bn_finalize returns."""
    mean: torch.Tensor
    invstd: torch.Tensor
    scale: torch.Tensor   # gamma * invstd
    shift: torch.Tensor   # beta - mean * scale
    var: torch.Tensor     # biased batch variance


def bn_finalize(part_mean, part_m2, tile_m, m, gamma, beta, eps, running: Optional[RunningUpdate] = None,
                chunk=None, prologue_out: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> BatchStats:
    """Batch mean, invstd, BN scale/shift and biased variance [K] from (mean, M2) partials of ``tile_m``
    pixels per tile (the conv STATS epilogue's, or one merged row of ``m`` pixels), and the running
    statistics update when ``running`` is given. gamma/beta None: affine=False.
    chunk: tiles per program of the parallel first pass (default: from the shape; >= T: one pass).
    prologue_out: optional ([K], [K]) of a 16-bit dtype, written with scale and shift rounded to it: the next conv's
    packed prologue operands (it would round them itself in every k-step of its main loop).
    """
    t, k = part_mean.shape
    stats = BatchStats(*(torch.empty(k, device=part_mean.device, dtype=part_mean.dtype) for _ in range(5)))
    dummy = stats.mean
    run = running if running is not None else RunningUpdate(dummy, dummy, dummy, dummy, 0.0, None)
    block_t, block_k = _finalize_blocks(t, k)
    chunk, chunk_block_t = _split(t, cdiv(k, block_k), 2 * block_k * part_mean.element_size(), chunk)
    with device_guard(part_mean):
        if chunk < t:  # pass 1: (mean, M2) per chunk of tiles, then the merge below runs over the chunks
            chunks = cdiv(t, chunk)
            c_mean = part_mean.new_empty((chunks, k))
            c_m2 = part_mean.new_empty((chunks, k))
            _bn_chunk_stats_kernel[(chunks, cdiv(k, block_k))](
                part_mean, part_m2, c_mean, c_m2, t, m, k, tile_m, chunk, BLOCK_T=chunk_block_t, BLOCK_K=block_k)
            part_mean, part_m2, t, tile_m = c_mean, c_m2, chunks, chunk * tile_m
            block_t = _finalize_blocks(t, k)[0]
        _bn_finalize_kernel[(cdiv(k, block_k),)](
            part_mean, part_m2, gamma if gamma is not None else dummy, beta if beta is not None else dummy,
            run.mean, run.var, run.new_mean, run.new_var,
            run.num_batches if run.num_batches is not None else dummy,
            stats.mean, stats.invstd, stats.scale, stats.shift, stats.var,
            *(prologue_out if prologue_out is not None else (dummy, dummy)), t, m, k, tile_m,
            *fp32_hi_lo(eps), *fp32_hi_lo(run.momentum or 0.0),
            HAS_AFFINE=gamma is not None, UPDATE_RUNNING=running is not None, CUMULATIVE=run.momentum is None,
            PROLOGUE_COPY=prologue_out is not None, BLOCK_T=block_t, BLOCK_K=block_k)
    return stats


def sum_rows(src, out=None, chunk=None):
    """[T, L] -> [L] column sums in a fixed order; ``out`` (any dtype, L elements, dense) is written flat.
    On a GPU, few column blocks get a parallel first pass over chunks of ``chunk`` rows (default: from the
    shape), whose [chunks, L] partial sums a second pass adds up in order."""
    t, length = src.shape
    out = torch.empty(length, device=src.device, dtype=src.dtype) if out is None else out
    block_l = clamp_block(1024 if INTERPRETED else 256, length, 1)
    cols = cdiv(length, block_l)
    rows, block_t = _split(t, cols, block_l * src.element_size(), chunk)
    with device_guard(src):
        if rows < t:
            chunks = cdiv(t, rows)
            part = src.new_empty((chunks, length))
            _sum_rows_kernel[(cols, chunks)](src, part, t, length, rows, BLOCK_T=block_t, BLOCK_L=block_l)
            src, t = part, chunks
        # the last pass at one BLOCK_T whatever its rows (at most a few dozen partial rows: masked rows cost
        # nothing to read), so it compiles once per dtype pair and BLOCK_L, not once per power of two of the
        # split count (the cold start of a ResNet-50 training step: 4 variants fewer)
        _sum_rows_kernel[(cols, 1)](src, out, t, length, t, BLOCK_T=_LAST_PASS_BLOCK_T, BLOCK_L=block_l)
    return out
