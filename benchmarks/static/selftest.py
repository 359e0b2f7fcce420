"""The budget check on tiny known kernels: one that must spill, one that must not; and the stem budget.

    python benchmarks/static/selftest.py [ARCH]        -> JSON: [{"config": ..., "failures": [...]}, ...]
    python benchmarks/static/selftest.py [ARCH] stem   -> the same for the forward stem, padded and not
    python benchmarks/static/selftest.py [ARCH] fp64   -> the conv kernels with fp64 operands

A 256x256 fp32 accumulator over 128 threads needs 512 registers per thread (> 255): it spills on
every arch. A 64x64 tile does not. The stem conv (3 channels, 7x7/2) compiles twice through the real
launcher: as shipped (channels padded to STEM_CPAD = 4: 8-byte loads) and with STEM_CPAD set to 3 (no
padding: each filter row is a 2-byte-aligned run of 21 values, loaded 2 bytes at a time), which the
stem budget must flag. fp64: the forward (eval and training), dgrad and wgrad kernels with fp64 operands
(gradcheck's dtype), one small config each. Exit 1 where a row does not compile. tests/test_static_check.py
runs this in a subprocess (its own process has TRITON_INTERPRET=1, under which nothing is compiled for a GPU).
"""
import json
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore", message=".*FP_FUSION.*")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from static import report  # noqa: E402
from static.driver import compile_only  # noqa: E402

SPILLING = (256, 256, 64, 4, 3)
CLEAN = (64, 64, 32, 4, 3)


@triton.jit
def _matmul(a_ptr, b_ptr, c_ptr, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptr + offs_m[:, None] * K + (k0 + offs_k)[None, :])
        b = tl.load(b_ptr + (k0 + offs_k)[:, None] * N + offs_n[None, :])
        acc = tl.dot(a, b, acc)
    tl.store(c_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(c_ptr.dtype.element_ty))


def rows(arch: int = 90):
    a = torch.empty((1024, 1024), device="meta", dtype=torch.bfloat16)
    with compile_only(arch) as (records, tags):
        tags.update(layer="selftest", mode="eval", phase="fwd", dtype="bf16")
        for bm, bn, bk, w, s in (SPILLING, CLEAN):
            _matmul[(1, 1)](a, a, a, 1024, 1024, 1024, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=s)
    return report.make_rows(records, arch)


def stem_rows(arch: int = 90):
    """The forward stem conv at a small batch, as shipped and unpadded (see the module docstring)."""
    from fusedres.kernels import conv

    x = torch.empty((8, 3, 64, 64), device="meta", dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    w = torch.empty((64, 3, 7, 7), device="meta", dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    shipped = conv.STEM_CPAD
    with compile_only(arch) as (records, tags):
        tags.update(layer="selftest-stem", mode="eval", phase="fwd", dtype="bf16")
        try:
            for cpad in (shipped, 3):
                conv.STEM_CPAD = cpad  # read by the launcher at each call
                conv.conv_bn_act(x, w, stride=(2, 2), padding=(3, 3),
                                 config=dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3))
        finally:
            conv.STEM_CPAD = shipped
    return report.make_rows(records, arch, sass=False)


def fp64_rows(arch: int = 90):
    """The conv kernels with fp64 operands through their real launchers: the forward (eval with a residual;
    training with the prologue and STATS), dgrad with the BN gradient and a residual, wgrad with the prologue.
    Triton 3.6 (the GPU image's) rejects an fp64 accumulator in tl.dot unless out_dtype says so (_tiles.mma); the
    interpreter and triton 3.8 accept it, so only a compile for a GPU target shows it."""
    from fusedres.kernels import conv, dgrad, wgrad

    def t(*shape):
        return torch.empty(shape, device="meta", dtype=torch.float64).to(memory_format=torch.channels_last)

    x, w, dy, k = t(2, 16, 8, 8), t(32, 16, 3, 3), t(2, 32, 8, 8), torch.empty(32, device="meta", dtype=torch.float64)
    c = k[:16]
    geo = ((1, 1), (1, 1), (1, 1), 1)
    small = dict(num_warps=4, num_stages=2)
    with compile_only(arch) as (records, tags):
        tags.update(layer="selftest-fp64", mode="eval", phase="fwd", dtype="fp64")
        conv.conv_bn_act(x, w, k, k, padding=(1, 1), residual=dy, relu=True,
                         config=dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=16, **small))
        tags.update(mode="train")
        conv.conv_bn_stats(x, w, padding=(1, 1), prologue=(c, c), config=dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=16,
                                                                               **small))
        tags.update(phase="bwd")
        dgrad.conv_dgrad_bn(dy, w, x.shape, *geo, (x, c, c, c, c), residual=(x, x, 1),
                            config=dict(BLOCK_M=64, BLOCK_N=16, BLOCK_K=32, **small))
        wgrad.conv_wgrad(dy, x, w, *geo, prologue=(c, c), config=dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, **small))
    return report.make_rows(records, arch, sass=False)


if __name__ == "__main__":
    arch = int(sys.argv[1]) if len(sys.argv) > 1 else 90
    which = {"stem": stem_rows, "fp64": fp64_rows}.get(sys.argv[2] if len(sys.argv) > 2 else "", rows)
    out = which(arch)
    print(json.dumps([dict(kernel=r["kernel"], config=r["config"], variant=r.get("variant"),
                           spill_bytes=r.get("spill_bytes"), mma=r.get("mma"), mma_type=r.get("mma_type"),
                           b16_loads_in_loop=r.get("b16_loads_in_loop"), error=r.get("error"),
                           failures=report.budget_failures([r])) for r in out]))
    sys.exit(1 if any(r.get("error") for r in out) else 0)
