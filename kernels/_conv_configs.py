"""Launch configurations of the forward conv kernel (kernels/conv.py): the per-arch autotune tiles, their
pruning to a problem, and the fixed config used when autotuning is off."""
from typing import Optional

import torch
import triton

from ._launch import INTERPRETED, clamp_block, target_arch

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per arch. Few on purpose: every shipped config must
# pass the parity tests on the GPU (a config-specific miscompile would otherwise hide), and each compiles
# without register spills at the ResNet-50 shapes in every variant once _SPILLS below is pruned (static check,
# triton 3.6 and 3.9; no 2-warp tiles: they compile to mma.sync, not wgmma, on sm_90).
_TILES = {
    90: [(128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4), (128, 128, 32, 8, 4),
         (64, 64, 32, 4, 5), (128, 64, 64, 8, 3)],
    80: [(128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 128, 32, 8, 4), (64, 64, 32, 4, 5), (128, 64, 64, 8, 3)],
    # sm_80 spills: (128, 64, 64, 4, 4) 16-24 B; (64, 64, 64, 4, 4) 8 B with the projection
}
# Tiles that spill in one variant only (static check at the ResNet-50 shapes, triton 3.6 and 3.9), matched on the
# listed tile or the tile fitted to the problem: the fp32 projection (two fp32 operand pipelines; bf16/fp16 fit every
# tile since its per-channel fold moved out of the accumulator's layout), sm_80 STATS convs at 128x64x64, the
# stem's padded-row loads on sm_80 (triton 3.6: 8 B eval, 24 B STATS).
_SPILLS = {
    (90, "shortcut_fp32"): {(128, 64, 64, 4, 4), (64, 128, 64, 4, 4)},   # 64-264 B
    (80, "shortcut_fp32"): {(128, 64, 64, 8, 3), (64, 128, 64, 4, 4)},   # 16-40 B
    (80, "stats"): {(128, 64, 64, 8, 3)},   # triton 3.9: ptxas caps it at 128 registers and spills 16 B (1x1)
    (80, "stem"): {(128, 64, 32, 8, 4)},
    (80, "stem_stats"): {(128, 64, 32, 8, 3), (128, 64, 32, 8, 4)},
}
# A variant whose every tile spills tunes over these instead (0 spills on both tritons; BLOCK_M = STATS_BLOCK_M).
_REPLACE = {(80, "stem_stats"): [(128, 32, 32, 4, 3), (128, 64, 32, 4, 3)]}
# The deterministic-mode tile of a variant whose default one (128x128x64 w8 s3, fitted) spills.
_FIXED = {(80, "stem_stats"): (128, 32, 32, 4, 3)}
# STATS convs: BLOCK_M is fixed, so the per-tile BN partials are sized before the launch; the rest is tuned
# over the 8-warp tiles (128x64x64 at 4 warps spilled 32 B with the BN prologue on triton 3.9).
STATS_BLOCK_M = 128


def _fit(kw: dict, kg: int, red: int, stem: bool = False) -> dict:
    """Shrink tiles to the problem (4-channel ResNeXt groups); the stem path's BLOCK_K holds a filter row."""
    bk = triton.next_power_of_2(red) if stem else clamp_block(kw["BLOCK_K"], red)
    return dict(kw, BLOCK_N=clamp_block(kw["BLOCK_N"], kg), BLOCK_K=bk)


def _variant(stem: bool, shortcut: bool, stats: bool, fp32: bool = False) -> str:
    """The key of a kernel variant in _SPILLS / _REPLACE / _FIXED."""
    if stem:
        return "stem_stats" if stats else "stem"
    if shortcut:
        return "shortcut_fp32" if fp32 else "shortcut"
    return "stats" if stats else ""


def _prune_configs(configs, named_args, **kwargs):
    """This arch's configs minus the variant's spilling tiles, shrunk to the problem, deduplicated."""
    named_args = {**named_args, **kwargs}  # the launcher passes its arguments by keyword
    kg, red = named_args["KG"], max(named_args["CG"], named_args["CD"])
    stem = bool(named_args.get("STEM_CPAD"))
    arch = target_arch()
    x = named_args.get("x_ptr")
    fp32 = getattr(x, "dtype", None) == torch.float32
    key = (arch, _variant(stem, bool(named_args.get("HAS_SHORTCUT")), bool(named_args.get("STATS")), fp32))
    allowed = {_sig(c.kwargs, c) for c in gpu_configs(arch)}
    spills = _SPILLS.get(key, set())
    out = _fitted([c for c in configs if _sig(c.kwargs, c) in allowed], kg, red, stem, spills)
    if not out:  # never leave a variant without a config
        out = _fitted(_configs(_REPLACE[key]), kg, red, stem, set()) if key in _REPLACE else \
            _fitted([c for c in configs if _sig(c.kwargs, c) in allowed], kg, red, stem, set())
    return out


def _fitted(configs, kg: int, red: int, stem: bool, spills: set) -> list:
    seen, out = set(), []
    for cfg in configs:
        kw = _fit(cfg.kwargs, kg, red, stem)
        if _sig(cfg.kwargs, cfg) in spills or _sig(kw, cfg) in spills or _sig(kw, cfg) in seen:
            continue
        seen.add(_sig(kw, cfg))
        out.append(triton.Config(kw, num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    return out


def _configs(tiles) -> list:
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in tiles]


def _sig(kw: dict, cfg) -> tuple:
    return kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], cfg.num_warps, cfg.num_stages


def gpu_configs(arch: Optional[int] = None, stats: bool = False):
    """Every config the autotuner may pick on an arch (all archs when None); stats: those of STATS convs.
    Exposed so the GPU tests can run each one."""
    if arch is None:  # with the per-variant replacements, so the GPU tests run those too
        tiles = sorted({t for ts in (*_TILES.values(), *_REPLACE.values()) for t in ts})
    else:
        tiles = _TILES[arch]
    return _configs(t for t in tiles if not stats or (t[0] == STATS_BLOCK_M and t[3] == 8))


def _fixed_config(m: int, kg: int, red: int, stem: bool = False, shortcut: bool = False,
                  stats: bool = False) -> dict:
    """The config when autotuning is off: the interpreter (big tiles: per-op overhead dominates) and
    deterministic mode (another process could tune another tile, so another summation order)."""
    if INTERPRETED:
        return dict(BLOCK_M=clamp_block(256, m), BLOCK_N=clamp_block(128, kg), BLOCK_K=clamp_block(128, red))
    # 8 warps by default: 4 spilled with the BN prologue + STATS (sm_90)
    bm, bn, bk, w, s = _FIXED.get((target_arch(), _variant(stem, shortcut, stats)), (STATS_BLOCK_M, 128, 64, 8, 3))
    return dict(_fit(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), kg, red, stem), num_warps=w, num_stages=s)
