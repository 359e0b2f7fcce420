"""The one convolution kernel: implicit GEMM over NHWC with constexpr-selected prologue and epilogue.

GEMM view of a conv: M = N*P*Q output pixels, N-dim = K output channels (per group), reduction =
R*S*C (per group). The reduction loops (r, s) outside and C-blocks inside, so no div/mod runs in
the inner loop, and with channels_last activations each A-tile row is a contiguous run of channels.

ACTIVATION ("relu" or "none", kernels/_launch.py ACTIVATIONS; the helper _tiles.activation) is the conv's one
activation: the prologue's and, with EPILOGUE_ACT, the epilogue's.

Prologue (PROLOGUE_BN, training): the input is the previous conv's raw output y; each loaded A tile
becomes act(in_scale[c] * y + in_shift[c]), so the normalized activation never touches memory. Zero
padding belongs to the activated tensor: out-of-bounds taps are 0 after the transform.

Epilogue, all in fp32 (fp64 for fp64 inputs), then one cast and store:
    y = scale[k] * acc + shift[k]                         per-channel affine (none: y = acc); an eval BN comes
                                                          folded by the host (fusedres/_fold.py: once per module)
    y += scale_d[k] * (xd conv1x1 wd)[k] + shift_d[k]     HAS_SHORTCUT: projection shortcut, a 2nd GEMM into
                                                          the same accumulator, its per-channel factors
                                                          folded by the host too (projection_fold)
    y += residual[k]   for k < RES_C                      HAS_RESIDUAL: identity / option-A shortcut
    y = act(y)                                            EPILOGUE_ACT: ACTIVATION (ReLU NaN-propagating)
    STATS: per-tile per-channel mean and M2 of acc into [num_m_tiles, K] fp32 (training BN statistics)
"""
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ._conv_configs import (
    SPATIAL_TILE_W,
    STATS_BLOCK_M,
    autotune_options,
    conv_fixed_config,
    conv_prune,
    gpu_configs,
    persistent_programs,
    persistent_wanted,
    stem_block_k,
    tma_configs,
    tma_eligible,
    tma_mode,
    tma_rows,
)
from ._launch import (
    INTERPRETED,
    STEM_CPAD,
    activation_of,
    cdiv,
    check_activation,
    descriptor_scratch,
    device_guard,
    dot_precision,
    empty_activation,
    launch_tuned,
    out_size,
    pad_channels_nhwc,
    prologue_math,
    rows_need_int64,
    stats_dtype,
    target_arch,
    upcast_dot,
)
from ._tiles import (
    activation,
    add_residual_act_store,
    bn_act,
    in_range,
    k_steps,
    mma,
    pixel_rows,
    tap_bits,
    tap_keep,
    tile_mean_m2,
    zero_where_not,
)


# Stride and padding only shift per-tile row bases (R and S are constexpr): a specialized value (== 1, a multiple of
# 16) would compile a variant of its own. Dilation stays specialized: 1 in every ResNet (no extra variant), and
# without it the stem's STATS tile spilled 16 B on sm_80.
@triton.jit(do_not_specialize=["stride_h", "stride_w", "pad_h", "pad_w", "stride_d"])
def _conv_bn_act_kernel(
    x_ptr,        # input activations, logical [N, C, H, W], any strides
    w_ptr,        # weights [K, C/groups, R, S], any strides (channels_last is the fast one)
    scale_ptr,    # [K] per-output-channel multiplier (None: 1)
    shift_ptr,    # [K] per-output-channel offset (None: 0)
    out_ptr,      # output [N, K, P, Q], any strides
    res_ptr,      # residual [N, RES_C, P, Q] (HAS_RESIDUAL), any strides
    xd_ptr,       # shortcut input [N, CD, HD, WD] (HAS_SHORTCUT), any strides
    wd_ptr,       # shortcut 1x1 weights [K, CD, 1, 1] (HAS_SHORTCUT)
    in_scale_ptr,  # [C] prologue BN multiplier of the input (PROLOGUE_BN)
    in_shift_ptr,  # [C] prologue BN offset of the input (PROLOGUE_BN)
    part_mean_ptr,  # [num_m_tiles, K] fp32 per-tile channel means of acc (STATS)
    part_m2_ptr,    # [num_m_tiles, K] fp32 per-tile channel sums of squared deviations (STATS)
    fold_ptr,       # [4, K] (HAS_SHORTCUT): the projection's per-channel ratio, offset, multiplier, live
    M, H, W, P, Q,          # M = N*P*Q output pixels; input H x W; output P x Q
    CG, KG,                 # input and output channels per group
    RES_C, CD,              # residual channels (<= K); shortcut input channels
    stride_x_n, stride_x_c, stride_x_h, stride_x_w,     # strides of x
    stride_w_k, stride_w_c, stride_w_r, stride_w_s,     # strides of w
    stride_out_n, stride_out_c, stride_out_h, stride_out_w,     # strides of out
    stride_res_n, stride_res_c, stride_res_h, stride_res_w,     # strides of residual
    stride_sc_n, stride_sc_c, stride_sc_h, stride_sc_w,     # strides of xd
    stride_wd_k, stride_wd_c,             # strides of wd (output, input channel)
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    stride_d,               # shortcut conv stride (both axes)
    R: tl.constexpr, S: tl.constexpr,          # filter size
    HAS_SCALE: tl.constexpr,       # apply scale/shift (False: the raw conv, e.g. STATS convs; unused with a shortcut)
    HAS_RESIDUAL: tl.constexpr, HAS_SHORTCUT: tl.constexpr,
    ACTIVATION: tl.constexpr,      # "relu" or "none": the activation of the prologue and (EPILOGUE_ACT) the output
    EPILOGUE_ACT: tl.constexpr,    # apply ACTIVATION to the output (after the residual)
    PROLOGUE_BN: tl.constexpr,     # the input is raw y: the A tile becomes ACTIVATION(in_scale * y + in_shift)
    STATS: tl.constexpr,
    STEM_CPAD: tl.constexpr,       # 0, or the padded channel count of the stem path (see the main loop)
    EVEN_C: tl.constexpr,          # CG % BLOCK_K == 0: no channel mask in the main loop (_even_c, per launch)
    IDX64: tl.constexpr,           # pixel indices may pass int32: split them in int64 (_tiles.pixel_rows, per launch)
    DOT_PRECISION: tl.constexpr,   # "ieee" or "tf32" for fp32 operands (follows cudnn.allow_tf32)
    UPCAST_DOT: tl.constexpr,      # interpreter + bf16: its bf16 tl.dot is wrong, dot in fp32 instead
    ACC_FP64: tl.constexpr,        # fp64 inputs accumulate in fp64 (gradcheck, references)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    TMA: tl.constexpr = False,     # a config switch: operands through tensor descriptors (_conv_configs.tma_eligible)
    PROLOGUE_MATH: tl.constexpr = "acc",  # the prologue's arithmetic: _tiles.bn_act's MATH (_launch.prologue_math)
    IN_BOUNDS: tl.constexpr = False,  # every tap of every pixel lies inside the input (1x1, no padding): no pad select
    TILE_W: tl.constexpr = 0,      # TMA with taps, no STATS: spatial tiles of BLOCK_M // TILE_W rows x TILE_W columns
    OUT_DESC: tl.constexpr = False,  # 1x1 TMA, out (and residual) dense [M, K]: the epilogue's descriptors (_out_desc)
    PERSISTENT: tl.constexpr = False,  # 1x1 TMA: a program per SM walks the tiles (_persistent)
    PTX: tl.constexpr = False,     # a GPU target (not the interpreter): the descriptor epilogue's ReLU as inline PTX
    STRIDE2: tl.constexpr = False,  # TILE_W at stride 2: x through its parity view (_descriptors, _stride2)
    W_AS_A: tl.constexpr = False,  # TMA with taps: the MMA computes acc.T = w @ x.T, both operands from shared memory
):
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    g = tl.program_id(1)  # axis 1 is the group
    num_n = tl.cdiv(KG, BLOCK_N)
    # Axis 0 walks the (m-tile, n-tile) grid, n fastest: neighbouring programs share the A tile, and the weights
    # (at most a few MB in a ResNet) stay in L2. One tile per program, or (PERSISTENT: as many programs as SMs) a
    # stride through the tiles: the device-side descriptors (global scratch) and the kernel's setup are then paid
    # once per program, not per tile.
    if PERSISTENT:
        tl.static_assert(TMA and not TILE_W)
        descs = _descriptors(x_ptr, w_ptr, out_ptr, res_ptr, M, H, W, P, Q, CG, KG, RES_C, stride_x_n, stride_x_h,
                             stride_x_w, stride_w_k, stride_w_s, stride_out_w, stride_res_w, R, S, HAS_RESIDUAL,
                             OUT_DESC, TILE_W, BLOCK_M, BLOCK_N, BLOCK_K, STRIDE2, W_AS_A)
        x_desc, w_desc, out_desc, res_desc = descs
        first = tl.program_id(0)
        last = tl.cdiv(M, BLOCK_M) * num_n
        step = tl.num_programs(0)
    else:  # constant bounds: the one-trip loop folds away at compile time (no loop in the IR)
        first = 0
        last = 1
        step = 1
    for t in tl.range(first, last, step, flatten=False):
        tile = t if PERSISTENT else tl.program_id(0)
        pid_m = tile // num_n
        pid_n = tile % num_n
        if TILE_W:
            n, p, q, mask_m, n_img, p0, q0 = spatial_rows(pid_m, P, Q, BLOCK_M, TILE_W)
        else:
            offs_m, n, p, q, mask_m = pixel_rows(pid_m, M, P, Q, BLOCK_M, IDX64)
        offs_ng = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                        # channel within group
        offs_n = g * KG + offs_ng                                                # global output channel
        mask_n = offs_ng < KG
        offs_c = tl.arange(0, BLOCK_K).to(tl.int64)  # channel * channel-stride can pass 2**31 (NCHW)

        # Row bases: each output pixel's input offset and coordinates at tap (0, 0); a tap adds a scalar.
        h0 = p * stride_h - pad_h
        w0 = q * stride_w - pad_w
        if TMA:
            # Stride 1 over dense rows (the host checked: tma_eligible), one group: x is [M, CG] with row stride
            # stride_x_w, channel-contiguous and 16-byte aligned. A 1x1 conv is a plain GEMM with w as [KG, CG].
            # With taps, "same" padding makes P, Q = H, W, so tap (r, s) is the row shift
            # (r - pad_h) * W + (s - pad_w) of the output pixel tile: rows that leave the image (a row above or
            # below, or a column wrapped to the next row) are masked in registers below, and w is [KG, R*S, CG]
            # (channels_last weights: dense taps). The device-side descriptors (global scratch: the launcher's
            # allocator) load zeros out of bounds, negative coordinates included: rows outside [0, M) and channels
            # past CG (zero in A and B alike). TILE_W (eval: no STATS, whose partials are one per BLOCK_M flat
            # pixels): x is [N, H, W, CG] and a tile an image's TILE_H x TILE_W output pixels; a tap moves the box,
            # the descriptor zero-fills every pixel outside the image (padding), so the tile needs no mask (Triton
            # reshapes the box to [BLOCK_M, BLOCK_K] in registers). STRIDE2 (stride 2, eval): the same tiles over x's
            # parity view (_descriptors).
            tl.static_assert(not STEM_CPAD and not (TILE_W and STATS))
            if not PERSISTENT:
                descs = _descriptors(x_ptr, w_ptr, out_ptr, res_ptr, M, H, W, P, Q, CG, KG, RES_C, stride_x_n,
                                     stride_x_h, stride_x_w, stride_w_k, stride_w_s, stride_out_w, stride_res_w, R, S,
                                     HAS_RESIDUAL, OUT_DESC, TILE_W, BLOCK_M, BLOCK_N, BLOCK_K, STRIDE2, W_AS_A)
                x_desc, w_desc, out_desc, res_desc = descs
            m0 = pid_m * BLOCK_M
            n0 = pid_n * BLOCK_N
            num_k = R * S * tl.cdiv(CG, BLOCK_K)
        elif STEM_CPAD:
            # Stem path (C <= 4): x is NHWC with STEM_CPAD channels and w is [K, R, BLOCK_K // STEM_CPAD,
            # STEM_CPAD] (its filter rows zero-padded past S), both dense,
            # so one filter row (r) reads a contiguous run of S * STEM_CPAD values per pixel: R K-steps of one
            # block each, instead of R*S, and constexpr strides and masks let the loads vectorize. The host
            # copied x with the conv's padding in place (pad_h = pad_w = 0 here): every tap is inside the copy,
            # so the mask (rows past M, columns past S * STEM_CPAD) is loop-invariant and a step adds one offset.
            tl.static_assert(BLOCK_K >= S * STEM_CPAD)
            x_rows = x_ptr + ((n * H + h0) * W + w0) * STEM_CPAD
            w_cols = w_ptr + offs_n.to(tl.int64) * (R * BLOCK_K)  # w's rows padded to BLOCK_K with zeros (host)
            num_k = R
        else:
            x_rows = x_ptr + (n * stride_x_n + (g * CG).to(tl.int64) * stride_x_c + h0 * stride_x_h + w0 * stride_x_w)
            w_cols = w_ptr + offs_n.to(tl.int64) * stride_w_k
            # Loop-invariant operand pointers: a step adds one scalar (tap and channel-block offset) to each.
            a_base = x_rows[:, None] + offs_c[None, :] * stride_x_c
            b_base = w_cols[None, :] + offs_c[:, None] * stride_w_c
            num_k = R * S * tl.cdiv(CG, BLOCK_K)
        h0 = h0.to(tl.int32)
        w0 = w0.to(tl.int32)
        if IN_BOUNDS:
            valid_1x1 = mask_m
        else:
            valid_1x1 = mask_m & (h0 >= 0) & (h0 < H) & (w0 >= 0) & (w0 < W)  # a 1x1 filter's one tap: loop-invariant
        if W_AS_A:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=acc_dtype)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_dtype)
        # One flattened loop over (r, s, channel block), channel blocks fastest: a single software pipeline
        # across all taps (a nested loop drains it at every tap). The tap counters advance by selects, so
        # no division runs in the loop.
        FLAT_TAPS: tl.constexpr = TMA and R * S > 1 and not TILE_W  # the STATS tile: flat rows, shifted per tap
        if FLAT_TAPS:
            tb = tap_bits(h0, w0, H, W, dil_h, dil_w, offs_m < 0, x_ptr, R, S)
        r = 0
        s = 0
        c0 = 0
        for _ in range(k_steps(num_k)):  # (num_k >= 1: _even_c keeps CG = 0 masked)
            dh = r * dil_h
            h = h0 + dh
            if TMA:
                cc = c0 + offs_c
                mask_c = (cc < CG) | EVEN_C
                if R * S == 1:
                    a = x_desc.load([m0, c0])
                    b = w_desc.load([n0, c0]).T
                else:
                    w_in = w0 + s
                    # padding only: rows past M are never stored nor counted in STATS (as in the 1x1 case below)
                    a_mask = (in_range(h, H) & in_range(w_in, W))[:, None]
                    if STRIDE2:  # input row 2p + r - pad_h = 2 (p + dr) + (its parity): dr by an arithmetic shift
                        dr = r - pad_h
                        ds = s - pad_w
                        a = x_desc.load([n_img, p0 + (dr >> 1), dr & 1, q0 + (ds >> 1), (ds & 1) * CG + c0])
                        a = a.reshape(BLOCK_M, BLOCK_K)
                    elif TILE_W:
                        a = x_desc.load([n_img, p0 + r - pad_h, q0 + s - pad_w, c0]).reshape(BLOCK_M, BLOCK_K)
                    else:
                        a = x_desc.load([m0 + (r - pad_h) * W + (s - pad_w), c0])
                        a_mask = tap_keep(tb, r, s, R)  # (tap_bits: the MMA operand's layout)
                        if not PROLOGUE_BN:  # 16-bit x: one and.b32 per pair on a GPU
                            a = zero_where_not(a, a_mask, "packed" if PTX else "acc")
                    if W_AS_A:
                        b = w_desc.load([n0, (r * S + s) * CG + c0])  # [BLOCK_N, BLOCK_K]: the A operand
                    else:
                        b = w_desc.load([n0, r * S + s, c0]).reshape(BLOCK_N, BLOCK_K).T
            elif STEM_CPAD:
                cc = offs_c
                mask_c = cc < S * STEM_CPAD
                a_mask = mask_m[:, None] & mask_c[None, :]
                a = tl.load(x_rows[:, None] + (dh.to(tl.int64) * (W * STEM_CPAD) + cc[None, :]), mask=a_mask, other=0.0)
                # whole rows of w (zero past S): 16-byte loads; x's columns past S stay masked (a NaN there
                # would meet a zero weight)
                b = tl.load(w_cols[None, :] + (r.to(tl.int64) * BLOCK_K + cc[:, None]), mask=mask_n[None, :], other=0.0)
            else:
                cc = c0 + offs_c
                mask_c = (cc < CG) | EVEN_C  # EVEN_C (CG % BLOCK_K == 0): no channel mask to compute
                c_off = c0.to(tl.int64)
                if R * S == 1:  # a plain GEMM over channel blocks: no tap to track
                    a_mask = valid_1x1[:, None] & mask_c[None, :]
                    a_off = c_off * stride_x_c
                    b_off = c_off * stride_w_c
                else:
                    dw = s * dil_w
                    w_in = w0 + dw
                    valid = mask_m & in_range(h, H) & in_range(w_in, W)
                    a_mask = valid[:, None] & mask_c[None, :]
                    a_off = dh.to(tl.int64) * stride_x_h + dw.to(tl.int64) * stride_x_w + c_off * stride_x_c
                    b_off = r.to(tl.int64) * stride_w_r + s.to(tl.int64) * stride_w_s + c_off * stride_w_c
                a = tl.load(a_base + a_off, mask=a_mask, other=0.0)
                b_ptrs = b_base + b_off
            if PROLOGUE_BN:
                s_in = tl.load(in_scale_ptr + g * CG + cc, mask=mask_c, other=0.0)
                t_in = tl.load(in_shift_ptr + g * CG + cc, mask=mask_c, other=0.0)
                a_act = bn_act(a, s_in, t_in, ACTIVATION, PROLOGUE_MATH)
                if (TMA and R * S == 1) or IN_BOUNDS:
                    # no padding (a 1x1 conv without it, TMA included): channels past CG read act(0 * 0 + 0) = 0, and
                    # rows past M (act(shift)) are never stored nor counted in STATS
                    a = a_act
                else:
                    a = zero_where_not(a_act, a_mask, PROLOGUE_MATH)  # pad the activated tensor
            if not (TMA or STEM_CPAD):
                b = tl.load(b_ptrs, mask=mask_c[:, None] & mask_n[None, :], other=0.0)
            if W_AS_A:
                acc = mma(b, a.T, acc, DOT_PRECISION, UPCAST_DOT)
            else:
                acc = mma(a, b, acc, DOT_PRECISION, UPCAST_DOT)
            if STEM_CPAD:
                r += 1
            elif R * S == 1:
                c0 += BLOCK_K
            else:
                c0 += BLOCK_K
                next_s = c0 >= CG
                c0 = tl.where(next_s, 0, c0)
                s = tl.where(next_s, s + 1, s)
                next_r = s == S
                s = tl.where(next_r, 0, s)
                r = tl.where(next_r, r + 1, r)

        if W_AS_A:
            acc = tl.trans(acc)
        if HAS_SHORTCUT:
            # Projection shortcut (1x1 conv, stride stride_d, no padding, its own BN) so the block tail is one
            # launch, on one accumulator whose operands go from memory to the MMA untouched (cp.async, pipelined):
            #   scale * acc + shift + scale_d * acc_d + shift_d = mult * (ratio * acc + offset + acc_d)
            # with the per-channel (ratio, offset, mult, live) folded by the host (projection_fold): two live
            # accumulators, or scale_d folded into each B tile, spilled.
            tl.static_assert(not STATS)  # STATS reads the raw main accumulator
            k_all = KG * tl.num_programs(1)
            ratio = tl.load(fold_ptr + offs_n, mask=mask_n, other=0.0).to(acc_dtype)
            offset = tl.load(fold_ptr + k_all + offs_n, mask=mask_n, other=0.0).to(acc_dtype)
            acc = acc * ratio[None, :] + offset[None, :]
            live_d = tl.load(fold_ptr + 3 * k_all + offs_n, mask=mask_n, other=0.0) != 0  # shortcut columns read
            if TMA:
                # within the 4-warp descriptor tile's registers (128 x 128 x 64: 255, 0 spilled; 160 B with int64
                # offsets and BLOCK_K-wide steps): half-width channel steps on int32 offsets (tma_eligible: xd and wd
                # have fewer than 2**31 elements). A strided conv in general, so pointers, not a descriptor; its B
                # tile keeps the live mask (projection_fold), which a descriptor load could not apply without a
                # register round trip.
                SC_K: tl.constexpr = BLOCK_K // 2 if BLOCK_K >= 32 else BLOCK_K
                ad_rows = xd_ptr + (n.to(tl.int32) * stride_sc_n + (p.to(tl.int32) * stride_d) * stride_sc_h
                                    + (q.to(tl.int32) * stride_d) * stride_sc_w)
                bd_cols = wd_ptr + offs_n * stride_wd_k
                sc_c = tl.arange(0, SC_K)
            else:
                SC_K: tl.constexpr = BLOCK_K
                ad_rows = xd_ptr + (n * stride_sc_n + (p * stride_d) * stride_sc_h + (q * stride_d) * stride_sc_w)
                bd_cols = wd_ptr + offs_n.to(tl.int64) * stride_wd_k
                sc_c = offs_c
            for c0 in range(0, CD, SC_K):
                cc = c0 + sc_c
                mask_c = cc < CD
                a = tl.load(ad_rows[:, None] + cc[None, :] * stride_sc_c, mask=mask_m[:, None] & mask_c[None, :],
                            other=0.0)
                b = tl.load(bd_cols[None, :] + cc[:, None] * stride_wd_c, mask=mask_c[:, None] & live_d[None, :],
                            other=0.0)
                acc = mma(a, b, acc, DOT_PRECISION, UPCAST_DOT)
            y = acc * tl.load(fold_ptr + 2 * k_all + offs_n, mask=mask_n, other=0.0).to(acc_dtype)[None, :]
        elif HAS_SCALE:
            scale, shift = channel_affine(offs_n, mask_n, scale_ptr, shift_ptr, acc_dtype)
            y = acc * scale[None, :] + shift[None, :]
        else:
            y = acc

        if STATS:
            cnt = tl.sum(mask_m.to(acc_dtype), axis=0)
            t_mean, t_m2 = tile_mean_m2(acc, mask_m, cnt)
            part = pid_m.to(tl.int64) * (KG * tl.num_programs(1)) + offs_n
            tl.store(part_mean_ptr + part, t_mean, mask=mask_n)
            tl.store(part_m2_ptr + part, t_m2, mask=mask_n)

        OUT_ACT: tl.constexpr = ACTIVATION if EPILOGUE_ACT else "none"  # a STATS conv activates its input only
        if OUT_DESC:  # no per-row address: no pixel (n, p, q) division, no 64-bit pointer per row
            if HAS_RESIDUAL:
                y += res_desc.load([m0, n0]).to(y.dtype)
            out_desc.store([m0, n0], activation(y, OUT_ACT, PTX=PTX).to(out_ptr.dtype.element_ty))
        else:
                add_residual_act_store(y, n, p, q, offs_n, mask_m, mask_n, res_ptr, stride_res_n, stride_res_c,
                                   stride_res_h, stride_res_w, RES_C,
                                   out_ptr, stride_out_n, stride_out_c, stride_out_h, stride_out_w, HAS_RESIDUAL,
                                   OUT_ACT)


@triton.jit
def _descriptors(x_ptr, w_ptr, out_ptr, res_ptr, M, H, W, P, Q, CG, KG, RES_C, stride_x_n, stride_x_h, stride_x_w,
                 stride_w_k, stride_w_s, stride_out_w, stride_res_w, R: tl.constexpr, S: tl.constexpr,
                 HAS_RESIDUAL: tl.constexpr, OUT_DESC: tl.constexpr, TILE_W: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STRIDE2: tl.constexpr = False,
                 W_AS_A: tl.constexpr = False):
    """The descriptor path's device-side tensor descriptors (x, w, out, residual); the last two stand in as x's where
    the epilogue has none (OUT_DESC, HAS_RESIDUAL): never read. STRIDE2: x [N, H, W, C] (even H and W, dense
    pixels) as [N, H/2, 2, W/2, 2C], rows and columns split into (pair, parity) with a pair's two pixels' channels
    one run: a stride-2 tap is then a box at (pair offset, parity), and the rows and columns past the image are
    outside the view (zero-filled, the padding), as at stride 1."""
    if STRIDE2:
        tl.static_assert(TILE_W > 0)
        x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M // (P * Q), H // 2, 2, W // 2, 2 * CG],
                                           strides=[stride_x_n, 2 * stride_x_h, stride_x_h, 2 * stride_x_w, 1],
                                           block_shape=[1, BLOCK_M // TILE_W, 1, TILE_W, BLOCK_K])
    elif TILE_W:
        x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M // (P * Q), H, W, CG],
                                           strides=[stride_x_n, stride_x_h, stride_x_w, 1],
                                           block_shape=[1, BLOCK_M // TILE_W, TILE_W, BLOCK_K])
    else:
        x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, CG], strides=[stride_x_w, 1],
                                           block_shape=[BLOCK_M, BLOCK_K])
    if R * S == 1 or W_AS_A:
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[KG, R * S * CG], strides=[stride_w_k, 1],
                                           block_shape=[BLOCK_N, BLOCK_K])
    else:
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[KG, R * S, CG], strides=[stride_w_k, stride_w_s, 1],
                                           block_shape=[BLOCK_N, 1, BLOCK_K])
    if OUT_DESC:
        # the output (and residual) as [M, K] matrices: the epilogue stores its tile as one box, the descriptor
        # clips rows past M and channels past K; a residual's channels past RES_C load as zero (option A)
        tl.static_assert(not TILE_W)
        out_desc = tl.make_tensor_descriptor(out_ptr, shape=[M, KG], strides=[stride_out_w, 1],
                                             block_shape=[BLOCK_M, BLOCK_N])
        if HAS_RESIDUAL:
            res_desc = tl.make_tensor_descriptor(res_ptr, shape=[M, RES_C], strides=[stride_res_w, 1],
                                                 block_shape=[BLOCK_M, BLOCK_N])
    if not OUT_DESC:
        out_desc = x_desc
        res_desc = x_desc
    elif not HAS_RESIDUAL:
        res_desc = out_desc
    return x_desc, w_desc, out_desc, res_desc


@triton.jit
def channel_affine(offs_n, mask_n, scale_ptr, shift_ptr, dtype: tl.constexpr):
    """Per-output-channel (scale, shift) in ``dtype``, loaded; a None pointer means 1 / 0."""
    scale = tl.full(offs_n.shape, 1.0, dtype)
    shift = tl.zeros(offs_n.shape, dtype)
    if scale_ptr is not None:
        scale = tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0).to(dtype)
    if shift_ptr is not None:
        shift = tl.load(shift_ptr + offs_n, mask=mask_n, other=0.0).to(dtype)
    return scale, shift


@triton.jit
def spatial_rows(pid_m, P, Q, BLOCK_M: tl.constexpr, TILE_W: tl.constexpr, WIDE: tl.constexpr = True):
    """A spatial tile's rows: program pid_m's image n and its BLOCK_M // TILE_W x TILE_W output pixels from (p0, q0),
    tiles row-major per image; (n, p, q) for the epilogue's offsets (int64; int32 without WIDE, where the launcher
    knows offsets stay below 2**31: half the registers), the mask of pixels inside P x Q, and the image, p0 and q0 as
    int32 scalars (descriptor coordinates)."""
    TILE_H: tl.constexpr = BLOCK_M // TILE_W
    tiles_q = tl.cdiv(Q, TILE_W)
    per_image = tl.cdiv(P, TILE_H) * tiles_q
    n = pid_m // per_image
    t = pid_m % per_image
    p0 = (t // tiles_q) * TILE_H
    q0 = (t % tiles_q) * TILE_W
    rows = tl.arange(0, BLOCK_M)
    p = p0 + rows // TILE_W
    q = q0 + rows % TILE_W
    IDX: tl.constexpr = tl.int64 if WIDE else tl.int32
    return tl.full([BLOCK_M], 0, IDX) + n, p.to(IDX), q.to(IDX), (p < P) & (q < Q), n, p0, q0


# ----------------------------------------------------------------------------------------------
# Launch configuration (tiles, pruning and the fixed config: _conv_configs.py)
# ----------------------------------------------------------------------------------------------

_KEY = ["M", "H", "W", "P", "Q", "CG", "KG", "CD", "stride_h", "R", "S", "HAS_SCALE", "HAS_RESIDUAL", "HAS_SHORTCUT",
        "PROLOGUE_BN", "ACTIVATION"]


def _even_c(args) -> bool:
    """EVEN_C: every channel block of the main loop is full (not the stem path, whose blocks are filter rows)."""
    return not args["STEM_CPAD"] and args["CG"] > 0 and args["CG"] % args["BLOCK_K"] == 0


def _idx64(args) -> bool:
    return rows_need_int64(args["M"], args["BLOCK_M"])


def _tile_w(args) -> int:
    """TILE_W: spatial tiles (16 columns) for a descriptor launch with taps that writes no STATS partials; else 0."""
    taps = args["R"] * args["S"] > 1
    return min(SPATIAL_TILE_W, args["BLOCK_M"]) if args.get("TMA") and taps and not args["STATS"] else 0


# The descriptor path's own switches (heuristics, per launch and config): each returns at its first test for a
# pointer config, so a pointer launch pays one dict lookup per switch (the launch path is the card's bottleneck).

def _stride2(args) -> bool:
    """STRIDE2: a stride-2 descriptor launch with taps (spatial tiles through the parity view, stride2_parity)."""
    return bool(args.get("TMA") and args["stride_h"] == 2 and _tile_w(args))


def _out_desc(args) -> bool:
    """OUT_DESC: a 1x1 descriptor launch whose 16-bit output, and residual if any, are dense NHWC [M, K] matrices
    (TMA's rule: 16-byte aligned base and row stride), so its epilogue goes through descriptors. (An fp32 tile
    staged in shared memory overflows it beside 3 stages of 128x128x64 operands: fp32 keeps the pointer epilogue.)
    1x1 only, as PERSISTENT: with taps (the STATS forward's flat rows) both cost main-loop instructions on sm_90 (the
    4-warp 3x3 tile at 253 registers: 302 -> 311-327 per k-step)."""
    if not args.get("TMA") or args["R"] * args["S"] != 1 or args["out_ptr"].element_size() > 2:
        return False
    return tma_rows(args["out_ptr"]) and (not args["HAS_RESIDUAL"] or tma_rows(args["res_ptr"]))


def _persistent(args) -> bool:
    """PERSISTENT (issue 17 item 4): a 1x1 descriptor launch (a plain GEMM over [M, C] rows) of 16-bit operands,
    unless FUSEDRES_PERSISTENT=0. (fp32, with its pointer epilogue, spilled 128-184 B persistent with a residual at
    8 warps, ResNet-50 layer4.1, sm_90; one tile per program there: 254-255 registers, none spilled.)"""
    return bool(args.get("TMA") and args["R"] * args["S"] == 1 and args["out_ptr"].element_size() <= 2
                and persistent_wanted())


def _w_as_a(args) -> bool:
    """W_AS_A: a descriptor launch over spatial tiles (TILE_W: taps, no STATS) with full channel blocks and dense
    channels_last weights ([KG, R*S*CG] rows: stride_w_s == CG), no shortcut (its pointer GEMM adds to the
    accumulator) and no prologue. Both MMA operands then come from shared memory: as the A operand x's box is loaded
    and reshaped in registers (layer1.0's eval 3x3, 128x64x64, sm_90, triton 3.6: 116 SASS instructions per k-step,
    82 swapped). Where x's tile is changed in registers (the prologue, or the flat STATS tile's padding select) it
    would be a fresh shared-memory copy each step, and the loop would wait for every wgmma once per step (pendings=0):
    not taken."""
    if not _tile_w(args) or args["HAS_SHORTCUT"] or args["PROLOGUE_BN"]:
        return False
    return args["CG"] % args["BLOCK_K"] == 0 and args["stride_w_s"] == args["CG"]


def m_tiles(meta) -> int:
    """The launch's pixel tiles: flat BLOCK_M runs of the N*P*Q pixels, or (TILE_W) spatial tiles per image."""
    bm, tw = meta["BLOCK_M"], _tile_w(meta)
    if not tw:
        return cdiv(meta["M"], bm)
    return meta["M"] // (meta["P"] * meta["Q"]) * cdiv(meta["P"], bm // tw) * cdiv(meta["Q"], tw)


# per launch, per tile
_conv_bn_act = triton.heuristics({"EVEN_C": _even_c, "IDX64": _idx64, "TILE_W": _tile_w, "OUT_DESC": _out_desc,
                                  "PERSISTENT": _persistent, "STRIDE2": _stride2,
                                  "W_AS_A": _w_as_a})(_conv_bn_act_kernel)
_conv_bn_act_autotuned = triton.autotune(configs=gpu_configs(), key=_KEY,
                                         prune_configs_by={"early_config_prune": conv_prune},
                                         **autotune_options())(_conv_bn_act)
# Autotuning reruns a launch per config: safe for STATS, which only writes its output and partials. Its
# configs all have BLOCK_M = STATS_BLOCK_M (_conv_configs.stats_partials_fit: the partials are sized first).
_conv_stats_autotuned = triton.autotune(configs=gpu_configs(stats=True), key=_KEY,
                                        prune_configs_by={"early_config_prune": conv_prune},
                                        **autotune_options())(_conv_bn_act)
# Launches that tma_eligible admits tune over the descriptor configs too (conv_prune keeps them on sm_90 only):
# autotuners of their own, as eligibility (strides, alignment) is not in the tuning key.
_conv_tma_autotuned = triton.autotune(configs=gpu_configs() + tma_configs(), key=_KEY,
                                      prune_configs_by={"early_config_prune": conv_prune},
                                      **autotune_options())(_conv_bn_act)
_conv_stats_tma_autotuned = triton.autotune(configs=gpu_configs(stats=True) + tma_configs(stats=True), key=_KEY,
                                            prune_configs_by={"early_config_prune": conv_prune},
                                            **autotune_options())(_conv_bn_act)


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------

class ProjectionShortcut(NamedTuple):
    """The projection shortcut fused into a conv's epilogue: scale_d * conv1x1(input, weight, stride) + shift_d.
    The first five fields are in the order of the plain 5-tuple ``conv_bn_act`` also accepts."""
    input: torch.Tensor                    # xd [N, CD, HD, WD]
    weight: torch.Tensor                   # wd [K, CD, 1, 1]
    scale: Optional[torch.Tensor] = None   # [K] multiplier (None: 1)
    shift: Optional[torch.Tensor] = None   # [K] offset (None: 0)
    stride: int = 1                        # both axes
    fold: Optional[torch.Tensor] = None    # instead of scale/shift and the conv's own: projection_fold's [4, K]

    @classmethod
    def of(cls, shortcut) -> Optional["ProjectionShortcut"]:
        """A ProjectionShortcut from itself or a plain tuple in its field order; None stays None."""
        return None if shortcut is None else cls(*shortcut)


# Below |scale_d| < 2**-64 (0 included) the shortcut's columns are not read: its term is then below the main
# term's fp32 resolution unless the shortcut's raw conv is 2**40 times larger. A NaN scale_d stays live.
_DEAD_SCALE = 2.0 ** -64


def projection_fold(scale: Optional[torch.Tensor], shift: Optional[torch.Tensor], scale_d: Optional[torch.Tensor],
                    shift_d: Optional[torch.Tensor], dtype: torch.dtype, k: Optional[int] = None) -> torch.Tensor:
    """The projection epilogue's per-channel factors, a dense [4, K] tensor in ``dtype`` of rows (ratio, offset,
    mult, live) with  mult * (ratio * acc + offset + live * acc_d) = scale * acc + shift + scale_d * acc_d + shift_d:
    mult is scale_d, or 1 where the shortcut is skipped (live 0, see _DEAD_SCALE). Computed in float64 and rounded
    once (the divisions are IEEE); None means 1 (scales) / 0 (shifts); ``k``: K when every vector is None."""
    given = [t for t in (scale, shift, scale_d, shift_d) if t is not None]
    like = given[0] if given else None
    k = k if k is not None else like.shape[0]
    device = like.device if like is not None else None
    with torch.no_grad():
        def f64(t, fill):
            return torch.full((k,), fill, dtype=torch.float64, device=device) if t is None else t.to(torch.float64)
        scale, shift, scale_d, shift_d = f64(scale, 1.0), f64(shift, 0.0), f64(scale_d, 1.0), f64(shift_d, 0.0)
        live = ~(scale_d.abs() < _DEAD_SCALE)
        mult = torch.where(live, scale_d, 1.0)
        return torch.stack([scale / mult, (shift + shift_d) / mult, mult, live.to(mult.dtype)]).to(dtype)


def _dense(t):
    return None if t is None else t.contiguous()  # the kernel reads per-channel vectors at stride 1


_NO_STRIDES = (0, 0, 0, 0)  # stride_args' strides of None: a pointer the kernel never reads


class ConvStats(NamedTuple):
    """What the training forward's conv returns (``conv_bn_stats``)."""
    out: torch.Tensor        # [N, K, P, Q] raw conv output, x's dtype and memory format
    part_mean: torch.Tensor  # [T, K] per-tile channel means (stats dtype)
    part_m2: torch.Tensor    # [T, K] per-tile sums of squared deviations from them
    tile_m: int              # pixels per full tile (BLOCK_M); the last tile may hold fewer


def conv_bn_act(x, weight, scale=None, shift=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1,
                residual=None, relu=False, shortcut=None, prologue=None, config=None, *, activation=None):
    """Launch the fused conv. Tensors in, a new tensor out; inputs are assumed validated.

    x: [N, C, H, W]; weight: [K, C/groups, R, S]; scale, shift: [K] (either may be None: 1 / 0; both
    None: the raw conv output); an eval BN comes folded (fusedres/_fold.py).
    residual: optional [N, RES_C, P, Q] with RES_C <= K, added to the first RES_C channels.
    shortcut: optional ProjectionShortcut, or a plain tuple in its field order (xd [N, CD, HD, WD],
    wd [K, CD, 1, 1], scale_d [K] or None, shift_d [K] or None, stride_d); its ``fold`` (projection_fold of
    scale, shift, scale_d, shift_d) replaces all four, precomputed: the launch then does no math on them.
    prologue: optional (in_scale [C], in_shift [C]): the conv reads act(in_scale * x + in_shift).
    relu / activation: the conv's activation (kernels/_launch.py ACTIVATIONS), applied to the output and by a
    prologue. activation None: relu=True means "relu" on the output, and a prologue applies "relu" (the
    legacy meaning: relu=False with a prologue activates the input only).
    config: optional dict of BLOCK_M/BLOCK_N/BLOCK_K (+ num_warps/num_stages) to bypass autotuning.
    Returns [N, K, P, Q] in x's dtype and memory format (channels_last in, channels_last out).
    """
    out_act = activation_of(relu, activation)
    act = check_activation(activation) if activation is not None else ("relu" if prologue is not None else out_act)
    return _conv(x, weight, scale=scale, shift=shift, stride=stride, padding=padding, dilation=dilation,
                 groups=groups, residual=residual, activation=act, epilogue_act=out_act != "none",
                 shortcut=ProjectionShortcut.of(shortcut), prologue=prologue, stats=False, config=config).out


def conv_bn_stats(x, weight, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1, prologue=None,
                  config=None, *, activation="relu") -> ConvStats:
    """The training forward's conv: the raw output and its per-tile BN partials (the STATS epilogue).
    prologue: optional (in_scale [C], in_shift [C]): the conv reads act(in_scale * x + in_shift), act the
    ``activation`` (kernels/_launch.py ACTIVATIONS)."""
    return _conv(x, weight, stride=stride, padding=padding, dilation=dilation, groups=groups, prologue=prologue,
                 activation=check_activation(activation), stats=True, config=config)


def _conv(x, weight, *, scale=None, shift=None, stride, padding, dilation, groups,
          residual=None, activation: str = "none", epilogue_act: bool = False,
          shortcut: Optional[ProjectionShortcut] = None, prologue=None, stats: bool, config=None) -> ConvStats:
    """The launch of conv_bn_act / conv_bn_stats: a ConvStats whose partials are None without stats.
    activation: the prologue's and (epilogue_act) the output's; a checked name of ACTIVATIONS."""
    n, c, h, w = x.shape
    k, cg, r, s = weight.shape
    p = out_size(h, r, stride[0], padding[0], dilation[0])
    q = out_size(w, s, stride[1], padding[1], dilation[1])
    out = empty_activation(x, (n, k, p, q))
    m, kg = n * p * q, k // groups
    cd = 0 if shortcut is None else shortcut.input.shape[1]
    stem_cpad = STEM_CPAD if (c <= STEM_CPAD and groups == 1 and dilation[1] == 1 and prologue is None
                              and shortcut is None and s * STEM_CPAD <= 128 and m > 0 and k > 0) else 0
    if stem_cpad:
        # the conv's padding goes into the copy: its taps read no pixel outside it (the kernel's stem path)
        cg = s * stem_cpad
        x = pad_channels_nhwc(x, STEM_CPAD, padding)
        weight = pad_channels_nhwc(weight, STEM_CPAD, right=stem_block_k(cg) // STEM_CPAD - s)  # rows of BLOCK_K
        h, w, padding = h + 2 * padding[0], w + 2 * padding[1], (0, 0)
        if config is not None:
            config = dict(config, BLOCK_K=stem_block_k(cg))
    # Autotuning may pick another tile (so another summation order) in another process: under
    # torch.use_deterministic_algorithms(True) a fixed config keeps results bitwise reproducible.
    if config is None:
        config = conv_fixed_config(m, kg, max(cg, cd), bool(stem_cpad), shortcut is not None, stats)
    block_m = STATS_BLOCK_M if config is None else config["BLOCK_M"]  # autotuned: see stats_partials_fit
    part_mean = part_m2 = None
    if stats:
        num_tiles = cdiv(m, block_m)
        part_mean = torch.empty((num_tiles, k), device=x.device, dtype=stats_dtype(x))
        part_m2 = torch.empty((num_tiles, k), device=x.device, dtype=stats_dtype(x))
    if m == 0 or k == 0:
        return ConvStats(out, part_mean, part_m2, block_m)
    xd = wd = fold = None
    stride_d = 1
    if shortcut is not None:
        xd, wd, stride_d, fold = shortcut.input, shortcut.weight, shortcut.stride, shortcut.fold
        if fold is None:  # a direct launch: the per-channel factors of the two affines
            fold = projection_fold(scale, shift, shortcut.scale, shortcut.shift, stats_dtype(x), k)
        fold = _dense(fold)
    epilogue_act = epilogue_act and activation != "none"
    if prologue is None and not epilogue_act:
        activation = "none"  # no site applies it: one compiled variant, whatever the caller's activation
    # stride_args' keywords written out (six calls and dict merges per launch otherwise); zeros for an absent tensor
    sx, sw, so = x.stride(), weight.stride(), out.stride()
    sr = _NO_STRIDES if residual is None else residual.stride()
    ssc = _NO_STRIDES if xd is None else xd.stride()
    swd = _NO_STRIDES if wd is None else wd.stride()
    args = {  # a literal: dict(...) of keywords would build its ~70 entries twice
        "x_ptr": x, "w_ptr": weight, "scale_ptr": _dense(scale), "shift_ptr": _dense(shift), "out_ptr": out,
        "res_ptr": out if residual is None else residual,  # a dummy pointer without a residual, never read
        "xd_ptr": xd, "wd_ptr": wd, "in_scale_ptr": None if prologue is None else prologue[0],
        "in_shift_ptr": None if prologue is None else prologue[1], "part_mean_ptr": part_mean,
        "part_m2_ptr": part_m2, "fold_ptr": fold,
        "M": m, "H": h, "W": w, "P": p, "Q": q, "CG": cg, "KG": kg,
        "RES_C": 0 if residual is None else residual.shape[1], "CD": cd,
        "stride_x_n": sx[0], "stride_x_c": sx[1], "stride_x_h": sx[2], "stride_x_w": sx[3],
        "stride_w_k": sw[0], "stride_w_c": sw[1], "stride_w_r": sw[2], "stride_w_s": sw[3],
        "stride_out_n": so[0], "stride_out_c": so[1], "stride_out_h": so[2], "stride_out_w": so[3],
        "stride_res_n": sr[0], "stride_res_c": sr[1], "stride_res_h": sr[2], "stride_res_w": sr[3],
        "stride_sc_n": ssc[0], "stride_sc_c": ssc[1], "stride_sc_h": ssc[2], "stride_sc_w": ssc[3],
        "stride_wd_k": swd[0], "stride_wd_c": swd[1],
        "stride_h": stride[0], "stride_w": stride[1], "pad_h": padding[0], "pad_w": padding[1],
        "dil_h": dilation[0], "dil_w": dilation[1], "stride_d": stride_d,
        "R": r, "S": s, "HAS_SCALE": scale is not None or shift is not None, "HAS_RESIDUAL": residual is not None,
        "HAS_SHORTCUT": shortcut is not None, "ACTIVATION": activation, "EPILOGUE_ACT": epilogue_act,
        "PROLOGUE_BN": prologue is not None, "STATS": bool(stats), "STEM_CPAD": stem_cpad,
        "PROLOGUE_MATH": prologue_math(x) if prologue is not None else "acc",
        "IN_BOUNDS": prologue is not None and r * s == 1 and tuple(padding) == (0, 0),
        "DOT_PRECISION": dot_precision(x), "UPCAST_DOT": upcast_dot(x), "ACC_FP64": x.dtype == torch.float64,
        "PTX": not INTERPRETED,
    }

    def grid(meta):  # meta: every bound argument of the launch, the config's and the heuristics' included
        tiles = m_tiles(meta) * cdiv(kg, meta["BLOCK_N"])
        return (min(tiles, persistent_programs(x)) if meta.get("PERSISTENT") else tiles, groups)

    # The descriptor path (issue 17 item 3): in the autotune set of eligible launches on sm_90; a fixed config
    # takes it when it asks (TMA=True: FUSEDRES_TMA=1, or the caller's config) and the launch is eligible.
    config_tma = config is not None and bool(config.get("TMA"))
    tma = tma_mode() != "off" and (INTERPRETED or (x.is_cuda or x.is_meta) and target_arch() >= 90) \
        and tma_eligible(args)
    with device_guard(x), descriptor_scratch(x if tma else None):
        if config is None:
            tuners = (_conv_stats_tma_autotuned, _conv_tma_autotuned) if tma else (_conv_stats_autotuned,
                                                                                  _conv_bn_act_autotuned)
            launch_tuned(tuners[0 if stats else 1], grid, args)
        else:
            config = {k: v for k, v in config.items() if k != "TMA"}
            if tma and config_tma and (stride[0] == 1 or cg % config["BLOCK_K"] == 0):  # (stride2_parity's rule)
                config["TMA"] = True  # (omitted otherwise: the pointer path's compile key stays as it was)
            _conv_bn_act[grid](**args, **config)
    return ConvStats(out, part_mean, part_m2, block_m)
