"""The anchor of the static check: a persistent GEMM whose operands load through device-side tensor descriptors.

A measuring instrument, not library code. It is the lean main loop Triton can emit for a GEMM on sm_90
(one TMA load per operand and step, a wgmma, nothing else), so a kernel's main-loop cost reads as a ratio
against it (issue 17 item 1). C[M, N] = A[M, K] @ B[N, K]^T, B as a weight is stored: [out, in].

Persistent: a grid of at most one program per SM walks the output tiles with a stride of the grid size,
in a grouped order (GROUP_M row tiles share each column tile's sweep, so B tiles stay in L2). The tile
loop is not flattened into the k-loop (flatten=False), so the k-loop compiles as a loop of its own and
its SASS is the main loop the report counts.
"""
import torch
import triton
import triton.language as tl

# The tile: 128x128x64, 4 warps (one warpgroup), a 3-stage request.
TILE = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8)
WARPS, STAGES = 4, 3
# ResNet-50 layer3's 1x1 reduce conv (1024 -> 256 channels, 14x14) at batch 256, as a GEMM.
LAYER3_GEMM = dict(M=256 * 14 * 14, N=256, K=1024)


@triton.jit
def anchor_gemm_kernel(a_ptr, b_ptr, c_ptr,  # A [M, K], B [N, K], C [M, N], all row-major
                       M, N, K,  # the GEMM's sizes
                       NUM_PROGRAMS: tl.constexpr,  # the grid size: the tile walk's stride
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       GROUP_M: tl.constexpr,  # row tiles per group of the tile order
                       K_STAGES: tl.constexpr):  # software-pipeline depth requested for the k-loop
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
    b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
    c_desc = tl.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[N, 1], block_shape=[BLOCK_M, BLOCK_N])
    row_tiles = tl.cdiv(M, BLOCK_M)
    col_tiles = tl.cdiv(N, BLOCK_N)
    steps = tl.cdiv(K, BLOCK_K)
    group_size = GROUP_M * col_tiles  # tiles in one group: GROUP_M rows x every column
    for t in tl.range(tl.program_id(0), row_tiles * col_tiles, NUM_PROGRAMS, flatten=False):
        first_row = (t // group_size) * GROUP_M
        rows_here = tl.minimum(row_tiles - first_row, GROUP_M)  # the last group may be short
        within = t % group_size
        m0 = (first_row + within % rows_here) * BLOCK_M
        n0 = (within // rows_here) * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for s in tl.range(steps, num_stages=K_STAGES):
            k0 = s * BLOCK_K
            acc = tl.dot(a_desc.load([m0, k0]), b_desc.load([n0, k0]).T, acc)  # out of bounds loads zeros
        c_desc.store([m0, n0], acc.to(c_ptr.dtype.element_ty))  # the descriptor clips the store at M, N


def anchor_gemm(a: torch.Tensor, b: torch.Tensor, programs: int = 132, tile: dict = TILE, warps: int = WARPS,
                stages: int = STAGES, c=None) -> torch.Tensor:
    """a [M, K] @ b[N, K]^T in a's dtype, on at most ``programs`` programs (an H100's 132 SMs by default)."""
    (m, k), (n, k2) = a.shape, b.shape
    assert k == k2, f"inner sizes differ: {a.shape} @ {b.shape}^T"
    assert a.is_contiguous() and b.is_contiguous(), "row-major operands (the descriptors' strides assume it)"
    c = torch.empty((m, n), dtype=a.dtype, device=a.device) if c is None else c
    tiles = triton.cdiv(m, tile["BLOCK_M"]) * triton.cdiv(n, tile["BLOCK_N"])
    grid = min(programs, tiles)
    # global scratch where each program writes its device-side descriptors (128 B apiece)
    triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device=a.device))
    anchor_gemm_kernel[(grid,)](a, b, c, m, n, k, NUM_PROGRAMS=grid, K_STAGES=stages, num_warps=warps,
                                num_stages=stages, **tile)
    return c


def compile_anchor(dtype: torch.dtype, blocks=(128, 128, 64)) -> None:
    """The anchor at the layer-3 GEMM on meta tensors (nothing runs), at a tile (BLOCK_M, BLOCK_N, BLOCK_K):
    under the static check's compile-only driver this compiles it for the driver's arch and records it."""
    g = LAYER3_GEMM
    a = torch.empty((g["M"], g["K"]), device="meta", dtype=dtype)
    b = torch.empty((g["N"], g["K"]), device="meta", dtype=dtype)
    tile = dict(TILE, BLOCK_M=blocks[0], BLOCK_N=blocks[1], BLOCK_K=blocks[2])
    stages = STAGES if dtype.itemsize < 4 else 2  # fp32 128x128x64 at 3 stages needs 263 KB of shared memory
    anchor_gemm(a, b, tile=tile, stages=stages, c=torch.empty((g["M"], g["N"]), device="meta", dtype=dtype))
