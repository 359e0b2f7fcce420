"""Weight gradient of a convolution as one implicit GEMM (CUTLASS's wgrad view).

dw[k, c, r, s] = sum over the N*P*Q output pixels m of dy[m, k] * x_act[pixel(m) shifted by tap (r, s), c].
GEMM: rows = the KG output channels, columns = the CG*R*S (r, s, c) triples with c fastest (the
memory order of a channels_last weight), reduction = pixels. Each program owns a [BLOCK_K, BLOCK_N]
tile of dw and a contiguous range of pixels (split-K over SPLIT programs; the fp32 partials are
summed in a fixed order afterwards, so results are deterministic).

The pixel (n, p, q) of each row is decoded once and then advanced incrementally by BLOCK_M (no
division in the loop), in int32 unless an offset can pass 2**31 (IDX64). When a column tile stays
within one tap (TAP_PER_TILE: CG % BLOCK_N == 0) the tap's bounds test is per row, not per element.

Prologue (PROLOGUE_BN_RELU): x holds the previous conv's raw output y; the loaded tile becomes
relu(in_scale[c] * y + in_shift[c]) and out-of-image taps are zero after the transform.
"""
import torch
import triton
import triton.language as tl

from ._launch import INTERPRETED, clamp_block, device_guard, dot_precision, stats_dtype, upcast_dot
from ._tiles import mma, relu_nan
from .bn import sum_rows


@triton.jit
def _conv_wgrad_kernel(
    dy_ptr,        # [N, K, P, Q] gradient w.r.t. the conv output, any strides
    x_ptr,         # [N, C, H, W] conv input, or the previous conv's raw output (PROLOGUE_BN_RELU)
    in_scale_ptr, in_shift_ptr,   # [C] previous BN as scale/shift (PROLOGUE_BN_RELU)
    part_ptr,      # [SPLIT, K * C/groups * R * S] fp32 (fp64) partials, each laid out like the weight's memory
    M, H, W, P, Q, CG, KG, NCOL,  # M = N*P*Q pixels; channels per group; NCOL = CG*R*S columns
    ROWS_PER_SPLIT, SPLIT, NUMEL,  # pixels per split (a multiple of BLOCK_M); splits; weight numel
    sdn, sdc, sdh, sdw, sxn, sxc, sxh, sxw, swk, swc, swr, sws,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    R: tl.constexpr, S: tl.constexpr, PROLOGUE_BN_RELU: tl.constexpr,
    TAP_PER_TILE: tl.constexpr,    # CG % BLOCK_N == 0: every column of a tile has the same tap
    IDX64: tl.constexpr,           # some offset may pass 2**31: index math in int64
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,         # pixels per step (the reduction)
    BLOCK_K: tl.constexpr,         # output channels per tile (rows of dw)
    BLOCK_N: tl.constexpr,         # (r, s, c) columns per tile
):
    pid = tl.program_id(0)
    num_n = tl.cdiv(NCOL, BLOCK_N)
    pid_k = pid // num_n
    pid_n = pid % num_n
    g = tl.program_id(1) // SPLIT
    split = tl.program_id(1) % SPLIT
    offs_kg = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_kg < KG
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = cols < NCOL
    # Column decode, once per program.
    if TAP_PER_TILE:
        rs = (pid_n * BLOCK_N) // CG
        c = cols - rs * CG
        r = rs // S
        s = rs - r * S
        h_off = tl.full([1, 1], 0, tl.int32) + (r * dil_h - pad_h)
        w_off = tl.full([1, 1], 0, tl.int32) + (s * dil_w - pad_w)
    else:
        rs = cols // CG
        c = cols - rs * CG
        r = rs // S
        s = rs - r * S
        h_off = (r * dil_h - pad_h)[None, :]
        w_off = (s * dil_w - pad_w)[None, :]
    offs_c = g * CG + c
    k_idx = g * KG + offs_kg
    if IDX64:
        k_off = k_idx.to(tl.int64) * sdc
        col_off = offs_c.to(tl.int64) * sxc + (r * dil_h - pad_h).to(tl.int64) * sxh \
            + (s * dil_w - pad_w).to(tl.int64) * sxw
    else:
        k_off = k_idx * sdc
        col_off = offs_c * sxc + (r * dil_h - pad_h) * sxh + (s * dil_w - pad_w) * sxw
    if PROLOGUE_BN_RELU:
        s_in = tl.load(in_scale_ptr + offs_c, mask=mask_n, other=0.0)
        t_in = tl.load(in_shift_ptr + offs_c, mask=mask_n, other=0.0)

    # Pixel decode once; then advanced by BLOCK_M per step: BLOCK_M = dn*P*Q + dp*Q + dq.
    start = split * ROWS_PER_SPLIT
    end = tl.minimum(start + ROWS_PER_SPLIT, M)
    offs_m = start + tl.arange(0, BLOCK_M)
    if IDX64:
        offs_m = offs_m.to(tl.int64)
    n = offs_m // (P * Q)
    pq = offs_m - n * (P * Q)
    p = pq // Q
    q = pq - p * Q
    dq = BLOCK_M % Q
    dp = (BLOCK_M // Q) % P
    dn = BLOCK_M // (P * Q)

    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=part_ptr.dtype.element_ty)
    for _ in range(start, end, BLOCK_M):
        mask_m = offs_m < end
        hb = p * stride_h
        wb = q * stride_w
        dyt = tl.load(dy_ptr + (n * sdn + p * sdh + q * sdw)[:, None] + k_off[None, :],
                      mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        hh = hb[:, None] + h_off
        ww = wb[:, None] + w_off
        x_mask = (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W) & mask_m[:, None] & mask_n[None, :]
        xt = tl.load(x_ptr + (n * sxn + hb * sxh + wb * sxw)[:, None] + col_off[None, :], mask=x_mask, other=0.0)
        if PROLOGUE_BN_RELU:
            xt = tl.where(x_mask, relu_nan(xt.to(s_in.dtype) * s_in[None, :] + t_in[None, :]), 0.0)
            xt = xt.to(dy_ptr.dtype.element_ty)
        acc = mma(tl.trans(dyt), xt, acc, DOT_PRECISION, UPCAST_DOT)
        offs_m += BLOCK_M
        q += dq
        cq = q >= Q
        q = tl.where(cq, q - Q, q)
        p += dp + cq.to(p.dtype)
        cp = p >= P
        p = tl.where(cp, p - P, p)
        n += dn + cp.to(n.dtype)

    idx = k_idx.to(tl.int64)[:, None] * swk + (c.to(tl.int64) * swc + r * swr + s * sws)[None, :]
    tl.store(part_ptr + split.to(tl.int64) * NUMEL + idx, acc, mask=mask_k[:, None] & mask_n[None, :])


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------

def max_offset(t: torch.Tensor) -> int:
    """The largest element offset a kernel can form from t's sizes and strides."""
    return sum((size - 1) * abs(st) for size, st in zip(t.shape, t.stride()) if size > 0)


def wgrad_config(m: int, kg: int, cg: int, ncol: int) -> dict:
    """Tiles: the interpreter wants big blocks (per-op overhead dominates); the GPU a 128-wide tile of
    output channels and, when the channels allow, a column tile inside one tap."""
    if INTERPRETED:
        return dict(BLOCK_M=clamp_block(256, m), BLOCK_K=clamp_block(128, kg), BLOCK_N=clamp_block(128, ncol))
    bk = clamp_block(128, kg, 64)
    bn = 128 if cg % 128 == 0 else 64
    return dict(BLOCK_M=64, BLOCK_K=bk, BLOCK_N=bn, num_warps=8 if bk * bn >= 128 * 128 else 4, num_stages=3)


def _num_splits(tiles: int, m: int, bm: int) -> int:
    """Enough programs to fill a GPU (~2 waves on 132 SMs), each still looping over >= 8 row blocks."""
    if INTERPRETED:
        return 1
    return max(1, min(triton.cdiv(264, tiles), triton.cdiv(m, bm * 8)))


def conv_wgrad(dy, x, weight, stride, padding, dilation, groups, prologue=None, config=None):
    """Gradient w.r.t. the weight: a new tensor like ``weight`` (same dtype and memory format).

    prologue: (scale, shift) when the conv input was relu(scale*x + shift) of the raw x given here.
    config: optional dict of BLOCK_M/BLOCK_K/BLOCK_N (+ num_warps/num_stages).
    """
    n, c, h, w = x.shape
    k, cg, r, s = weight.shape
    p, q = dy.shape[2:]
    dw = torch.empty_like(weight)
    m, kg, ncol = n * p * q, k // groups, cg * r * s
    if m == 0:
        return dw.zero_()
    cfg = dict(config) if config is not None else wgrad_config(m, kg, cg, ncol)
    bm, bk, bn = cfg["BLOCK_M"], cfg["BLOCK_K"], cfg["BLOCK_N"]
    tiles = triton.cdiv(kg, bk) * triton.cdiv(ncol, bn)
    split = _num_splits(tiles * groups, m, bm)
    rows_per_split = triton.cdiv(triton.cdiv(m, split), bm) * bm
    split = max(1, triton.cdiv(m, rows_per_split))
    acc_dtype = stats_dtype(dy)
    direct = split == 1 and weight.dtype == acc_dtype
    part = torch.as_strided(dw, (1, dw.numel()), (0, 1)) if direct else \
        torch.empty((split, dw.numel()), device=dy.device, dtype=acc_dtype)
    in_scale, in_shift = prologue if prologue is not None else (dw, dw)
    idx64 = max(max_offset(dy), max_offset(x), m + bm) >= 2**31 - 1
    with device_guard(dy):
        _conv_wgrad_kernel[(tiles, groups * split)](
            dy, x, in_scale, in_shift, part, m, h, w, p, q, cg, kg, ncol, rows_per_split, split, dw.numel(),
            *dy.stride(), *x.stride(), *dw.stride(),
            stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
            R=r, S=s, PROLOGUE_BN_RELU=prologue is not None, TAP_PER_TILE=cg % bn == 0, IDX64=idx64,
            DOT_PRECISION=dot_precision(dy), UPCAST_DOT=upcast_dot(dy), **cfg)
    if not direct:
        sum_rows(part, out=torch.as_strided(dw, (dw.numel(),), (1,)))
    return dw
