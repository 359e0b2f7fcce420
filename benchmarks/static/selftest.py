"""The budget check on tiny known kernels: one that must spill, one that must not; and the stem budget.

    python benchmarks/static/selftest.py [ARCH]        -> JSON: [{"config": ..., "failures": [...]}, ...]
    python benchmarks/static/selftest.py [ARCH] stem   -> the same for the forward stem, padded and not

A 256x256 fp32 accumulator over 128 threads needs 512 registers per thread (> 255): it spills on
every arch. A 64x64 tile does not. The stem conv (3 channels, 7x7/2) compiles twice through the real
launcher: as shipped (channels padded to STEM_CPAD = 4: 8-byte loads) and with STEM_CPAD set to 3 (no
padding: each filter row is a 2-byte-aligned run of 21 values, loaded 2 bytes at a time), which the
stem budget must flag. tests/test_static_check.py runs this in a subprocess (its own process has
TRITON_INTERPRET=1, under which nothing is compiled for a GPU).
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


if __name__ == "__main__":
    arch = int(sys.argv[1]) if len(sys.argv) > 1 else 90
    stem = len(sys.argv) > 2 and sys.argv[2] == "stem"
    print(json.dumps([dict(config=r["config"], variant=r.get("variant"), spill_bytes=r.get("spill_bytes"),
                           mma=r.get("mma"), b16_loads_in_loop=r.get("b16_loads_in_loop"), error=r.get("error"),
                           failures=report.budget_failures([r])) for r in (stem_rows if stem else rows)(arch)]))
