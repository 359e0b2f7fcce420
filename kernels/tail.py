"""The block tail and the BN backward of the training path, and the attention (SE / ECA) tail.

Forward: ``out = act(bn(y) * attn[n, k] * row_scale[n] + shortcut)`` in one pass, where the shortcut is the
input itself (identity / option A) or a projection's ``bn_d(yd)``; ``row_scale`` is stochastic depth's
per-sample keep mask / keep probability and ``attn`` an attention module's gate, both on the branch only.
Backward: the BN reductions of the activation-gated gradient and the BN backward (pixel-tile major), and
for an attention tail one image-major pass that also reduces the gate's gradient per (image, channel).
``act`` is the ACTIVATION constexpr ("relu" or "none", kernels/_launch.py ACTIVATIONS): the helpers
_tiles.activation forward, _tiles.activation_grad gating by the tail's output backward.
All work on tiles of logical [N, C, P, Q] tensors through their strides (see ``_tiles``).
"""
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ._launch import (
    INTERPRETED,
    activation_of,
    cdiv,
    clamp_block,
    device_guard,
    empty_activation,
    site_activation,
)
from ._tiles import activation_grad, add_residual_act_store, pixel_channel_tile, tile_ptrs
from .bn import sum_rows


@triton.jit(do_not_specialize=["M", "P", "Q"])  # pixel decode only: no variant per image size
def _bn_act_kernel(
    y_ptr, scale_ptr, shift_ptr,        # raw conv output [N, K, P, Q] and its BN as scale/shift [K] (HAS_BN)
    row_scale_ptr,                      # [N] per-sample scale of the branch (HAS_ROW_SCALE: drop_path's mask/keep)
    attn_ptr,                           # [N, K] dense per-(sample, channel) gate of the branch (HAS_ATTN: SE/ECA)
    yd_ptr, scale_d_ptr, shift_d_ptr,   # projection shortcut's raw conv output and BN (HAS_BN_SHORTCUT)
    res_ptr, out_ptr,                   # identity / option-A residual [N, RES_C, P, Q]; output
    M, P, Q, K, RES_C,
    stride_y_n, stride_y_c, stride_y_h, stride_y_w, stride_yd_n, stride_yd_c, stride_yd_h, stride_yd_w, stride_res_n,
    stride_res_c, stride_res_h, stride_res_w, stride_out_n, stride_out_c, stride_out_h, stride_out_w,
    HAS_BN: tl.constexpr, HAS_ROW_SCALE: tl.constexpr, HAS_ATTN: tl.constexpr,
    HAS_BN_SHORTCUT: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    ACTIVATION: tl.constexpr,           # "relu" or "none": act below
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Block tail: out = act(bn(y) * attn[n, k] * row_scale[n] + [bn_d(yd) | residual]) in one pass; also
    the stem's bn + act. The branch factors multiply bn(y) only, as timm's se and drop_path do."""
    n, p, q, mask_m, offs_k, mask_k, msk = pixel_channel_tile(M, P, Q, K, BLOCK_M, BLOCK_N)
    y = tl.load(tile_ptrs(y_ptr, n, p, q, offs_k, stride_y_n, stride_y_c, stride_y_h, stride_y_w), mask=msk,
                other=0.0)
    if HAS_BN:
        scale = tl.load(scale_ptr + offs_k, mask=mask_k, other=0.0)
        shift = tl.load(shift_ptr + offs_k, mask=mask_k, other=0.0)
        y = y.to(scale.dtype) * scale[None, :] + shift[None, :]
    elif y_ptr.dtype.element_ty != tl.float64:
        y = y.to(tl.float32)
    y = branch_factors(y, n, offs_k, mask_m, mask_k, K, row_scale_ptr, attn_ptr, HAS_ROW_SCALE, HAS_ATTN)
    if HAS_BN_SHORTCUT:
        scale_d = tl.load(scale_d_ptr + offs_k, mask=mask_k, other=0.0)
        shift_d = tl.load(shift_d_ptr + offs_k, mask=mask_k, other=0.0)
        yd = tl.load(tile_ptrs(yd_ptr, n, p, q, offs_k, stride_yd_n, stride_yd_c, stride_yd_h, stride_yd_w), mask=msk,
                     other=0.0).to(scale_d.dtype)
        y += yd * scale_d[None, :] + shift_d[None, :]
    add_residual_act_store(y, n, p, q, offs_k, mask_m, mask_k, res_ptr, stride_res_n, stride_res_c, stride_res_h,
                           stride_res_w, RES_C,
                           out_ptr, stride_out_n, stride_out_c, stride_out_h, stride_out_w, HAS_RESIDUAL, ACTIVATION)


@triton.jit
def branch_factors(v, n, offs_k, mask_m, mask_k, K, row_scale_ptr, attn_ptr, HAS_ROW_SCALE: tl.constexpr,
                   HAS_ATTN: tl.constexpr):
    """v * attn[n, k] * row_scale[n]: the branch's per-(sample, channel) and per-sample factors (either may be
    off). The one place the tail's forward and backward apply them, so both agree."""
    if HAS_ATTN:
        v = v * tl.load(attn_ptr + n[:, None] * K + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :],
                        other=0.0).to(v.dtype)
    if HAS_ROW_SCALE:
        v = v * tl.load(row_scale_ptr + n, mask=mask_m, other=0.0).to(v.dtype)[:, None]
    return v


@triton.jit
def load_gated_grad(grad_ptr, mask_ptr, n, p, q, offs_k, msk, stride_g_n, stride_g_c, stride_g_h, stride_g_w,
                    stride_mask_n, stride_mask_c, stride_mask_h, stride_mask_w,
                    ACTIVATION: tl.constexpr):
    """A gradient tile through the activation's backward, gated by its output at mask_ptr (not read for "none")."""
    g = tl.load(tile_ptrs(grad_ptr, n, p, q, offs_k, stride_g_n, stride_g_c, stride_g_h, stride_g_w), mask=msk,
                other=0.0)
    if ACTIVATION != "none":
        g = activation_grad(g, tl.load(tile_ptrs(mask_ptr, n, p, q, offs_k, stride_mask_n, stride_mask_c,
                                                 stride_mask_h, stride_mask_w), mask=msk, other=0.0), ACTIVATION)
    return g


@triton.jit(do_not_specialize=["M", "P", "Q"])  # pixel decode only: no variant per image size
def _bn_bwd_reduce_kernel(
    grad_ptr, mask_ptr,            # upstream gradient; the activation's output that gates it (ACTIVATION)
    y_ptr, mean_ptr, invstd_ptr,   # the BN input and its batch statistics
    row_scale_ptr,                 # [N] per-sample scale of the branch (HAS_ROW_SCALE)
    y2_ptr, mean2_ptr, invstd2_ptr,  # a second BN fed by the same gradient (HAS_Y2: projection shortcut)
    parts_ptr,                     # [T, 2 or 4, K] per-tile partial sums of gb, gb*xhat (, g, g*xhat2)
    M, P, Q, K,
    stride_g_n, stride_g_c, stride_g_h, stride_g_w, stride_mask_n, stride_mask_c, stride_mask_h, stride_mask_w,
    stride_y_n, stride_y_c, stride_y_h, stride_y_w, stride_y2_n, stride_y2_c, stride_y2_h, stride_y2_w,
    ACTIVATION: tl.constexpr, HAS_ROW_SCALE: tl.constexpr, HAS_Y2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Per-tile partials of the BN backward reductions: sum(gb) and sum(gb * xhat), g = act-gated grad and
    gb = g * row_scale[n] the branch's share of it; for the projection sum(g) and sum(g * xhat2)."""
    pid_m = tl.program_id(0)
    n, p, q, mask_m, offs_k, mask_k, msk = pixel_channel_tile(M, P, Q, K, BLOCK_M, BLOCK_N)
    mean = tl.load(mean_ptr + offs_k, mask=mask_k, other=0.0)
    invstd = tl.load(invstd_ptr + offs_k, mask=mask_k, other=0.0)
    g = load_gated_grad(grad_ptr, mask_ptr, n, p, q, offs_k, msk, stride_g_n, stride_g_c, stride_g_h, stride_g_w,
                        stride_mask_n, stride_mask_c, stride_mask_h, stride_mask_w,
                        ACTIVATION).to(mean.dtype)
    gb = branch_factors(g, n, offs_k, mask_m, mask_k, K, row_scale_ptr, row_scale_ptr, HAS_ROW_SCALE, False)
    y = tl.load(tile_ptrs(y_ptr, n, p, q, offs_k, stride_y_n, stride_y_c, stride_y_h, stride_y_w), mask=msk,
                other=0.0).to(mean.dtype)
    part = parts_ptr + pid_m.to(tl.int64) * ((4 if HAS_Y2 else 2) * K) + offs_k
    tl.store(part, tl.sum(gb, axis=0), mask=mask_k)
    tl.store(part + K, tl.sum(tl.where(msk, gb * (y - mean[None, :]) * invstd[None, :], 0.0), axis=0),
             mask=mask_k)
    if HAS_Y2:
        mean2 = tl.load(mean2_ptr + offs_k, mask=mask_k, other=0.0)
        invstd2 = tl.load(invstd2_ptr + offs_k, mask=mask_k, other=0.0)
        y2 = tl.load(tile_ptrs(y2_ptr, n, p, q, offs_k, stride_y2_n, stride_y2_c, stride_y2_h, stride_y2_w), mask=msk,
                     other=0.0).to(mean.dtype)
        tl.store(part + 2 * K, tl.sum(g, axis=0), mask=mask_k)
        tl.store(part + 3 * K,
                 tl.sum(tl.where(msk, g * (y2 - mean2[None, :]) * invstd2[None, :], 0.0), axis=0), mask=mask_k)


@triton.jit(do_not_specialize=["M", "P", "Q"])  # pixel decode only: no variant per image size
def _bn_bwd_apply_kernel(
    grad_ptr, mask_ptr, y_ptr, dy_ptr,   # upstream grad, the activation's output gating it, BN input, result
    gamma_ptr, mean_ptr, invstd_ptr, sum_g_ptr, sum_gx_ptr,  # [K]
    row_scale_ptr,                       # [N] per-sample factor of the gradient (HAS_ROW_SCALE)
    nc_ptr,                              # [N, K] dense addend of the gradient (HAS_NC: a pooled output's grad)
    M, P, Q, K,
    COUNT,                               # pixels the sums are over (more than M under synchronized BN)
    stride_g_n, stride_g_c, stride_g_h, stride_g_w, stride_mask_n, stride_mask_c, stride_mask_h, stride_mask_w,
    stride_y_n, stride_y_c, stride_y_h, stride_y_w, stride_out_n, stride_out_c, stride_out_h, stride_out_w,
    ACTIVATION: tl.constexpr, GAIN: tl.constexpr, HAS_ROW_SCALE: tl.constexpr, HAS_NC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dy = a * (g - sum(g)/COUNT - xhat * sum(g*xhat)/COUNT), the batch-statistics BN backward, where
    g = act-gated grad * row_scale[n] + nc[n, k] and a = GAIN: "gamma" gamma*invstd, "invstd" (affine=False),
    "one" (the grad is already d/dy at fixed statistics: the attention tail's)."""
    n, p, q, mask_m, offs_k, mask_k, msk = pixel_channel_tile(M, P, Q, K, BLOCK_M, BLOCK_N)
    mean = tl.load(mean_ptr + offs_k, mask=mask_k, other=0.0)
    invstd = tl.load(invstd_ptr + offs_k, mask=mask_k, other=0.0)
    if GAIN == "gamma":
        a = tl.load(gamma_ptr + offs_k, mask=mask_k, other=0.0).to(mean.dtype) * invstd
    elif GAIN == "invstd":
        a = invstd
    else:
        a = tl.zeros_like(invstd) + 1.0
    mean_g = tl.load(sum_g_ptr + offs_k, mask=mask_k, other=0.0).to(mean.dtype) / COUNT
    mean_gx = tl.load(sum_gx_ptr + offs_k, mask=mask_k, other=0.0).to(mean.dtype) / COUNT
    g = load_gated_grad(grad_ptr, mask_ptr, n, p, q, offs_k, msk, stride_g_n, stride_g_c, stride_g_h, stride_g_w,
                        stride_mask_n, stride_mask_c, stride_mask_h, stride_mask_w,
                        ACTIVATION).to(mean.dtype)
    g = branch_factors(g, n, offs_k, mask_m, mask_k, K, row_scale_ptr, row_scale_ptr, HAS_ROW_SCALE, False)
    if HAS_NC:
        g += tl.load(nc_ptr + n[:, None] * K + offs_k[None, :], mask=msk, other=0.0).to(mean.dtype)
    y = tl.load(tile_ptrs(y_ptr, n, p, q, offs_k, stride_y_n, stride_y_c, stride_y_h, stride_y_w), mask=msk,
                other=0.0).to(mean.dtype)
    xhat = (y - mean[None, :]) * invstd[None, :]
    dy = a[None, :] * (g - mean_g[None, :] - xhat * mean_gx[None, :])
    tl.store(tile_ptrs(dy_ptr, n, p, q, offs_k, stride_out_n, stride_out_c, stride_out_h, stride_out_w),
             dy.to(dy_ptr.dtype.element_ty), mask=msk)


@triton.jit
def _image_mean_kernel(
    y_ptr,                      # [N, K, P, Q] activation
    out_ptr,                    # [N, K] dense out: the mean over the P*Q pixels of each (image, channel)
    PQ, Q, K,
    stride_y_n, stride_y_c, stride_y_h, stride_y_w,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Global average pool: one program per (image, channel block) walks that image's pixels."""
    n = tl.program_id(0).to(tl.int64)
    offs_k = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_k = offs_k < K
    acc = tl.zeros((BLOCK_N,), dtype=out_ptr.dtype.element_ty)
    for pq0 in tl.range(0, PQ, BLOCK_M):
        offs_pq = pq0 + tl.arange(0, BLOCK_M)
        msk = (offs_pq < PQ)[:, None] & mask_k[None, :]
        ptrs = tile_ptrs(y_ptr, n + offs_pq * 0, offs_pq // Q, offs_pq % Q, offs_k, stride_y_n, stride_y_c,
                         stride_y_h, stride_y_w)
        acc += tl.sum(tl.load(ptrs, mask=msk, other=0.0).to(acc.dtype), axis=0)
    tl.store(out_ptr + n * K + offs_k, acc / PQ, mask=mask_k)


@triton.jit
def _attention_tail_bwd_kernel(
    grad_ptr, out_ptr,              # upstream gradient and the tail's output (its activation's gate)
    y_ptr, scale_ptr, shift_ptr,    # the branch's raw conv output and its BN as scale/shift [K]
    attn_ptr, row_scale_ptr,        # [N, K] gate, [N] per-sample scale (HAS_ROW_SCALE)
    yd_ptr, scale_d_ptr,            # projection's raw conv output and BN scale (HAS_BN_SHORTCUT)
    dy_ptr,                         # out: d/dy of the branch at fixed statistics, g*row_scale*attn*scale
    dres_ptr,                       # out: the shortcut's gradient: g (identity), or g*scale_d (projection)
    dattn_ptr,                      # [N, K] out: sum over the image's pixels of g * row_scale * bn(y)
    parts_ptr,                      # [N, 2 or 4, K] out: per image sum(gz), sum(gz*xhat) (, sum(g), sum(g*xhat_d))
    mean_ptr, invstd_ptr, mean_d_ptr, invstd_d_ptr,  # [K] batch statistics (xhat)
    PQ, Q, K,
    stride_g_n, stride_g_c, stride_g_h, stride_g_w, stride_o_n, stride_o_c, stride_o_h, stride_o_w,
    stride_y_n, stride_y_c, stride_y_h, stride_y_w, stride_yd_n, stride_yd_c, stride_yd_h, stride_yd_w,
    stride_dy_n, stride_dy_c, stride_dy_h, stride_dy_w, stride_dr_n, stride_dr_c, stride_dr_h, stride_dr_w,
    ACTIVATION: tl.constexpr, HAS_ROW_SCALE: tl.constexpr, HAS_BN_SHORTCUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Backward of out = act(bn(y) * attn[n, k] * row_scale[n] + shortcut) in one pass over the image's
    pixels (image-major, so the per-(image, channel) sum for d attn stays in registers): gz = g * attn *
    row_scale is the gradient of bn(y); the per-channel sums give the BN parameters and statistics theirs."""
    n = tl.program_id(0).to(tl.int64)
    offs_k = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_k = offs_k < K
    mean = tl.load(mean_ptr + offs_k, mask=mask_k, other=0.0)
    invstd = tl.load(invstd_ptr + offs_k, mask=mask_k, other=0.0)
    scale = tl.load(scale_ptr + offs_k, mask=mask_k, other=0.0)
    shift = tl.load(shift_ptr + offs_k, mask=mask_k, other=0.0)
    factor = tl.load(attn_ptr + n * K + offs_k, mask=mask_k, other=0.0).to(mean.dtype)
    if HAS_ROW_SCALE:
        factor = factor * tl.load(row_scale_ptr + n).to(mean.dtype)
    if HAS_BN_SHORTCUT:
        mean_d = tl.load(mean_d_ptr + offs_k, mask=mask_k, other=0.0)
        invstd_d = tl.load(invstd_d_ptr + offs_k, mask=mask_k, other=0.0)
        scale_d = tl.load(scale_d_ptr + offs_k, mask=mask_k, other=0.0)
    zero = tl.zeros((BLOCK_N,), dtype=mean.dtype)
    d_attn, s_gz, s_gzx, s_g, s_gxd = zero, zero, zero, zero, zero
    for pq0 in tl.range(0, PQ, BLOCK_M):
        offs_pq = pq0 + tl.arange(0, BLOCK_M)
        rows = n + offs_pq * 0
        p, q = offs_pq // Q, offs_pq % Q
        msk = (offs_pq < PQ)[:, None] & mask_k[None, :]
        g = load_gated_grad(grad_ptr, out_ptr, rows, p, q, offs_k, msk, stride_g_n, stride_g_c, stride_g_h,
                            stride_g_w, stride_o_n, stride_o_c, stride_o_h, stride_o_w, ACTIVATION).to(mean.dtype)
        y = tl.load(tile_ptrs(y_ptr, rows, p, q, offs_k, stride_y_n, stride_y_c, stride_y_h, stride_y_w), mask=msk,
                    other=0.0).to(mean.dtype)
        z = y * scale[None, :] + shift[None, :]
        gz = g * factor[None, :]
        tl.store(tile_ptrs(dy_ptr, rows, p, q, offs_k, stride_dy_n, stride_dy_c, stride_dy_h, stride_dy_w),
                 (gz * scale[None, :]).to(dy_ptr.dtype.element_ty), mask=msk)
        d_attn += tl.sum(tl.where(msk, g * z, 0.0), axis=0)
        s_gz += tl.sum(gz, axis=0)
        s_gzx += tl.sum(tl.where(msk, gz * (y - mean[None, :]) * invstd[None, :], 0.0), axis=0)
        d_res = g
        if HAS_BN_SHORTCUT:
            yd = tl.load(tile_ptrs(yd_ptr, rows, p, q, offs_k, stride_yd_n, stride_yd_c, stride_yd_h, stride_yd_w),
                         mask=msk, other=0.0).to(mean.dtype)
            s_g += tl.sum(g, axis=0)
            s_gxd += tl.sum(tl.where(msk, g * (yd - mean_d[None, :]) * invstd_d[None, :], 0.0), axis=0)
            d_res = g * scale_d[None, :]
        tl.store(tile_ptrs(dres_ptr, rows, p, q, offs_k, stride_dr_n, stride_dr_c, stride_dr_h, stride_dr_w),
                 d_res.to(dres_ptr.dtype.element_ty), mask=msk)
    if HAS_ROW_SCALE:
        d_attn = d_attn * tl.load(row_scale_ptr + n).to(mean.dtype)
    tl.store(dattn_ptr + n * K + offs_k, d_attn.to(dattn_ptr.dtype.element_ty), mask=mask_k)
    part = parts_ptr + n * ((4 if HAS_BN_SHORTCUT else 2) * K) + offs_k
    tl.store(part, s_gz, mask=mask_k)
    tl.store(part + K, s_gzx, mask=mask_k)
    if HAS_BN_SHORTCUT:
        tl.store(part + 2 * K, s_g, mask=mask_k)
        tl.store(part + 3 * K, s_gxd, mask=mask_k)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

def _tile(m: int, k: int):
    if INTERPRETED:
        return clamp_block(256, m), clamp_block(128, k)
    return 64, clamp_block(64, k)


def _image_tile(pq: int, k: int):
    """(pixels per step, channels) of an image-major launch: one program walks one image's pixels."""
    if INTERPRETED:
        return clamp_block(256, pq), clamp_block(128, k)
    return 32, clamp_block(64, k)


def _strides(t):
    return t.stride() if t is not None else (0, 0, 0, 0)


class Projection(NamedTuple):
    """A projection shortcut in the tail: its raw conv output and its BN as scale/shift."""
    yd: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor


def bn_act(y, scale, shift, shortcut: Optional[Projection] = None, residual=None, relu=True, row_scale=None,
           attn=None, *, activation=None):
    """out = act(bn(y) * attn[n, k] * row_scale[n] + [bn_d(yd) | residual]), bn(y) = scale*y + shift
    (scale None: y as it is). row_scale: [N]; attn: [N, K] dense. act: ``activation`` (kernels/_launch.py
    ACTIVATIONS), or when None "relu" / "none" by ``relu``."""
    act = activation_of(relu, activation)
    n, k, p, q = y.shape
    out = empty_activation(y, y.shape)
    m = n * p * q
    if m == 0:
        return out
    yd, scale_d, shift_d = shortcut if shortcut is not None else (y, scale, shift)
    res = residual if residual is not None else y
    bm, bn = _tile(m, k)
    with device_guard(y):
        _bn_act_kernel[(cdiv(m, bm), cdiv(k, bn))](
            y, scale if scale is not None else y, shift if scale is not None else y,
            row_scale if row_scale is not None else y, attn if attn is not None else y,
            yd, scale_d if scale_d is not None else y, shift_d if shift_d is not None else y, res, out, m, p, q, k,
            0 if residual is None else residual.shape[1],
            *y.stride(), *yd.stride(), *_strides(residual), *out.stride(),
            HAS_BN=scale is not None, HAS_ROW_SCALE=row_scale is not None, HAS_ATTN=attn is not None,
            HAS_BN_SHORTCUT=shortcut is not None, HAS_RESIDUAL=residual is not None, ACTIVATION=act,
            BLOCK_M=bm, BLOCK_N=bn)
    return out


class TailSums(NamedTuple):
    """Per-channel sums over all pixels of the tail's BN backward: gb = the gated gradient's branch share
    (times row_scale), g = all of it (the projection's share)."""
    sum_g: torch.Tensor              # sum gb
    sum_gx: torch.Tensor             # sum gb * xhat
    sum_g_d: Optional[torch.Tensor]  # sum g (projection only)
    sum_gx_d: Optional[torch.Tensor]  # sum g * xhat_d (projection only)


def bn_bwd_reduce(grad, act_out, y, mean, invstd, y2=None, mean2=None, invstd2=None, row_scale=None, *,
                  activation="relu") -> TailSums:
    """The BN backward reductions of the tail; grad through the ``activation``'s backward at its output act_out
    when given (ReLU: gated by act_out > 0)."""
    act = site_activation(activation, act_out is not None)
    n, k, p, q = y.shape
    m = n * p * q
    bm, bn = _tile(m, k)
    t = cdiv(m, bm)
    j = 4 if y2 is not None else 2
    parts = torch.empty((t, j * k), device=y.device, dtype=mean.dtype)
    with device_guard(y):
        _bn_bwd_reduce_kernel[(t, cdiv(k, bn))](
            grad, act_out if act_out is not None else grad, y, mean, invstd,
            row_scale if row_scale is not None else mean,
            y2 if y2 is not None else y, mean2 if y2 is not None else mean, invstd2 if y2 is not None else invstd,
            parts, m, p, q, k,
            *grad.stride(), *_strides(act_out), *y.stride(), *_strides(y2),
            ACTIVATION=act, HAS_ROW_SCALE=row_scale is not None, HAS_Y2=y2 is not None,
            BLOCK_M=bm, BLOCK_N=bn)
    sums = sum_rows(parts).view(j, k).unbind(0)
    return TailSums(*sums) if j == 4 else TailSums(*sums, None, None)


def bn_bwd_apply(grad, act_out, y, gamma, mean, invstd, sum_g, sum_gx, count=None, row_scale=None, nc=None,
                 unit_gain=False, *, activation="relu"):
    """Gradient w.r.t. the BN input y (batch statistics) of g = grad (through the ``activation``'s backward at
    its output act_out when given; ReLU: gated by act_out > 0) * row_scale[n] + nc[n, k].
    unit_gain: grad is already d/dy at fixed statistics (no gamma * invstd).
    count: the pixels the sums run over (all ranks' under synchronized BN; default: y's own)."""
    n, k, p, q = y.shape
    dy = empty_activation(y, y.shape)
    m = n * p * q
    bm, bn = _tile(m, k)
    gain = "one" if unit_gain else ("gamma" if gamma is not None else "invstd")
    act = site_activation(activation, act_out is not None)
    with device_guard(y):
        _bn_bwd_apply_kernel[(cdiv(m, bm), cdiv(k, bn))](
            grad, act_out if act_out is not None else grad, y, dy,
            gamma if gamma is not None else mean, mean, invstd, sum_g, sum_gx,
            row_scale if row_scale is not None else mean, nc if nc is not None else mean, m, p, q, k,
            float(m if count is None else count),
            *grad.stride(), *_strides(act_out), *y.stride(), *dy.stride(),
            ACTIVATION=act, GAIN=gain, HAS_ROW_SCALE=row_scale is not None, HAS_NC=nc is not None,
            BLOCK_M=bm, BLOCK_N=bn)
    return dy


def image_mean(y, dtype=None):
    """[N, K] dense: the mean of y [N, K, P, Q] over each image's pixels (global average pool), in ``dtype``
    (default y's)."""
    n, k, p, q = y.shape
    out = torch.empty((n, k), device=y.device, dtype=dtype or y.dtype)
    if out.numel() == 0:
        return out
    bm, bn = _image_tile(p * q, k)
    with device_guard(y):
        _image_mean_kernel[(n, cdiv(k, bn))](y, out, p * q, q, k, *y.stride(), BLOCK_M=bm, BLOCK_N=bn)
    return out


class AttentionTailGrads(NamedTuple):
    """attention_tail_bwd's result."""
    dy: torch.Tensor        # d/dy of the branch's raw conv output at fixed batch statistics
    dres: torch.Tensor      # the shortcut's: d residual (identity) or d yd at fixed statistics (projection)
    dattn: torch.Tensor     # [N, K]
    sums: TailSums          # per channel, with gz = g * attn * row_scale the gradient of bn(y)


def attention_tail_bwd(grad, out, y, scale, shift, mean, invstd, attn, row_scale=None,
                       projection: Optional[Projection] = None, mean_d=None, invstd_d=None,
                       relu=True, *, activation=None) -> AttentionTailGrads:
    """Backward of out = act(bn(y) * attn * row_scale + shortcut) in one image-major pass; act: ``activation``
    (kernels/_launch.py ACTIVATIONS), or when None "relu" / "none" by ``relu``."""
    act = activation_of(relu, activation)
    n, k, p, q = y.shape
    dy, dres = empty_activation(y, y.shape), empty_activation(y, y.shape)
    dattn = torch.empty((n, k), device=y.device, dtype=attn.dtype)
    j = 4 if projection is not None else 2
    parts = torch.empty((n, j * k), device=y.device, dtype=mean.dtype)
    yd, scale_d = (projection.yd, projection.scale) if projection is not None else (y, scale)
    bm, bn = _image_tile(p * q, k)
    with device_guard(y):
        _attention_tail_bwd_kernel[(n, cdiv(k, bn))](
            grad, out, y, scale, shift, attn, row_scale if row_scale is not None else mean, yd, scale_d,
            dy, dres, dattn, parts, mean, invstd, mean_d if mean_d is not None else mean,
            invstd_d if invstd_d is not None else invstd, p * q, q, k,
            *grad.stride(), *out.stride(), *y.stride(), *yd.stride(), *dy.stride(), *dres.stride(),
            ACTIVATION=act, HAS_ROW_SCALE=row_scale is not None, HAS_BN_SHORTCUT=projection is not None,
            BLOCK_M=bm, BLOCK_N=bn)
    sums = sum_rows(parts).view(j, k).unbind(0)
    return AttentionTailGrads(dy, dres, dattn, TailSums(*sums) if j == 4 else TailSums(*sums, None, None))
