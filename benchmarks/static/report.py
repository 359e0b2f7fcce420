"""Rows (one per layer class x kernel x config x arch x triton version), budgets, JSON and markdown."""
import json
import os
from typing import Dict, List

import triton

from . import analyze
from .driver import Launch

# Integer launch arguments that describe a layer's shape, in the order they are printed.
SHAPE_KEYS = ("M", "H", "W", "P", "Q", "CG", "KG", "CD", "C", "K", "T", "L", "stride_h")
_CACHE: Dict[str, Dict] = {}  # analysis per compiled-kernel hash: identical code is analysed once


def _variant(const: Dict, dtype: str) -> str:
    """The constexpr switches that change the code (true flags, filter size), not the tile sizes."""
    parts = [f"{const['R']}x{const['S']}"] if "R" in const and "S" in const else []
    parts += [k for k, v in const.items() if v is True and not k.startswith("BLOCK")]
    if dtype == "fp32" and const.get("DOT_PRECISION"):
        parts.append(const["DOT_PRECISION"])
    return " ".join(parts)


def _shape(ints: Dict) -> str:
    return " ".join(f"{k}={ints[k]}" for k in SHAPE_KEYS if k in ints)


def _config(const: Dict, meta) -> str:
    blocks = "x".join(str(const[k]) for k in const if k.startswith("BLOCK"))
    if meta is None:
        return blocks
    return f"{blocks} w{meta.num_warps} s{meta.num_stages}"


def analyse(compiled, sass: bool = True) -> Dict:
    """Every static figure of one compiled kernel (cached by its hash). sass=False skips the
    disassembly (the main-loop columns stay empty; the MMA kind then comes from the PTX)."""
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
        row.update(analyze.ttgir_summary(asm["ttgir"]))
        row["has_dot"] = row["dot_loops"] > 0 or row["mma"] != "none"
        if not row["has_dot"]:
            row["operand_loads"] = "-"  # no dot: the column is about the dot's operands
        _CACHE[h] = row
    return dict(_CACHE[h])


def make_rows(records: List[Launch], arch: int, sass: bool = True) -> List[Dict]:
    """One row per distinct (layer, mode, phase, kernel, variant, shape, config); repeats are counted."""
    rows: Dict[tuple, Dict] = {}
    for rec in records:
        meta = rec.compiled.metadata if rec.compiled is not None else None
        row = dict(layer=rec.tags.get("layer", "?"), mode=rec.tags.get("mode", "?"),
                   phase=rec.tags.get("phase", "?"), dtype=rec.tags.get("dtype", "?"), kernel=rec.kernel,
                   variant=_variant(rec.constexprs, rec.tags.get("dtype", "")), shape=_shape(rec.ints),
                   config=_config(rec.constexprs, meta), arch=arch, triton=triton.__version__,
                   num_warps=meta.num_warps if meta else rec.config.get("num_warps"), error=rec.error)
        key = tuple(row[k] for k in ("layer", "mode", "phase", "dtype", "kernel", "variant", "shape", "config"))
        if key in rows:
            rows[key]["launches"] += 1
            continue
        row["launches"] = 1
        if rec.compiled is not None:
            try:
                row.update(analyse(rec.compiled, sass))
                row["ctas_per_sm"], row["occupancy_limit"] = analyze.ctas_per_sm(arch, row["regs"], row["smem"],
                                                                                 row["num_warps"])
            except Exception as exc:  # noqa: BLE001 - an analysis failure is reported on its row
                row["error"] = f"analysis: {type(exc).__name__}: {exc}"
        rows[key] = row
    return list(rows.values())


def budget_failures(rows: List[Dict]) -> List[str]:
    """The budgets of issue 9, one message per broken (row, budget)."""
    out = []
    for r in rows:
        where = f"{r['layer']} {r['mode']}/{r['phase']} {r['dtype']} {r['kernel']} [{r['variant']}] " \
                f"{r['config']} sm_{r['arch']} triton {r['triton']}"
        if r.get("error"):
            out.append(f"{where}: does not compile ({r['error']})")
            continue
        if r["spill_bytes"] > 0:
            out.append(f"{where}: spills {r['spill_bytes']} B")
        limit = analyze.ARCH_LIMITS[r["arch"]]["smem_cta"]
        if r["smem"] > limit:
            out.append(f"{where}: shared memory {r['smem']} B > {limit} B")
        if r["arch"] == 90 and r["has_dot"] and r["mma"] != "wgmma":
            out.append(f"{where}: dot compiles to {r['mma']}, not wgmma")
        # Issue 10's loop shape: one pipelined loop holds the dot (the projection variant: the main GEMM's
        # and the shortcut's, one accumulator), the pipeline never drains inside a loop, and no 64-bit
        # division runs in a loop (the old wgrad called the divide routine 16 times per iteration).
        max_loops = 2 if "HAS_SHORTCUT" in r.get("variant", "") else 1
        if r["has_dot"] and (r.get("dot_loops") or 0) > max_loops:
            out.append(f"{where}: {r['dot_loops']} loops hold the dot (budget {max_loops})")
        if r.get("async_wait0_in_loop"):
            out.append(f"{where}: async_wait num=0 inside a loop ({r['async_wait0_in_loop']})")
        if r.get("div64_in_loop"):
            out.append(f"{where}: 64-bit div/rem inside a loop ({r['div64_in_loop']})")
    return out


COLUMNS = [("layer", "layer"), ("mode", "mode"), ("phase", "fwd/bwd"), ("dtype", "dtype"), ("kernel", "kernel"),
           ("variant", "variant"), ("shape", "shape"), ("config", "BMxBNxBK warps stages"), ("arch", "sm"),
           ("triton", "triton"), ("regs", "regs"), ("spill_bytes", "spill B"), ("smem", "smem B"),
           ("ctas_per_sm", "CTAs/SM"), ("occupancy_limit", "bound by"), ("mma", "mma"),
           ("operand_loads", "dot loads"), ("dot_loops", "for-loops w/ dot"), ("async_wait0_in_loop", "wait0 in loop"),
           ("div64_in_loop", "div64 in loop"), ("main_loop", "main loop"), ("main_loop_instrs", "main-loop instrs"),
           ("instr_per_mflop", "instr/MFLOP"), ("launches", "launches"), ("error", "error")]


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
             "smem B | CTAs/SM | mma | dot loads | for-loops w/ dot | wait0 in loop | div64 in loop | instr/MFLOP | "
             "errors |", "|" + "---|" * 20]
    for key, rs in groups.items():
        ok = [r for r in rs if not r.get("error")]
        spill = [r["spill_bytes"] for r in ok if r["spill_bytes"] > 0]
        cells = [*map(str, key), str(len(rs)), f"{len(spill)} ({max(spill)})" if spill else "0",
                 _span(r["regs"] for r in ok), _span(r["smem"] for r in ok), _span(r.get("ctas_per_sm") for r in ok),
                 "/".join(sorted({r["mma"] for r in ok})), "/".join(sorted({r["operand_loads"] for r in ok})),
                 _span(r["dot_loops"] for r in ok), _span(r["async_wait0_in_loop"] for r in ok),
                 _span(r["div64_in_loop"] for r in ok), _span(r.get("instr_per_mflop") for r in ok),
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
