"""Input gradient of a convolution (dgrad) as implicit GEMMs, one per output phase.

dx[n, c, h, w] = sum over k, r, s of dy[n, k, p, q] * w[k, c, r, s], where h = p*stride - pad + r*dil.
A tap r reaches row h only when (h + pad - r*dil) divides by the stride, which depends on h % stride
alone. So the launcher splits dx into stride_h*stride_w phases (h % stride, w % stride); each phase is
a dense conv over its own pixel grid with just the taps that hit it (an arithmetic progression
r = R0 + j*RSTEP, reading dy row p = i + PB - j*PD for phase row i). No MMA is issued for a tap that
cannot contribute: a 1x1 stride-2 dgrad is one GEMM over the strided pixels, the other phases only
run the epilogue. At stride 1 there is one phase with every tap.

GEMM per phase: M = N*HP*WP pixels x C input channels (per group), reduction over (tap, K block), one
flattened loop whose tap and K-block counters advance without division.

Epilogue: BN_GRAD gates the gradient by the activation of the previous BN (ACTIVATION, _tiles.activation_grad),
its input recomputed from the BN's saved raw output y, and writes per-tile partial sums (of the stored, rounded
values) for that BN's backward; HAS_RESIDUAL adds the shortcut's gradient read at stride RES_STRIDE (option A),
gated by the block output's activation (HAS_RES_MASK: the same ACTIVATION, at the output). dx may alias res:
each element is read, then written, by one program.
"""
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._conv_configs import (
    DGRAD_BLOCK_M,
    DGRAD_TILES,
    SPATIAL_TILE_W,
    arch_tiles,
    autotune_options,
    dgrad_fixed_config,
    dgrad_prune,
    dgrad_tma_configs,
    dgrad_tma_eligible,
    tile_configs,
    tma_config,
    tma_wanted,
)
from ._launch import (
    cdiv,
    check_activation,
    descriptor_scratch,
    device_guard,
    dot_args,
    empty_activation,
    launch_tuned,
    out_size,
    stats_dtype,
    stride_args,
)
from ._tiles import activation_grad, in_range, k_steps, mma, tile_ptrs
from .bn import sum_rows
from .conv import spatial_rows
from .wgrad import max_offset

# The tap and phase integers take few distinct values per network, but each specialized value (== 1, a multiple of 16)
# would compile its own variant (~5x the variants of a ResNet-50 step); the loop shape they matter for is ONE_TAP.
_TAP_INTS = ["PH0", "PW0", "TILE0", "stride_h", "stride_w", "R0", "RSTEP", "NR", "PB", "PD", "S0", "SSTEP", "NS", "QB",
             "QD"]


@triton.jit(do_not_specialize=_TAP_INTS)
def _conv_dgrad_kernel(
    dy_ptr,        # [N, K, P, Q] gradient w.r.t. the conv output
    w_ptr,         # [K, C/groups, R, S]
    dx_ptr,        # [N, C, H, W] result (may alias res_ptr)
    y_ptr,         # [N, C, H, W] raw output of the previous conv (BN_GRAD)
    in_scale_ptr, in_shift_ptr, mean_ptr, invstd_ptr,  # [C] that BN as scale/shift, and its batch stats
    parts_ptr,     # [T, 2, C] per-tile partial sums of g and g*xhat (BN_GRAD); this phase from TILE0
    res_ptr,       # [N, RES_C, H', W'] gradient to add at stride RES_STRIDE (HAS_RESIDUAL)
    rmask_ptr,     # activation output gating res (HAS_RES_MASK), same shape and strides as res
    M, HP, WP,     # this phase: M = N*HP*WP pixels h = PH0 + stride_h*i, w = PW0 + stride_w*j
    PH0, PW0, P, Q, CG, KG, RES_C, C, TILE0,
    stride_dy_n, stride_dy_c, stride_dy_h, stride_dy_w, stride_w_k, stride_w_c, stride_w_r, stride_w_s, stride_dx_n,
    stride_dx_c, stride_dx_h, stride_dx_w, stride_y_n, stride_y_c, stride_y_h, stride_y_w, stride_res_n, stride_res_c,
    stride_res_h, stride_res_w,
    stride_rmask_n, stride_rmask_c, stride_rmask_h, stride_rmask_w,
    stride_h, stride_w, RES_STRIDE,
    R0, RSTEP, NR, PB, PD,   # taps along h: r = R0 + j*RSTEP reads dy row i + PB - j*PD (NR taps)
    S0, SSTEP, NS, QB, QD,   # the same along w
    ONE_TAP: tl.constexpr,   # NR * NS <= 1 (1x1 convs, some phases of strided ones): no tap counters in the loop
    BN_GRAD: tl.constexpr,   # the conv input was ACTIVATION(in_scale * y + in_shift): gate, and that BN's sums
    HAS_RESIDUAL: tl.constexpr, HAS_RES_MASK: tl.constexpr,
    ACTIVATION: tl.constexpr,  # "relu" or "none" (kernels/_launch.py ACTIVATIONS): the gates' activation
    IDX64: tl.constexpr,     # some offset may pass 2**31: loop index math in int64
    EVEN_K: tl.constexpr,    # KG % BLOCK_K == 0: no K mask in the loop (_even_k, per launch)
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, ACC_FP64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    TMA: tl.constexpr = False,  # a config switch: dy and w through tensor descriptors (dgrad_tma_eligible)
    TILE_W: tl.constexpr = 0,  # TMA with taps: spatial tiles of BLOCK_M // TILE_W rows x TILE_W columns (_tile_w)
    EPI_SPLIT: tl.constexpr = 1,  # a config switch: the epilogue over 1 or 4 column slices (dgrad_prune)
    W_AS_A: tl.constexpr = False,  # TILE_W: the MMA computes acc.T = w.T @ dy.T, both operands from shared memory
):
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    pid = tl.program_id(0)
    num_n = tl.cdiv(CG, BLOCK_N)
    pid_m = pid // num_n
    g = tl.program_id(1)
    if IDX64:
        pid_m = pid_m.to(tl.int64)  # before the product: pixel indices may pass 2**31
    if TILE_W:
        n, i, j, mask_m, n_img, i0, j0 = spatial_rows(pid_m, HP, WP, BLOCK_M, TILE_W, WIDE=IDX64)
    else:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        n = offs_m // (HP * WP)  # once per tile, in int32 unless offsets need 64 bits (no division routine)
        i = offs_m - n * (HP * WP)
        j = i % WP
        i = i // WP
        mask_m = offs_m < M
    offs_cg = (pid % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = g * CG + offs_cg
    mask_c = offs_cg < CG
    offs_kk = tl.arange(0, BLOCK_K)
    pi = i + PB  # dy row and column of the first tap; tap j steps back by PD (QD)
    qj = j + QB
    if TMA and TILE_W:
        # A stride-1 dgrad with taps and "same" padding (dgrad_tma_eligible; one phase with every tap, one group) over
        # spatial tiles: dy is [N, P, Q, KG], a tile one image's TILE_H x TILE_W dx pixels, tap (jr, js) the box at
        # dy pixel (i0 + PB - jr, j0 + QB - js); TMA zero-fills what lies outside the image (negative coordinates
        # included), so no mask. w is [KG, NR*NS, CG] (channels_last: dense taps), a [BK, 1, BN] box per tap.
        dy_desc = tl.make_tensor_descriptor(dy_ptr, shape=[M // (HP * WP), P, Q, KG],
                                            strides=[stride_dy_n, stride_dy_h, stride_dy_w, 1],
                                            block_shape=[1, BLOCK_M // TILE_W, TILE_W, BLOCK_K])
        # W_AS_A (whole channel blocks, dense taps): w as a [KG, NR*NS*CG] matrix and the product transposed, so
        # neither operand is reshaped in registers (as the A operand, dy's box would be: ldmatrix and a register
        # reshape each step); acc is transposed back for the epilogue.
        if W_AS_A:
            w_desc = tl.make_tensor_descriptor(w_ptr, shape=[KG, NR * NS * CG], strides=[stride_w_k, 1],
                                               block_shape=[BLOCK_K, BLOCK_N])
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=acc_dtype)
        else:
            w_desc = tl.make_tensor_descriptor(w_ptr, shape=[KG, NR * NS, CG], strides=[stride_w_k, stride_w_s, 1],
                                               block_shape=[BLOCK_K, 1, BLOCK_N])
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_dtype)
        c0 = (pid % num_n) * BLOCK_N
        k0 = 0
        js = 0
        jr = 0
        for _ in range(k_steps(NR * NS * tl.cdiv(KG, BLOCK_K))):  # (stride 1: every phase has its taps)
            a = dy_desc.load([n_img, i0 + PB - jr * PD, j0 + QB - js * QD, k0]).reshape(BLOCK_M, BLOCK_K)
            tap = (R0 + jr * RSTEP) * NS + S0 + js * SSTEP
            if W_AS_A:
                acc = mma(w_desc.load([k0, tap * CG + c0]).T, a.T, acc, DOT_PRECISION, UPCAST_DOT)
            else:
                b = w_desc.load([k0, tap, c0]).reshape(BLOCK_K, BLOCK_N)
                acc = mma(a, b, acc, DOT_PRECISION, UPCAST_DOT)
            k0, js, jr = _next_step(k0, js, jr, KG, NS, BLOCK_K)
        if W_AS_A:
            acc = tl.trans(acc)
    elif TMA:
        # A 1x1 stride-1 dgrad over dense rows (the host checked: dgrad_tma_eligible; one phase, one group) is the
        # GEMM dx[M, C] = dy[M, K] @ w[K, C]: dy as [M, KG] with row stride stride_dy_w, w as [KG, CG] with row
        # stride stride_w_k, both channel-contiguous and 16-byte aligned. Out-of-bounds reads load zeros: rows past M
        # (masked at the store and in the BN sums), channels past KG (zero in A and B alike), past CG (not stored).
        tl.static_assert(ONE_TAP)
        dy_desc = tl.make_tensor_descriptor(dy_ptr, shape=[M, KG], strides=[stride_dy_w, 1],
                                            block_shape=[BLOCK_M, BLOCK_K])
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[KG, CG], strides=[stride_w_k, 1],
                                           block_shape=[BLOCK_K, BLOCK_N])
        m0 = pid_m * BLOCK_M
        c0 = (pid % num_n) * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_dtype)
        for kb in range(k_steps(tl.cdiv(KG, BLOCK_K))):
            k0 = kb * BLOCK_K
            acc = mma(dy_desc.load([m0, k0]), w_desc.load([k0, c0]), acc, DOT_PRECISION, UPCAST_DOT)
    else:
        if IDX64:
            dy_rows = dy_ptr + n * stride_dy_n + (g * KG).to(tl.int64) * stride_dy_c + pi * stride_dy_h \
                + qj * stride_dy_w
            w_cols = w_ptr + (g * KG).to(tl.int64) * stride_w_k + offs_cg.to(tl.int64) * stride_w_c
            offs_kk = offs_kk.to(tl.int64)
        else:
            dy_rows = dy_ptr + (n * stride_dy_n + (g * KG) * stride_dy_c + pi * stride_dy_h + qj * stride_dy_w)
            w_cols = w_ptr + ((g * KG) * stride_w_k + offs_cg * stride_w_c)
        # Loop-invariant operand pointers: a step adds one scalar (tap and K-block offset) to each.
        a_base = dy_rows[:, None] + (offs_kk * stride_dy_c)[None, :]
        b_base = w_cols[None, :] + (offs_kk * stride_w_k)[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_dtype)
        # One loop over (tap row jr, tap column js, K block k0), k0 fastest, counters advanced without division.
        k0 = 0
        js = 0
        jr = 0
        if ONE_TAP:  # the one tap's rows and weight offset are loop-invariant
            valid = mask_m & (pi >= 0) & (pi < P) & (qj >= 0) & (qj < Q)
            if IDX64:
                b_tap = R0.to(tl.int64) * stride_w_r + S0.to(tl.int64) * stride_w_s
            else:
                b_tap = R0 * stride_w_r + S0 * stride_w_s
        for _ in range(NR * NS * tl.cdiv(KG, BLOCK_K)):
            mask_kk = (k0 + offs_kk < KG) | EVEN_K
            if ONE_TAP:
                tap_a = 0
                tap_b = b_tap
            else:
                hp = pi - jr * PD
                wq = qj - js * QD
                valid = mask_m & in_range(hp, P) & in_range(wq, Q)
                if IDX64:
                    tap_a = -jr.to(tl.int64) * PD * stride_dy_h - js.to(tl.int64) * QD * stride_dy_w
                    tap_b = (R0 + jr * RSTEP).to(tl.int64) * stride_w_r + (S0 + js * SSTEP).to(tl.int64) * stride_w_s
                else:
                    tap_a = -jr * PD * stride_dy_h - js * QD * stride_dy_w
                    tap_b = (R0 + jr * RSTEP) * stride_w_r + (S0 + js * SSTEP) * stride_w_s
            if IDX64:
                a_off = k0.to(tl.int64) * stride_dy_c + tap_a
                b_off = k0.to(tl.int64) * stride_w_k + tap_b
            else:
                a_off = k0 * stride_dy_c + tap_a
                b_off = k0 * stride_w_k + tap_b
            a = tl.load(a_base + a_off, mask=valid[:, None] & mask_kk[None, :], other=0.0)
            b = tl.load(b_base + b_off, mask=mask_kk[:, None] & mask_c[None, :], other=0.0)
            acc = mma(a, b, acc, DOT_PRECISION, UPCAST_DOT)
            if ONE_TAP:
                k0 += BLOCK_K
            else:
                k0, js, jr = _next_step(k0, js, jr, KG, NS, BLOCK_K)

    h = PH0 + stride_h * i
    w = PW0 + stride_w * j
    if EPI_SPLIT == 1:
        _dx_epilogue(acc, offs_c, mask_c, n, h, w, mask_m, pid_m, dx_ptr, y_ptr, in_scale_ptr, in_shift_ptr, mean_ptr,
                     invstd_ptr, parts_ptr, res_ptr, rmask_ptr, RES_C, C, TILE0, stride_dx_n, stride_dx_c, stride_dx_h,
                     stride_dx_w, stride_y_n, stride_y_c, stride_y_h, stride_y_w, stride_res_n, stride_res_c,
                     stride_res_h, stride_res_w, stride_rmask_n, stride_rmask_c, stride_rmask_h, stride_rmask_w,
                     RES_STRIDE, BN_GRAD, HAS_RESIDUAL, HAS_RES_MASK, ACTIVATION, acc_dtype)
    else:
        # The epilogue over column quarters (the 4-warp descriptor tile with taps, dgrad_prune): each reads its own
        # y, residual and per-channel factors beside the accumulator, a quarter of the registers the whole tile's
        # need (at once, that tile spilled 296-456 B).
        tl.static_assert(EPI_SPLIT == 4 and BLOCK_N >= 4)
        QN: tl.constexpr = BLOCK_N // 4
        halves = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
        for k in tl.static_range(2):
            quarters = tl.split(tl.permute(tl.reshape(halves[k], (BLOCK_M, 2, QN)), (0, 2, 1)))
            for k2 in tl.static_range(2):
                oc = g * CG + (pid % num_n) * BLOCK_N + (2 * k + k2) * QN + tl.arange(0, QN)
                _dx_epilogue(quarters[k2], oc, oc < g * CG + CG, n, h, w, mask_m, pid_m, dx_ptr, y_ptr, in_scale_ptr,
                             in_shift_ptr, mean_ptr, invstd_ptr, parts_ptr, res_ptr, rmask_ptr, RES_C, C, TILE0,
                             stride_dx_n, stride_dx_c, stride_dx_h, stride_dx_w, stride_y_n, stride_y_c, stride_y_h,
                             stride_y_w, stride_res_n, stride_res_c, stride_res_h, stride_res_w, stride_rmask_n,
                             stride_rmask_c, stride_rmask_h, stride_rmask_w, RES_STRIDE, BN_GRAD, HAS_RESIDUAL,
                             HAS_RES_MASK, ACTIVATION, acc_dtype)


@triton.jit
def _dx_epilogue(acc, offs_c, mask_c, n, h, w, mask_m, pid_m, dx_ptr, y_ptr, in_scale_ptr, in_shift_ptr, mean_ptr,
                 invstd_ptr, parts_ptr, res_ptr, rmask_ptr, RES_C, C, TILE0, stride_dx_n, stride_dx_c, stride_dx_h,
                 stride_dx_w, stride_y_n, stride_y_c, stride_y_h, stride_y_w, stride_res_n, stride_res_c, stride_res_h,
                 stride_res_w, stride_rmask_n, stride_rmask_c, stride_rmask_h, stride_rmask_w, RES_STRIDE,
                 BN_GRAD: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_RES_MASK: tl.constexpr,
                 ACTIVATION: tl.constexpr, acc_dtype: tl.constexpr):
    """dx of a tile's columns offs_c (acc [BLOCK_M, len(offs_c)]): the BN-ReLU gate and that BN's partial sums
    (BN_GRAD), + the residual gradient, the store."""
    msk = mask_m[:, None] & mask_c[None, :]
    if BN_GRAD:
        scale = tl.load(in_scale_ptr + offs_c, mask=mask_c, other=0.0).to(acc_dtype)
        shift = tl.load(in_shift_ptr + offs_c, mask=mask_c, other=0.0).to(acc_dtype)
        mean = tl.load(mean_ptr + offs_c, mask=mask_c, other=0.0).to(acc_dtype)
        invstd = tl.load(invstd_ptr + offs_c, mask=mask_c, other=0.0).to(acc_dtype)
        y = tl.load(tile_ptrs(y_ptr, n, h, w, offs_c, stride_y_n, stride_y_c, stride_y_h, stride_y_w), mask=msk,
                    other=0.0).to(acc_dtype)
        # the pre-activation, the forward prologue's expression in fp32 (of the factors it applied: a bf16 chain's
        # are rounded to bf16, fusedres/chain.py _finalize), so the gate opens where the forward's activation is > 0
        acc = activation_grad(acc, y * scale[None, :] + shift[None, :], ACTIVATION)
        # Reduce what is stored (rounded to the activation dtype), so that the BN backward applied to
        # the stored gradient removes exactly its own mean and xhat components.
        acc = tl.where(msk, acc.to(dx_ptr.dtype.element_ty).to(acc_dtype), 0.0)
        part = parts_ptr + (TILE0 + pid_m).to(tl.int64) * (2 * C) + offs_c
        tl.store(part, tl.sum(acc, axis=0), mask=mask_c)
        tl.store(part + C, tl.sum(acc * (y - mean[None, :]) * invstd[None, :], axis=0), mask=mask_c)
    if HAS_RESIDUAL:
        on_grid = (h % RES_STRIDE == 0) & (w % RES_STRIDE == 0)
        r_msk = (mask_m & on_grid)[:, None] & (mask_c & (offs_c < RES_C))[None, :]
        hr = h // RES_STRIDE
        wr = w // RES_STRIDE
        res = tl.load(tile_ptrs(res_ptr, n, hr, wr, offs_c, stride_res_n, stride_res_c, stride_res_h, stride_res_w),
                      mask=r_msk, other=0.0).to(acc_dtype)
        if HAS_RES_MASK:
            res = activation_grad(res, tl.load(tile_ptrs(rmask_ptr, n, hr, wr, offs_c, stride_rmask_n, stride_rmask_c,
                                                         stride_rmask_h, stride_rmask_w), mask=r_msk, other=0.0),
                                  ACTIVATION)
        acc += res
    tl.store(tile_ptrs(dx_ptr, n, h, w, offs_c, stride_dx_n, stride_dx_c, stride_dx_h, stride_dx_w),
             acc.to(dx_ptr.dtype.element_ty), mask=msk)


@triton.jit
def _next_step(k0, js, jr, KG, NS, BLOCK_K: tl.constexpr):
    """The loop's next (K block, tap column, tap row), K blocks fastest, advanced by selects (no division)."""
    k0 += BLOCK_K
    wrap = k0 >= KG
    k0 = tl.where(wrap, 0, k0)
    js += wrap.to(tl.int32)
    wrap2 = js >= NS
    js = tl.where(wrap2, 0, js)
    jr += wrap2.to(tl.int32)
    return k0, js, jr


# ----------------------------------------------------------------------------------------------
# Phases and launcher
# ----------------------------------------------------------------------------------------------

def _axis_phases(size: int, k: int, stride: int, pad: int, dil: int):
    """Per phase a of one axis: (a, pixels, (first tap, tap step, taps, dy row base, dy row step))."""
    phases = []
    for a in range(stride):
        taps = [t for t in range(k) if (a + pad - t * dil) % stride == 0]
        step = taps[1] - taps[0] if len(taps) > 1 else 1
        t0 = taps[0] if taps else 0
        phases.append((a, max(0, cdiv(size - a, stride)),
                       (t0, step, len(taps), (a + pad - t0 * dil) // stride, step * dil // stride)))
    return phases


# The kernel's tap arguments of one phase, as _axis_phases gives them per axis.
_TAPS_H = ("R0", "RSTEP", "NR", "PB", "PD")
_TAPS_W = ("S0", "SSTEP", "NS", "QB", "QD")


def dgrad_phases(x_shape, w_shape, stride, padding, dilation):
    """[(h phase, w phase), (pixels along h, along w), h taps, w taps] for every non-empty phase."""
    _, _, h, w = x_shape
    _, _, r, s = w_shape
    return [((ah, aw), (hp, wp), th, tw)
            for ah, hp, th in _axis_phases(h, r, stride[0], padding[0], dilation[0])
            for aw, wp, tw in _axis_phases(w, s, stride[1], padding[1], dilation[1]) if hp > 0 and wp > 0]


def dgrad_flops(x_shape, w_shape, stride, padding, dilation, groups):
    """(issued, useful) MMA FLOPs of a dgrad, counted per pixel (tile padding aside): issued by the
    phase launches; useful = the forward conv's 2*N*P*Q*K*(C/groups)*R*S. Equal at ResNet shapes (even
    sizes, "same" padding); issued is larger only by border rows that some tap cannot reach (an
    unpadded conv, or a dilated strided one whose taps reach few rows of a phase)."""
    n, c, h, w = x_shape
    k, cg, r, s = w_shape
    p, q = out_size(h, r, stride[0], padding[0], dilation[0]), out_size(w, s, stride[1], padding[1], dilation[1])
    issued = sum(2 * n * hp * wp * th[2] * tw[2] * k * cg
                 for _, (hp, wp), th, tw in dgrad_phases(x_shape, w_shape, stride, padding, dilation))
    return issued, 2 * n * p * q * k * cg * r * s


def gpu_configs(arch: int = None):
    """Every config the dgrad autotuner may pick on an arch (all of them when arch is None)."""
    return tile_configs(arch_tiles(DGRAD_TILES, arch))


def _even_k(args) -> bool:
    return args["KG"] % args["BLOCK_K"] == 0


def _tile_w(args) -> int:
    """TILE_W: spatial tiles (SPATIAL_TILE_W columns) for a descriptor launch with taps; else 0 (flat tiles)."""
    return min(SPATIAL_TILE_W, args["BLOCK_M"]) if args.get("TMA") and not args["ONE_TAP"] else 0


def _w_as_a(args) -> bool:
    """W_AS_A: a descriptor launch with taps (TILE_W) whose channel blocks are whole and whose weights are dense
    channels_last rows ([KG, NR*NS*CG]: stride_w_s == CG)."""
    return bool(_tile_w(args)) and args["CG"] % args["BLOCK_N"] == 0 and args["stride_w_s"] == args["CG"]


def phase_tiles(meta) -> int:
    """A phase launch's pixel tiles: BLOCK_M runs of its M pixels, or (TILE_W) spatial tiles per image."""
    bm, tw = meta["BLOCK_M"], _tile_w(meta)
    if not tw:
        return cdiv(meta["M"], bm)
    return meta["M"] // (meta["HP"] * meta["WP"]) * cdiv(meta["HP"], bm // tw) * cdiv(meta["WP"], tw)


# per launch and tile
_conv_dgrad = triton.heuristics({"EVEN_K": _even_k, "TILE_W": _tile_w, "W_AS_A": _w_as_a})(_conv_dgrad_kernel)
# Per-shape config cache (the autotuner's, keyed below). The result may alias the residual (in-place
# accumulation): the autotuner restores dx after every timed run, so each config sees the same input.
_KEY = ["M", "HP", "WP", "P", "Q", "CG", "KG", "NR", "NS", "BN_GRAD", "HAS_RESIDUAL", "HAS_RES_MASK", "ACTIVATION",
        "IDX64"]
_conv_dgrad_autotuned = triton.autotune(
    configs=gpu_configs(), key=_KEY,
    prune_configs_by={"early_config_prune": dgrad_prune}, restore_value=["dx_ptr"], **autotune_options(),
)(_conv_dgrad)
# Launches that dgrad_tma_eligible admits: the descriptor tile in place of its pointer twin (dgrad_prune; sm_90
# only), an autotuner of their own, as eligibility (strides, alignment) is not in the tuning key.
# The BN partials too: a launch with taps sizes them for spatial tiles, zeroed, of which flat configs write fewer rows.
_conv_dgrad_tma_autotuned = triton.autotune(
    configs=gpu_configs() + dgrad_tma_configs(), key=_KEY,
    prune_configs_by={"early_config_prune": dgrad_prune}, restore_value=["dx_ptr", "parts_ptr"], **autotune_options(),
)(_conv_dgrad)


def conv_dgrad(dy, weight, x_shape, stride, padding, dilation, groups, residual=None, out=None, config=None, *,
               activation="relu"):
    """Gradient w.r.t. the conv input, [N, C, H, W] in dy's memory format.

    residual: (res, act_out or None, res_stride): adds res at stride res_stride, gated by the gradient of
    ``activation`` (kernels/_launch.py ACTIVATIONS) at its output act_out when given (ReLU: act_out > 0).
    out: write into this tensor (it may be res itself: in-place accumulation is safe).
    config: optional dict of BLOCK_M/BLOCK_N/BLOCK_K (+ num_warps/num_stages).
    """
    return _dgrad(dy, weight, x_shape, stride, padding, dilation, groups, None, residual, out, config, activation).dx


def conv_dgrad_bn(dy, weight, x_shape, stride, padding, dilation, groups, bn_act, residual=None, out=None,
                  config=None, *, activation="relu") -> "DgradBN":
    """``conv_dgrad`` through a previous BN and activation: bn_act = (y, scale, shift, mean, invstd) when the
    conv input was act(scale*y + shift), act the ``activation`` (kernels/_launch.py ACTIVATIONS; it gates the
    residual too). Returns the activation-gated gradient w.r.t. bn(y) and that BN's sums."""
    return _dgrad(dy, weight, x_shape, stride, padding, dilation, groups, bn_act, residual, out, config, activation)


def _dgrad(dy, weight, x_shape, stride, padding, dilation, groups, bn_act, residual, out, config, activation):
    """The launches of conv_dgrad / conv_dgrad_bn: a DgradBN, whose sums are None without bn_act."""
    n, c, h, w = x_shape
    k, cg, r, s = weight.shape
    p, q = dy.shape[2:]
    dx = empty_activation(dy, (n, c, h, w)) if out is None else out
    kg = k // groups
    phases = dgrad_phases(x_shape, weight.shape, stride, padding, dilation)
    cfg = dict(config) if config is not None else dgrad_fixed_config(n * h * w, cg, kg)
    bm = DGRAD_BLOCK_M if cfg is None else cfg["BLOCK_M"]
    y, in_scale, in_shift, mean, invstd = bn_act if bn_act is not None else (dx, dx, dx, dx, dx)
    res, rmask, res_stride = residual if residual is not None else (dx, None, 1)
    activation = check_activation(activation)
    if activation == "none":
        rmask = None  # no gate to read
    elif bn_act is None and rmask is None:
        activation = "none"  # no site applies it: one compiled variant
    rmask_t = rmask if rmask is not None else res
    idx64 = max(max_offset(t) for t in (dy, weight, dx, y, res, rmask_t)) >= 2**31 - 1
    # the descriptor path (issue 17 item 3): a stride-1 launch's operands (one phase): 1x1, or taps over spatial tiles
    tma = tma_wanted(dy) and dgrad_tma_eligible(dy, weight, stride, padding, groups, idx64, dilation)
    cfg = tma_config(cfg, tma)
    spatial = tma and r * s > 1 and (cfg is None or bool(cfg.get("TMA")))  # autotuned: spatial or flat tiles
    tiles = [phase_tiles(dict(M=n * hp * wp, HP=hp, WP=wp, BLOCK_M=bm, TMA=spatial, ONE_TAP=False))
             for _, (hp, wp), _, _ in phases]  # spatial tiles are at least as many as flat ones
    alloc = torch.zeros if spatial and cfg is None else torch.empty  # flat configs write fewer rows: 0 in the rest
    parts = alloc((sum(tiles), 2 * c), device=dy.device, dtype=stats_dtype(dy)) if bn_act is not None else dx
    args = dict(dy_ptr=dy, w_ptr=weight, dx_ptr=dx, y_ptr=y, in_scale_ptr=in_scale, in_shift_ptr=in_shift,
                mean_ptr=mean, invstd_ptr=invstd, parts_ptr=parts, res_ptr=res, rmask_ptr=rmask_t, P=p, Q=q, CG=cg,
                KG=kg, RES_C=res.shape[1], C=c, **stride_args("dy", dy), **stride_args("w", weight, "kcrs"),
                **stride_args("dx", dx), **stride_args("y", y), **stride_args("res", res),
                **stride_args("rmask", rmask_t), stride_h=stride[0], stride_w=stride[1], RES_STRIDE=res_stride,
                BN_GRAD=bn_act is not None, HAS_RESIDUAL=residual is not None, HAS_RES_MASK=rmask is not None,
                ACTIVATION=activation, IDX64=idx64, **dot_args(dy),
                ACC_FP64=dy.dtype == torch.float64)
    tile0 = 0
    for ((ah, aw), (hp, wp), th, tw), t in zip(phases, tiles):
        if t == 0:
            continue

        phase = dict(M=n * hp * wp, HP=hp, WP=wp, PH0=ah, PW0=aw, TILE0=tile0, **dict(zip(_TAPS_H, th)),
                     **dict(zip(_TAPS_W, tw)), ONE_TAP=th[2] <= 1 and tw[2] <= 1)

        def grid(meta):  # meta: every bound argument of the launch (the phase's, the config's) included
            return (phase_tiles(meta) * cdiv(cg, meta["BLOCK_N"]), groups)

        with device_guard(dy), descriptor_scratch(dy if tma else None):
            if cfg is None:
                launch_tuned(_conv_dgrad_tma_autotuned if tma else _conv_dgrad_autotuned, grid, {**args, **phase})
            else:
                _conv_dgrad[grid](**args, **phase, **cfg)
        tile0 += t
    if bn_act is None:
        return DgradBN(dx, None, None)
    if tile0 == 0:
        zeros = torch.zeros(c, device=dy.device, dtype=parts.dtype)
        return DgradBN(dx, zeros, zeros.clone())
    sum_g, sum_gx = sum_rows(parts).view(2, c).unbind(0)
    return DgradBN(dx, sum_g, sum_gx)


class DgradBN(NamedTuple):
    """What ``conv_dgrad_bn`` returns: the gradient w.r.t. bn(y) (activation-gated) and the BN reductions."""
    dx: torch.Tensor         # [N, C, H, W], dy's memory format
    sum_g: torch.Tensor      # [C] sum of the gated gradient
    sum_gxhat: torch.Tensor  # [C] sum of the gated gradient times xhat
