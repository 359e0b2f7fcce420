"""Convolution backward as implicit GEMMs: dgrad (gradient of the input) and wgrad (of the weight).

dgrad: M = N*H*W input pixels x C input channels, reduction over K*R*S. A tap (r, s) reaches input
pixel h from output row p = (h + pad - r*dil) / stride when that divides exactly, so stride 2 works.
Its epilogue can (BN_RELU_GRAD) gate the gradient by the ReLU of the previous BN, recomputed from
the saved raw conv output, and emit that BN's backward partial sums; and (HAS_RESIDUAL) add the
shortcut's gradient, read at stride RES_STRIDE (option A) and gated by the block output's ReLU.

wgrad: dw[k, c, r, s] = sum over the N*P*Q output pixels of dy * input, split over SPLIT programs
along the pixels (partials summed in a fixed order afterwards: deterministic). Its prologue
recomputes the input relu(bn(y)) from the saved raw y instead of saving the activation.
"""
import torch
import triton
import triton.language as tl

from ._launch import (INTERPRETED, clamp_block, device_guard, dot_precision, empty_activation, stats_dtype,
                      upcast_dot)
from ._tiles import mma, pixel_rows, relu_nan, tile_ptrs
from .bn import relu_grad, sum_rows


@triton.jit
def _conv_dgrad_kernel(
    dy_ptr,        # [N, K, P, Q] gradient w.r.t. the conv output
    w_ptr,         # [K, C/groups, R, S]
    dx_ptr,        # [N, C, H, W] result (may alias res_ptr: each element is read, then written, by one program)
    y_ptr,         # [N, C, H, W] raw output of the previous conv (BN_RELU_GRAD)
    in_scale_ptr, in_shift_ptr, mean_ptr, invstd_ptr,  # [C] that BN as scale/shift, and its batch stats
    parts_ptr,     # [T, 2, C] per-tile partial sums of g and g*xhat (BN_RELU_GRAD)
    res_ptr,       # [N, RES_C, H', W'] gradient to add at stride RES_STRIDE (HAS_RESIDUAL)
    rmask_ptr,     # ReLU output gating res (HAS_RES_MASK), same shape and strides as res
    M, H, W, P, Q, CG, KG, RES_C, C,
    sdn, sdc, sdh, sdw, swk, swc, swr, sws, sxn, sxc, sxh, sxw, syn, syc, syh, syw, srn, src, srh, srw,
    smn, smc, smh, smw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, RES_STRIDE,
    R: tl.constexpr, S: tl.constexpr,
    BN_RELU_GRAD: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_RES_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, ACC_FP64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    pid = tl.program_id(0)
    num_n = tl.cdiv(CG, BLOCK_N)
    pid_m = pid // num_n
    g = tl.program_id(1)
    offs_m, n, h, w, mask_m = pixel_rows(pid_m, M, H, W, BLOCK_M)
    offs_cg = (pid % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = g * CG + offs_cg
    mask_c = offs_cg < CG
    offs_kk = tl.arange(0, BLOCK_K).to(tl.int64)  # channel * channel-stride can pass 2**31 (NCHW)
    dy_base = dy_ptr + n * sdn + (g * KG).to(tl.int64) * sdc
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_dtype)
    for r in range(R):
        hp = h + pad_h - r * dil_h
        p = hp // stride_h
        ok_h = (hp >= 0) & (hp % stride_h == 0) & (p < P)
        for s in range(S):
            wq = w + pad_w - s * dil_w
            q = wq // stride_w
            valid = mask_m & ok_h & (wq >= 0) & (wq % stride_w == 0) & (q < Q)
            a_ptrs = dy_base + p * sdh + q * sdw
            b_ptrs = w_ptr + offs_cg.to(tl.int64) * swc + r * swr + s * sws
            for k0 in range(0, KG, BLOCK_K):
                kk = k0 + offs_kk
                mask_kk = kk < KG
                a = tl.load(a_ptrs[:, None] + kk[None, :] * sdc, mask=valid[:, None] & mask_kk[None, :], other=0.0)
                b = tl.load(b_ptrs[None, :] + (g * KG + kk).to(tl.int64)[:, None] * swk,
                            mask=mask_kk[:, None] & mask_c[None, :], other=0.0)
                acc = mma(a, b, acc, DOT_PRECISION, UPCAST_DOT)

    msk = mask_m[:, None] & mask_c[None, :]
    if BN_RELU_GRAD:
        scale = tl.load(in_scale_ptr + offs_c, mask=mask_c, other=0.0).to(acc_dtype)
        shift = tl.load(in_shift_ptr + offs_c, mask=mask_c, other=0.0).to(acc_dtype)
        mean = tl.load(mean_ptr + offs_c, mask=mask_c, other=0.0).to(acc_dtype)
        invstd = tl.load(invstd_ptr + offs_c, mask=mask_c, other=0.0).to(acc_dtype)
        y = tl.load(tile_ptrs(y_ptr, n, h, w, offs_c, syn, syc, syh, syw), mask=msk, other=0.0).to(acc_dtype)
        acc = relu_grad(acc, y * scale[None, :] + shift[None, :])  # same fp32 expression as the forward prologue
        # Reduce what is stored (rounded to the activation dtype), so that the BN backward applied to
        # the stored gradient removes exactly its own mean and xhat components.
        acc = tl.where(msk, acc.to(dx_ptr.dtype.element_ty).to(acc_dtype), 0.0)
        part = parts_ptr + pid_m.to(tl.int64) * (2 * C) + offs_c
        tl.store(part, tl.sum(acc, axis=0), mask=mask_c)
        tl.store(part + C, tl.sum(acc * (y - mean[None, :]) * invstd[None, :], axis=0), mask=mask_c)
    if HAS_RESIDUAL:
        on_grid = (h % RES_STRIDE == 0) & (w % RES_STRIDE == 0)
        r_msk = (mask_m & on_grid)[:, None] & (mask_c & (offs_c < RES_C))[None, :]
        hr = h // RES_STRIDE
        wr = w // RES_STRIDE
        res = tl.load(tile_ptrs(res_ptr, n, hr, wr, offs_c, srn, src, srh, srw), mask=r_msk, other=0.0).to(acc_dtype)
        if HAS_RES_MASK:
            res = relu_grad(res, tl.load(tile_ptrs(rmask_ptr, n, hr, wr, offs_c, smn, smc, smh, smw), mask=r_msk,
                                         other=0.0))
        acc += res
    tl.store(tile_ptrs(dx_ptr, n, h, w, offs_c, sxn, sxc, sxh, sxw), acc.to(dx_ptr.dtype.element_ty), mask=msk)


@triton.jit
def _conv_wgrad_kernel(
    dy_ptr,        # [N, K, P, Q] gradient w.r.t. the conv output
    x_ptr,         # [N, C, H, W] conv input, or the previous conv's raw output (PROLOGUE_BN_RELU)
    in_scale_ptr, in_shift_ptr,   # [C] previous BN as scale/shift (PROLOGUE_BN_RELU)
    part_ptr,      # [SPLIT, K * C/groups * R * S] fp32 partials, each laid out like the weight's memory
    M, H, W, P, Q, CG, KG, ROWS_PER_SPLIT, SPLIT, NUMEL,
    sdn, sdc, sdh, sdw, sxn, sxc, sxh, sxw, swk, swc, swr, sws,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    R: tl.constexpr, S: tl.constexpr, PROLOGUE_BN_RELU: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    num_c = tl.cdiv(CG, BLOCK_K)
    offs_kg = (pid // num_c) * BLOCK_N + tl.arange(0, BLOCK_N)   # output channels (within group)
    offs_cg = (pid % num_c) * BLOCK_K + tl.arange(0, BLOCK_K)    # input channels (within group)
    rs = tl.program_id(1)
    r = rs // S
    s = rs % S
    g = tl.program_id(2) // SPLIT
    split = tl.program_id(2) % SPLIT
    mask_k = offs_kg < KG
    mask_c = offs_cg < CG
    offs_k = g * KG + offs_kg
    offs_c = g * CG + offs_cg
    if PROLOGUE_BN_RELU:
        s_in = tl.load(in_scale_ptr + offs_c, mask=mask_c, other=0.0)
        t_in = tl.load(in_shift_ptr + offs_c, mask=mask_c, other=0.0)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=part_ptr.dtype.element_ty)
    start = split * ROWS_PER_SPLIT
    for m0 in range(start, tl.minimum(start + ROWS_PER_SPLIT, M), BLOCK_M):
        offs_m, n, p, q, mask_m = pixel_rows(m0 // BLOCK_M, M, P, Q, BLOCK_M)
        hh = p * stride_h - pad_h + r * dil_h
        ww = q * stride_w - pad_w + s * dil_w
        valid = mask_m & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
        dyt = tl.load(tile_ptrs(dy_ptr, n, p, q, offs_k, sdn, sdc, sdh, sdw), mask=mask_m[:, None] & mask_k[None, :],
                      other=0.0)
        x_mask = valid[:, None] & mask_c[None, :]
        xt = tl.load(tile_ptrs(x_ptr, n, hh, ww, offs_c, sxn, sxc, sxh, sxw), mask=x_mask, other=0.0)
        if PROLOGUE_BN_RELU:
            xt = tl.where(x_mask, relu_nan(xt.to(s_in.dtype) * s_in[None, :] + t_in[None, :]), 0.0)
            xt = xt.to(dy_ptr.dtype.element_ty)
        acc = mma(tl.trans(dyt), xt, acc, DOT_PRECISION, UPCAST_DOT)
    idx = offs_k.to(tl.int64)[:, None] * swk + offs_cg.to(tl.int64)[None, :] * swc + r * swr + s * sws
    tl.store(part_ptr + split.to(tl.int64) * NUMEL + idx, acc, mask=mask_k[:, None] & mask_c[None, :])


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

def _blocks(rows: int, cols: int, red: int):
    if INTERPRETED:
        return clamp_block(256, rows), clamp_block(128, cols), clamp_block(128, red)
    return 128, clamp_block(64, cols), clamp_block(32, red)


def conv_dgrad(dy, weight, x_shape, stride, padding, dilation, groups, bn_relu=None, residual=None, out=None):
    """Gradient w.r.t. the conv input, [N, C, H, W] in dy's memory format.

    bn_relu: (y, scale, shift, mean, invstd) when the conv input was relu(scale*y + shift): the result is
      then the ReLU-gated gradient w.r.t. bn(y), and (result, sum_g, sum_gxhat) is returned.
    residual: (res, relu_out or None, res_stride): adds res (gated by relu_out > 0) at stride res_stride.
    out: write into this tensor (it may be res itself: in-place accumulation is safe).
    """
    n, c, h, w = x_shape
    k, cg, r, s = weight.shape
    p, q = dy.shape[2:]
    dx = empty_activation(dy, (n, c, h, w)) if out is None else out
    m, kg = n * h * w, k // groups
    bm, bn, bk = _blocks(m, cg, kg)
    t = triton.cdiv(m, bm)
    parts = torch.empty((t, 2 * c), device=dy.device, dtype=stats_dtype(dy)) if bn_relu is not None else dx
    y, in_scale, in_shift, mean, invstd = bn_relu if bn_relu is not None else (dx, dx, dx, dx, dx)
    res, rmask, res_stride = residual if residual is not None else (dx, None, 1)
    rmask_t = rmask if rmask is not None else res
    if m > 0:
        with device_guard(dy):
            _conv_dgrad_kernel[(t * triton.cdiv(cg, bn), groups)](
                dy, weight, dx, y, in_scale, in_shift, mean, invstd, parts, res, rmask_t,
                m, h, w, p, q, cg, kg, res.shape[1], c,
                *dy.stride(), *weight.stride(), *dx.stride(), *y.stride(), *res.stride(), *rmask_t.stride(),
                stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1], res_stride,
                R=r, S=s, BN_RELU_GRAD=bn_relu is not None, HAS_RESIDUAL=residual is not None,
                HAS_RES_MASK=rmask is not None, DOT_PRECISION=dot_precision(dy), UPCAST_DOT=upcast_dot(dy),
                ACC_FP64=dy.dtype == torch.float64, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    if bn_relu is None:
        return dx
    if m == 0:
        return dx, torch.zeros(c, device=dy.device, dtype=parts.dtype), torch.zeros(c, device=dy.device,
                                                                                     dtype=parts.dtype)
    sum_g, sum_gx = sum_rows(parts).view(2, c).unbind(0)
    return dx, sum_g, sum_gx


def _num_splits(tiles: int, m: int, bm: int) -> int:
    """Enough programs to fill a GPU (~2 waves on 132 SMs), each still looping over >= 8 row blocks."""
    if INTERPRETED:
        return 1
    return max(1, min(triton.cdiv(264, tiles), triton.cdiv(m, bm * 8)))


def conv_wgrad(dy, x, weight, stride, padding, dilation, groups, prologue=None):
    """Gradient w.r.t. the weight: a new tensor like ``weight`` (same dtype and memory format).

    prologue: (scale, shift) when the conv input was relu(scale*x + shift) of the raw x given here.
    """
    n, c, h, w = x.shape
    k, cg, r, s = weight.shape
    p, q = dy.shape[2:]
    dw = torch.empty_like(weight)
    m, kg = n * p * q, k // groups
    bm, bn, bk = _blocks(m, kg, cg)
    tiles = triton.cdiv(kg, bn) * triton.cdiv(cg, bk) * r * s * groups
    split = _num_splits(tiles, m, bm)
    rows_per_split = triton.cdiv(triton.cdiv(m, split), bm) * bm
    split = max(1, triton.cdiv(m, rows_per_split))
    acc_dtype = stats_dtype(dy)
    direct = split == 1 and weight.dtype == acc_dtype
    part = torch.as_strided(dw, (1, dw.numel()), (0, 1)) if direct else \
        torch.empty((split, dw.numel()), device=dy.device, dtype=acc_dtype)
    if m == 0:
        return dw.zero_()
    in_scale, in_shift = prologue if prologue is not None else (dw, dw)
    with device_guard(dy):
        _conv_wgrad_kernel[(triton.cdiv(kg, bn) * triton.cdiv(cg, bk), r * s, groups * split)](
            dy, x, in_scale, in_shift, part, m, h, w, p, q, cg, kg, rows_per_split, split, dw.numel(),
            *dy.stride(), *x.stride(), *dw.stride(),
            stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
            R=r, S=s, PROLOGUE_BN_RELU=prologue is not None, DOT_PRECISION=dot_precision(dy),
            UPCAST_DOT=upcast_dot(dy), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    if not direct:
        sum_rows(part, out=torch.as_strided(dw, (dw.numel(),), (1,)))
    return dw
