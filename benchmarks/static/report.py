"""Rows (one per layer class x kernel x config x arch x triton version), budgets, JSON and markdown."""
import json
import os
from typing import Dict, List

import triton

from . import analyze, anchor_budgets
from .driver import Launch

# Integer launch arguments that describe a layer's shape, in the order they are printed.
SHAPE_KEYS = ("M", "H", "W", "P", "Q", "CG", "KG", "CD", "C", "K", "T", "L", "stride_h")
_CACHE: Dict[str, Dict] = {}  # analysis per compiled-kernel hash: identical code is analysed once

# Issue 10's wgrad budgets. Its main-loop cost has no PTX equivalent (ptxas rewrites the loop: the 64-bit
# divide is one PTX instruction but a CALL of ~70 SASS instructions, address math is re-associated), so
# these kernels are disassembled even under --no-sass (~25 cubins in the CI subset: a second or two).
WGRAD_KERNEL = "_conv_wgrad_kernel"
SASS_KERNELS = frozenset({WGRAD_KERNEL})
# Issue 17's budgets read every bf16 conv kernel's main loop (and its calls) on sm_90: disassembled there even
# under --no-sass (about 1 s a cubin), with the anchor.
CONV_KERNELS = frozenset({"_conv_bn_act_kernel", "_conv_dgrad_kernel", WGRAD_KERNEL, "anchor_gemm_kernel"})


def needs_sass(kernel: str, arch: int, dtype: str) -> bool:
    """Whether a budget needs this kernel's SASS (so --no-sass still disassembles it): issue 17's are bf16."""
    return kernel in SASS_KERNELS or (arch == anchor_budgets.BUDGET_ARCH and kernel in CONV_KERNELS and dtype == "bf16")
# Main-loop SASS instructions per MFLOP before the rewrite (ee19f73: 16 CALLs of the 64-bit divide per
# iteration, N=32 wgmma): a median of ~10101 as counted here (sass_summary; ~2500 per warpgroup, the
# convention of benchmarks/RESULTS.md). The budget: 3x fewer, on sm_90 (the arch the baseline is from).
WGRAD_BASELINE_INSTR_PER_MFLOP = 10101
WGRAD_MAX_INSTR_PER_MFLOP = round(WGRAD_BASELINE_INSTR_PER_MFLOP / 3)
WGRAD_MIN_WGMMA_N = 64  # the old wgrad issued 64x32x16 (64x16x16 at the stem): half-width wgmma

# The BN reductions of kernels/bn.py (bn_finalize, sum_rows), split in two passes by bn._split.
BN_REDUCTIONS = frozenset({"_bn_chunk_stats_kernel", "_bn_finalize_kernel", "_sum_rows_kernel"})
_BN_PASS2 = {"_bn_chunk_stats_kernel": "_bn_finalize_kernel", "_sum_rows_kernel": "_sum_rows_kernel"}
MIN_CHUNK_ROWS = 8  # bn._split's chunks are a multiple of 8 rows (its BLOCK_T 8..32 divides them)


# Not variants: TMA and the switches heuristics derive from it (OUT_DESC, PERSISTENT, STRIDE2, W_AS_A) are config
# switches; PTX is the target (every compiled row has it, the interpreter none)
_CONFIG_FLAGS = ("TMA", "OUT_DESC", "PERSISTENT", "STRIDE2", "W_AS_A", "PTX")


def _variant(const: Dict, dtype: str) -> str:
    """The constexpr switches that change the code (true flags, filter size), not the tile sizes."""
    parts = [f"{const['R']}x{const['S']}"] if "R" in const and "S" in const else []
    # TMA (the forward's descriptor path) is a config switch, not a variant: the autotuner picks it or a pointer
    # config for the same launch, so both are rows of one kernel (the config label says "tma")
    parts += [k for k, v in const.items() if v is True and not k.startswith("BLOCK") and k not in _CONFIG_FLAGS]
    # the stem paths' channel padding (forward and wgrad STEM_CPAD, wgrad STEM_SP): ints, not flags
    parts += [f"{k}={v}" for k, v in const.items() if k.startswith("STEM_") and type(v) is int and v]
    # the activation (kernels/_launch.py ACTIVATIONS): a name, not a flag; "none" is left out like a false flag
    if const.get("ACTIVATION", "none") != "none":
        parts.append(f"ACTIVATION={const['ACTIVATION']}")
    if dtype == "fp32" and const.get("DOT_PRECISION"):
        parts.append(const["DOT_PRECISION"])
    return " ".join(parts)


def _shape(ints: Dict) -> str:
    return " ".join(f"{k}={ints[k]}" for k in SHAPE_KEYS if k in ints)


def _config(const: Dict, meta) -> str:
    blocks = "x".join(str(const[k]) for k in const if k.startswith("BLOCK"))
    tma = " tma" if const.get("TMA") is True else ""
    tma += " persistent" if const.get("PERSISTENT") is True else ""
    if meta is None:
        return blocks + tma
    return f"{blocks} w{meta.num_warps} s{meta.num_stages}{tma}"


def analyse(compiled, sass: bool = True, tile_loop: bool = False) -> Dict:
    """Every static figure of one compiled kernel (cached by its hash). sass=False skips the
    disassembly (the main-loop columns stay empty; the MMA kind then comes from the PTX). tile_loop: a persistent
    kernel, whose outermost loop walks output tiles around its k-loops (analyze.ttgir_summary)."""
    h = (compiled.metadata.hash, sass)
    if h not in _CACHE:
        asm = compiled.asm
        res = analyze.resources(asm["cubin"])
        row = dict(regs=res["regs"], spill_bytes=res["stack"] + res["local"],
                   smem=compiled.metadata.shared + res["static_smem"])
        row.update(analyze.ptx_summary(asm["ptx"]))
        if sass:
            row.update(analyze.sass_summary(analyze.sass(asm["cubin"])))
        else:
            row["mma"] = row["ptx_mma"]
        row.update(analyze.ttgir_summary(asm["ttgir"], tile_loop))
        row["has_dot"] = row["dot_loops"] > 0 or row["mma"] != "none"
        if not row["has_dot"]:
            row["operand_loads"] = "-"  # no dot: the column is about the dot's operands
        _CACHE[h] = row
    return dict(_CACHE[h])


def _bn_reduction(rec: Launch):
    """(rows, column blocks, bytes of one row per program) of a BN reduction launch: bn._split's arguments."""
    c, i = rec.constexprs, rec.ints
    if rec.kernel == "_sum_rows_kernel":
        return i["T"], triton.cdiv(i["L"], c["BLOCK_L"]), c["BLOCK_L"] * rec.elem_bytes.get("src_ptr", 4)
    return i["T"], triton.cdiv(i["K"], c["BLOCK_K"]), 2 * c["BLOCK_K"] * rec.elem_bytes.get("part_mean_ptr", 4)


def _is_pass1(rec: Launch) -> bool:
    """The parallel first pass of a split reduction (over chunks of rows)."""
    return rec.kernel == "_bn_chunk_stats_kernel" or (rec.kernel == "_sum_rows_kernel" and
                                                        rec.ints.get("ROWS", 0) < rec.ints.get("T", 0))


def bn_passes(records: List[Launch]) -> Dict[int, str]:
    """Per BN reduction launch (by id): "pass 1", "pass 2" (the merge that follows a pass 1, over its
    chunks), "one pass", or "one pass (small)": one pass because the launcher's own split logic
    (``bn._split``, called here, so this tracks the code) finds one program's read at most
    ``bn._ONE_PASS_BYTES``, about what a second launch costs."""
    from fusedres.kernels import bn  # the launcher's module, as the fused paths import it

    out, prev = {}, None
    for rec in records:
        if rec.kernel in BN_REDUCTIONS and not rec.error:
            if _is_pass1(rec):
                kind = "pass 1"
            elif (prev is not None and _is_pass1(prev) and _BN_PASS2[prev.kernel] == rec.kernel and prev.grid
                  and (prev.grid[0] if prev.kernel == "_bn_chunk_stats_kernel" else prev.grid[1]) == rec.ints["T"]):
                kind = "pass 2"
            else:
                rows, cols, row_bytes = _bn_reduction(rec)
                chunk, _ = bn._split(rows, cols, row_bytes, gpu=True)
                small = chunk >= rows and cols < bn._GPU_PROGRAMS
                kind = "one pass (small)" if small else "one pass"
            out[id(rec)] = kind
        prev = rec
    return out


def make_rows(records: List[Launch], arch: int, sass: bool = True) -> List[Dict]:
    """One row per distinct (layer, mode, phase, kernel, variant, shape, config, programs); repeats are
    counted. sass=False still disassembles SASS_KERNELS (their budgets need SASS)."""
    rows: Dict[tuple, Dict] = {}
    passes = bn_passes(records)
    for rec in records:
        meta = rec.compiled.metadata if rec.compiled is not None else None
        row = dict(layer=rec.tags.get("layer", "?"), mode=rec.tags.get("mode", "?"),
                   phase=rec.tags.get("phase", "?"), dtype=rec.tags.get("dtype", "?"), kernel=rec.kernel,
                   variant=_variant(rec.constexprs, rec.tags.get("dtype", "")), shape=_shape(rec.ints),
                   config=_config(rec.constexprs, meta), arch=arch, triton=triton.__version__,
                   num_warps=meta.num_warps if meta else rec.config.get("num_warps"), error=rec.error,
                   programs=_prod(rec.grid) if rec.grid else None, taps=_taps(rec))
        if id(rec) in passes:
            row["bn_pass"] = passes[id(rec)]
            row["reduction_rows"], row["column_blocks"] = _bn_reduction(rec)[:2]
        key = tuple(row.get(k) for k in ("layer", "mode", "phase", "dtype", "kernel", "variant", "shape", "config",
                                         "programs", "bn_pass"))
        if key in rows:
            rows[key]["launches"] += 1
            continue
        row["launches"] = 1
        if rec.compiled is not None:
            try:
                row.update(analyse(rec.compiled, sass or needs_sass(rec.kernel, arch, row["dtype"]),
                                   rec.constexprs.get("PERSISTENT") is True))
                row["ctas_per_sm"], row["occupancy_limit"] = analyze.ctas_per_sm(arch, row["regs"], row["smem"],
                                                                                 row["num_warps"])
            except Exception as exc:  # noqa: BLE001 - an analysis failure is reported on its row
                row["error"] = f"analysis: {type(exc).__name__}: {exc}"
        rows[key] = row
    return list(rows.values())


def _taps(rec: Launch):
    """Filter taps a launch covers: R*S (forward, wgrad), NR*NS (a dgrad phase)."""
    c, i = rec.constexprs, rec.ints
    if "R" in c and "S" in c:
        return c["R"] * c["S"]
    return i["NR"] * i["NS"] if "NR" in i and "NS" in i else None


def _prod(vals) -> int:
    out = 1
    for v in vals:
        out *= v
    return out


def budget_failures(rows: List[Dict]) -> List[str]:
    """The budgets of issues 9 and 10, one message per broken (row, budget)."""
    out = []
    for r in rows:
        where = f"{r['layer']} {r['mode']}/{r['phase']} {r['dtype']} {r['kernel']} [{r['variant']}] " \
                f"{r['config']} sm_{r['arch']} triton {r['triton']}"
        if r.get("error"):
            out.append(f"{where}: does not compile ({r['error']})")
            continue
        fp32 = r["dtype"] == "fp32"  # fp32 (TF32) spills and wgmma waits: named budgets of anchor_budgets (item 5)
        if r["spill_bytes"] > 0 and not (fp32 and r["arch"] == anchor_budgets.BUDGET_ARCH):
            out.append(f"{where}: spills {r['spill_bytes']} B")
        limit = analyze.ARCH_LIMITS[r["arch"]]["smem_cta"]
        if r["smem"] > limit:
            out.append(f"{where}: shared memory {r['smem']} B > {limit} B")
        want = {90: "wgmma", 100: "tcgen05"}.get(r["arch"])  # each arch's own tensor-core MMA (issue 17 item 6)
        if want and r["has_dot"] and r["mma"] != want:
            out.append(f"{where}: dot compiles to {r['mma']}, not {want}")
        # Issue 17 item 5: fp32 convs run TF32 by PyTorch's default (the static check compiles them so): TF32 MMA
        if r["dtype"] == "fp32" and r["has_dot"] and r.get("mma_type") != "tf32":
            out.append(f"{where}: fp32 dot runs {r.get('mma_type') or 'no MMA'}, not TF32")
        if r["layer"] == anchor_budgets.ANCHOR_LAYER:  # the yardstick: its tile loop holds the dot by design
            continue
        # Issue 10's loop shape: one pipelined loop holds the dot (the projection variant: the main GEMM's
        # and the shortcut's, one accumulator), the pipeline never drains inside a loop, and no 64-bit
        # division runs in a loop (the old wgrad called the divide routine 16 times per iteration).
        max_loops = 2 if "HAS_SHORTCUT" in r.get("variant", "") else 1
        if r["has_dot"] and (r.get("dot_loops") or 0) > max_loops:
            out.append(f"{where}: {r['dot_loops']} loops hold the dot (budget {max_loops})")
        if r.get("async_wait0_in_loop"):
            out.append(f"{where}: async_wait num=0 inside a loop ({r['async_wait0_in_loop']})")
        # an operand written to shared memory in the loop: MMA and loads serialize
        if r.get("wgmma_wait0_in_loop") and not fp32:
            out.append(f"{where}: wgmma wait pendings=0 inside a loop ({r['wgmma_wait0_in_loop']})")
        if r.get("div64_in_loop"):
            out.append(f"{where}: 64-bit div/rem inside a loop ({r['div64_in_loop']})")
        if r["kernel"] == WGRAD_KERNEL:
            out += [f"{where}: {m}" for m in _wgrad_failures(r)]
        # The stem paths pad 3 channels to 4 so a filter row is one aligned run: 8-byte loads, never 2.
        if any(p.startswith("STEM_C") for p in r.get("variant", "").split()) and r.get("b16_loads_in_loop"):
            out.append(f"{where}: {r['b16_loads_in_loop']} 2-byte scalar global loads inside the main loop")
        if r["kernel"] in BN_REDUCTIONS:
            out += [f"{where}: {m}" for m in _bn_failures(r)]
    return out


def coverage_failures(rows: List[Dict]) -> List[str]:
    """The CI subset must hold, per arch, the rows issue 10's budgets are about: a budget over no rows
    passes silently (a renamed kernel or constexpr, a layer dropped from the subset)."""
    out = []
    for arch in sorted({r["arch"] for r in rows}):
        rs = [r for r in rows if r["arch"] == arch and not r.get("error")]
        need = {
            "wgrad": [r for r in rs if r["kernel"] == WGRAD_KERNEL],
            "forward stem (STEM_CPAD)": [r for r in rs if r["kernel"] == "_conv_bn_act_kernel"
                                         and "STEM_CPAD=" in r["variant"]],
            "stem wgrad (STEM_CPAD)": [r for r in rs if r["kernel"] == WGRAD_KERNEL and "STEM_CPAD=" in r["variant"]],
            "BN finalize, pass 1": [r for r in rs if r["kernel"] == "_bn_chunk_stats_kernel"],
            "sum_rows": [r for r in rs if r["kernel"] == "_sum_rows_kernel" and r.get("bn_pass")],
        }
        out += [f"sm_{arch}: no {what} rows in the budget subset" for what, got in need.items() if not got]
    return out


def _wgrad_failures(r: Dict) -> List[str]:
    """Issue 10's wgrad: no call (the 64-bit divide routine) in the loop; on sm_90 wgmma N >= 64 and
    main-loop SASS instructions per MFLOP 3x under the old kernel's."""
    out = []
    if r.get("calls_in_loop") or r.get("main_loop_calls"):
        out.append(f"call inside the main loop (PTX {r.get('calls_in_loop')}, SASS {r.get('main_loop_calls')})")
    if r["arch"] != 90:
        return out
    ns = [n for n in (r.get("wgmma_n"), r.get("sass_wgmma_n")) if n is not None]
    if not ns or min(ns) < WGRAD_MIN_WGMMA_N:
        out.append(f"wgmma N {min(ns) if ns else 'none'} < {WGRAD_MIN_WGMMA_N}")
    ipm = r.get("instr_per_mflop")
    # TF32 wgmma is k8, half bf16's k16: twice the MMA instructions per MFLOP at the same loop shape
    limit = WGRAD_MAX_INSTR_PER_MFLOP * (2 if r.get("dtype") == "fp32" else 1)
    if ipm is None or ipm > limit:
        tf32 = ", x2 for TF32" if limit != WGRAD_MAX_INSTR_PER_MFLOP else ""
        out.append(f"main-loop SASS instructions per MFLOP {ipm} > {limit} "
                   f"(baseline {WGRAD_BASELINE_INSTR_PER_MFLOP} / 3{tf32})")
    return out


def _bn_failures(r: Dict) -> List[str]:
    """BN reductions: at least one program per SM in every launch that carries the reduction's bulk.
    Exempt, as genuinely small:
    - "pass 2": the fixed-order merge of pass 1's partials, one program per column block by design; its
      input is pass 1's output, one row per pass-1 chunk (pass 1's own programs are budgeted);
    - "one pass (small)": the launcher (bn._split) keeps one pass because one program reads at most
      bn._ONE_PASS_BYTES, about what the second launch of a split would cost;
    - a launch with fewer MIN_CHUNK_ROWS-row chunks x column blocks than SMs: the finest split bn._split
      makes cannot fill the card (e.g. 196 tiles x 4 channel blocks at ResNet-50 layer3, 100 programs)."""
    sms = analyze.ARCH_LIMITS[r["arch"]]["sms"]
    kind, programs = r.get("bn_pass"), r.get("programs")
    if programs is None or kind is None:
        return [f"BN reduction launch not classified (grid {programs}, pass {kind})"]
    if kind in ("pass 2", "one pass (small)") or programs >= sms:
        return []
    if triton.cdiv(r["reduction_rows"], MIN_CHUNK_ROWS) * r["column_blocks"] < sms:
        return []
    return [f"{programs} programs < {sms} SMs ({kind})"]


COLUMNS = [("layer", "layer"), ("mode", "mode"), ("phase", "fwd/bwd"), ("dtype", "dtype"), ("kernel", "kernel"),
           ("variant", "variant"), ("shape", "shape"), ("config", "BMxBNxBK warps stages"), ("arch", "sm"),
           ("triton", "triton"), ("regs", "regs"), ("spill_bytes", "spill B"), ("smem", "smem B"),
           ("ctas_per_sm", "CTAs/SM"), ("occupancy_limit", "bound by"), ("mma", "mma"), ("mma_type", "mma type"),
           ("operand_loads", "dot loads"), ("dot_loops", "for-loops w/ dot"), ("async_wait0_in_loop", "wait0 in loop"),
           ("div64_in_loop", "div64 in loop"), ("calls_in_loop", "calls in loop"), ("wgmma_n", "wgmma N"),
           ("b16_loads_in_loop", "2-B loads in loop"), ("main_loop", "main loop"),
           ("main_loop_instrs", "main-loop instrs"), ("instr_per_mflop", "instr/MFLOP"), ("vs_anchor", "vs anchor"),
           ("issue_share", "issue share at peak (%)"), ("per_tile_instrs", "instrs per tile out of loop"),
           ("sass_calls", "CALL.REL"), ("programs", "programs"),
           ("bn_pass", "BN pass"), ("launches", "launches"), ("error", "error")]


def markdown(rows: List[Dict]) -> str:
    head = "| " + " | ".join(t for _, t in COLUMNS) + " |"
    sep = "|" + "---|" * len(COLUMNS)
    lines = [head, sep]
    for r in rows:
        cells = ["" if r.get(k) is None else str(r.get(k)).replace("|", "/") for k, _ in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _span(vals) -> str:
    vals = [v for v in vals if v is not None]
    if not vals:
        return ""
    lo, hi = min(vals), max(vals)
    return str(lo) if lo == hi else f"{lo}-{hi}"


def summary_markdown(rows: List[Dict]) -> str:
    """One line per (layer, mode, phase, kernel, variant, arch, triton) over its configs: the per-layer table."""
    groups: Dict[tuple, List[Dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in ("layer", "mode", "phase", "dtype", "kernel", "variant", "arch",
                                               "triton")), []).append(r)
    lines = ["| layer | mode | fwd/bwd | dtype | kernel | variant | sm | triton | configs | spilling (max B) | regs | "
             "smem B | CTAs/SM | mma | mma type | dot loads | for-loops w/ dot | wait0 in loop | div64 in loop | "
             "calls in loop | wgmma N | 2-B loads in loop | instr/MFLOP | vs anchor | issue share at peak (%) | "
             "CALL.REL | programs | errors |",
             "|" + "---|" * 28]
    for key, rs in groups.items():
        ok = [r for r in rs if not r.get("error")]
        spill = [r["spill_bytes"] for r in ok if r["spill_bytes"] > 0]
        cells = [*map(str, key), str(len(rs)), f"{len(spill)} ({max(spill)})" if spill else "0",
                 _span(r["regs"] for r in ok), _span(r["smem"] for r in ok), _span(r.get("ctas_per_sm") for r in ok),
                 "/".join(sorted({r["mma"] for r in ok})), "/".join(sorted({r.get("mma_type") or "-" for r in ok})),
                 "/".join(sorted({r["operand_loads"] for r in ok})),
                 _span(r["dot_loops"] for r in ok), _span(r["async_wait0_in_loop"] for r in ok),
                 _span(r["div64_in_loop"] for r in ok), _span(r.get("calls_in_loop") for r in ok),
                 _span(r.get("wgmma_n") for r in ok), _span(r.get("b16_loads_in_loop") for r in ok),
                 _span(r.get("instr_per_mflop") for r in ok), _span(r.get("vs_anchor") for r in ok),
                 _span(r.get("issue_share") for r in ok), _span(r.get("sass_calls") for r in ok),
                 _span(r.get("programs") for r in ok),
                 str(len(rs) - len(ok))]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def write(rows: List[Dict], out_dir: str, name: str = "static") -> List[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, f"{name}.{ext}") for ext in ("json", "md", "summary.md")]
    with open(paths[0], "w") as f:
        json.dump(rows, f, indent=1)
    with open(paths[1], "w") as f:
        f.write(markdown(rows))
    with open(paths[2], "w") as f:
        f.write(summary_markdown(rows))
    return paths
