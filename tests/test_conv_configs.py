"""The conv kernels' one config dialect (kernels/_conv_configs.py): Tile tables, the shared prune and fixed
config, BLOCK_K as the reduction in every kernel, and the STATS convs' fixed BLOCK_M."""
import pytest
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

from fusedres import kernels
from fusedres.kernels import _conv_configs as cc
from fusedres.kernels import dgrad, wgrad
from fusedres.reference import conv_bn_act_reference
from helpers import assert_close


class _Arch:
    """A compile target of sm_<arch> as the active driver's, which target_arch() reads to pick a table."""

    def __init__(self, arch):
        self.arch = arch

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)

    def __enter__(self):
        self.prev = driver._active
        driver.set_active(self)

    def __exit__(self, *exc):
        driver._active = self.prev


def test_every_table_holds_tiles_with_the_fixed_block_of_its_kernel():
    tables = [cc.CONV_TILES, cc.DGRAD_TILES, cc.WGRAD_TILES, cc.CONV_REPLACE,
              {key: list(ts) for key, ts in cc.DTYPE_SPILLS.items()}, {key: [t] for key, t in cc.CONV_FIXED.items()}]
    assert all(isinstance(t, cc.Tile) for table in tables for ts in table.values() for t in ts)
    assert all(t.block_m == cc.DGRAD_BLOCK_M for ts in cc.DGRAD_TILES.values() for t in ts)
    assert all(t.block_k == cc.WGRAD_BLOCK_K for ts in cc.WGRAD_TILES.values() for t in ts)
    for mod in (kernels, dgrad, wgrad):
        for cfg in mod.gpu_configs():
            assert set(cfg.kwargs) == {"BLOCK_M", "BLOCK_N", "BLOCK_K"}, cfg.kwargs
            assert cc.Tile.of(cfg).config().all_kwargs() == cfg.all_kwargs()


@pytest.mark.parametrize("arch", [90, 80])
def test_stats_convs_tune_only_over_stats_block_m(arch):
    """The STATS partials are allocated for STATS_BLOCK_M before the autotuner picks a tile: every STATS
    candidate, before and after pruning (the spill replacements included), has that BLOCK_M."""
    configs = kernels.gpu_configs(stats=True)
    assert configs and all(cc.stats_partials_fit(cc.Tile.of(c)) for c in configs)
    with _Arch(arch):
        for stem in (0, 4):
            for kg, cg in ((64, 3), (64, 64), (256, 512), (16, 16)):
                pruned = cc.conv_prune(configs, {}, KG=kg, CG=cg, CD=0, x_ptr=torch.empty(1, dtype=torch.bfloat16),
                                       STEM_CPAD=stem, HAS_SHORTCUT=False, STATS=True)
                assert pruned and all(c.kwargs["BLOCK_M"] == cc.STATS_BLOCK_M for c in pruned)


def test_stats_convs_take_four_warps_on_the_stem_path_only():
    """sm_90: the stem's STATS conv (7 filter rows) tunes a 4-warp tile beside the 8-warp ones (at 8 warps its loop
    unrolls with the STATS epilogue), one compile per warp count; every other STATS conv keeps 8 warps (4 spilled
    with the BN prologue)."""
    configs = kernels.gpu_configs(stats=True)
    with _Arch(90):
        def warps(stem, cg):
            pruned = cc.conv_prune(configs, {}, KG=64, CG=cg, CD=0, x_ptr=torch.empty(1, dtype=torch.bfloat16),
                                   STEM_CPAD=stem, HAS_SHORTCUT=False, STATS=True)
            assert not stem or len(pruned) == 2, pruned
            return {c.num_warps for c in pruned}
        assert warps(4, 28) == {4, 8}
        assert warps(0, 64) == {8} and warps(0, 256) == {8}


@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize("row", [4, 8, 12, 28, 64])  # a stem-path filter row: S x 4 padded channels
def test_stem_path_block_k_is_a_dot_operand(arch, row):
    """The stem path's BLOCK_K is its filter row rounded up, but never under tl.dot's K >= 16 (a 1x1 conv of a
    1-4 channel input has a row of 4: it failed to compile on the H200, the interpreter does not check)."""
    with _Arch(arch):
        tuned = cc.conv_prune(kernels.gpu_configs(), {}, KG=16, CG=row, CD=0, STEM_CPAD=4)
    fixed = cc.conv_fit(cc.CONV_FIXED_DEFAULT, 16, row, stem=True)  # the fixed configs' fit (None on a GPU)
    blocks = {c.kwargs["BLOCK_K"] for c in tuned} | {fixed.block_k}
    assert blocks == {max(16, triton.next_power_of_2(row))}


@pytest.mark.parametrize("arch", [90, 80])
def test_prune_fits_each_kernel_to_its_problem(arch):
    with _Arch(arch):
        fwd = cc.conv_prune(kernels.gpu_configs(), {}, KG=4, CG=4, CD=0, STEM_CPAD=0)  # a 4-channel ResNeXt group
        assert {(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) for c in fwd} == {(16, 16)}
        dg = cc.dgrad_prune(dgrad.gpu_configs(), {}, CG=16, KG=32)   # BLOCK_N: input channels, BLOCK_K: output's
        assert {(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) for c in dg} == {(16, 32)}
        wg = cc.wgrad_prune(wgrad.gpu_configs(), {}, CG=16, KG=32, NCOL=144)  # BLOCK_M: columns, BLOCK_N: outputs
        assert wg and all(c.kwargs["BLOCK_N"] == 32 and c.kwargs["BLOCK_K"] == cc.WGRAD_BLOCK_K for c in wg)
        assert all(c.kwargs["TAP_PER_TILE"] == (16 % c.kwargs["BLOCK_M"] == 0) for c in wg)
        assert len({cc.Tile.of(c) for c in wg}) == len(wg), "fitted tiles are deduplicated"


def test_blocks_of_distinct_sizes_follow_one_meaning(device):
    """BLOCK_M, BLOCK_N and BLOCK_K of different sizes in each kernel, so a launcher and its kernel that read
    a block with two meanings (grid vs tile) would give a wrong result: BLOCK_K is the reduction everywhere."""
    torch.manual_seed(5)
    x = torch.randn(2, 24, 9, 9, device=device).to(memory_format=torch.channels_last)
    w = (torch.randn(40, 24, 3, 3, device=device) / 15).to(memory_format=torch.channels_last)
    geo = ((2, 2), (1, 1), (1, 1), 1)
    dy = torch.randn(2, 40, 5, 5, device=device).to(memory_format=torch.channels_last)
    cfg = dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=64)
    out = kernels.conv_bn_act(x, w, None, None, *geo, config=cfg)
    ones, zeros = torch.ones(40, device=device), torch.zeros(40, device=device)
    assert_close(out, conv_bn_act_reference(x, w, ones, zeros, 2, 1), torch.float32, "forward")
    dx = dgrad.conv_dgrad(dy, w, x.shape, *geo, config=cfg)
    assert_close(dx, torch.nn.grad.conv2d_input(x.shape, w.double(), dy.double(), 2, 1), torch.float32, "dgrad")
    for wcfg in (cfg, dict(BLOCK_M=64, BLOCK_N=16, BLOCK_K=32), dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=16)):
        dw = wgrad.conv_wgrad(dy, x, w, *geo, config=wcfg)
        assert_close(dw, torch.nn.grad.conv2d_weight(x.double(), w.shape, dy.double(), 2, 1), torch.float32,
                     f"wgrad {wcfg}")


def _backward_views(dtype, **flags):
    """(prune, configs, launch view) of a dgrad and a wgrad launch at ResNet-50's channel counts (64: layer1, 256:
    layer3), 1x1 and 3x3, with the flags given."""
    dy = torch.empty(1, dtype=dtype)
    for cg, kg in ((64, 64), (64, 256), (256, 256), (256, 1024)):
        yield cc.dgrad_prune, dgrad.gpu_configs(), dict(CG=cg, KG=kg, ONE_TAP=True, IDX64=False, dy_ptr=dy,
                                                        BN_GRAD=flags.get("bn_grad", False))
        for r in (1, 3):
            yield cc.wgrad_prune, wgrad.gpu_configs(), dict(CG=cg, KG=kg, NCOL=cg * r * r, R=r, S=r, STEM_CPAD=0,
                                                            IDX64=False, dy_ptr=dy,
                                                            PROLOGUE_BN=flags.get("prologue", False))


@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize("flags", [{}, {"bn_grad": True, "prologue": True}], ids=["plain", "bn"])
def test_fp32_prune_drops_its_spilling_tiles_and_keeps_a_config(arch, flags):
    """Issue 17 item 5: fp32 (TF32) dgrad and wgrad launches never tune a tile DTYPE_SPILLS lists for their kernel
    and variant (matched on the table tile or the fitted one), and always keep a config."""
    with _Arch(arch):
        for prune, configs, view in _backward_views(torch.float32, **flags):
            kernel = "dgrad" if prune is cc.dgrad_prune else "wgrad"
            variant = ("bn_grad" if view["BN_GRAD"] else "") if kernel == "dgrad" else \
                ("prologue" if view["PROLOGUE_BN"] else "")
            spills = cc.DTYPE_SPILLS.get((kernel, arch, torch.float32, variant), set())
            out = [cc.Tile.of(c) for c in prune(configs, {}, **view)]
            assert out, f"{kernel} {view}: no config left"
            assert not spills.intersection(out), f"{kernel} {view}: a spilling fp32 tile kept: {out}"


def test_spill_rules_name_shipped_tiles():
    """Every DTYPE_SPILLS entry names a tile its kernel's table ships for that arch's family, or a fit of one (the
    stem's: BLOCK_N fitted to 64 channels, BLOCK_K to a filter row): a stale entry prunes nothing."""
    tables = {"dgrad": cc.DGRAD_TILES, "wgrad": cc.WGRAD_TILES, "conv": cc.CONV_TILES, "conv_tma": cc.CONV_TMA_TILES}
    assert cc.DTYPE_SPILLS
    for (kernel, arch, _, _), tiles in cc.DTYPE_SPILLS.items():
        shipped = tables[kernel][90 if arch >= 90 else 80]
        for t in tiles:
            assert t in shipped or any(t._replace(block_n=s.block_n, block_k=s.block_k) == s and t.block_n < s.block_n
                                       for s in shipped), f"{kernel} sm_{arch}: {t}"


def _spills(kernel, archs, dtype, variant):
    return set().union(*(cc.DTYPE_SPILLS.get((kernel, a, d, v), set()) for a in archs for d in (dtype, None)
                         for v in (variant, None)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("flags", [{}, {"bn_grad": True, "prologue": True}], ids=["plain", "bn"])
def test_sm100_prune_drops_its_own_and_the_family_spills(dtype, flags, monkeypatch):
    """Issue 17 item 6: sm_100 takes the sm_90 tables; its prune drops the tiles DTYPE_SPILLS lists for sm_100 and
    for the sm_90 family, and keeps a config. sm_90 keeps the sm_100-only tiles (another compile)."""
    monkeypatch.setattr(cc, "INTERPRETED", False)  # as the static check: a driver (_Arch) names the exact arch
    kept = {}
    for arch in (100, 90):
        with _Arch(arch):
            for prune, configs, view in _backward_views(dtype, **flags):
                kernel = "dgrad" if prune is cc.dgrad_prune else "wgrad"
                variant = ("bn_grad" if view["BN_GRAD"] else "") if kernel == "dgrad" else \
                    ("prologue" if view["PROLOGUE_BN"] else "")
                out = [cc.Tile.of(c) for c in prune(configs, {}, **view)]
                assert out, f"sm_{arch} {kernel} {view}: no config left"
                spills = _spills(kernel, (90, arch), dtype, variant)
                assert not spills.intersection(out), f"sm_{arch} {kernel} {view}: a spilling tile kept: {out}"
                kept.setdefault(arch, set()).update(out)
    if dtype == torch.bfloat16 and not flags:
        assert cc.Tile(128, 64, 32, 4, 5) in kept[90] - kept[100]  # dgrad's sm_100-only entry


def _tma_view(dtype, c=256, k=256, **flags):
    """A forward launch's keywords that tma_eligible admits: a 1x1 stride-1 conv on channels_last tensors."""
    x = torch.empty(2, c, 14, 14, dtype=dtype).to(memory_format=torch.channels_last)
    w = torch.empty(k, c, 1, 1, dtype=dtype).to(memory_format=torch.channels_last)
    sx, sw = x.stride(), w.stride()
    return dict(x_ptr=x, w_ptr=w, R=1, S=1, stride_h=1, stride_w=1, pad_h=0, pad_w=0, stride_w_r=sw[2],
                stride_w_s=sw[3], STEM_CPAD=0, KG=k, CG=c, CD=0, W=14, H=14, M=392, stride_x_n=sx[0], stride_x_c=sx[1],
                stride_x_h=sx[2], stride_x_w=sx[3], stride_w_k=sw[0], stride_w_c=sw[1], **flags)


@pytest.mark.parametrize("flags", [{}, {"HAS_RESIDUAL": True}, {"STATS": True}], ids=["eval", "residual", "stats"])
def test_forward_descriptor_tiles_follow_the_spill_rule(flags, monkeypatch):
    """The forward's descriptor tiles go through the same rule (DTYPE_SPILLS' "conv_tma"): sm_90 keeps the 4-warp
    tile for bf16 except with a residual, never for fp32; sm_100 never keeps it (it spills 56-1600 B there)."""
    monkeypatch.setattr(cc, "INTERPRETED", False)
    stats = bool(flags.get("STATS"))
    configs = kernels.gpu_configs(stats=stats) + cc.tma_configs(stats=stats)
    w4 = cc.Tile(128, 128, 64, 4, 3)
    for arch, dtype, want in ((90, torch.bfloat16, not flags.get("HAS_RESIDUAL")), (90, torch.float32, False),
                              (100, torch.bfloat16, False), (100, torch.float32, False)):
        with _Arch(arch):
            out = cc.conv_prune(configs, {}, **_tma_view(dtype, **flags))
        tma = {cc.Tile.of(c) for c in out if c.kwargs.get("TMA")}
        assert out and (w4 in tma) == want, f"sm_{arch} {dtype} {flags}: {out}"
        assert not stats or all(c.kwargs["BLOCK_M"] == cc.STATS_BLOCK_M for c in out)


def test_dtype_rule_that_leaves_nothing_falls_back(monkeypatch):
    """A dtype rule that would drop every tile of a launch leaves the kernel's own rule's configs (a spilling
    config beats none: the autotuner needs one)."""
    keys = [("dgrad", 90, torch.float32, "bn_grad"), ("wgrad", 90, torch.float32, "prologue")]
    for key in keys:
        monkeypatch.setitem(cc.DTYPE_SPILLS, key, set(cc.DGRAD_TILES[90]) | set(cc.WGRAD_TILES[90]))
    with _Arch(90):
        views = list(_backward_views(torch.float32, bn_grad=True, prologue=True))
        fallback = [prune(configs, {}, **view) for prune, configs, view in views]
        for key in keys:
            monkeypatch.delitem(cc.DTYPE_SPILLS, key)
        own = [prune(configs, {}, **view) for prune, configs, view in views]
    assert all(fallback) and [[c.all_kwargs() for c in f] for f in fallback] == [[c.all_kwargs() for c in o]
                                                                                  for o in own]
