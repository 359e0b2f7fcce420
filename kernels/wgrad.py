"""Weight gradient of a convolution as one implicit GEMM (CUTLASS's wgrad view).

dw[k, c, r, s] = sum over the N*P*Q output pixels m of dy[m, k] * x_act[pixel(m) shifted by tap (r, s), c].
GEMM (blocks as in kernels/_conv_configs.py): BLOCK_M tiles the CG*R*S (r, s, c) columns of dw, c fastest (the
memory order of a channels_last weight), BLOCK_N its KG output channels, and BLOCK_K steps through the reduction,
the pixels. Each program owns a [BLOCK_N, BLOCK_M] tile of dw and a contiguous range of pixels (split-K over
SPLIT programs; the fp32 partials are summed in a fixed order afterwards, so results are deterministic).
With 16-bit operands (X_AS_A) the tile is computed transposed, x_act^T @ dy ([BLOCK_M, BLOCK_N]), so x
(activated in registers by the prologue) is the MMA's A operand, which wgmma reads from registers; as the B
operand it went through shared memory and the pipeline drained (wgmma wait 0) every step. fp32 operands keep
x as B: held as the A operand they spilled (56-408 B, sm_90), and with the prologue (2026-12, issue 17 item 5)
16-616 B at 2.1-3x the main-loop SASS of x as B (TF32's register A operand needs its tile transposed through
shared memory every step), so the fp32 prologue keeps its one wgmma wait per step (the activated B tile is a
fresh shared-memory copy each step, which Triton does not double-buffer).

The pixel (n, p, q) of each row is decoded once and then advanced incrementally by BLOCK_K (no
division in the loop), in int32 unless an offset can pass 2**31 (IDX64). When a column tile stays
within one tap (TAP_PER_TILE: CG % BLOCK_M == 0) the tap's bounds test is per row, not per element.

Prologue (PROLOGUE_BN): x holds the previous conv's raw output y; the loaded tile becomes
act(in_scale[c] * y + in_shift[c]), act = ACTIVATION, by the forward conv's own helper and arithmetic
(_tiles.bn_act with the launch's PROLOGUE_MATH: bf16 packed on sm_80+), so the gradient is of the values the
forward used, bit for bit; out-of-image taps are zero after the transform. With one tap
per tile, a padded row zeroes the dy row instead (one mask per row, not a select per element): such
taps are skipped, as oneDNN does, so a non-finite dy never meets the padding. A 1x1 conv without padding
(IN_BOUNDS) has no such taps: no bounds test and no select.

Descriptors (TMA, 16-bit, sm_90; _conv_configs.wgrad_tma_eligible): a 1x1 stride-1 wgrad is the GEMM x^T @ dy over
[M, C] and [M, K] rows. A same-padded stride-1 RxS wgrad (3x3: ResNet's conv2) runs one tap per column tile over
that tap's pixel pairs: x and dy as two equal-shape views (_tap_views), so no padding mask or select is needed, and a
padded tap is never paired (a non-finite dy does not meet the padding, as on the pointer path's TAP_PER_TILE).

The stem (C <= 4, STEM_CPAD): x is first copied into a zero-padded dense NHWC tensor of STEM_CPAD = 4 channels,
with the conv's padding in place (no bounds mask), and the columns run over whole filter rows: S*4 contiguous input
elements, loaded 8 bytes at a time. Its pixels run in spatial tiles (_stem_pixel_tiles): loop-invariant offsets.
"""
import torch
import triton
import triton.language as tl

from ._conv_configs import (
    WGRAD_SPLIT_STEP,
    WGRAD_TILES,
    arch_tiles,
    autotune_options,
    tile_configs,
    tma_config,
    tma_wanted,
    wgrad_fixed_config,
    wgrad_prune,
    wgrad_tma_configs,
    wgrad_tma_eligible,
)
from ._launch import (
    INTERPRETED,
    STEM_CPAD,
    cdiv,
    descriptor_scratch,
    device_guard,
    dot_args,
    launch_tuned,
    next_power_of_2,
    pad_channels_nhwc,
    prologue_math,
    site_activation,
    stats_dtype,
    stride_args,
)
from ._tiles import bn_act, in_range, k_steps, mma
from .bn import sum_rows


# Stride, padding and split integers: a specialized value (== 1, a multiple of 16) would compile a variant of its own;
# they only enter per-program column decode and per-row index math (R and S are constexpr). Dilation stays
# specialized (1 in every ResNet: no extra variant).
@triton.jit(do_not_specialize=["stride_h", "stride_w", "pad_h", "pad_w", "ROWS_PER_SPLIT", "SPLIT"])
def _conv_wgrad_kernel(
    dy_ptr,        # [N, K, P, Q] gradient w.r.t. the conv output, any strides
    x_ptr,         # [N, C, H, W] conv input, or the previous conv's raw output (PROLOGUE_BN)
    in_scale_ptr, in_shift_ptr,   # [C] previous BN as scale/shift (PROLOGUE_BN)
    part_ptr,      # [SPLIT, K * C/groups * R * S] fp32 (fp64) partials, each laid out like the weight's memory
    M, H, W, P, Q, CG, KG, NCOL,  # M = N*P*Q pixels; channels per group; NCOL = CG*R*S columns
    ROWS_PER_SPLIT, SPLIT, NUMEL,  # pixels per split (a multiple of BLOCK_K); splits; weight numel
    stride_dy_n, stride_dy_c, stride_dy_h, stride_dy_w, stride_x_n, stride_x_c, stride_x_h, stride_x_w, stride_w_k,
    stride_w_c, stride_w_r, stride_w_s,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    R: tl.constexpr, S: tl.constexpr,
    PROLOGUE_BN: tl.constexpr,     # x is raw y: the conv input was ACTIVATION(in_scale * y + in_shift)
    ACTIVATION: tl.constexpr,      # "relu" or "none" (kernels/_launch.py ACTIVATIONS)
    TAP_PER_TILE: tl.constexpr,    # CG % BLOCK_M == 0: every column of a tile has the same tap
    STEM_CPAD: tl.constexpr,       # > 0: x is a dense NHWC copy padded to STEM_CPAD channels (C <= 4, the stem)
    STEM_SP: tl.constexpr,         # S rounded up to a power of two (STEM_CPAD > 0)
    IDX64: tl.constexpr,           # some offset may pass 2**31: index math in int64
    X_AS_A: tl.constexpr,          # compute dw^T = x^T dy (x the MMA's register operand): 16-bit operands
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    PROLOGUE_MATH: tl.constexpr,   # the prologue's arithmetic: the forward's (_tiles.bn_act, _launch.prologue_math)
    IN_BOUNDS: tl.constexpr,       # every tap of every pixel lies inside x (1x1, no padding): no bounds test, no select
    BLOCK_M: tl.constexpr,         # (r, s, c) columns of dw per tile
    BLOCK_N: tl.constexpr,         # output channels (rows of dw) per tile
    BLOCK_K: tl.constexpr,         # pixels per step (the reduction)
    TMA: tl.constexpr = False,     # a config switch: dy and x through tensor descriptors (wgrad_tma_eligible)
):
    pid = tl.program_id(0)
    num_col = tl.cdiv(NCOL, BLOCK_M)
    pid_out = pid // num_col
    pid_col = pid % num_col
    g = tl.program_id(1) // SPLIT
    split = tl.program_id(1) % SPLIT
    offs_kg = pid_out * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_k = offs_kg < KG
    cols = pid_col * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_col = cols < NCOL
    # Column decode, once per program.
    if STEM_CPAD > 0:
        # Columns (r, s, c) over a padded [R, STEM_SP, STEM_CPAD] box: a filter row is one contiguous run of
        # S*STEM_CPAD input elements, loaded STEM_CPAD at a time (constexpr shifts, not divisions).
        r = cols // (STEM_SP * STEM_CPAD)
        s = (cols // STEM_CPAD) % STEM_SP
        c = cols % STEM_CPAD
        mask_col = (r < R) & (s < S)   # all STEM_CPAD channels load (the padding is zero): whole vectors
        h_off = (r * dil_h - pad_h)[None, :]
        w_off = (s * dil_w - pad_w)[None, :]
    elif TAP_PER_TILE:
        rs = (pid_col * BLOCK_M) // CG
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
    if STEM_CPAD > 0:
        k_off = k_idx * stride_dy_c
        # (whole STEM_CPAD-value pixels by construction, whatever Triton knows of the padded copy's strides: the
        # loads stay 8-byte vectors)
        col_off = ((r * dil_h - pad_h) * W + (s * dil_w - pad_w)) * STEM_CPAD + c
    elif IDX64:
        k_off = k_idx.to(tl.int64) * stride_dy_c
        col_off = offs_c.to(tl.int64) * stride_x_c + (r * dil_h - pad_h).to(tl.int64) * stride_x_h \
            + (s * dil_w - pad_w).to(tl.int64) * stride_x_w
    else:
        k_off = k_idx * stride_dy_c
        col_off = offs_c * stride_x_c + (r * dil_h - pad_h) * stride_x_h + (s * dil_w - pad_w) * stride_x_w
    if PROLOGUE_BN:
        s_in = tl.load(in_scale_ptr + offs_c, mask=mask_col, other=0.0)
        t_in = tl.load(in_shift_ptr + offs_c, mask=mask_col, other=0.0)
    else:
        s_in = 0.0  # unused
        t_in = 0.0

    # Pixel decode once; then advanced by BLOCK_K per step: BLOCK_K = dn*P*Q + dp*Q + dq.
    if IDX64:
        split = split.to(tl.int64)  # before the product: pixel indices may pass 2**31
    start = split * ROWS_PER_SPLIT
    end = tl.minimum(start + ROWS_PER_SPLIT, M)
    if X_AS_A:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=part_ptr.dtype.element_ty)  # dw^T
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=part_ptr.dtype.element_ty)
    if TMA:
        # A 1x1 stride-1 wgrad over dense rows (the host checked: wgrad_tma_eligible; one group, 16-bit: X_AS_A) is
        # the GEMM dw^T[C, K] = x[M, C]^T @ dy[M, K]: x as [M, CG] with row stride stride_x_w, dy as [M, KG] with row
        # stride stride_dy_w. A split's pixels are whole BLOCK_K steps but at M, where the descriptors load zeros
        # (x rows past M may become act(shift) in the prologue, against zero dy rows: no contribution); columns past
        # CG and KG load zeros and are not stored.
        # Taps (a same-padded stride-1 conv, one tap per column tile; _tap_views): x and dy through views of the
        # pixels a tap pairs, walked in spatial tiles.
        tl.static_assert(STEM_CPAD == 0 and X_AS_A and (R * S == 1 or TAP_PER_TILE))
        n0 = pid_out * BLOCK_N
        if R * S == 1:
            x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, CG], strides=[stride_x_w, 1],
                                               block_shape=[BLOCK_K, BLOCK_M])
            dy_desc = tl.make_tensor_descriptor(dy_ptr, shape=[M, KG], strides=[stride_dy_w, 1],
                                                block_shape=[BLOCK_K, BLOCK_N])
            c0 = pid_col * BLOCK_M
            for mb in range(k_steps(tl.cdiv(end - start, BLOCK_K))):  # (an empty split: one step of zero dy)
                m0 = start + mb * BLOCK_K
                xt = x_desc.load([m0, c0])
                if PROLOGUE_BN:
                    xt = bn_act(xt, s_in, t_in, ACTIVATION, PROLOGUE_MATH)
                acc = mma(tl.trans(xt), dy_desc.load([m0, n0]), acc, DOT_PRECISION, UPCAST_DOT)
        else:
            acc = _tap_views(x_ptr, dy_ptr, acc, s_in, t_in, M // (P * Q), H, W, CG, KG, split, SPLIT,
                             r - pad_h, s - pad_w, pid_col * BLOCK_M - rs * CG, n0, stride_x_n, stride_x_h,
                             stride_x_w, stride_dy_n, stride_dy_h, stride_dy_w, PROLOGUE_BN, ACTIVATION,
                             PROLOGUE_MATH, DOT_PRECISION, UPCAST_DOT, BLOCK_M, BLOCK_N, BLOCK_K)
    elif STEM_CPAD > 0:
        # x loads whole filter rows, s = S.. included (in the copy: the host padded it; their columns are not
        # stored, and a column's sum meets only its own x): 16-byte vectors where the stored mask gives 8
        acc = _stem_pixel_tiles(dy_ptr, x_ptr, acc, k_off, col_off, mask_k, r < R, M // (P * Q), H, W, P, Q, split,
                                SPLIT, stride_dy_n, stride_dy_h, stride_dy_w, stride_h, stride_w, STEM_CPAD, X_AS_A,
                                DOT_PRECISION, UPCAST_DOT, BLOCK_K)
    else:
        offs_m = start + tl.arange(0, BLOCK_K)
        n = offs_m // (P * Q)
        pq = offs_m - n * (P * Q)
        p = pq // Q
        q = pq - p * Q
        dq = BLOCK_K % Q
        dp = (BLOCK_K // Q) % P
        dn = BLOCK_K // (P * Q)

        for _ in range(k_steps(tl.cdiv(end - start, BLOCK_K))):  # (an empty split: one masked step)
            mask_m = offs_m < end
            hb = p * stride_h
            wb = q * stride_w
            hh = hb[:, None] + h_off
            ww = wb[:, None] + w_off
            if IN_BOUNDS:
                row_ok = mask_m[:, None]
            else:
                row_ok = in_range(hh, H) & in_range(ww, W) & mask_m[:, None]
            x_mask = row_ok & mask_col[None, :]
            if TAP_PER_TILE and PROLOGUE_BN:
                dy_mask = row_ok & mask_k[None, :]  # a padded tap's row: zero dy, not each activated x element
            else:
                dy_mask = mask_m[:, None] & mask_k[None, :]
            dyt = tl.load(dy_ptr + (n * stride_dy_n + p * stride_dy_h + q * stride_dy_w)[:, None] + k_off[None, :],
                          mask=dy_mask, other=0.0)
            x_rows = n * stride_x_n + hb * stride_x_h + wb * stride_x_w
            xt = tl.load(x_ptr + x_rows[:, None] + col_off[None, :], mask=x_mask, other=0.0)
            if PROLOGUE_BN:
                # the forward's arithmetic, so the values it used (bn_act: [pixels, channels] as the forward's A tile)
                xt = bn_act(xt, s_in, t_in, ACTIVATION, PROLOGUE_MATH)
                if not (TAP_PER_TILE or IN_BOUNDS):
                    xt = tl.where(x_mask, xt, 0.0)  # zero padding of the activated tensor
            if X_AS_A:
                acc = mma(tl.trans(xt), dyt, acc, DOT_PRECISION, UPCAST_DOT)
            else:
                acc = mma(tl.trans(dyt), xt, acc, DOT_PRECISION, UPCAST_DOT)
            offs_m += BLOCK_K
            q += dq
            cq = q >= Q
            q = tl.where(cq, q - Q, q)
            p += dp + cq.to(p.dtype)
            cp = p >= P
            p = tl.where(cp, p - P, p)
            n += dn + cp.to(n.dtype)

    k_part = k_idx.to(tl.int64) * stride_w_k
    col_part = c.to(tl.int64) * stride_w_c + r * stride_w_r + s * stride_w_s
    if STEM_CPAD > 0:
        mask_col = mask_col & (c < CG)
    part = part_ptr + split.to(tl.int64) * NUMEL
    if X_AS_A:
        tl.store(part + col_part[:, None] + k_part[None, :], acc, mask=mask_col[:, None] & mask_k[None, :])
    else:
        tl.store(part + k_part[:, None] + col_part[None, :], acc, mask=mask_k[:, None] & mask_col[None, :])


@triton.jit
def _stem_pixel_tiles(dy_ptr, x_ptr, acc, k_off, col_off, mask_k, mask_col, IMG, H, W, P, Q, split, SPLIT, stride_dy_n,
                      stride_dy_h, stride_dy_w, stride_h, stride_w, STEM_CPAD: tl.constexpr, X_AS_A: tl.constexpr,
                      DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, BLOCK_K: tl.constexpr):
    """The stem's share of acc over its split's output pixels, walked in TILE_H x TILE_W spatial tiles (BLOCK_K
    pixels a step): a pixel's offsets from its tile's corner are loop-invariant, so a step adds one scalar to each
    operand's addresses, where a flat walk over N*P*Q carries every row's (n, p, q) (178% issue share on sm_90 at
    64x64x64, 2.2x this loop). x is the stem's dense NHWC copy of STEM_CPAD channels with the conv's padding in
    place, H x W its padded size (no bounds mask); pixels past P or Q (a partial tile) load zero dy and x. The tiles
    of the [IMG, P, Q] grid are split evenly over the SPLIT programs of a column tile (a split may get none: one
    step past the last image, masked)."""
    TILE_W: tl.constexpr = 16 if BLOCK_K >= 16 else BLOCK_K
    TILE_H: tl.constexpr = BLOCK_K // TILE_W
    kk = tl.arange(0, BLOCK_K)
    dp = kk // TILE_W
    dq = kk % TILE_W
    dy_in = dp * stride_dy_h + dq * stride_dy_w
    x_in = (dp * stride_h * W + dq * stride_w) * STEM_CPAD  # whole pixels of STEM_CPAD values: aligned loads
    n, p0, q0, steps = split_first_tile(IMG, P, Q, split, SPLIT, TILE_H, TILE_W)
    for _ in range(k_steps(steps)):  # (no tile: one step at n = IMG, every row masked)
        rows = (p0 + dp < P) & (q0 + dq < Q) & (n < IMG)
        dy_base = n * stride_dy_n + p0 * stride_dy_h + q0 * stride_dy_w
        dyt = tl.load(dy_ptr + dy_base + dy_in[:, None] + k_off[None, :], mask=rows[:, None] & mask_k[None, :],
                      other=0.0)
        x_base = ((n * H + p0 * stride_h) * W + q0 * stride_w) * STEM_CPAD
        xt = tl.load(x_ptr + x_base + x_in[:, None] + col_off[None, :], mask=rows[:, None] & mask_col[None, :],
                     other=0.0)
        if X_AS_A:
            acc = mma(tl.trans(xt), dyt, acc, DOT_PRECISION, UPCAST_DOT)
        else:
            acc = mma(tl.trans(dyt), xt, acc, DOT_PRECISION, UPCAST_DOT)
        n, p0, q0 = next_tile(n, p0, q0, P, Q, TILE_H, TILE_W)
    return acc


@triton.jit
def _tap_views(x_ptr, dy_ptr, acc, s_in, t_in, IMG, H, W, CG, KG, split, SPLIT, dh, dw, c0, n0, stride_x_n, stride_x_h,
               stride_x_w, stride_dy_n, stride_dy_h, stride_dy_w, PROLOGUE_BN: tl.constexpr, ACTIVATION: tl.constexpr,
               PROLOGUE_MATH: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One tap's share of a same-padded stride-1 wgrad on descriptors: acc += act(x)^T @ dy over the pixel pairs the
    tap (dh, dw) = (r - pad_h, s - pad_w) joins, x at (h, w) and dy at (h - dh, w - dw), both inside the image (P, Q
    = H, W). Those pairs are two [IMG, H - |dh|, W - |dw|] views of equal shape, x from (max(dh, 0), max(dw, 0)) and dy
    from (max(-dh, 0), max(-dw, 0)): one descriptor each, walked in TILE_H x TILE_W spatial tiles at the same
    coordinates. Both zero-fill the same places (a tile's overhang past the view), where x may become act(shift) in
    the prologue against dy's zeros: no padding mask, no select, and every x value, finite or not, meets exactly the dy
    values the convolution pairs it with. The steps are the [IMG, H, W] grid's tiles (the same for every tap: a view
    is at most that), split evenly over the SPLIT programs of a column tile (a split may get none: zero partials).
    The host checked H >= R and W >= S (no view is empty) and 16-byte aligned rows (a view's base is whole pixels)."""
    # 8 x 8 pixels a step, 8 x 16 at 128 (_conv_configs.WGRAD_TMA_TILES)
    TILE_W: tl.constexpr = 16 if BLOCK_K >= 128 else (8 if BLOCK_K >= 8 else BLOCK_K)
    TILE_H: tl.constexpr = BLOCK_K // TILE_W
    hv = H - tl.abs(dh)
    wv = W - tl.abs(dw)
    x_view = tl.make_tensor_descriptor(x_ptr + tl.maximum(dh, 0) * stride_x_h + tl.maximum(dw, 0) * stride_x_w,
                                       shape=[IMG, hv, wv, CG], strides=[stride_x_n, stride_x_h, stride_x_w, 1],
                                       block_shape=[1, TILE_H, TILE_W, BLOCK_M])
    dy_view = tl.make_tensor_descriptor(dy_ptr + tl.maximum(-dh, 0) * stride_dy_h + tl.maximum(-dw, 0) * stride_dy_w,
                                        shape=[IMG, hv, wv, KG], strides=[stride_dy_n, stride_dy_h, stride_dy_w, 1],
                                        block_shape=[1, TILE_H, TILE_W, BLOCK_N])
    n, h0, w0, steps = split_first_tile(IMG, H, W, split, SPLIT, TILE_H, TILE_W)
    for _ in range(k_steps(steps)):  # (no tile: one step past the views, zero-filled dy)
        xt = x_view.load([n, h0, w0, c0]).reshape(BLOCK_K, BLOCK_M)
        if PROLOGUE_BN:
            xt = bn_act(xt, s_in, t_in, ACTIVATION, PROLOGUE_MATH)
        acc = mma(tl.trans(xt), dy_view.load([n, h0, w0, n0]).reshape(BLOCK_K, BLOCK_N), acc, DOT_PRECISION,
                  UPCAST_DOT)
        n, h0, w0 = next_tile(n, h0, w0, H, W, TILE_H, TILE_W)
    return acc


@triton.jit
def split_first_tile(IMG, H, W, split, SPLIT, TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    """A split's share of the [IMG, H, W] grid's TILE_H x TILE_W tiles (row-major, the tiles split evenly over the
    SPLIT programs): its first tile's (n, h0, w0) and its number of tiles (0 past the last: n = IMG there)."""
    tiles_w = tl.cdiv(W, TILE_W)
    per_img = tl.cdiv(H, TILE_H) * tiles_w
    total = IMG * per_img
    per_split = tl.cdiv(total, SPLIT)
    t0 = split * per_split
    t1 = tl.minimum(t0 + per_split, total)
    n = t0 // per_img
    hw = t0 - n * per_img
    return n, (hw // tiles_w) * TILE_H, (hw % tiles_w) * TILE_W, t1 - t0


@triton.jit
def next_tile(n, h0, w0, H, W, TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    """The tile after (n, h0, w0) in split_first_tile's order: selects, no division."""
    w0 += TILE_W
    next_row = w0 >= W
    w0 = tl.where(next_row, 0, w0)
    h0 = tl.where(next_row, h0 + TILE_H, h0)
    next_img = h0 >= H
    h0 = tl.where(next_img, 0, h0)
    n = tl.where(next_img, n + 1, n)
    return n, h0, w0


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------

def gpu_configs(arch: int = None):
    """Every config the wgrad autotuner may pick on an arch (all of them when arch is None)."""
    return tile_configs(arch_tiles(WGRAD_TILES, arch))


def max_offset(t: torch.Tensor) -> int:
    """The largest element offset a kernel can form from t's sizes and strides."""
    return sum((size - 1) * abs(st) for size, st in zip(t.shape, t.stride()) if size > 0)


# Per-shape config cache (the autotuner's). Each run overwrites its partials: rerunning is harmless.
_KEY = ["M", "H", "W", "P", "Q", "CG", "KG", "NCOL", "SPLIT", "stride_h", "R", "S", "PROLOGUE_BN", "ACTIVATION",
        "IDX64"]
_conv_wgrad_autotuned = triton.autotune(
    configs=gpu_configs(), key=_KEY, prune_configs_by={"early_config_prune": wgrad_prune}, **autotune_options(),
)(_conv_wgrad_kernel)
# Launches that wgrad_tma_eligible admits: the descriptor tile in place of its pointer twin (wgrad_prune; sm_90
# only), an autotuner of their own, as eligibility (strides, alignment) is not in the tuning key.
_conv_wgrad_tma_autotuned = triton.autotune(
    configs=gpu_configs() + wgrad_tma_configs(), key=_KEY, prune_configs_by={"early_config_prune": wgrad_prune},
    **autotune_options(),
)(_conv_wgrad_kernel)


def _num_splits(tiles: int, m: int, bk: int) -> int:
    """Enough programs to fill a GPU (~2 waves on 132 SMs), each still looping over >= 8 pixel blocks."""
    if INTERPRETED:
        return 1
    return max(1, min(cdiv(264, tiles), cdiv(m, bk * 8)))


def conv_wgrad(dy, x, weight, stride, padding, dilation, groups, prologue=None, config=None, *, activation="relu"):
    """Gradient w.r.t. the weight: a new tensor like ``weight`` (same dtype and memory format).

    prologue: (scale, shift) when the conv input was act(scale*x + shift) of the raw x given here, act the
    ``activation`` (kernels/_launch.py ACTIVATIONS).
    config: optional dict of BLOCK_M/BLOCK_N/BLOCK_K (+ num_warps/num_stages): columns, output channels,
    pixels per step (kernels/_conv_configs.py).
    """
    act = site_activation(activation, prologue is not None)
    n, c, h, w = x.shape
    k, cg, r, s = weight.shape
    p, q = dy.shape[2:]
    dw = torch.empty_like(weight)
    m, kg, ncol = n * p * q, k // groups, cg * r * s
    if m == 0:
        return dw.zero_()
    idx64 = max(max_offset(dy), max_offset(x), m + 256) >= 2**31 - 1
    stem_cpad = stem_sp = 0
    if groups == 1 and c <= STEM_CPAD and prologue is None and not idx64:
        # The stem (C=3): a zero-padded dense NHWC copy with STEM_CPAD channels (4/3 of the input, once) makes
        # each filter row one aligned contiguous run, read 8 bytes at a time instead of 2.
        # The conv's padding goes into the copy too: no tap reads outside it, so no bounds mask (the kernel).
        # A filter row loads STEM_SP pixels (past S: columns never stored), so the copy holds those of the last
        # output column too.
        stem_cpad, stem_sp = STEM_CPAD, next_power_of_2(s)
        right = max(0, (q - 1) * stride[1] + (stem_sp - 1) * dilation[1] + 1 - (w + 2 * padding[1]))
        x, ncol = pad_channels_nhwc(x, stem_cpad, padding, right), r * stem_sp * stem_cpad
        h, w, padding = h + 2 * padding[0], w + 2 * padding[1] + right, (0, 0)
    cfg = dict(config) if config is not None else wgrad_fixed_config(m, kg, cg, ncol)
    bk = WGRAD_SPLIT_STEP if cfg is None else cfg["BLOCK_K"]  # (autotuned: a multiple of every config's)
    # The split-K partition comes from a nominal 128x128 tile, so it does not depend on the tuned tile.
    split = _num_splits(cdiv(kg, 128) * cdiv(ncol, 128) * groups, m, bk)
    rows_per_split = cdiv(cdiv(m, split), bk) * bk
    split = max(1, cdiv(m, rows_per_split))
    acc_dtype = stats_dtype(dy)
    direct = split == 1 and weight.dtype == acc_dtype
    part = torch.as_strided(dw, (1, dw.numel()), (0, 1)) if direct else \
        torch.empty((split, dw.numel()), device=dy.device, dtype=acc_dtype)
    in_scale, in_shift = prologue if prologue is not None else (dw, dw)

    def grid(meta):
        return (cdiv(kg, meta["BLOCK_N"]) * cdiv(ncol, meta["BLOCK_M"]), groups * split)

    # the stem's padded copy is read as dense NHWC with stem_cpad channels, whatever its logical shape
    x_strides = (h * w * stem_cpad, 1, w * stem_cpad, stem_cpad) if stem_cpad else x.stride()
    args = dict(dy_ptr=dy, x_ptr=x, in_scale_ptr=in_scale, in_shift_ptr=in_shift, part_ptr=part, M=m, H=h, W=w, P=p,
                Q=q, CG=cg, KG=kg, NCOL=ncol, ROWS_PER_SPLIT=rows_per_split, SPLIT=split, NUMEL=dw.numel(),
                **stride_args("dy", dy), **stride_args("x", x_strides), **stride_args("w", dw, "kcrs"),
                stride_h=stride[0], stride_w=stride[1], pad_h=padding[0], pad_w=padding[1], dil_h=dilation[0],
                dil_w=dilation[1], R=r, S=s, PROLOGUE_BN=prologue is not None,
                ACTIVATION=act, STEM_CPAD=stem_cpad,
                STEM_SP=stem_sp, IDX64=idx64, X_AS_A=dy.element_size() == 2, **dot_args(dy),
                PROLOGUE_MATH=prologue_math(x) if prologue is not None else "acc",
                IN_BOUNDS=prologue is not None and r * s == 1 and tuple(padding) == (0, 0))
    # the descriptor path (issue 17 items 2-3): a 1x1 stride-1 launch's operands, or a same-padded stride-1 one's
    # (with a fixed config, one whose column tile stays within one tap)
    tma = tma_wanted(dy) and wgrad_tma_eligible(dy, x, weight, stride, padding, groups, stem_cpad > 0, idx64,
                                                dilation) and (cfg is None or r * s == 1 or cg % cfg["BLOCK_M"] == 0)
    cfg = tma_config(cfg, tma)
    with device_guard(dy), descriptor_scratch(dy if tma else None):
        if cfg is None:
            launch_tuned(_conv_wgrad_tma_autotuned if tma else _conv_wgrad_autotuned, grid, args)
        else:
            _conv_wgrad_kernel[grid](**args, **cfg, TAP_PER_TILE=cg % cfg["BLOCK_M"] == 0)
    if not direct:
        sum_rows(part, out=torch.as_strided(dw, (dw.numel(),), (1,)))
    return dw
