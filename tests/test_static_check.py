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
