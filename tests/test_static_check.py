"""The static GPU check's budgets flag a spilling config and pass a clean one (benchmarks/static/).

Runs benchmarks/static/selftest.py in a subprocess without TRITON_INTERPRET: this process runs the
kernels in the interpreter, which compiles nothing for a GPU. Skips where triton ships no nvidia
backend or no ptxas / cuobjdump / nvdisasm.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import DTYPES, ON_GPU, assert_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SELFTEST = os.path.join(ROOT, "benchmarks", "static", "selftest.py")


def _toolchain_missing():
    try:
        import triton
        import triton.backends.nvidia.compiler  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means: no nvidia backend here
        return f"triton's nvidia backend is unavailable ({exc})"
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    missing = [t for t in ("ptxas", "cuobjdump", "nvdisasm") if not os.access(os.path.join(bin_dir, t), os.X_OK)]
    return f"triton ships no {', '.join(missing)}" if missing else None


@pytest.mark.skipif(_toolchain_missing() is not None, reason=str(_toolchain_missing()))
def test_budget_flags_spilling_config_and_passes_clean_one():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, SELFTEST, "90"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    spilling, clean = json.loads(proc.stdout.strip().splitlines()[-1])
    assert spilling["spill_bytes"] > 0
    assert any("spills" in f for f in spilling["failures"]), spilling
    assert clean["spill_bytes"] == 0 and clean["mma"] == "wgmma"
    assert clean["failures"] == [], clean


def _static():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        from static import analyze, report
    finally:
        sys.path.pop(0)
    return analyze, report


TTGIR = """
    %a = scf.for %r = %c0 to %c3 step %c1 iter_args(%x = %z) -> (tensor<f32>) : i32 {
      %b = scf.for %s = %c0 to %c3 step %c1 iter_args(%y = %x) -> (tensor<f32>) : i32 {
        %d = ttng.warp_group_dot %p, %q, %y {isAsync = true} : tensor<f32>
        scf.yield %d : tensor<f32>
      }
      %w = ttg.async_wait {num = 0 : i32}
      scf.yield %b : tensor<f32>
    }
    %e = scf.for %k = %c0 to %c4 step %c1 iter_args(%v = %a) -> (tensor<f32>) : i32 {
      %f = arith.addf %v, %v : tensor<f32>
      scf.yield %f : tensor<f32>
    }
"""

SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_1:
        /*0010*/                   LDGSTS.E.BYPASS.128 [R2], desc[UR4][R4.64] ;
        /*0020*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0030*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24, gsb0 ;
        /*0040*/               @P0 BRA `(.L_x_1) ;
        /*0050*/                   EXIT ;
"""


def test_ttgir_counts_loops_around_the_dot_and_drains_inside_loops():
    analyze, _ = _static()
    s = analyze.ttgir_summary(TTGIR)
    assert (s["dot_loops"], s["dot_depth"], s["async_wait0_in_loop"]) == (2, 2, 1)


def test_ttgir_persistent_tile_loop_is_not_a_dot_loop():
    """A persistent kernel's outermost loop walks tiles: its k-loop is the one loop around the dot, and the drain at
    the end of each tile is where a one-tile kernel drains after its loop. Loops inside the k-loop still count."""
    analyze, _ = _static()
    s = analyze.ttgir_summary(TTGIR, tile_loop=True)
    assert (s["dot_loops"], s["dot_depth"], s["async_wait0_in_loop"]) == (1, 1, 0)
    nested = "scf.for %t = %c0 to %c9 step %c1 {\n" + TTGIR + "}\n"  # a tap loop inside the tile walk drains
    s = analyze.ttgir_summary(nested, tile_loop=True)
    assert (s["dot_loops"], s["dot_depth"], s["async_wait0_in_loop"]) == (2, 2, 1)


def test_sass_main_loop_and_instructions_per_mflop():
    analyze, _ = _static()
    s = analyze.sass_summary(SASS)
    assert s["mma"] == "wgmma" and s["main_loop_instrs"] == 4 and s["main_loop_mma"] == 2
    flops_per_warp = 2 * (2 * 64 * 128 * 16 / 4)  # two wgmma, each shared by the 4 warps of a warpgroup
    assert s["instr_per_mflop"] == round(4 / (flops_per_warp / 1e6), 1)


def test_budget_rules():
    _, report = _static()
    ok = dict(layer="l", mode="eval", phase="fwd", dtype="bf16", kernel="k", variant="", config="c", arch=90,
              triton="x", error="", spill_bytes=0, smem=1000, has_dot=True, mma="wgmma")
    assert report.budget_failures([ok]) == []
    broken = [dict(ok, spill_bytes=8), dict(ok, smem=300000), dict(ok, mma="mma.sync"), dict(ok, error="boom"),
              dict(ok, arch=80, smem=200000)]
    msgs = report.budget_failures(broken)
    assert len(msgs) == 5 and "spills 8 B" in msgs[0] and "not wgmma" in msgs[2] and "does not compile" in msgs[3]
    assert report.budget_failures([dict(ok, arch=80, mma="mma.sync")]) == []  # wgmma is an sm_90 budget
    loops = [dict(ok, dot_loops=3), dict(ok, dot_loops=2), dict(ok, async_wait0_in_loop=1), dict(ok, div64_in_loop=2),
             dict(ok, wgmma_wait0_in_loop=1)]
    msgs = report.budget_failures(loops)
    assert len(msgs) == 5 and "3 loops hold the dot" in msgs[0] and "num=0" in msgs[2] and "64-bit" in msgs[3]
    assert "wgmma wait pendings=0" in msgs[4]
    assert report.budget_failures([dict(ok, dot_loops=2, variant="1x1 HAS_SHORTCUT")]) == []  # main + shortcut


@pytest.mark.skipif(_toolchain_missing() is not None, reason=str(_toolchain_missing()))
def test_stem_budget_flags_unpadded_stem_and_passes_shipped_one():
    """The stem conv compiled through its real launcher, with channels padded (shipped) and not (STEM_CPAD=3:
    2-byte loads): the 2-byte-load budget must fire on the second only."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, SELFTEST, "90", "stem"], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    padded, unpadded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "STEM_CPAD=4" in padded["variant"] and "STEM_CPAD=3" in unpadded["variant"], (padded, unpadded)
    assert padded["b16_loads_in_loop"] == 0 and padded["failures"] == [], padded
    assert unpadded["b16_loads_in_loop"] > 0, unpadded
    assert any("2-byte scalar global loads" in f for f in unpadded["failures"]), unpadded


@pytest.mark.skipif(_toolchain_missing() is not None, reason=str(_toolchain_missing()))
def test_fp64_conv_kernels_compile_for_sm90():
    """fp64 operands (gradcheck's dtype) through the forward, dgrad and wgrad launchers compile for sm_90. Under
    triton 3.6 (the GPU image's) tl.dot rejected their fp64 accumulator (a CompilationError the interpreter never
    raises: found on the first GPU run); this process's triton here, 3.6 in benchmarks/static_ci.sh."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, SELFTEST, "90", "fp64"], capture_output=True, text=True, env=env,
                          timeout=600)
    rows = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else []
    assert proc.returncode == 0, [r["error"] for r in rows if r["error"]] or proc.stderr[-2000:]
    kernels = {r["kernel"] for r in rows}
    assert {"_conv_bn_act_kernel", "_conv_dgrad_kernel", "_conv_wgrad_kernel"} <= kernels, kernels
    assert all("ACC_FP64" in r["variant"] for r in rows if r["kernel"] in ("_conv_bn_act_kernel", "_conv_dgrad_kernel"))


PTX = """
\tmov.u32 %r1, 0;
$L__BB0_1:
\t@%p1 ld.global.b16 { %rs1 }, [ %rd1 + 0 ];
\tld.global.nc.L1::evict_last.u16 %rs7, [ %rd1 + 0 ];
\t@%p1 ld.global.v4.b16 { %rs2, %rs3, %rs4, %rs5 }, [ %rd2 + 0 ];
\tcp.async.ca.shared.global [ %r1 + 0 ], [ %rd3 + 0 ], 0x8, %r2;
\tdiv.s64 %rd9, %rd8, %rd7;
\tcall.uni (retval0), __internal_helper, (param0);
\twgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {%f1, %f2}, %rd4, %rd5, 1, 1, 1, 0, 0;
\t@%p2 bra $L__BB0_1;
\tld.global.b16 { %rs6 }, [ %rd1 + 0 ];
\twgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%f1, %f2}, %rd4, %rd5, 1, 1, 1, 0, 0;
.b8 1                                   // DW_AT_call_file
"""


def test_ptx_loop_loads_calls_and_wgmma_n():
    analyze, _ = _static()
    s = analyze.ptx_summary(PTX)
    # in the loop: two scalar 2-byte loads (not the vector one, not the 8-byte cp.async), one call, one div
    assert (s["b16_loads_in_loop"], s["calls_in_loop"], s["div64_in_loop"]) == (2, 1, 1), s
    assert s["wgmma_n"] == 32 and s["operand_loads"] == "cp.async"
    assert analyze.ptx_summary(PTX.replace("0x8", "0x2"))["b16_loads_in_loop"] == 3


SASS_CALLS = """
.L_x_1:
        /*0010*/                   HGMMA.64x32x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0020*/                   CALL.REL.NOINC `($__internal_0_$__cuda_sm20_div_s64) ;
        /*0030*/               @P2 CALL.REL.NOINC `(.L_x_2) ;
        /*0040*/               @P0 BRA `(.L_x_1) ;
.L_x_2:
        /*0050*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0060*/                   EXIT ;
"""


def test_sass_counts_routine_calls_not_local_jumps():
    analyze, _ = _static()
    s = analyze.sass_summary(SASS_CALLS)
    assert s["main_loop_calls"] == 1 and s["sass_wgmma_n"] == 32 and s["main_loop_instrs"] == 4


def _row(report, **kw):
    row = dict(layer="l", mode="train", phase="bwd", dtype="bf16", kernel="k", variant="", config="c", arch=90,
               triton="x", error="", spill_bytes=0, smem=1000, has_dot=True, mma="wgmma")
    row.update(kw)
    return row


def test_wgrad_budgets():
    _, report = _static()
    ok = _row(report, kernel=report.WGRAD_KERNEL, wgmma_n=64, sass_wgmma_n=64, calls_in_loop=0, main_loop_calls=0,
              instr_per_mflop=report.WGRAD_MAX_INSTR_PER_MFLOP)
    assert report.WGRAD_MAX_INSTR_PER_MFLOP == 3367 and report.budget_failures([ok]) == []
    cases = [(dict(main_loop_calls=16), "call inside the main loop"), (dict(calls_in_loop=1), "call inside"),
             (dict(wgmma_n=32, sass_wgmma_n=32), "wgmma N 32 < 64"), (dict(sass_wgmma_n=16), "wgmma N 16"),
             (dict(instr_per_mflop=10101.0), "per MFLOP 10101.0 > 3367"),
             (dict(instr_per_mflop=None), "per MFLOP None")]  # no SASS: the budget cannot pass unmeasured
    for change, msg in cases:
        fails = report.budget_failures([dict(ok, **change)])
        assert len(fails) == 1 and msg in fails[0], (change, fails)
    # N and instructions per MFLOP are sm_90 budgets (sm_80 issues mma.sync); the call budget is not
    sm80 = dict(ok, arch=80, mma="mma.sync", wgmma_n=None, sass_wgmma_n=None, instr_per_mflop=5000.0)
    assert report.budget_failures([sm80]) == []
    assert len(report.budget_failures([dict(sm80, main_loop_calls=1)])) == 1


def test_stem_budget_applies_to_stem_variants_only():
    _, report = _static()
    for variant in ("7x7 STEM_CPAD=4", "7x7 STEM_CPAD=4 STEM_SP=8"):
        assert report.budget_failures([_row(report, variant=variant, b16_loads_in_loop=0)]) == []
        fails = report.budget_failures([_row(report, variant=variant, b16_loads_in_loop=12)])
        assert len(fails) == 1 and "12 2-byte scalar global loads" in fails[0]
    assert report.budget_failures([_row(report, variant="3x3", b16_loads_in_loop=12)]) == []


def test_bn_reduction_budget():
    _, report = _static()
    bn = _row(report, kernel="_sum_rows_kernel", has_dot=False, mma="none", reduction_rows=25088, column_blocks=1)
    assert report.budget_failures([dict(bn, bn_pass="pass 1", programs=262)]) == []
    fails = report.budget_failures([dict(bn, bn_pass="pass 1", programs=100)])
    assert len(fails) == 1 and "100 programs < 132 SMs" in fails[0]
    assert report.budget_failures([dict(bn, bn_pass="pass 1", programs=108, arch=80)]) == []  # an A100's 108 SMs
    assert "< 108 SMs" in report.budget_failures([dict(bn, bn_pass="pass 1", programs=107, arch=80)])[0]
    assert len(report.budget_failures([dict(bn, bn_pass="one pass", programs=1)])) == 1
    # exempt: the merge pass, a one-pass launch the launcher's split keeps small, a launch whose finest
    # (8-row chunk) split cannot fill the card; an unclassified launch fails
    assert report.budget_failures([dict(bn, bn_pass="pass 2", programs=1)]) == []
    assert report.budget_failures([dict(bn, bn_pass="one pass (small)", programs=32)]) == []
    assert report.budget_failures([dict(bn, bn_pass="pass 1", programs=100, reduction_rows=196,
                                        column_blocks=4)]) == []
    assert "not classified" in report.budget_failures([dict(bn, programs=None)])[0]


def test_bn_passes_follow_the_launchers_split():
    _, report = _static()
    from fusedres.kernels import bn

    def launch(kernel, grid, ints, const, ptr):
        return report.Launch(kernel, const, {}, ints, grid=grid, elem_bytes={ptr: 4})

    T = dict(BLOCK_T=32, BLOCK_L=256)
    sum1 = launch("_sum_rows_kernel", (16, 17), dict(T=262, L=4096, ROWS=16), T, "src_ptr")
    sum2 = launch("_sum_rows_kernel", (16, 1), dict(T=17, L=4096, ROWS=17), T, "src_ptr")
    one = launch("_sum_rows_kernel", (144, 1), dict(T=53, L=36864, ROWS=53), T, "src_ptr")
    big_one = launch("_sum_rows_kernel", (16, 1), dict(T=262, L=4096, ROWS=262), T, "src_ptr")
    K = dict(BLOCK_T=16, BLOCK_K=64)
    fin1 = launch("_bn_chunk_stats_kernel", (262, 1), dict(T=12544, M=1605632, K=64, CHUNK=48), K, "part_mean_ptr")
    fin2 = launch("_bn_finalize_kernel", (1,), dict(T=262, M=1605632, K=64), K, "part_mean_ptr")
    kinds = report.bn_passes([sum1, sum2, one, big_one, fin1, fin2])
    assert [kinds[id(r)] for r in (sum1, sum2, one, big_one, fin1, fin2)] == \
        ["pass 1", "pass 2", "one pass (small)", "one pass", "pass 1", "pass 2"]
    # the pass-1 grids are what bn._split gives at these shapes (the launcher's own logic)
    assert bn._split(262, 16, 256 * 4, gpu=True)[0] == 16 and bn._split(12544, 1, 2 * 64 * 4, gpu=True)[0] == 48
    big = _row(report, kernel="_sum_rows_kernel", has_dot=False, mma="none", bn_pass=kinds[id(big_one)],
               programs=16, reduction_rows=262, column_blocks=16)
    assert "16 programs < 132 SMs (one pass)" in report.budget_failures([big])[0]


def test_budget_subset_must_hold_the_budgeted_rows():
    _, report = _static()
    rows = [_row(report, kernel=report.WGRAD_KERNEL, variant="7x7 STEM_CPAD=4 STEM_SP=8"),
            _row(report, kernel="_conv_bn_act_kernel", variant="7x7 STEM_CPAD=4"),
            _row(report, kernel="_bn_chunk_stats_kernel"), _row(report, kernel="_sum_rows_kernel", bn_pass="pass 1")]
    assert report.coverage_failures(rows) == []
    missing = report.coverage_failures(rows[1:])
    assert len(missing) == 2 and "no wgrad rows" in missing[0] and "stem wgrad" in missing[1]


def test_variant_labels_name_the_activation():
    """The row label shows the ACTIVATION constexpr (a name, not a flag) unless it is "none"."""
    _, report = _static()
    const = dict(R=1, S=1, PROLOGUE_BN=True, STATS=True, EPILOGUE_ACT=False, ACTIVATION="relu", BLOCK_M=64)
    assert report._variant(const, "bf16") == "1x1 PROLOGUE_BN STATS ACTIVATION=relu"
    assert report._variant(dict(const, ACTIVATION="none"), "bf16") == "1x1 PROLOGUE_BN STATS"


def _anchor():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        from static import anchor
    finally:
        sys.path.pop(0)
    return anchor


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d is not torch.float32 or not ON_GPU])  # TF32 on a GPU
def test_anchor_gemm_is_a_real_gemm(dtype, device):
    """The static check's yardstick (benchmarks/static/anchor.py) computes a @ b^T: ragged edges in M, N and K,
    more tiles than programs (the persistent walk and the grouped order), against float64 torch.matmul."""
    if device == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("device-side tensor descriptors need sm_90")
    anchor = _anchor()
    g = torch.Generator().manual_seed(17)
    a = torch.randn(200, 96, generator=g).to(device, dtype)
    b = torch.randn(72, 96, generator=g).to(device, dtype)
    tile = dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, GROUP_M=3)  # 4 x 3 tiles (the last row group short), 3 steps
    out = anchor.anchor_gemm(a, b, programs=5, tile=tile)
    assert out.dtype == dtype
    assert_close(out, torch.matmul(a.double(), b.double().T), dtype, "anchor GEMM")


def _budgets():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        from static import anchor_budgets
    finally:
        sys.path.pop(0)
    return anchor_budgets


def test_sm100_dot_must_be_tcgen05():
    _, report = _static()
    row = _row(report, arch=100, mma="tcgen05")
    assert report.budget_failures([row]) == []
    fails = report.budget_failures([dict(row, mma="mma.sync")])
    assert len(fails) == 1 and "not tcgen05" in fails[0]


def test_anchor_columns_and_issue_share():
    ab = _budgets()
    anchor = _row(None, layer=ab.ANCHOR_LAYER, kernel="anchor_gemm_kernel", instr_per_mflop=150.0)
    conv = _row(None, kernel="_conv_bn_act_kernel", variant="1x1 HAS_SCALE", mode="eval", instr_per_mflop=375.0)
    tf32 = dict(conv, dtype="fp32", instr_per_mflop=976.5625)
    ab.annotate([anchor, conv, tf32])
    assert conv["vs_anchor"] == 2.5 and anchor["vs_anchor"] == 1.0
    assert ab.peak_instr_per_mflop(90, "bf16") == 976.5625  # 4 instructions per clock / 4096 FLOP per clock
    assert conv["issue_share"] == 38.4 and tf32["issue_share"] == 50.0  # TF32 peaks at half the FLOP rate
    assert "vs_anchor" not in tf32  # no fp32 anchor in these rows: no ratio


def _budget_rows(ab, fwd_ratio):
    anchor = _row(None, layer=ab.ANCHOR_LAYER, kernel="anchor_gemm_kernel", instr_per_mflop=150.0, mode="eval",
                  config="128x128x64 w4 s3")
    fwd = _row(None, kernel="_conv_bn_act_kernel", variant="1x1 PROLOGUE_BN STATS", mode="train", phase="fwd",
               config="128x128x64 w8 s3")
    worse = dict(fwd, config="128x128x64 w4 s4")  # a second config of the same kernel: the budget judges the best
    rows = [anchor, dict(fwd, instr_per_mflop=150.0 * fwd_ratio), dict(worse, instr_per_mflop=150.0 * 20)]
    ab.annotate(rows)
    return rows


def test_enforced_budget_fails_when_broken(monkeypatch):
    ab = _budgets()
    budget = next(b for b in ab.BUDGETS if b.name == "train_fwd_1x1_vs_anchor")
    monkeypatch.setattr(ab, "BUDGETS", [budget])
    monkeypatch.setattr(ab, "PENDING", {})
    assert ab.evaluate(_budget_rows(ab, 2.5)) == ([], [])  # at the limit: met (its worse config does not count)
    other_tile = _row(None, kernel="_conv_bn_act_kernel", variant="1x1 PROLOGUE_BN STATS", mode="train",
                      config="64x64x64 w4 s4", layer="l2", vs_anchor=9.0)
    assert ab.evaluate(_budget_rows(ab, 2.5) + [other_tile]) == ([], [])  # ratios compare at the anchor's tile
    fails, pending = ab.evaluate(_budget_rows(ab, 2.6))
    assert pending == [] and len(fails) == 1 and "vs anchor 2.6 > 2.5" in fails[0], fails
    fails, _ = ab.evaluate([r for r in _budget_rows(ab, 2.0) if r["layer"] == ab.ANCHOR_LAYER])
    assert len(fails) == 1 and "no rows to judge" in fails[0]  # a budget over no rows must not pass


def test_pending_budget_reports_and_fails_once_met(monkeypatch):
    """Like xfail(strict=True): a pending budget prints its figure and passes while unmet, fails when met."""
    ab = _budgets()
    budget = next(b for b in ab.BUDGETS if b.name == "train_fwd_1x1_vs_anchor")
    monkeypatch.setattr(ab, "BUDGETS", [budget])
    monkeypatch.setattr(ab, "PENDING", {budget.name: "10.2"})
    monkeypatch.setattr(ab, "PENDING_ON", {})  # pending on every triton
    fails, pending = ab.evaluate(_budget_rows(ab, 10.2))
    assert fails == [] and len(pending) == 1
    assert pending[0].startswith("PENDING train_fwd_1x1_vs_anchor") and "measured 10.2, limit 2.5" in pending[0]
    fails, pending = ab.evaluate(_budget_rows(ab, 2.4))
    assert len(pending) == 1 and len(fails) == 1 and "pending budget is met" in fails[0], fails


def test_pending_on_some_tritons_is_enforced_on_the_others(monkeypatch):
    """PENDING_ON: a budget met on one triton only stays pending on the listed versions and is enforced elsewhere."""
    ab = _budgets()
    budget = next(b for b in ab.BUDGETS if b.name == "train_fwd_1x1_vs_anchor")
    monkeypatch.setattr(ab, "BUDGETS", [budget])
    monkeypatch.setattr(ab, "PENDING", {budget.name: "10.2"})
    monkeypatch.setattr(ab, "PENDING_ON", {budget.name: ("3.6.0",)})
    old = [dict(r, triton="3.6.0") for r in _budget_rows(ab, 2.6)]
    assert ab.evaluate(old)[0] == []  # pending there, unmet: passes
    new = [dict(r, triton="3.8.0") for r in _budget_rows(ab, 2.6)]
    fails, pending = ab.evaluate(new)
    assert pending == [] and len(fails) == 1 and "2.6 > 2.5" in fails[0], fails  # enforced there: broken
    assert ab.evaluate([dict(r, triton="3.8.0") for r in _budget_rows(ab, 2.4)]) == ([], [])


def test_every_pending_budget_is_a_budget():
    ab = _budgets()
    names = {b.name for b in ab.BUDGETS}
    assert set(ab.PENDING) <= names, set(ab.PENDING) - names
    assert set(ab.PENDING_ON) <= set(ab.PENDING), set(ab.PENDING_ON) - set(ab.PENDING)


def test_fp32_dots_must_be_tf32():
    _, report = _static()
    row = _row(report, dtype="fp32", mma_type="tf32")
    assert report.budget_failures([row]) == []
    fails = report.budget_failures([dict(row, mma_type="")])
    assert len(fails) == 1 and "not TF32" in fails[0]
    assert report.budget_failures([dict(row, dtype="bf16", mma_type="bf16")]) == []


SASS_PERSISTENT = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   IMAD R2, R3, R4, R5 ;
.L_x_1:
        /*0020*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0030*/               @P0 BRA `(.L_x_1) ;
        /*0040*/                   STG.E desc[UR4][R6.64], R24 ;
        /*0050*/                   CALL.REL.NOINC `($__internal_0_$__cuda_sm3x_div_rn_noftz_f32_slowpath) ;
        /*0060*/               @P1 BRA `(.L_x_0) ;
        /*0070*/                   EXIT ;
"""


def test_sass_per_tile_instructions_and_calls():
    """Out of the main loop per tile: the rest of a persistent kernel's tile loop, else the rest of the kernel."""
    analyze, _ = _static()
    s = analyze.sass_summary(SASS_PERSISTENT)
    assert s["main_loop_instrs"] == 2 and s["per_tile_instrs"] == 6 - 2 and s["sass_calls"] == 1
    s = analyze.sass_summary(SASS)
    assert s["per_tile_instrs"] == 6 - 4 and s["sass_calls"] == 0


def test_fp32_spills_are_a_named_budget(monkeypatch):
    """fp32 (TF32) rows' spills on sm_90 are judged by the item-5 budget fp32_no_spills (pending while any
    row spills), not row by row; bf16 rows and other archs keep the per-row spill budget."""
    ab = _budgets()
    _, report = _static()
    row = _row(report, dtype="fp32", mma_type="tf32", spill_bytes=40, config="64x128x64 w4 s3")
    assert report.budget_failures([row]) == []
    assert "spills 40 B" in report.budget_failures([dict(row, dtype="bf16", mma_type="bf16")])[0]
    assert "spills 40 B" in report.budget_failures([dict(row, arch=80, mma="mma.sync")])[0]
    budget = next(b for b in ab.BUDGETS if b.name == "fp32_no_spills")
    monkeypatch.setattr(ab, "BUDGETS", [budget])
    monkeypatch.setattr(ab, "PENDING", {})
    fails, _ = ab.evaluate([row])
    assert len(fails) == 1 and "spill bytes 40 > 0" in fails[0], fails
