"""pytest-benchmark glue for the suite: ``pytest benchmarks/ --benchmark-only``.

How one case is timed (on a CUDA GPU; without one every case skips with one reason, exit code 0):

1. ``fusedres.bench.measure.build`` makes the callable (fused / eager / compile / compile-max / eager-amp), with
   input sets that rotate through more than twice the L2 cache;
2. its first call is timed apart (Triton autotuning, torch.compile): ``extra_info["first_call_s"]``;
3. ``triton.testing.do_bench`` warms up, then times each run with CUDA events, the L2 flushed before
   each: ``extra_info`` gets the median ms, images/s, TFLOP/s, the floor and % of it
   (DESIGN.md section 7), the speedup over eager, and for fused its relative difference to eager;
4. ``benchmark.pedantic`` runs the same callable with a timer that synchronizes the GPU, so the table's
   columns are wall-clock time per call (launch overhead included).

``benchmark.group`` is "level | what | mode dtype batch": the table reads shape by shape, providers
within. Environment: FUSEDRES_BENCH_QUICK=1 (a representative handful: benchmarks/gpu_check.sh),
FUSEDRES_BENCH_BUDGET_S=N (cases that would start after N seconds skip), FUSEDRES_BENCH_JSONL=path (each
result appended as it is measured, so a killed run keeps what it had; benchmarks/report.py reads it).
"""
import json
import os
import time

import pytest

os.environ.setdefault("FUSEDRES_STRICT", "1")  # a fused case that falls back to PyTorch fails, never times it

NO_GPU = "benchmarks need a CUDA GPU; on CPU run `python -m fusedres` for kernel verification"
HERE = os.path.dirname(os.path.abspath(__file__))
_START = time.monotonic()
_EAGER_MS = {}
# Self-test only: "cpu" times the same code paths on the CPU (with TRITON_INTERPRET=1, tiny cases).
DEVICE = os.environ.get("_FUSEDRES_BENCH_DEVICE", "cuda")


def pytest_collect_file(file_path, parent):
    """Collect bench_*.py here (pytest.ini's python_files is for tests/)."""
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def _skip_reason():
    import torch  # is_available() asks the driver for a count: no CUDA context, fine at collection
    if DEVICE == "cuda" and not torch.cuda.is_available():
        return NO_GPU
    try:
        import pytest_benchmark  # noqa: F401
    except ImportError:
        return "pytest-benchmark is not installed (pip install -e '.[test]')"
    return None


def pytest_collection_modifyitems(config, items):
    reason = _skip_reason()
    if reason:
        mark = pytest.mark.skip(reason=reason)
        for item in items:
            if str(item.path).startswith(HERE + os.sep):
                item.add_marker(mark)


def pytest_configure(config):
    from fusedres.bench.measure import interrupt_on_sigterm
    interrupt_on_sigterm()  # `timeout` ends the run cleanly: the JSON still gets written


def pytest_report_header(config):
    from _suite import QUICK, block_cases, guess_seconds, layer_cases, model_cases
    cases = layer_cases() + block_cases() + model_cases()
    budget = os.environ.get("FUSEDRES_BENCH_BUDGET_S")
    return [f"fusedres benchmarks: {'quick' if QUICK else 'full'} set, {len(cases)} cases, a rough guess of "
            f"{sum(map(guess_seconds, cases)) / 60:.0f} min on an H100"
            + (f"; budget {budget} s" if budget else "; no budget (FUSEDRES_BENCH_BUDGET_S)")]


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config, machine_info):
    import torch
    import triton
    machine_info.update(torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda)
    if torch.cuda.is_available():
        machine_info.update(gpu=torch.cuda.get_device_name(), tf32_conv=torch.backends.cudnn.allow_tf32)


def _record(row):
    path = os.environ.get("FUSEDRES_BENCH_JSONL")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row, default=str) + "\n")


def _synchronized_timer():
    import torch
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def _pedantic(benchmark, runnable, summary):
    """pytest-benchmark's own columns: rounds of ~25 ms, the GPU synchronized at each clock read."""
    benchmark._timer = _synchronized_timer
    iterations = max(1, min(1000, round(25.0 / summary["median_ms"])))
    benchmark.pedantic(runnable.fn, rounds=5, iterations=iterations, warmup_rounds=1)


@pytest.fixture
def time_case(benchmark):
    def run(case):
        import torch

        from fusedres.bench import measure as B
        benchmark.group = case.group
        row = case.record()
        budget = float(os.environ.get("FUSEDRES_BENCH_BUDGET_S") or 0)
        if budget and time.monotonic() - _START > budget:
            _record(dict(row, status=f"not measured (FUSEDRES_BENCH_BUDGET_S={budget:g} spent)"))
            pytest.skip(f"FUSEDRES_BENCH_BUDGET_S={budget:g} s spent")
        torch.backends.cudnn.benchmark = True
        try:
            summary = B.run_case(case, torch.device(DEVICE), then=lambda r, s: _pedantic(benchmark, r, s))
        except B.Unsupported as e:
            _record(dict(row, status=f"skipped: {e}"))
            pytest.skip(str(e))
        except Exception as e:
            _record(dict(row, status=f"error: {type(e).__name__}: {e}"))
            raise
        finally:
            torch.cuda.empty_cache()
        row.update(summary, status=B.verdict(summary))
        if case.provider == "eager":
            _EAGER_MS[case.group] = summary["median_ms"]
        elif case.group in _EAGER_MS:
            row["speedup_vs_eager"] = _EAGER_MS[case.group] / summary["median_ms"]
        benchmark.extra_info.update(row)
        _record(row)
        assert row["status"] == "ok", row["status"]
    return run
