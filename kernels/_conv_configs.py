"""Launch configurations of the three conv kernels, in one dialect: forward (kernels/conv.py), dgrad
(kernels/dgrad.py) and wgrad (kernels/wgrad.py).

Each kernel is a GEMM that computes a BLOCK_M x BLOCK_N tile and steps through its reduction BLOCK_K at a time:

    kernel    BLOCK_M                     BLOCK_N                     BLOCK_K (the reduction)
    forward   output pixels (N*P*Q)       output channels per group   input channels per group, per tap
    dgrad     input pixels of a phase     input channels per group    output channels per group, per tap
    wgrad     (r, s, c) weight columns    output channels per group   output pixels (N*P*Q)

A config is a ``Tile`` (the three blocks, num_warps, num_stages). Per kernel: the per-arch tile table, a fit
(the tile shrunk to the problem) and a keep rule go through one pruning function (``prune``) for the autotuner,
and one function (``fixed_config``) gives the config used when autotuning is off.
"""
import inspect
import os
from typing import Callable, Iterable, List, NamedTuple, Optional

import torch
import triton

from ._launch import INTERPRETED, cdiv, clamp_block, current_arch, next_power_of_2, rows_need_int64, target_arch


class Tile(NamedTuple):
    """One launch configuration of a conv kernel (blocks as in the module docstring)."""
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int

    @classmethod
    def of(cls, cfg: triton.Config) -> "Tile":
        kw = cfg.kwargs
        return cls(kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], cfg.num_warps, cfg.num_stages)

    def blocks(self) -> dict:
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_K=self.block_k)

    def kwargs(self) -> dict:
        """The launch keywords: the three blocks, num_warps and num_stages."""
        return dict(self.blocks(), num_warps=self.num_warps, num_stages=self.num_stages)

    def config(self, **extra) -> triton.Config:
        return triton.Config(dict(self.blocks(), **extra), num_warps=self.num_warps, num_stages=self.num_stages)

    def fit(self, m: Optional[int] = None, n: Optional[int] = None, k: Optional[int] = None) -> "Tile":
        """The tile with each given extent's block shrunk to it (no block wider than the problem)."""
        return Tile(self.block_m if m is None else clamp_block(self.block_m, m),
                    self.block_n if n is None else clamp_block(self.block_n, n),
                    self.block_k if k is None else clamp_block(self.block_k, k), self.num_warps, self.num_stages)


def arch_tiles(table: dict, arch: Optional[int] = None) -> List[Tile]:
    """A tile table's tiles for one arch, or every arch's (sorted, deduplicated) when arch is None."""
    return sorted({t for ts in table.values() for t in ts}) if arch is None else list(table[arch])


def tile_configs(tiles: Iterable[Tile]) -> List[triton.Config]:
    return [t.config() for t in tiles]


def prune(configs, tiles: Iterable[Tile], fit: Callable[[Tile], Tile],
          keep: Callable[[Tile, Tile], bool] = lambda tile, fitted: True,
          extra: Callable[[Tile], dict] = lambda fitted: {}) -> List[triton.Config]:
    """The autotuner's early prune, for every conv kernel: of ``configs``, those in ``tiles`` (this arch's
    table), each fitted to the problem, kept when ``keep(tile, fitted)``, deduplicated (two tiles may fit to
    one), with ``extra(fitted)``'s per-tile constexprs added."""
    allowed, seen, out = set(tiles), set(), []
    for cfg in configs:
        tile = Tile.of(cfg)
        if tile not in allowed:
            continue
        fitted = fit(tile)
        if fitted in seen or not keep(tile, fitted):
            continue
        seen.add(fitted)
        out.append(fitted.config(**extra(fitted)))
    return out


# Tiles that spill, per (kernel, arch, dtype, variant), from the static check at the ResNet-50 shapes (triton 3.6 and
# 3.8/3.9), matched on the listed tile or the tile fitted to the problem (dtype_keep): the one spill rule of every conv
# kernel's prune. kernel: "conv" (the forward's pointer tiles), "conv_tma" (its descriptor tiles), "dgrad", "wgrad".
# arch: a config family (target_arch: 80 or 90, sm_90 entries hold on sm_100 too) or an exact arch (100: that
# arch's own compile only). dtype / variant None: every operand dtype / every variant. Forward variants: _conv_variant;
# its descriptor tiles': "residual" or "".
DTYPE_SPILLS = {
    # fp32 (TF32, issue 17 item 5): dgrad with the BN gradient at 128x64x64 w4 (16-48 B), dgrad with the gated residual
    # at 128x128 w8 (layer3.1: 32-48 B, triton 3.6), wgrad with the prologue at 64x128x64 w4 s3 (3x3: 24-32 B; 1x1 at
    # 250-255 registers).
    ("dgrad", 90, torch.float32, "bn_grad"): {Tile(128, 64, 64, 4, 3), Tile(128, 64, 64, 4, 4)},
    ("dgrad", 90, torch.float32, "res_mask"): {Tile(128, 128, 32, 8, 4), Tile(128, 128, 64, 8, 3)},
    ("wgrad", 90, torch.float32, "prologue"): {Tile(64, 128, 64, 4, 3)},
    # The forward: the fp32 projection (two fp32 operand pipelines; bf16/fp16 fit every tile since its per-channel
    # fold moved out of the accumulator's layout), sm_80 STATS convs at 128x64x64, the stem's padded-row loads on
    # sm_80 (triton 3.6: 8 B eval, 24 B STATS).
    # (64x64x32 w4 s5: 8 B on triton 3.8 in ResNet-18's layer2.0 3x3 conv with the projection, 148 registers)
    ("conv", 90, torch.float32, "shortcut"): {Tile(128, 64, 64, 4, 4), Tile(64, 128, 64, 4, 4),   # 64-264 B
                                              Tile(64, 64, 32, 4, 5)},
    ("conv", 80, torch.float32, "shortcut"): {Tile(128, 64, 64, 8, 3), Tile(64, 128, 64, 4, 4)},   # 16-40 B
    ("conv", 80, None, "stats"): {Tile(128, 64, 64, 8, 3)},  # triton 3.9: ptxas caps it at 128 registers, 16 B (1x1)
    # the plain fp32 3x3 forward at 64x64x32 w4 s5: 8 B on triton 3.8 (126 registers) since its padding mask takes
    # one unsigned compare per coordinate (_tiles.in_range); at 128x64x64 w4 s4 (255 registers) 40 B on triton 3.6
    # and 3.8 since its loop's trip count is known to be >= 1 (_tiles.k_steps, ResNet-50 layer1.0)
    ("conv", 90, torch.float32, ""): {Tile(64, 64, 32, 4, 5), Tile(128, 64, 64, 4, 4)},
    ("conv", 80, None, "stem"): {Tile(128, 64, 32, 8, 4)},
    ("conv", 80, None, "stem_stats"): {Tile(128, 64, 32, 8, 3), Tile(128, 64, 32, 8, 4)},
    # The forward's descriptor tiles (sm_90, triton 3.6 / 3.8): with the residual epilogue at 4 warps (88-136 B), and
    # fp32 (TF32) at 4 warps (the projection 8 B on 3.8; eval 8 B, STATS 176 B, prologue + STATS 184 B on 3.6): fp32
    # eval tunes over the 8-warp descriptor tile, fp32 STATS over pointers only.
    ("conv_tma", 90, None, "residual"): {Tile(128, 128, 64, 4, 3)},
    ("conv_tma", 90, torch.float32, None): {Tile(128, 128, 64, 4, 3)},
    # sm_100 (issue 17 item 6; tcgen05, ResNet-50 stem/layer1.0/layer3.0/layer3.1, bf16 and fp32, triton 3.6 / 3.8):
    # the 4-warp descriptor tile spills in every forward variant but 64-channel 1x1 ones (56-1600 B: the 128x128 fp32
    # accumulator read out of tensor memory by 128 threads), so sm_100 tunes over the 8-warp one (STATS: pointers).
    ("conv_tma", 100, None, None): {Tile(128, 128, 64, 4, 3)},
    ("conv", 100, None, ""): {Tile(128, 64, 64, 4, 4)},  # with a residual: 24 B bf16, 72 B fp32 (3.8)
    # the projection: 8 B at 4 warps, 16 B at 128x128x64 w8 (bf16 on 3.8, fp32 on both), 16 B at 128x128x32 (fp32, 3.8)
    ("conv", 100, None, "shortcut"): {Tile(128, 64, 64, 4, 4), Tile(64, 128, 64, 4, 4), Tile(128, 128, 64, 8, 3)},
    ("conv", 100, torch.float32, "shortcut"): {Tile(128, 128, 32, 8, 4)},
    ("dgrad", 100, None, ""): {Tile(128, 64, 32, 4, 5)},  # 16 B bf16 (3.6), 8 B fp32 (3.8)
    ("wgrad", 100, torch.bfloat16, ""): {Tile(64, 128, 64, 4, 3)},  # 16 B (3.6), fp16 too
    ("wgrad", 100, torch.float16, ""): {Tile(64, 128, 64, 4, 3)},
    ("wgrad", 100, torch.float32, ""): {Tile(64, 64, 64, 4, 4), Tile(128, 128, 64, 8, 3)},  # 8-16 B
}


def spill_archs() -> tuple:
    """The arch keys of DTYPE_SPILLS that hold for the compile target: its config family, and its exact arch past
    sm_90 (sm_100). The interpreter has no driver to ask (its tests set the family alone): the family's."""
    family = target_arch()
    arch = None if INTERPRETED or family < 90 else current_arch()
    return (family, arch) if isinstance(arch, int) and arch > family else (family,)


def dtype_keep(kernel: str, dtype, variant: str,
               keep: Callable[[Tile, Tile], bool] = lambda tile, fitted: True) -> Callable[[Tile, Tile], bool]:
    """``keep`` (a prune's keep rule) without the tiles DTYPE_SPILLS lists for the launch's kernel, target arch
    (spill_archs), operand dtype and variant. A launcher's prune falls back to ``keep`` alone where this leaves no
    config (a spilling config beats none: the autotuner needs one)."""
    spills = set().union(*(DTYPE_SPILLS.get((kernel, arch, d, v), set()) for arch in spill_archs()
                           for d in (dtype, None) for v in (variant, None)))
    return lambda tile, fitted: tile not in spills and fitted not in spills and keep(tile, fitted)


# The tile of every kernel in the interpreter: big blocks, as per-op overhead dominates there (DESIGN.md 5).
INTERPRETER_BLOCKS = (256, 128, 128)


def fixed_config(m: int, n: int, k: int, deterministic: Callable[[], Tile],
                 interpreted=INTERPRETER_BLOCKS) -> Optional[dict]:
    """The launch keywords when autotuning is off, or None to autotune; m, n, k: the GEMM's extents.
    Fixed in the interpreter (``interpreted`` blocks shrunk to the extents; no warps or stages there) and
    under torch.use_deterministic_algorithms (the ``deterministic()`` tile: another process could tune another
    tile, so another summation order)."""
    if INTERPRETED:
        bm, bn, bk = interpreted
        return dict(BLOCK_M=clamp_block(bm, m), BLOCK_N=clamp_block(bn, n), BLOCK_K=clamp_block(bk, k))
    if torch.are_deterministic_algorithms_enabled():
        return deterministic().kwargs()
    return None


def autotune_options() -> dict:
    """The options every conv autotuner takes besides its configs: cache_results=True, so a tuned config's
    timings persist in Triton's on-disk cache (TRITON_CACHE_DIR, default ~/.triton/cache, files
    *.autotune.json; keyed on the triton version, the GPU target, the kernel source, the shape key and the
    configs) and a new process does not benchmark them again. FUSEDRES_AUTOTUNE_CACHE=0 turns it off;
    a triton whose autotune lacks the option tunes every process, as before."""
    if os.environ.get("FUSEDRES_AUTOTUNE_CACHE", "1") == "0":
        return {}
    return {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}


def launch_args(named_args: dict, kwargs: dict) -> dict:
    """An early prune's view of the launch: positional (named_args) and keyword arguments alike (the
    launchers pass every argument by keyword, which the autotuner hands to the prune as kwargs)."""
    return {**named_args, **kwargs}


# ----------------------------------------------------------------------------------------------
# Forward conv (kernels/conv.py)
# ----------------------------------------------------------------------------------------------

# Per arch. Few on purpose: every shipped config must pass the parity tests on the GPU (a config-specific
# miscompile would otherwise hide), and each compiles without register spills at the ResNet-50 shapes in every
# variant once DTYPE_SPILLS' "conv" entries are pruned (static check, triton 3.6 and 3.9; no 2-warp tiles: they
# compile to mma.sync, not wgmma, on sm_90).
CONV_TILES = {
    90: [Tile(128, 128, 64, 8, 3), Tile(128, 64, 64, 4, 4), Tile(64, 128, 64, 4, 4), Tile(64, 64, 64, 4, 4),
         Tile(128, 128, 32, 8, 4), Tile(64, 64, 32, 4, 5), Tile(128, 64, 64, 8, 3)],
    80: [Tile(128, 128, 64, 8, 3), Tile(64, 128, 64, 4, 4), Tile(128, 128, 32, 8, 4), Tile(64, 64, 32, 4, 5),
         Tile(128, 64, 64, 8, 3)],
    # sm_80 spills: Tile(128, 64, 64, 4, 4) 16-24 B; Tile(64, 64, 64, 4, 4) 8 B with the projection
}
# A variant whose every tile spills tunes over these instead (0 spills on both tritons; BLOCK_M = STATS_BLOCK_M).
CONV_REPLACE = {(80, "stem_stats"): [Tile(128, 32, 32, 4, 3), Tile(128, 64, 32, 4, 3)]}
# The deterministic-mode tile of a variant whose default one (CONV_FIXED_DEFAULT, fitted) spills.
CONV_FIXED = {(80, "stem_stats"): Tile(128, 32, 32, 4, 3)}
# STATS convs write per-tile BN partials, one row per BLOCK_M pixels (see stats_partials_fit).
STATS_BLOCK_M = 128
# The deterministic-mode tile otherwise; 8 warps: 4 spilled with the BN prologue + STATS (sm_90).
CONV_FIXED_DEFAULT = Tile(STATS_BLOCK_M, 128, 64, 8, 3)


def stats_partials_fit(tile: Tile) -> bool:
    """Whether a STATS conv may run ``tile`` under the autotuner: only at BLOCK_M = STATS_BLOCK_M. The launcher
    allocates the per-tile BN partials, [cdiv(M, BLOCK_M), K], before the launch, while the autotuner picks
    the tile during it, so every candidate must have the BLOCK_M the partials were sized for (and that the
    finalize is told): another BLOCK_M would write more or fewer rows than were allocated. A config given
    explicitly (or the fixed one) sizes the partials from its own BLOCK_M and needs no such filter."""
    return tile.block_m == STATS_BLOCK_M


def _one_per_warps(configs: list) -> list:
    """The first config of each (blocks, warps): the stem's STATS conv (its 7-step loop unrolls, the stage count
    hardly changes it: 323 / 330% issue share at 8 warps, 3 / 4 stages) tunes a 4- and an 8-warp tile, one compile
    each (the cold-start budget: 90 variants for a ResNet-50 training step)."""
    seen, out = set(), []
    for c in configs:
        key = Tile.of(c)[:4]  # blocks and warps, not stages
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def stats_warps_fit(tile: Tile, stem: bool) -> bool:
    """A STATS conv's warps: 8 (128x64x64 at 4 warps spilled 32 B with the BN prologue on triton 3.9), or either on
    the stem path (no prologue; C <= 4, so K = 7 filter rows: the whole kernel unrolls, and at 4 warps it issues
    fewer instructions per MFLOP, 235% issue share on sm_90 against 323% at 8 warps, triton 3.8, 0 spills;
    RESULTS.md)."""
    return stem or tile.num_warps == 8


def gpu_configs(arch: Optional[int] = None, stats: bool = False) -> List[triton.Config]:
    """Every forward config the autotuner may pick on an arch (all archs when None, with the per-variant
    replacements, so the GPU tests run those too); stats: those of STATS convs (stats_partials_fit; conv_prune keeps
    8 warps off the stem path, stats_warps_fit).
    Exposed so the GPU tests can run each one."""
    tiles = arch_tiles({**CONV_TILES, **CONV_REPLACE}) if arch is None else arch_tiles(CONV_TILES, arch)
    return tile_configs(t for t in tiles if not stats or stats_partials_fit(t))


# Issue 17 item 3: 1x1 stride-1 convs may load their operands through device-side tensor descriptors (TMA; the
# kernel's TMA switch), beside the pointer configs, on sm_90 only (sm_80 has no TMA) and for launches that
# tma_eligible admits. 128x128x64 at 4 warps is the anchor GEMM's tile: its main loop runs 164 SASS instructions
# per MFLOP (1.09x / 0.98x the anchor, triton 3.6 / 3.8; the pointer loop at 8 warps 2.4x). At 8 warps the same
# loop costs 290 (two warpgroups each wait for every stage): it is there for the residual epilogue, which spills
# 88-136 B at 4 warps. STATS convs tune over the 4-warp tile only: each config is a compile of every eligible
# STATS variant of a training step (benchmarks/cold_start.py budget: 90 for ResNet-50).
CONV_TMA_TILES = {90: [Tile(128, 128, 64, 4, 3), Tile(128, 128, 64, 8, 3)]}
TMA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TAPS_TMA_DTYPES = (torch.float16, torch.bfloat16)  # with taps: fp32 (TF32) not compiled spill-free there
SPATIAL_TILE_W = 16  # columns of a spatial tile (kernels/conv.py TILE_W): 8 x 16 pixels at BLOCK_M = 128


def tma_mode() -> str:
    """FUSEDRES_TMA: "auto" (default: descriptor configs join the autotune set on sm_90; fixed configs, in the
    interpreter and under deterministic algorithms, keep pointers), "1" (fixed configs take the descriptor path
    too, wherever a launch is eligible: how the tests run it in the interpreter) or "0" (never: pointers only)."""
    raw = os.environ.get("FUSEDRES_TMA", "auto")  # read per launch; parsed once per value (_TMA_MODES)
    mode = _TMA_MODES.get(raw)
    if mode is None:
        mode = _TMA_MODES[raw] = {"1": "on", "on": "on", "0": "off", "off": "off"}.get(raw.strip().lower(), "auto")
    return mode


_TMA_MODES: dict = {}


def persistent_wanted() -> bool:
    """FUSEDRES_PERSISTENT (default "1"): 16-bit 1x1 descriptor launches run persistent (kernels/conv.py PERSISTENT:
    min(tiles, SMs) programs walk the tiles); "0": one program per tile, to time the two on a card."""
    raw = os.environ.get("FUSEDRES_PERSISTENT", "1")  # read per launch; parsed once per value
    on = _PERSISTENT_MODES.get(raw)
    if on is None:
        on = _PERSISTENT_MODES[raw] = raw.strip().lower() not in ("0", "off", "false", "no")
    return on


_PERSISTENT_MODES: dict = {}
INTERPRETER_PROGRAMS = 2  # a persistent launch's programs in the interpreter: each walks several tiles in the tests
_SMS: dict = {}  # CUDA device index -> its SM count


def persistent_programs(x: torch.Tensor) -> int:
    """How many programs a persistent launch on x's device runs at most: one per SM (an H100's 132 for the static
    check's meta tensors; INTERPRETER_PROGRAMS in the interpreter)."""
    if not x.is_cuda:
        return 132 if x.is_meta else INTERPRETER_PROGRAMS
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    sms = _SMS.get(index)
    if sms is None:
        sms = _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return sms


def _extent(t) -> int:
    """1 + the largest element offset of a strided tensor (0 when empty)."""
    return 0 if t.numel() == 0 else 1 + sum((d - 1) * st for d, st in zip(t.shape, t.stride()))


def tma_wanted(x) -> bool:
    """Whether a launch on x's device may take the descriptor path at all: FUSEDRES_TMA is not "0", and it runs in
    the interpreter or for an sm_90+ target (a CUDA or meta tensor: the static check). Each kernel's launcher adds
    its own eligibility rule (tma_eligible, dgrad_tma_eligible, wgrad_tma_eligible)."""
    return tma_mode() != "off" and (INTERPRETED or (x.is_cuda or x.is_meta) and target_arch() >= 90)


def tma_config(cfg: Optional[dict], tma: bool) -> Optional[dict]:
    """A fixed config as launched: TMA=True only where it asked (FUSEDRES_TMA=1, or a caller's config) and the
    launch is eligible (tma); no TMA key otherwise, so the pointer path's compile key stays as it was."""
    if cfg is None:
        return None
    out = {k: v for k, v in cfg.items() if k != "TMA"}
    return dict(out, TMA=True) if tma and cfg.get("TMA") else out


def tma_rows(t: torch.Tensor, dtypes=TMA_DTYPES, weight: bool = False) -> bool:
    """Whether t may be read by a tensor descriptor as a matrix with channel stride 1 and a 16-byte aligned base and
    row stride (TMA's rule), in a descriptor dtype: an [N, C, H, W] activation as [N*H*W, C] with row stride
    stride(3) (channels_last, or a channel slice of it), or (weight) a [K, C, 1, 1] weight as [K, C] with row
    stride stride(0)."""
    if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.dtype not in dtypes or t.stride(1) != 1:
        return False
    n, _, h, w = t.shape
    row = t.stride(0) if weight else t.stride(3)
    dense = weight or ((h == 1 or t.stride(2) == w * row) and (n == 1 or t.stride(0) == h * w * row))
    return dense and t.data_ptr() % 16 == 0 and row * t.element_size() % 16 == 0


def same_padded(r: int, s: int, pad_h: int, pad_w: int, dil_h: int = 1, dil_w: int = 1) -> bool:
    """A stride-1 conv whose output has its input's size (odd R and S, pad (R-1)/2 and (S-1)/2, no dilation): a tap is
    then one row shift of the flattened [N*H*W, C] pixels (the descriptor paths of kernels/conv.py)."""
    return (dil_h, dil_w) == (1, 1) and r % 2 == 1 and s % 2 == 1 and (pad_h, pad_w) == ((r - 1) // 2, (s - 1) // 2)


def stride2_parity(a: dict) -> bool:
    """A stride-2 launch with taps the descriptor path takes through its parity view (kernels/conv.py STRIDE2): an
    eval conv (spatial tiles: STATS partials are per flat BLOCK_M rows) whose input H and W are even and whose pixels
    are dense (stride_x_w == C: a pixel pair's channels are one run of 2C), with C a multiple of 16 (each channel block
    of a config must stay within one pixel of the pair: the launcher and conv_prune check its BLOCK_K). The padding
    rule is the stride-1 one's ("same" padding, so P, Q = H / 2, W / 2)."""
    return ((a["stride_h"], a["stride_w"]) == (2, 2) and not a.get("STATS") and a["H"] % 2 == 0 and a["W"] % 2 == 0
            and a["stride_x_w"] == a["CG"] and a["CG"] % 16 == 0)


def tma_eligible(a: dict) -> bool:
    """Whether a forward launch (its keyword arguments) may take the descriptor path: stride 1 (stride 2 with taps
    where stride2_parity admits it), either a 1x1 conv without padding or an odd RxS one with "same" padding
    (same_padded: taps are row shifts), one group, not the stem path, 16-bit operands (fp32 too for 1x1); x a
    [M = N*H*W, C] matrix (channel stride 1, rows at one stride:
    channels_last, or a channel slice of it) and w a [K, C] one (channel stride 1; with taps [K, R*S, C]: dense
    taps, channels_last), each with a 16-byte aligned base and strides (TMA's rule), and pixel indices in int32
    (tile coordinates are 32-bit). A projection shortcut's operands stay on pointers, with int32 offsets there
    (their extent below 2**31)."""
    x, w = a.get("x_ptr"), a.get("w_ptr")
    if not (isinstance(x, torch.Tensor) and isinstance(w, torch.Tensor)) or x.dtype not in TMA_DTYPES:
        return False
    r, s = a["R"], a["S"]
    taps = r * s > 1
    if (a["stride_h"], a["stride_w"]) != (1, 1) and not (taps and stride2_parity(a)):
        return False
    if not taps and (a["pad_h"], a["pad_w"]) != (0, 0):
        return False
    if taps and not (x.dtype in TAPS_TMA_DTYPES and same_padded(r, s, a["pad_h"], a["pad_w"], a.get("dil_h", 1),
                                                               a.get("dil_w", 1))
                     and a["stride_w_r"] == s * a["stride_w_s"] and a["stride_w_s"] * x.element_size() % 16 == 0):
        return False
    if a.get("STEM_CPAD") or w.shape[0] != a["KG"] or w.dtype != x.dtype:  # KG == K: one group
        return False
    reach = (r // 2) * a["W"] + s // 2  # a tap shifts a tile's rows by up to this many
    if rows_need_int64(a["M"] + reach, 256):  # 256: the largest BLOCK_M of any config (the interpreter's)
        return False
    esize, row, wrow = x.element_size(), a["stride_x_w"], a["stride_w_k"]
    dense = (a["stride_x_c"] == 1 and a["stride_x_h"] == a["W"] * row and a["stride_x_n"] == a["H"] * a["W"] * row
             and a["stride_w_c"] == 1)
    aligned = (x.data_ptr() | w.data_ptr() | row * esize | wrow * esize) % 16 == 0  # each >= 0: all 16-byte multiples
    if not (dense and aligned):
        return False
    if a.get("HAS_SHORTCUT"):
        return all(isinstance(t, torch.Tensor) and _extent(t) < 2 ** 31 for t in (a["xd_ptr"], a["wd_ptr"]))
    return True


def tma_configs(stats: bool = False) -> List[triton.Config]:
    """The descriptor configs of every arch that has them (the kernel's TMA=True), for the autotuners of
    eligible launches (conv_prune keeps them on sm_90 only); stats: those of STATS convs (4 warps)."""
    tiles = arch_tiles(CONV_TMA_TILES)
    return [t.config(TMA=True) for t in tiles if not stats or (stats_partials_fit(t) and t.num_warps == 4)]


def conv_fit(tile: Tile, kg: int, red: int, stem: bool = False) -> Tile:
    """Shrink a forward tile to the problem (4-channel ResNeXt groups): BLOCK_N to the output channels per
    group, BLOCK_K to the reduction's channel block (``red``); on the stem path BLOCK_K holds a whole filter
    row, so it is the row's length rounded up to a power of two, and at least 16: tl.dot's smallest K on a GPU
    (a 1x1 stem-path conv's row is 4 values; the interpreter does not check it)."""
    tile = tile.fit(n=kg)
    return tile._replace(block_k=stem_block_k(red)) if stem else tile.fit(k=red)


def stem_block_k(row: int) -> int:
    """The stem path's BLOCK_K for a filter row of ``row`` values (see conv_fit)."""
    return max(16, next_power_of_2(row))


def _conv_variant(stem: bool, shortcut: bool, stats: bool) -> str:
    """The key of a forward variant in DTYPE_SPILLS ("conv") / CONV_REPLACE / CONV_FIXED."""
    if stem:
        return "stem_stats" if stats else "stem"
    if shortcut:
        return "shortcut"
    return "stats" if stats else ""


def conv_prune(configs, named_args, **kwargs) -> List[triton.Config]:
    """This arch's forward configs minus the variant's spilling tiles, fitted to the problem, deduplicated."""
    a = launch_args(named_args, kwargs)
    kg, red, stem, stats = a["KG"], max(a["CG"], a["CD"]), bool(a.get("STEM_CPAD")), bool(a.get("STATS"))
    dtype = getattr(a.get("x_ptr"), "dtype", None)
    arch = target_arch()
    key = (arch, _conv_variant(stem, bool(a.get("HAS_SHORTCUT")), stats))
    lean = dtype_keep("conv", dtype, key[1])

    def fit(tile):
        return conv_fit(tile, kg, red, stem)

    descriptor = [c for c in configs if c.kwargs.get("TMA")]
    configs = [c for c in configs if not c.kwargs.get("TMA") and (not stats or stats_warps_fit(Tile.of(c), stem))]

    def pointer(cs):
        out = prune(cs, CONV_TILES[arch], fit, lean)
        if not out:  # never leave a variant without a config
            tiles = CONV_REPLACE.get(key)
            out = prune(tile_configs(tiles), tiles, fit) if tiles else prune(cs, CONV_TILES[arch], fit)
        return out

    def descriptors():
        if not (descriptor and arch in CONV_TMA_TILES and tma_eligible(a)):  # the launcher sends eligible ones only
            return []
        keep = dtype_keep("conv_tma", dtype, "residual" if a.get("HAS_RESIDUAL") else "")
        out = prune(descriptor, CONV_TMA_TILES[arch], fit, keep, extra=lambda fitted: dict(TMA=True))
        if a["stride_h"] == 2:  # the parity view: a channel block within one pixel of the pair
            out = [c for c in out if a["CG"] % c.kwargs["BLOCK_K"] == 0]
        return out

    if _taps_capable(a) and arch in CONV_TMA_TILES:  # with taps: one descriptor tile, in place of a pointer one for
        # STATS (the training step's compile budget); beside the pointer ones in eval (the stride-2 3x3 eval convs
        # keep TMA_REPLACES: their variant is the stride-1 one's, and that tile is their best)
        one = lambda: descriptors()[:1]  # noqa: E731
        out = replace_by_tma(pointer, configs, one, twin=lambda t: t[:3]) if stats else pointer(configs) + one()
    else:
        out = pointer(configs) + descriptors()
    if stats and stem:
        out = _one_per_warps(out)
    assert not stats or all(stats_partials_fit(Tile.of(c)) for c in out), \
        f"a STATS conv's tiles must have BLOCK_M = {STATS_BLOCK_M} (the partials' size), got {out}"
    return out


def _taps_capable(a: dict) -> bool:
    """A forward variant with taps that may take the descriptor path (16-bit, not the stem, pixel indices in int32).
    Its eligible launches tune one descriptor tile: 128x128x64 at 4 warps (spatial eval tiles 1.4x the anchor's main
    loop, flat STATS ones 3.9-4.9x; at 8 warps 2.3x / 5-6.3x: static check, sm_90, bf16), at 8 warps with a residual
    (4 spill there). For STATS it stands in for the pointer tile TMA_REPLACES in every launch of the variant, eligible
    or not (replace_by_tma: a stride-2 3x3 launch compiles the same variant as a stride-1 one)."""
    taps = a.get("R", 1) * a.get("S", 1) > 1
    return taps and getattr(a.get("x_ptr"), "dtype", None) in TAPS_TMA_DTYPES and not (a.get("STEM_CPAD") or
                                                                                       a.get("IDX64"))


def conv_fixed_config(m: int, kg: int, red: int, stem: bool = False, shortcut: bool = False,
                      stats: bool = False) -> Optional[dict]:
    """The forward conv's fixed config (see fixed_config), or None to autotune. With FUSEDRES_TMA=1 it asks
    for the descriptor path (TMA=True; the launcher drops it where the launch is not eligible)."""
    def deterministic():
        tile = CONV_FIXED.get((target_arch(), _conv_variant(stem, shortcut, stats)), CONV_FIXED_DEFAULT)
        return conv_fit(tile, kg, red, stem)

    return with_tma(fixed_config(m, kg, red, deterministic))


def with_tma(cfg: Optional[dict]) -> Optional[dict]:
    """A fixed config, asking for the descriptor path under FUSEDRES_TMA=1 (TMA=True; each launcher drops it where
    the launch is not eligible: tma_config)."""
    return cfg if cfg is None or tma_mode() != "on" else dict(cfg, TMA=True)


# ----------------------------------------------------------------------------------------------
# dgrad (kernels/dgrad.py)
# ----------------------------------------------------------------------------------------------

# BLOCK_M stays 128: the launcher sizes the BN partials (one row per BLOCK_M-pixel tile) before the launch.
DGRAD_BLOCK_M = 128
# Per arch, each compiled without spills at the ResNet-50 shapes (see the static check).
DGRAD_TILES = {
    90: [Tile(DGRAD_BLOCK_M, 128, 64, 8, 3), Tile(DGRAD_BLOCK_M, 128, 32, 8, 4), Tile(DGRAD_BLOCK_M, 64, 64, 4, 3),
         Tile(DGRAD_BLOCK_M, 64, 64, 4, 4), Tile(DGRAD_BLOCK_M, 64, 32, 4, 5)],
    80: [Tile(DGRAD_BLOCK_M, 128, 32, 8, 3), Tile(DGRAD_BLOCK_M, 64, 32, 4, 4)],  # 128x64x64 w4 s3 needs all 255
}                                                                                # registers there


def _dgrad_keep(tile: Tile, fitted: Tile) -> bool:
    """Not an 8-warp tile whose BLOCK_N shrank to the channels: the 4-warp tile of that shape is in the table, and
    the 8-warp one's main loop runs 1.4-1.7x its SASS instructions per MFLOP (static check, sm_90, ResNet-50
    layer1: 128x64x64 595 vs 423, 128x64x32 1022 vs 595); dropping it spares ~8 compiles of a ResNet-50 step."""
    return not (fitted.num_warps == 8 and fitted.block_n < tile.block_n)


# Issue 17 item 3, backward part: 1x1 stride-1 dgrad and wgrad are plain GEMMs over [N*H*W, C] matrices, which
# their kernels' TMA switch loads through device-side descriptors (sm_90). The descriptor tile REPLACES the pointer
# tile of the same blocks (TMA_REPLACES; replace_by_tma) instead of joining beside it: each extra config is a
# compile of every eligible variant of a training step (benchmarks/cold_start.py: 89 of 90 before this, 88 after).
# dgrad: 4 warps (the anchor's loop) without an epilogue that reads tiles; with the BN gradient or a residual (both
# read a 128x128 tile beside the accumulator: the forward's residual spilled 88-136 B at 4 warps) 8 warps.
DGRAD_TMA_TILES = {90: [Tile(DGRAD_BLOCK_M, 128, 64, 4, 3), Tile(DGRAD_BLOCK_M, 128, 64, 8, 3)]}
TMA_REPLACES = Tile(128, 128, 64, 8, 3)  # the pointer tile a descriptor tile stands in for (dgrad, wgrad, taps)
# 16-bit operands only on the backward descriptor paths: fp32 (TF32) tiles were not compiled without spills there
# (the fp32 wgrad keeps x as the B operand: X_AS_A), so fp32 keeps pointers.
BWD_TMA_DTYPES = (torch.float16, torch.bfloat16)


def dgrad_tma_eligible(dy, weight, stride, padding, groups, idx64: bool, dilation=(1, 1)) -> bool:
    """Whether a dgrad launch may take the descriptor path: stride 1 and one group (one phase), either a 1x1 conv
    without padding (one tap: ONE_TAP) or an odd RxS one with "same" padding (same_padded; spatial tiles, w
    channels_last: dense taps, read as [K, R*S, C]), 16-bit operands, pixel indices in int32 (not IDX64; descriptor
    coordinates are 32-bit), dy a [N*P*Q, K] matrix and the weight a [K, C] one (tma_rows). dx, y and the residual
    stay on pointers (the epilogue: any strides)."""
    r, s = weight.shape[2:]
    if tuple(stride) != (1, 1) or groups != 1:
        return False
    if (r, s) == (1, 1) and tuple(padding) != (0, 0):
        return False
    if (r, s) != (1, 1) and not (same_padded(r, s, *padding, *dilation) and weight.stride(2) == s * weight.stride(3)
                                 and weight.stride(3) * weight.element_size() % 16 == 0):
        return False
    return not idx64 and weight.dtype == dy.dtype and tma_rows(dy, BWD_TMA_DTYPES) and \
        tma_rows(weight, BWD_TMA_DTYPES, weight=True)


def replace_by_tma(pointer: Callable[[list], list], configs: list, descriptor: Callable[[], list],
                   twin: Optional[Callable[[Tile], tuple]] = None) -> list:
    """The configs of a launch whose variant may take the descriptor path (16-bit): the pointer set
    (``pointer(configs)`` prunes pointer configs) without the pointer tile TMA_REPLACES, plus, for an eligible launch,
    the descriptor tile in its place (``descriptor()``, pruned; [] for an ineligible one). twin: a key; the
    descriptor tile also replaces the pointer tiles whose (fitted) key is its own, where the problem fits
    TMA_REPLACES and a native tile to the same blocks (64 channels): a wgrad's 64x64x64 w4 s3 (1x1 or 3x3; at 64 by
    64 channels the 1x1 one had no descriptor tile before, 187% issue share on its pointer loop; key: the tile but
    its pixels per step) and a dgrad's 128x64x64 w4 s3 (key: the tile), a 3x3 STATS forward's 128x64x64 w8 s3 (key:
    the blocks). Where wider launches of the variant tune that pointer tile too, it still compiles (the forward +1
    variant, dgrad +2: within the cold-start budget since sum_rows' last pass compiles once).
    Variants are shared: a 1x1 stride-2 launch compiles the same variant as a stride-1 one, so a pointer tile kept
    for the one would still compile beside the other's descriptor tile (benchmarks/cold_start.py: +1 per kernel).
    Never more configs than the pointer set alone (where the replaced tile was pruned anyway: fitted to 64
    channels beside a tile of the same blocks, a launch keeps that set)."""
    alone = pointer(configs)
    desc = descriptor()
    twins = {twin(Tile.of(c)) for c in desc} if twin else set()
    out = desc + [c for c in pointer([c for c in configs if Tile.of(c) != TMA_REPLACES])
                  if not (twin and twin(Tile.of(c)) in twins)]
    return out if len(out) <= len(alone) else alone


def dgrad_prune(configs, named_args, **kwargs) -> List[triton.Config]:
    """This arch's dgrad configs, fitted to the channels (no block wider than the problem), deduplicated; with
    TMA configs (an eligible launch's autotuner), the descriptor tile in place of the pointer one it replaces."""
    a = launch_args(named_args, kwargs)
    arch = target_arch()
    tiles = DGRAD_TILES[arch]

    def fit(tile):
        return tile.fit(n=a["CG"], k=a["KG"])

    descriptor = [c for c in configs if c.kwargs.get("TMA")]
    configs = [c for c in configs if not c.kwargs.get("TMA")]

    dy = a.get("dy_ptr")
    variant = " ".join(k for k, on in (("bn_grad", a.get("BN_GRAD")), ("res_mask", a.get("HAS_RES_MASK"))) if on)
    keep = dtype_keep("dgrad", getattr(dy, "dtype", None), variant, _dgrad_keep)

    def pointer(cs):  # never no config
        return prune(cs, tiles, fit, keep) or prune(cs, tiles, fit, _dgrad_keep) or prune(cs, tiles, fit)

    capable = not a.get("IDX64") and getattr(dy, "dtype", None) in BWD_TMA_DTYPES  # 1x1, or taps (spatial tiles)
    if not (capable and arch in DGRAD_TMA_TILES):
        return pointer(configs)
    # 4 warps (the anchor's loop); 8 where a 1x1 epilogue reads tiles (BN gradient, residual: 4 spilled 408-664 B);
    # with taps the epilogue over column quarters (EPI_SPLIT: the whole tile at once spilled 296-456 B at 4 warps)
    taps = not a.get("ONE_TAP", True)
    reads = a.get("BN_GRAD") or a.get("HAS_RESIDUAL")
    warps = 8 if reads and not taps else 4
    split = dict(EPI_SPLIT=4) if reads and taps else {}
    return replace_by_tma(pointer, configs, lambda: prune(
        [c for c in descriptor if c.num_warps == warps], DGRAD_TMA_TILES[arch], fit,
        extra=lambda _: dict(TMA=True, **split)), twin=lambda t: t)


def dgrad_tma_configs() -> List[triton.Config]:
    """The dgrad descriptor configs of every arch that has them (the autotuner of eligible launches)."""
    return [t.config(TMA=True) for t in arch_tiles(DGRAD_TMA_TILES)]


def dgrad_fixed_config(m: int, cg: int, kg: int) -> Optional[dict]:
    """dgrad's fixed config (see fixed_config), or None to autotune; m: the input's pixels."""
    def deterministic():
        bn = clamp_block(128, cg)
        return Tile(DGRAD_BLOCK_M, bn, clamp_block(64, kg), 8 if bn >= 128 else 4, 3)

    return with_tma(fixed_config(m, cg, kg, deterministic))


# ----------------------------------------------------------------------------------------------
# wgrad (kernels/wgrad.py)
# ----------------------------------------------------------------------------------------------

# BLOCK_K (pixels per step) stays 64: the launcher sets the split-K partition (a multiple of BLOCK_K pixels
# per split) before the launch.
WGRAD_BLOCK_K = 64
# Per arch, each compiled without spills at the ResNet-50 shapes (see the static check).
WGRAD_TILES = {
    90: [Tile(128, 128, WGRAD_BLOCK_K, 8, 3), Tile(64, 128, WGRAD_BLOCK_K, 4, 3), Tile(64, 128, WGRAD_BLOCK_K, 8, 4),
         Tile(64, 64, WGRAD_BLOCK_K, 4, 4)],
    80: [Tile(64, 128, WGRAD_BLOCK_K, 8, 3), Tile(64, 64, WGRAD_BLOCK_K, 4, 3)],
}


def wgrad_prune(configs, named_args, **kwargs) -> List[triton.Config]:
    """This arch's wgrad configs, fitted to the problem, TAP_PER_TILE set per tile, deduplicated."""
    a = launch_args(named_args, kwargs)
    cg = a["CG"]

    def keep(_, fitted):
        if fitted.num_warps == 8 and fitted.block_m * fitted.block_n < 128 * 64:
            return False  # two warpgroups on a 64x64 tile would each issue N=32 wgmma
        # a tile across taps masks per element where a 64-wide one masks per row (~13% more SASS/MFLOP)
        return not (cg % 64 == 0 and cg % fitted.block_m != 0)

    arch = target_arch()
    dtype = getattr(a.get("dy_ptr"), "dtype", None)
    lean = dtype_keep("wgrad", dtype, "prologue" if a.get("PROLOGUE_BN") else "", keep)

    def fit(tile):
        return tile.fit(m=a["NCOL"], n=a["KG"])

    def tap(fitted):
        return dict(TAP_PER_TILE=cg % fitted.block_m == 0)

    def pointer(cs):  # never no config
        return prune(cs, WGRAD_TILES[arch], fit, lean, extra=tap) or prune(cs, WGRAD_TILES[arch], fit, keep, extra=tap)

    def tma_fit(tile):  # with taps, columns of one tap per tile (TAP_PER_TILE): BLOCK_M divides the channels
        fitted = fit(tile)
        while taps and cg % fitted.block_m and fitted.block_m > 64:
            fitted = fitted._replace(block_m=fitted.block_m // 2)
        if taps and wgrad_wide_overhangs(a["W"]):  # 8 x 8 pixel steps (kernels/wgrad.py _tap_views)
            fitted = fitted._replace(block_k=min(fitted.block_k, WGRAD_BLOCK_K))
        return fitted

    descriptor = [c for c in configs if c.kwargs.get("TMA")]
    configs = [c for c in configs if not c.kwargs.get("TMA")]
    taps = a.get("R", 1) * a.get("S", 1) > 1
    capable = a.get("X_AS_A") and not (a.get("STEM_CPAD") or a.get("IDX64"))
    if not (capable and arch in WGRAD_TMA_TILES):
        return pointer(configs)
    return replace_by_tma(pointer, configs, lambda: prune(
        descriptor, WGRAD_TMA_TILES[arch], tma_fit, lambda _, fitted: not taps or cg % fitted.block_m == 0,
        extra=lambda fitted: dict(tap(fitted), TMA=True)), twin=lambda t: t._replace(block_k=0))


# wgrad's descriptor tile (see DGRAD_TMA_TILES): 128 columns x 128 output channels x 128 pixels at 4 warps; its
# epilogue stores the accumulator only. 128 pixels a step, not 64: a step's waits, barriers and loop control over
# twice the MMAs (sm_90, triton 3.8, ResNet-50 layer3.1: 3x3 with the prologue 143 -> 195 SASS per step, 27.9 ->
# 19.0% issue share; 1x1 92 -> 110, 18.0 -> 10.7%). With taps a step is a 8 x 16 pixel tile, or 8 x 8 (64 pixels)
# where 16 columns would overhang the image further (wgrad_wide_overhangs: 56 and 7 wide; 28 and 14 take 16).
WGRAD_TMA_TILES = {90: [Tile(128, 128, 2 * WGRAD_BLOCK_K, 4, 3)]}


def wgrad_wide_overhangs(width: int) -> bool:
    """Whether 16-column pixel tiles cover more columns past an image ``width`` wide than 8-column ones."""
    return cdiv(width, 16) * 16 > cdiv(width, 8) * 8

# The split-K partition's step: a multiple of every wgrad BLOCK_K (a 1x1 descriptor split is whole steps).
WGRAD_SPLIT_STEP = 2 * WGRAD_BLOCK_K


def wgrad_tma_configs() -> List[triton.Config]:
    """The wgrad descriptor configs of every arch that has them (the autotuner of eligible launches)."""
    return [t.config(TMA=True) for t in arch_tiles(WGRAD_TMA_TILES)]


def wgrad_tma_eligible(dy, x, weight, stride, padding, groups, stem: bool, idx64: bool, dilation=(1, 1)) -> bool:
    """Whether a wgrad launch may take the descriptor path: stride 1 and one group, either a 1x1 conv without padding
    or an odd RxS one with "same" padding (same_padded; kernels/wgrad.py _tap_views: the column tiles are one tap's
    channels, TAP_PER_TILE, so the channels a multiple of 16, a BLOCK_M the prune fits to them; the image at least
    the filter's size, so no tap's view is empty), not the stem path, 16-bit operands (X_AS_A: x the MMA's A
    operand, transposed from shared memory), pixel indices in int32 (not IDX64), dy and x [N*H*W, C] matrices
    (tma_rows). The BN prologue applies to the loaded x tile in registers as on the pointer path: rows past M (1x1)
    or past a view (taps) load 0 and become act(shift) there, against dy rows that load 0 (no contribution); a 1x1
    split's pixel range is whole BLOCK_K steps except at M (ROWS_PER_SPLIT)."""
    r, s = weight.shape[2:]
    if tuple(stride) != (1, 1) or groups != 1:
        return False
    if (r, s) == (1, 1) and tuple(padding) != (0, 0):
        return False
    if (r, s) != (1, 1) and not (same_padded(r, s, *padding, *dilation) and weight.shape[1] % 16 == 0
                                 and x.shape[2] >= r and x.shape[3] >= s):
        return False
    return not (stem or idx64) and x.dtype == dy.dtype and all(tma_rows(t, BWD_TMA_DTYPES) for t in (dy, x))


def wgrad_fixed_config(m: int, kg: int, cg: int, ncol: int) -> Optional[dict]:
    """wgrad's fixed config (see fixed_config), or None to autotune; m: the output's pixels (the reduction)."""
    def deterministic():
        bm, bn = (128 if cg % 128 == 0 else clamp_block(64, ncol)), clamp_block(128, kg)
        return Tile(bm, bn, WGRAD_BLOCK_K, 8 if bm * bn >= 128 * 128 else 4, 3)

    # the interpreter's blocks as before the rename: 128 columns x 128 output channels x 256 pixels
    return with_tma(fixed_config(ncol, kg, m, deterministic, interpreted=(128, 128, 256)))
