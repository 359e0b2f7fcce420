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
    loops = [dict(ok, dot_loops=3), dict(ok, dot_loops=2), dict(ok, async_wait0_in_loop=1), dict(ok, div64_in_loop=2)]
    msgs = report.budget_failures(loops)
    assert len(msgs) == 4 and "3 loops hold the dot" in msgs[0] and "num=0" in msgs[2] and "64-bit" in msgs[3]
    assert report.budget_failures([dict(ok, dot_loops=2, variant="1x1 HAS_SHORTCUT")]) == []  # main + shortcut
