"""Device helpers shared by the conv and pointwise kernels.

Every activation tile is [BLOCK_M pixels, BLOCK_N channels] of a logical [N, C, P, Q] tensor read
through its strides, so NCHW and channels_last (NHWC) layouts both work without copies.
"""
import triton
import triton.language as tl


@triton.jit
def pixel_rows(pid_m, M, P, Q, BLOCK_M: tl.constexpr, IDX64: tl.constexpr = True):
    """Rows of an M = N*P*Q pixel tile: int64 offsets (N*P*Q*C may pass 2**31), (n, p, q), mask.
    pid_m is widened before the product: pid_m * BLOCK_M itself passes 2**31 at >= 2**31 pixels.
    IDX64=False (the launcher knows M + BLOCK_M < 2**31, see rows_need_int64): the pixel index is split in
    int32, then widened: a 64-bit division is a SASS routine call (__cuda_sm20_div_s64), a 32-bit one inline."""
    if IDX64:
        offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    else:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = offs_m // (P * Q)
    pq = offs_m % (P * Q)
    p = pq // Q
    q = pq % Q
    return offs_m.to(tl.int64), n.to(tl.int64), p.to(tl.int64), q.to(tl.int64), offs_m < M


@triton.jit
def pixel_channel_tile(M, P, Q, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The [BLOCK_M pixels, BLOCK_N channels] tile of a pointwise kernel on grid (pixel tiles, channel tiles)."""
    offs_m, n, p, q, mask_m = pixel_rows(tl.program_id(0), M, P, Q, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_k = offs_k < K
    return n, p, q, mask_m, offs_k, mask_k, mask_m[:, None] & mask_k[None, :]


@triton.jit
def mma(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """acc += a @ b; UPCAST_DOT: in fp32 (the interpreter's bf16 tl.dot is wrong, DESIGN.md section 5).
    out_dtype is acc's: triton 3.6's tl.dot defaults it to fp32 and rejects an fp64 accumulator (fp64 operands)."""
    if UPCAST_DOT:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION, out_dtype=acc.dtype)


@triton.jit
def tile_ptrs(base, n, p, q, offs_c, s_n, s_c, s_h, s_w):
    """[BLOCK_M, BLOCK_N] pointers of pixels (n, p, q) x channels offs_c, the offsets in n's index type: int64
    for the rows of pixel_rows (offsets may pass 2**31), int32 where a launcher knows they cannot (dgrad
    without IDX64: half the registers of 64-bit offsets per element)."""
    return base + (n * s_n + p * s_h + q * s_w)[:, None] + offs_c.to(n.dtype)[None, :] * s_c


@triton.jit
def check_activation(ACTIVATION: tl.constexpr):
    """A compile error for an ACTIVATION the helpers below do not know (the host checks first: _launch)."""
    tl.static_assert(ACTIVATION == "relu" or ACTIVATION == "none", "ACTIVATION: not in kernels/_launch.py ACTIVATIONS")


# y < 0 ? +0 : y (a NaN or -0.0 compares false: kept), for activation's PTX path
_RELU_F32 = tl.constexpr("{ .reg .pred p; setp.lt.f32 p, $1, 0f00000000; selp.f32 $0, 0f00000000, $1, p; }")


@triton.jit
def activation(y, ACTIVATION: tl.constexpr, KEEP_NEG_ZERO: tl.constexpr = True, PTX: tl.constexpr = False):
    """The forward activation (the names of _launch.ACTIVATIONS): "relu" as torch.relu, NaN propagating
    (a plain tl.maximum would drop it) and -0.0 kept; "none": y unchanged. KEEP_NEG_ZERO=False, for values
    that only feed an MMA (where a zero's sign cannot matter): ReLU as one NaN-propagating max instead of a
    compare and a select (wgrad's prologue: ~5% fewer main-loop SASS instructions, its budget needs them).
    PTX (a GPU target; fp32 y): the compare and select as inline PTX, opaque to the compiler: before a cast to 16
    bits, triton 3.8's LLVM moves a select past the cast onto the unpacked halves and, out of predicate registers,
    keeps the conditions as bits of general registers (the 1x1 descriptor epilogue at 128x128, 8 warps: 413
    instructions for its 64 values, 128 this way)."""
    check_activation(ACTIVATION)
    if ACTIVATION == "relu" and KEEP_NEG_ZERO and PTX and y.dtype == tl.float32:
        y = tl.inline_asm_elementwise(_RELU_F32, "=r,r", [y], dtype=tl.float32, is_pure=True, pack=1)
    elif ACTIVATION == "relu" and KEEP_NEG_ZERO:
        y = tl.where(y < 0, 0.0, y)
    elif ACTIVATION == "relu":
        y = tl.maximum(y, 0.0, propagate_nan=tl.PropagateNan.ALL)
    return y


@triton.jit
def round_fp64_to(y, DT: tl.constexpr):
    """fp64 y rounded once (to nearest even) to DT's significand, as fp64. bf16 by its bits (the interpreter's casts to
    bf16 truncate); fp16 by the cast (numpy rounds fp64 -> fp16 once). bf16's subnormal range is not modelled."""
    if DT == tl.bfloat16:
        b = y.to(tl.int64, bitcast=True)
        r = ((b + (2 ** 44 - 1) + ((b >> 45) & 1)) & -(2 ** 45)).to(tl.float64, bitcast=True)
        return tl.where(y != y, y, r)
    else:
        return y.to(DT).to(tl.float64)


@triton.jit
def _fma_x2(a, s, t, ASM: tl.constexpr):
    """One packed 16-bit PTX instruction ASM ($0 = f($1, $2, $3)) on each pair of elements of a, s, t (one shape)."""
    return tl.inline_asm_elementwise(ASM, "=r,r,r,r", [a, s, t], dtype=a.dtype, is_pure=True, pack=2)


@triton.jit
def bn_act(a, scale, shift, ACTIVATION: tl.constexpr, MATH: tl.constexpr):
    """The BN-apply + activation prologue of an A tile: ACTIVATION(scale * a + shift) in a's dtype, for a [BM, BK] and
    per-channel (fp32 or fp64; for "packed" / "rounded" possibly already rounded to a's dtype) scale, shift [BK].
    ReLU propagates NaN; a zero's sign is not kept (the result only feeds an MMA).
    MATH (_launch.prologue_math, per launch):
    - "acc": in scale's dtype, one rounding to a's dtype at the end (fp32 / fp64 inputs, and fp16);
    - "packed": bf16 on sm_80+: scale and shift rounded to a's dtype, then one fma.rn(.relu).bf16x2 per pair (PTX:
      the exact a * scale + shift rounded once; .relu clamps negatives to 0 and returns NaN as the canonical NaN);
    - "rounded": what "packed" computes, in the interpreter (no inline asm there): the same rounded scale and shift,
      the exact product and sum in fp64 (exact unless the terms are 2**30 apart), one rounding to a's dtype."""
    check_activation(ACTIVATION)
    if MATH == "packed":
        tl.static_assert(a.dtype == tl.bfloat16 or a.dtype == tl.float16)
        s = tl.broadcast_to(scale.to(a.dtype)[None, :], a.shape)
        t = tl.broadcast_to(shift.to(a.dtype)[None, :], a.shape)
        if a.dtype == tl.bfloat16:
            if ACTIVATION == "relu":
                y = _fma_x2(a, s, t, "fma.rn.relu.bf16x2 $0, $1, $2, $3;")
            else:
                y = _fma_x2(a, s, t, "fma.rn.bf16x2 $0, $1, $2, $3;")
        elif ACTIVATION == "relu":
            y = _fma_x2(a, s, t, "fma.rn.relu.f16x2 $0, $1, $2, $3;")
        else:
            y = _fma_x2(a, s, t, "fma.rn.f16x2 $0, $1, $2, $3;")
    elif MATH == "rounded":
        s = round_fp64_to(scale.to(tl.float64), a.dtype)
        t = round_fp64_to(shift.to(tl.float64), a.dtype)
        y = activation(a.to(tl.float32).to(tl.float64) * s[None, :] + t[None, :], ACTIVATION, KEEP_NEG_ZERO=False)
        y = round_fp64_to(y, a.dtype).to(tl.float32).to(a.dtype)  # bf16: exact, so the truncating cast is right
    else:
        tl.static_assert(MATH == "acc", "MATH: acc, packed or rounded")
        y = activation(a.to(scale.dtype) * scale[None, :] + shift[None, :], ACTIVATION, KEEP_NEG_ZERO=False)
        y = y.to(a.dtype)
    return y


@triton.jit
def k_steps(n):
    """A main loop's trip count n (>= 1 wherever it is used) as one the compiler knows is at least 1. When it
    may be 0, LLVM gives the loop a skip edge whose block sets the accumulator's registers to the zeros of its
    init; that block meets the loop's exit while the last wgmmas are still in flight, and ptxas then serializes
    every wgmma of the loop (C7515, "non wgmma instructions defining accumulator registers ... between start and
    end of the pipeline stage": each HGMMA waits for itself, sm_90). Found 2026-12-05 on the 3x3 training
    forward's descriptor tiles, serialized or not by config and triton version as that edge came and went."""
    return tl.maximum(n, 1)


@triton.jit
def in_range(i, n):
    """0 <= i < n for int32 (int64) coordinates i and a size n >= 0, in one unsigned compare (a negative i wraps above
    any size): half the compares of a padding mask, recomputed per row in every k-step of a tap loop."""
    # n (an int32 argument, or an int where Triton specialized it) is compared as unsigned: the mixed-sign
    # comparison takes the unsigned operand's type
    if i.dtype == tl.int64:
        return i.to(tl.uint64, bitcast=True) < n
    return i.to(tl.uint32, bitcast=True) < n


@triton.jit
def zero_where_not(a, keep, MATH: tl.constexpr):
    """tl.where(keep, a, 0.0) for a prologue's activated tile (keep broadcasts to a's shape: the padding mask).
    "packed" (16-bit a on a GPU): one and.b32 per element pair with the mask as 16-bit all-ones / zeros, where the
    compiler's select unpacks each pair, selects and repacks (on sm_90, triton 3.6: 96 SEL and 73 PRMT in the 3x3
    training forward's k-step). The result's zeros are +0 either way, and a NaN in the padding is cleared too.
    keep may also be int16 all-ones / zeros already (tap_keep): no select on the way to the MMA operand."""
    if keep.dtype == tl.int16:
        bits = keep
        keep = keep != 0
    else:
        bits = tl.where(keep, -1, 0).to(tl.int16)
    if MATH == "packed":
        return tl.inline_asm_elementwise("and.b32 $0, $1, $2;", "=r,r,r", [a, tl.broadcast_to(bits, a.shape)],
                                         dtype=a.dtype, is_pure=True, pack=2)
    return tl.where(keep, a, 0.0)


@triton.jit
def tap_bits(h0, w0, H, W, dil_h, dil_w, never, any_ptr, R: tl.constexpr, S: tl.constexpr):
    """Per output pixel (its input row h0 and column w0 at tap (0, 0)), which taps lie inside the image, once per
    tile: bit r for the row of tap row r, bit R + s for the column of tap column s (int16; tap_keep reads them).
    Returned through a load that never reads (mask ``never``, all false; any_ptr any pointer of the launch):
    Triton builds a register MMA operand in its own layout back to loads and constants only (the MMAv3 operand
    pass), so a padding mask from arithmetic on the tile's coordinates kept the activated tile in a blocked layout,
    converted through shared memory every k-step and reshuffled into the wgmma's registers (the 3x3 training
    forward at 128x128x64, sm_90: 304 / 303 SASS instructions per k-step on triton 3.6 / 3.8, 228 / 225 so)."""
    tl.static_assert(R + S <= 16)
    tb = tl.zeros_like(h0).to(tl.int16)
    for i in tl.static_range(R):
        tb |= in_range(h0 + i * dil_h, H).to(tl.int16) << i
    for j in tl.static_range(S):
        tb |= in_range(w0 + j * dil_w, W).to(tl.int16) << (R + j)
    return tl.load(any_ptr.to(tl.pointer_type(tl.int16)) + tl.zeros_like(h0), mask=never, other=tb)


@triton.jit
def tap_keep(tb, r, s, R: tl.constexpr):
    """[rows, 1] int16 all-ones where tap (r, s) of the row's pixel is inside the image (tap_bits), zeros elsewhere."""
    return (-((tb >> r.to(tl.int16)) & (tb >> (R + s).to(tl.int16)) & 1))[:, None]


@triton.jit
def activation_grad(grad, src, ACTIVATION: tl.constexpr):
    """The activation's backward of grad, gated by src: the activation's output, or its input where a kernel
    recomputes that (ReLU's gate is the same on both). "relu": torch's threshold_backward, 0 where src <= 0,
    else grad (a NaN src passes the gradient, as in PyTorch); "none": grad."""
    check_activation(ACTIVATION)
    if ACTIVATION == "relu":
        grad = tl.where(src <= 0, 0.0, grad)
    return grad


@triton.jit
def add_residual_act_store(y, n, p, q, offs_k, mask_m, mask_k, res_ptr, stride_res_n, stride_res_c, stride_res_h,
                           stride_res_w, RES_C,
                           out_ptr, stride_out_n, stride_out_c, stride_out_h, stride_out_w,
                           HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr):
    """The common tail of every forward epilogue: + residual (first RES_C channels), activation, cast, store."""
    if HAS_RESIDUAL:
        # Channels >= RES_C read as zero: the option-A shortcut's zero-padded channels, never stored.
        r_mask = mask_m[:, None] & (mask_k & (offs_k < RES_C))[None, :]
        y += tl.load(tile_ptrs(res_ptr, n, p, q, offs_k, stride_res_n, stride_res_c, stride_res_h, stride_res_w),
                     mask=r_mask, other=0.0).to(y.dtype)
    y = activation(y, ACTIVATION)
    o_ptrs = tile_ptrs(out_ptr, n, p, q, offs_k, stride_out_n, stride_out_c, stride_out_h, stride_out_w)
    tl.store(o_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_k[None, :])


@triton.jit
def tile_mean_m2(v, mask_m, cnt):
    """Per-channel mean and sum of squared deviations of the valid rows of v (for Chan's merge)."""
    v = tl.where(mask_m[:, None], v, 0.0)
    mean = tl.sum(v, axis=0) / tl.maximum(cnt, 1.0)
    d = tl.where(mask_m[:, None], v - mean[None, :], 0.0)
    return mean, tl.sum(d * d, axis=0)
