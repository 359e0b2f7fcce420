"""What a compiled kernel shows: resources (cuobjdump), MMA kind and main-loop shape (SASS, PTX, TTGIR).

Every function takes the text or bytes Triton returns in ``compiled.asm`` and returns plain numbers, so
rows can be compared across triton versions and archs.
"""
import functools
import os
import re
import subprocess
import tempfile
from typing import Dict, List, Optional, Tuple

import triton

# Per-SM limits used for the CTAs/SM column and the shared-memory budget.
# sms: the card a budget sizes a launch for (H100 SXM: 132; A100: 108).
ARCH_LIMITS = {
    90: dict(regs=65536, smem_cta=232448, smem_sm=233472, threads=2048, ctas=32, sms=132),
    80: dict(regs=65536, smem_cta=166912, smem_sm=167936, threads=2048, ctas=32, sms=108),
    100: dict(regs=65536, smem_cta=232448, smem_sm=233472, threads=2048, ctas=32, sms=148),  # B200
}
RESERVED_SMEM = 1024  # per CTA, reserved by the driver on sm_80 and later


@functools.lru_cache(None)
def nvidia_tool(name: str) -> Optional[str]:
    """ptxas / cuobjdump / nvdisasm as shipped inside triton's nvidia backend (None when absent)."""
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.isfile(path) and os.access(path, os.X_OK) else None


def _run_on_cubin(tool: str, args: List[str], cubin: bytes) -> str:
    exe = nvidia_tool(tool)
    if exe is None:
        raise FileNotFoundError(f"{tool} not found in triton's backends/nvidia/bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([exe, *args, f.name], capture_output=True, text=True, check=True).stdout


def resources(cubin: bytes) -> Dict[str, int]:
    """Registers per thread and stack (spill) bytes per thread, from ``cuobjdump --dump-resource-usage``."""
    out = _run_on_cubin("cuobjdump", ["--dump-resource-usage"], cubin)
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", out)
    if m is None:
        raise ValueError(f"unexpected cuobjdump output: {out[:200]}")
    return dict(regs=int(m[1]), stack=int(m[2]), static_smem=int(m[3]), local=int(m[4]))


def ctas_per_sm(arch: int, regs: int, smem: int, num_warps: int) -> Tuple[int, str]:
    """Resident CTAs per SM that registers, shared memory and threads allow, and which one binds."""
    lim = ARCH_LIMITS[arch]
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256  # allocation unit: 256 registers per warp
    by = {
        "regs": (lim["regs"] // regs_per_warp) // num_warps,
        "smem": lim["smem_sm"] // (smem + RESERVED_SMEM),
        "threads": lim["threads"] // (32 * num_warps),
    }
    n = min(min(by.values()), lim["ctas"])
    return n, min(by, key=by.get)


# --- SASS -----------------------------------------------------------------------------------------

_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH = re.compile(r"\bBRA\b.*?`\((\.L_x_\d+)\)")
_HGMMA = re.compile(r"\bHGMMA\.(\d+)x(\d+)x(\d+)")
_HMMA = re.compile(r"\bHMMA\.168(\d+)")  # HMMA.16816 -> m16 n8 k16, HMMA.1688 -> m16 n8 k8
# sm_100's tcgen05 MMA (UTCHMMA 16-bit, UTCQMMA 8-bit, ...): one thread issues it for the CTA, its shape is in
# an instruction descriptor register, so it gives the MMA kind, not FLOPs (no main-loop figure on sm_100).
_UTCMMA = re.compile(r"\bUTC\w*MMA\b")
# A call of a routine, e.g. CALL.REL.NOINC `($__internal_0_$__cuda_sm20_div_s64): not one whose target is a
# local label (ptxas on sm_80 leaves a loop by a predicated CALL.REL.NOINC to the label after it: a jump).
_ROUTINE_CALL = re.compile(r"\bCALL\b(?!.*`\(\.L_x_\d+\))")


def sass(cubin: bytes) -> str:
    return _run_on_cubin("nvdisasm", ["-c"], cubin)


def _mma_flops_per_warp(op: str) -> float:
    """FLOPs one warp contributes per executed MMA instruction (a wgmma is shared by 4 warps)."""
    m = _HGMMA.search(op)
    if m:
        return 2.0 * int(m[1]) * int(m[2]) * int(m[3]) / 4
    m = _HMMA.search(op)
    if m:
        return 2.0 * 16 * 8 * int(m[1])
    return 0.0


_WGMMA_WAIT0 = re.compile(r"WARPGROUP\.DEPBAR\.LE\s+gsb0,\s*0x0\b")


def sass_loops(text: str):
    """Instructions [(addr, op)] and loops [(start_idx, end_idx)] (a backward branch closes a loop)."""
    instrs, labels, pending = [], {}, []
    for line in text.splitlines():
        lab = _LABEL.match(line.strip())
        if lab:
            pending.append(lab[1])
            continue
        m = _INSTR.search(line)
        if m:
            for name in pending:
                labels[name] = len(instrs)
            pending = []
            instrs.append((int(m[1], 16), m[2]))
    loops = []
    for i, (_, op) in enumerate(instrs):
        b = _BRANCH.search(op)
        if b and b[1] in labels and labels[b[1]] < i:  # (a branch to itself ends every kernel: not a loop)
            loops.append((labels[b[1]], i))
    return instrs, loops


def sass_summary(text: str) -> Dict:
    """MMA kind, the main loop (the innermost loop with the most MMA instructions, or the whole kernel
    when the dot loop was unrolled) and its cost in SASS instructions per MFLOP one warp issues."""
    instrs, loops = sass_loops(text)
    ops = [op for _, op in instrs]
    n_hgmma = sum(1 for op in ops if _HGMMA.search(op))
    n_hmma = sum(1 for op in ops if _HMMA.search(op))
    best = None
    for lo, hi in loops:
        body = ops[lo:hi + 1]
        n_mma = sum(1 for op in body if _mma_flops_per_warp(op) > 0)
        if n_mma == 0:
            continue
        inner = not any(lo <= a and b <= hi and (a, b) != (lo, hi) and
                        any(_mma_flops_per_warp(op) > 0 for op in ops[a:b + 1]) for a, b in loops)
        if inner and (best is None or n_mma > best[2]):
            best = (lo, hi, n_mma)
    hgmma_n = [int(m[2]) for m in map(_HGMMA.search, ops) if m]
    kind = "wgmma" if n_hgmma else "mma.sync" if n_hmma else "tcgen05" if any(map(_UTCMMA.search, ops)) else "none"
    out = dict(mma=kind, sass_instrs=len(ops), sass_calls=sum(1 for op in ops if _ROUTINE_CALL.search(op)),
               sass_wgmma_n=min(hgmma_n) if hgmma_n else None,
               sass_stl=sum(1 for op in ops if re.search(r"\bSTL\b", op)),
               main_loop="none", main_loop_instrs=0, main_loop_mma=0, instr_per_mflop=None, main_loop_calls=0,
               main_loop_stl=0, main_loop_wgmma_wait0=0, per_tile_instrs=None)
    if best is None and n_hgmma + n_hmma:  # the dot loop was fully unrolled: the whole kernel is its body
        best = (0, len(ops) - 1, n_hgmma + n_hmma)
        out["main_loop"] = "unrolled (whole kernel)"
    elif best is not None:
        out["main_loop"] = "loop"
    if best is not None:
        lo, hi, n_mma = best
        body = ops[lo:hi + 1]
        flops = sum(_mma_flops_per_warp(op) for op in body)
        out.update(main_loop_instrs=len(body), main_loop_mma=n_mma,
                   instr_per_mflop=round(len(body) / (flops / 1e6), 1),
                   main_loop_calls=sum(1 for op in body if _ROUTINE_CALL.search(op)),
                   main_loop_stl=sum(1 for op in body if re.search(r"\bSTL\b", op)),
                   # waits for every wgmma in flight: one per step is the TTGIR's pendings=0 (its own budget); one
                   # per HGMMA is ptxas serializing them (C7515: the accumulator defined by a non-wgmma instruction
                   # while they run, e.g. a loop-skip edge's zeros: _tiles.k_steps)
                   main_loop_wgmma_wait0=sum(1 for op in body if _WGMMA_WAIT0.search(op)))
        # Per output tile, outside the main loop: the rest of the smallest loop around it (a persistent
        # kernel's tile loop), or of the whole kernel (one tile per program).
        outer = [b - a + 1 for a, b in loops if a <= lo and hi <= b and (a, b) != (lo, hi)]
        out["per_tile_instrs"] = (min(outer) if outer else len(ops)) - len(body)
    return out


# --- PTX ------------------------------------------------------------------------------------------

_PTX_LABEL = re.compile(r"^(\$L__BB\d+_\d+):")
_PTX_BRA = re.compile(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+)")
_DIV64 = re.compile(r"\b(?:div|rem)\.[su]64\b")
_PRED = r"^(?:@!?%\w+\s+)?"  # an optional guard predicate before the opcode
_CALL = re.compile(_PRED + r"call(?:\.uni)?\b")  # (the debug sections' "DW_AT_call_*" comments are not opcodes)
_LD_GLOBAL = re.compile(_PRED + r"ld\.global((?:\.[\w:]+)*)\s")
_CP_ASYNC_2B = re.compile(_PRED + r"cp\.async\.c[ag]\.shared(?:::\w+)?\.global\S*\s+"
                          r"\[[^\]]*\],\s*\[[^\]]*\],\s*(?:0x)?2\b")
_WGMMA_SHAPE = re.compile(r"\bwgmma\.mma_async\S*?\.m(\d+)n(\d+)k(\d+)\b")
# The MMA's operand type: wgmma / mma.sync spell it after the accumulator's (.f32.tf32.tf32), tcgen05 as kind::
_MMA_TYPE = re.compile(r"\b(?:wgmma\.mma_async|mma\.sync)\S*?\.m\d+n\d+k\d+(?:\.row\.col)?\.f32\.(\w+)\."
                       r"|\btcgen05\.mma\S*?\.kind::(\w+)")


def _two_byte_load(line: str) -> bool:
    """A scalar (non-vector) 2-byte global load: ld.global[.nc/.L1::...].b16/u16/s16/f16/bf16, or a
    cp.async of 2 bytes (not a legal cp-size today: counted in case a backend ever emits one)."""
    m = _LD_GLOBAL.match(line)
    if m:
        mods = m[1]
        return bool(re.search(r"\.(?:b|u|s|f|bf)16$", mods)) and not re.search(r"\.v\d+\b", mods)
    return bool(_CP_ASYNC_2B.match(line))


def ptx_summary(text: str) -> Dict:
    """64-bit div/rem, calls and 2-byte scalar global loads inside loops, how the dot operands are loaded
    (TMA, cp.async or plain loads), and the smallest wgmma N."""
    lines = [ln.strip() for ln in text.splitlines()]
    labels = {}
    for i, ln in enumerate(lines):
        m = _PTX_LABEL.match(ln)
        if m:
            labels[m[1]] = i
    in_loop = [False] * len(lines)
    for i, ln in enumerate(lines):
        m = _PTX_BRA.search(ln)
        if m and m[1] in labels and labels[m[1]] <= i:
            for j in range(labels[m[1]], i + 1):
                in_loop[j] = True
    div_loop = sum(1 for i, ln in enumerate(lines) if in_loop[i] and _DIV64.search(ln))
    calls_loop = sum(1 for i, ln in enumerate(lines) if in_loop[i] and _CALL.match(ln))
    b16_loop = sum(1 for i, ln in enumerate(lines) if in_loop[i] and _two_byte_load(ln))
    wgmma_n = [int(m[2]) for m in _WGMMA_SHAPE.finditer(text)]
    if "cp.async.bulk.tensor" in text:
        loads = "tma"
    elif re.search(r"\bcp\.async\.(?:ca|cg)\b", text):
        loads = "cp.async"
    else:
        loads = "ld.global"
    mma = "wgmma" if "wgmma.mma_async" in text else "tcgen05" if "tcgen05.mma" in text else (
        "mma.sync" if re.search(r"\bmma\.sync\b", text) else "none")
    types = sorted({a or b for a, b in _MMA_TYPE.findall(text)})
    return dict(div64_in_loop=div_loop, div64_total=len(_DIV64.findall(text)), operand_loads=loads, ptx_mma=mma,
                mma_type="/".join(types),
                calls_in_loop=calls_loop, b16_loads_in_loop=b16_loop, wgmma_n=min(wgmma_n) if wgmma_n else None)


# --- TTGIR ----------------------------------------------------------------------------------------

_DOT = re.compile(r"(?:=\s*|^)(?:ttng\.warp_group_dot|tt\.dot|ttng\.tc_gen5_mma)\b")  # tc_gen5_mma: no result


def ttgir_summary(text: str, tile_loop: bool = False) -> Dict:
    """scf.for loops that contain a dot (and their deepest nesting), pipelining waits inside loops. tile_loop: the
    outermost scf.for is a persistent kernel's walk over output tiles (one tile's k-loops and epilogue per trip; the
    pipeline drains at the end of each tile there, as one-tile kernels drain after their loop): not counted."""
    stack: List[List] = []  # [is_for, has_dot]
    dot_loops = depth = wait0 = wgwait0 = 0
    for line in text.splitlines():
        s = line.strip()
        closes = s.startswith("}")
        if closes and stack:
            is_for, has_dot = stack.pop()
            dot_loops += int(is_for and has_dot)
            if has_dot and stack:
                stack[-1][1] = True
        in_for = any(f for f, _ in stack)
        if _DOT.search(s):
            if stack:
                stack[-1][1] = True
            depth = max(depth, sum(1 for f, _ in stack if f))
        if in_for and re.search(r"ttg\.async_wait\b.*\{num = 0 ", s):
            wait0 += 1
        if in_for and re.search(r"warp_group_dot_wait\b.*\{pendings = 0 ", s):
            wgwait0 += 1
        if s.endswith("{") and not closes:
            is_for = bool(re.search(r"\bscf\.for\b", s))
            if is_for and tile_loop and not any(f for f, _ in stack):
                is_for = tile_loop = False  # the tile loop: a region like an if's
            stack.append([is_for, False])
        elif s.endswith("{") and closes:  # "} else {" / "} do {": a sibling region of the same op
            stack.append([False, False])
    return dict(dot_loops=dot_loops, dot_depth=depth, async_wait0_in_loop=wait0, wgmma_wait0_in_loop=wgwait0,
                pipelined_copies=len(re.findall(r"ttg\.async_copy_global_to_local|async_tma_copy", text)))
