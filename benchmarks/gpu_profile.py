"""Where a benchmark case's GPU time goes, for a lent GPU: kernel by kernel, host against device, configs.

    python benchmarks/gpu_profile.py layer:layer1.0.conv2:training:256 model:resnet50:inference:256

A spec is LEVEL:PATH_OR_MODEL:MODE:BATCH (bf16, ResNet-50 shapes). Each case is built as the benchmark builds
it (fusedres.bench.measure.build), fused and eager side by side, and gets:
- the timed step (triton.testing.do_bench, as the main job times it) and the same step replayed from a CUDA graph:
  their difference is host time the GPU waited for (the graph replays the kernels with no Python in between);
- a torch.profiler table of the kernels by CUDA time per step (their sum against the timed step says the same);
- every autotuned launch's timing per config, descriptor (TMA) configs against pointer ones (fused only).
"""
import os
import sys
import time

# every key tunes in this process (no timings loaded from Triton's disk cache), so each config's time is seen;
# read when fusedres builds its autotuners, so before the import below
os.environ["FUSEDRES_AUTOTUNE_CACHE"] = "0"

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402

from fusedres.bench import measure as B  # noqa: E402

STEPS = 5
TUNED = {}  # (kernel, key) -> {config: ms} of every autotuning run in this process
_AUTOTUNE_BENCH = Autotuner._bench


def _recording_bench(self, *args, config, **meta):
    """Autotuner._bench that also keeps each config's timing under its launch's key (triton keeps only the last
    key's). _bench, not run: kernels/_launch.launch_tuned takes its fast path only while Autotuner.run is triton's
    own, so wrapping run would time another host path than users get."""
    out = _AUTOTUNE_BENCH(self, *args, config=config, **meta)
    bound = {**(self.nargs or {}), **meta}
    key = tuple(bound.get(k) for k in self.keys)
    TUNED.setdefault((getattr(self.fn, "__name__", "?"), key), {})[str(config)] = out
    return out


def case_of(spec: str, provider: str) -> B.Case:
    level, what, mode, batch = spec.split(":")
    if level == "layer":
        layer = next(lay for lay in B.model_shapes("resnet50").layers if what in lay.names)
        return B.Case("layer", "resnet50", layer.shape.label, mode, "bf16", int(batch), provider, path=what,
                      shape=layer.shape)
    return B.Case("model", what, what, mode, "bf16", int(batch), provider)


def _graph_ms(fn) -> str:
    """fn's step captured in a CUDA graph and replayed (do_bench median), or why it could not be captured."""
    from triton.testing import do_bench
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return f"{do_bench(graph.replay, warmup=100, rep=300):.3f}"
    except Exception as e:  # noqa: BLE001 - a capture failure is a finding, reported in the table
        return f"capture failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


def _wall_ms(fn, steps: int = 20) -> float:
    """Host wall time per step over back-to-back steps, synchronized at the end only: max(host, GPU)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps * 1e3


def _kernel_table(case_id: str, prof, warm: float) -> float:
    rows = [e for e in prof.key_averages() if getattr(e, "self_device_time_total", 0) > 0]
    rows.sort(key=lambda e: -e.self_device_time_total)
    total = sum(e.self_device_time_total for e in rows) / STEPS / 1e3
    print(f"\n### {case_id}: {total:.3f} ms of kernels per step (first call + autotune {warm:.1f} s)")
    print("| kernel | calls/step | ms/step | share |")
    print("|---|---|---|---|")
    for e in rows[:25]:
        t = e.self_device_time_total / STEPS / 1e3
        print(f"| {e.key[:110]} | {e.count / STEPS:g} | {t:.3f} | {100 * t / total:.0f}% |")
    return total


def profile_case(case: B.Case, device: torch.device) -> None:
    from triton.testing import do_bench
    t0 = time.perf_counter()
    r = B.build(case, device)
    r.fn()
    torch.cuda.synchronize()
    warm = time.perf_counter() - t0
    timed = do_bench(r.fn, warmup=100, rep=300)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(STEPS):
            r.fn()
        torch.cuda.synchronize()
    kernels = _kernel_table(case.id, prof, warm)
    graphed = _graph_ms(r.fn)
    again = do_bench(r.fn, warmup=100, rep=300)  # after the profiler: a host that slowed down shows here
    print(f"\ntimed step {timed:.3f} ms; kernels {kernels:.3f} ms; CUDA-graph replay {graphed} ms "
          f"(timed - kernels = {timed - kernels:.3f} ms the GPU waited for the host); "
          f"timed again after the profiler {again:.3f} ms; wall {_wall_ms(r.fn):.3f} ms per step")
    r.restore()
    sys.stdout.flush()


def print_configs() -> None:
    """Per autotuned launch: the best descriptor (TMA) config against the best pointer config."""
    print("\n### Autotuned launches: best descriptor (TMA) config against best pointer config (ms)")
    print("| kernel | key (leading fields) | best TMA ms | best pointer ms | TMA / pointer | winner |")
    print("|---|---|---|---|---|---|")
    for (name, key), timings in TUNED.items():
        ms = {c: (t[0] if isinstance(t, (list, tuple)) else t) for c, t in timings.items()}
        tma = {c: t for c, t in ms.items() if "TMA: True" in c}
        ptr = {c: t for c, t in ms.items() if "TMA: True" not in c}
        bt = min(tma.values()) if tma else None
        bp = min(ptr.values()) if ptr else None
        ratio = f"{bt / bp:.2f}" if bt and bp else "-"
        win = min(ms, key=ms.get) if ms else "-"
        print(f"| {name} | {' '.join(str(k) for k in key[:12])} | {bt if bt is None else f'{bt:.4f}'} | "
              f"{bp if bp is None else f'{bp:.4f}'} | {ratio} | {win.replace('num_ctas: 1, ', '')[:90]} |")


def main(specs) -> int:
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    Autotuner._bench = _recording_bench
    for spec in specs:
        for provider in ("fused", "eager"):
            try:
                profile_case(case_of(spec, provider), device)
            except Exception as e:  # noqa: BLE001 - one case's failure must not lose the others
                print(f"\n### {spec} {provider}: failed: {type(e).__name__}: {e}")
    print_configs()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
