"""The one convolution kernel: implicit GEMM over NHWC with a constexpr-selected epilogue.

GEMM view of a conv: M = N*P*Q output pixels, N-dim = K output channels (per group), reduction =
R*S*C (per group). The reduction loops (r, s) outside and C-blocks inside, so no div/mod runs in
the inner loop, and with channels_last activations each A-tile row is a contiguous run of channels.

Epilogue, all in fp32 (fp64 for fp64 inputs), then one cast and store:
    y = scale[k] * acc + shift[k]                         folded eval-mode BN (scale=1, shift=0 for none)
    y += scale_d[k] * (xd conv1x1 wd)[k] + shift_d[k]     HAS_SHORTCUT: projection shortcut, a 2nd GEMM
    y += residual[k]   for k < RES_C                      HAS_RESIDUAL: identity / option-A shortcut
    y = relu(y)                                           APPLY_RELU, NaN-propagating like torch.relu
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _conv_bn_act_kernel(
    x_ptr,        # input activations, logical [N, C, H, W], any strides
    w_ptr,        # weights [K, C/groups, R, S], any strides (channels_last is the fast one)
    scale_ptr,    # [K] per-output-channel multiplier (folded BN), fp32 (fp64 for fp64 inputs)
    shift_ptr,    # [K] per-output-channel offset
    out_ptr,      # output [N, K, P, Q], any strides
    res_ptr,      # residual [N, RES_C, P, Q] (HAS_RESIDUAL), any strides
    xd_ptr,       # shortcut input [N, CD, HD, WD] (HAS_SHORTCUT), any strides
    wd_ptr,       # shortcut 1x1 weights [K, CD, 1, 1] (HAS_SHORTCUT)
    scale_d_ptr,  # [K] shortcut BN multiplier (HAS_SHORTCUT)
    shift_d_ptr,  # [K] shortcut BN offset (HAS_SHORTCUT)
    M, H, W, P, Q,          # M = N*P*Q output pixels; input H x W; output P x Q
    CG, KG,                 # input and output channels per group
    RES_C, CD,              # residual channels (<= K); shortcut input channels
    sxn, sxc, sxh, sxw,     # strides of x
    swk, swc, swr, sws,     # strides of w
    son, soc, soh, sow,     # strides of out
    srn, src, srh, srw,     # strides of residual
    sdn, sdc, sdh, sdw,     # strides of xd
    swdk, swdc,             # strides of wd (output, input channel)
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    stride_d,               # shortcut conv stride (both axes)
    R: tl.constexpr, S: tl.constexpr,          # filter size
    HAS_RESIDUAL: tl.constexpr, HAS_SHORTCUT: tl.constexpr, APPLY_RELU: tl.constexpr,
    DOT_PRECISION: tl.constexpr,   # "ieee" or "tf32" for fp32 operands (follows cudnn.allow_tf32)
    UPCAST_DOT: tl.constexpr,      # interpreter + bf16: its bf16 tl.dot is wrong, dot in fp32 instead
    ACC_FP64: tl.constexpr,        # fp64 inputs accumulate in fp64 (gradcheck, references)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    # 1-D grid over (m-tile, n-tile), n fastest: neighbouring programs share the A tile.
    # axis 1 is the group.
    pid = tl.program_id(0)
    num_n = tl.cdiv(KG, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    g = tl.program_id(1)

    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)          # int64: M*C can pass 2**31
    offs_kg = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                        # channel within group
    offs_k = g * KG + offs_kg                                                # global output channel
    mask_m = offs_m < M
    mask_k = offs_kg < KG
    n = offs_m // (P * Q)
    pq = offs_m % (P * Q)
    p = pq // Q
    q = pq % Q
    offs_c = tl.arange(0, BLOCK_K)

    x_base = x_ptr + n * sxn + (g * CG).to(tl.int64) * sxc
    w_base = w_ptr + offs_k.to(tl.int64) * swk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_dtype)
    for r in range(R):
        h = p * stride_h - pad_h + r * dil_h
        for s in range(S):
            w_in = q * stride_w - pad_w + s * dil_w
            valid = mask_m & (h >= 0) & (h < H) & (w_in >= 0) & (w_in < W)
            a_ptrs = x_base + h * sxh + w_in * sxw
            b_ptrs = w_base + r * swr + s * sws
            for c0 in range(0, CG, BLOCK_K):
                cc = c0 + offs_c
                mask_c = cc < CG
                a = tl.load(a_ptrs[:, None] + cc[None, :] * sxc, mask=valid[:, None] & mask_c[None, :], other=0.0)
                b = tl.load(b_ptrs[None, :] + cc[:, None] * swc, mask=mask_c[:, None] & mask_k[None, :], other=0.0)
                if UPCAST_DOT:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    scale = tl.load(scale_ptr + offs_k, mask=mask_k, other=0.0).to(acc_dtype)
    shift = tl.load(shift_ptr + offs_k, mask=mask_k, other=0.0).to(acc_dtype)
    y = acc * scale[None, :] + shift[None, :]

    if HAS_SHORTCUT:
        # Projection shortcut: a second GEMM (1x1 conv, stride stride_d, no padding) into its own
        # accumulator, with its own folded BN, so the block tail is one launch.
        acc_d = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_dtype)
        ad_ptrs = xd_ptr + n * sdn + (p * stride_d) * sdh + (q * stride_d) * sdw
        bd_ptrs = wd_ptr + offs_k.to(tl.int64) * swdk
        for c0 in range(0, CD, BLOCK_K):
            cc = c0 + offs_c
            mask_c = cc < CD
            a = tl.load(ad_ptrs[:, None] + cc[None, :] * sdc, mask=mask_m[:, None] & mask_c[None, :], other=0.0)
            b = tl.load(bd_ptrs[None, :] + cc[:, None] * swdc, mask=mask_c[:, None] & mask_k[None, :], other=0.0)
            if UPCAST_DOT:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc_d = tl.dot(a, b, acc_d, input_precision=DOT_PRECISION)
        scale_d = tl.load(scale_d_ptr + offs_k, mask=mask_k, other=0.0).to(acc_dtype)
        shift_d = tl.load(shift_d_ptr + offs_k, mask=mask_k, other=0.0).to(acc_dtype)
        y += acc_d * scale_d[None, :] + shift_d[None, :]

    if HAS_RESIDUAL:
        # Channels >= RES_C read as zero: the option-A shortcut's zero-padded channels, never stored.
        r_ptrs = res_ptr + (n * srn + p * srh + q * srw)[:, None] + offs_k.to(tl.int64)[None, :] * src
        r_mask = mask_m[:, None] & (mask_k & (offs_k < RES_C))[None, :]
        y += tl.load(r_ptrs, mask=r_mask, other=0.0).to(acc_dtype)

    if APPLY_RELU:
        y = tl.where(y < 0, 0.0, y)  # not tl.maximum: NaN must propagate as in torch.relu

    o_ptrs = out_ptr + (n * son + p * soh + q * sow)[:, None] + offs_k.to(tl.int64)[None, :] * soc
    tl.store(o_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_k[None, :])


# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------

# True when TRITON_INTERPRET=1 was set before this module was imported: the kernels then run on
# CPU tensors through numpy, one program at a time.
INTERPRETED = type(_conv_bn_act_kernel).__name__ == "InterpretedFunction"

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). Few on purpose: every shipped config must
# pass the parity tests on the GPU (a config-specific miscompile would otherwise hide).
_GPU_TILES = [
    (128, 128, 64, 8, 3),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (64, 64, 64, 4, 4),
    (128, 128, 32, 4, 4),
    (64, 64, 32, 2, 5),
]


def _clamp_block(block: int, size: int) -> int:
    """A block no larger than needed for ``size`` elements; tl.dot needs at least 16."""
    return max(16, min(block, triton.next_power_of_2(max(size, 1))))


def _prune_configs(configs, named_args, **_):
    """Shrink tiles to the problem (C=3 stem, 4-channel ResNeXt groups) and drop duplicates."""
    kg, red = named_args["KG"], max(named_args["CG"], named_args["CD"])
    seen, out = set(), []
    for cfg in configs:
        kw = dict(cfg.kwargs)
        kw["BLOCK_N"] = _clamp_block(kw["BLOCK_N"], kg)
        kw["BLOCK_K"] = _clamp_block(kw["BLOCK_K"], red)
        sig = (kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], cfg.num_warps, cfg.num_stages)
        if sig not in seen:
            seen.add(sig)
            out.append(triton.Config(kw, num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    return out


def gpu_configs():
    """Every config the autotuner may pick (exposed so the GPU tests can run each one)."""
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in _GPU_TILES]


_conv_bn_act_autotuned = triton.autotune(
    configs=gpu_configs(),
    key=["M", "H", "W", "P", "Q", "CG", "KG", "CD", "stride_h", "R", "S", "HAS_RESIDUAL", "HAS_SHORTCUT"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_conv_bn_act_kernel)


def _interpreter_blocks(m: int, kg: int, red: int):
    """Large tiles: under the interpreter per-op overhead dominates, so fewer programs is faster."""
    return dict(BLOCK_M=_clamp_block(256, m), BLOCK_N=_clamp_block(128, kg), BLOCK_K=_clamp_block(128, red))


def _dot_precision(x: torch.Tensor) -> str:
    if x.dtype == torch.float64:
        return "ieee"
    if x.dtype == torch.float32:
        # Follow PyTorch's switch for convolutions so fused fp32 matches eager fp32.
        return "tf32" if (x.is_cuda and torch.backends.cudnn.allow_tf32) else "ieee"
    return "tf32"  # ignored for 16-bit operands; the backend default


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------

def _out_size(size: int, k: int, stride: int, pad: int, dil: int) -> int:
    return (size + 2 * pad - dil * (k - 1) - 1) // stride + 1


def conv_bn_act(x, weight, scale, shift, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1,
                residual=None, relu=False, shortcut=None, config=None):
    """Launch the fused conv. Tensors in, a new tensor out; inputs are assumed validated.

    x: [N, C, H, W]; weight: [K, C/groups, R, S]; scale, shift: [K] (fp32, or fp64 for fp64 x).
    residual: optional [N, RES_C, P, Q] with RES_C <= K, added to the first RES_C channels.
    shortcut: optional (xd [N, CD, HD, WD], wd [K, CD, 1, 1], scale_d [K], shift_d [K], stride_d).
    config: optional dict of BLOCK_M/BLOCK_N/BLOCK_K (+ num_warps/num_stages) to bypass autotuning.
    Returns [N, K, P, Q] in x's dtype and memory format (channels_last in, channels_last out).
    """
    n, c, h, w = x.shape
    k, cg, r, s = weight.shape
    p = _out_size(h, r, stride[0], padding[0], dilation[0])
    q = _out_size(w, s, stride[1], padding[1], dilation[1])
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
        else torch.contiguous_format
    out = torch.empty((n, k, p, q), device=x.device, dtype=x.dtype, memory_format=fmt)
    m = n * p * q
    if m == 0 or k == 0:
        return out
    kg = k // groups
    if residual is None:
        res, res_c, res_strides = out, 0, (0, 0, 0, 0)  # dummy pointer, never read
    else:
        res, res_c, res_strides = residual, residual.shape[1], residual.stride()
    if shortcut is None:
        xd, wd, sc_d, sh_d, stride_d = x, weight, scale, shift, 1  # dummies, never read
        cd, xd_strides, wd_strides = 0, (0, 0, 0, 0), (0, 0)
    else:
        xd, wd, sc_d, sh_d, stride_d = shortcut
        cd, xd_strides, wd_strides = xd.shape[1], xd.stride(), wd.stride()[:2]
    args = (x, weight, scale, shift, out, res, xd, wd, sc_d, sh_d,
            m, h, w, p, q, cg, kg, res_c, cd,
            *x.stride(), *weight.stride(), *out.stride(), *res_strides, *xd_strides, *wd_strides,
            stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1], stride_d)
    flags = dict(R=r, S=s, HAS_RESIDUAL=residual is not None, HAS_SHORTCUT=shortcut is not None,
                 APPLY_RELU=bool(relu), DOT_PRECISION=_dot_precision(x),
                 UPCAST_DOT=INTERPRETED and x.dtype == torch.bfloat16, ACC_FP64=x.dtype == torch.float64)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(kg, meta["BLOCK_N"]), groups)

    if config is None and INTERPRETED:
        config = _interpreter_blocks(m, kg, max(cg, cd))
    with torch.cuda.device(x.device) if x.is_cuda else _nullcontext():
        if config is None:
            _conv_bn_act_autotuned[grid](*args, **flags)
        else:
            _conv_bn_act_kernel[grid](*args, **flags, **config)
    return out


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
