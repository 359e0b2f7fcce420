"""Where a benchmark case's GPU time goes, kernel by kernel (torch.profiler), for a lent GPU.

    python benchmarks/gpu_profile.py layer:layer1.0.conv2:training:256 model:resnet50:inference:256

A spec is LEVEL:PATH_OR_MODEL:MODE:BATCH (bf16, ResNet-50 shapes). Each case is built as the benchmark
builds it (fusedres.bench.measure.build), run until its autotuning is done, then profiled over a few steps;
the table lists the kernels by total CUDA time per step. Fused and eager are profiled side by side.
"""
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from fusedres.bench import measure as B

STEPS = 5


def case_of(spec: str, provider: str) -> B.Case:
    level, what, mode, batch = spec.split(":")
    if level == "layer":
        layer = next(lay for lay in B.model_shapes("resnet50").layers if what in lay.names)
        return B.Case("layer", "resnet50", layer.shape.label, mode, "bf16", int(batch), provider, path=what,
                      shape=layer.shape)
    return B.Case("model", what, what, mode, "bf16", int(batch), provider)


def profile_case(case: B.Case, device: torch.device) -> None:
    t0 = time.perf_counter()
    r = B.build(case, device)
    r.fn()
    torch.cuda.synchronize()
    warm = time.perf_counter() - t0
    for _ in range(3):
        r.fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(STEPS):
            r.fn()
        torch.cuda.synchronize()
    rows = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA
            or getattr(e, "self_device_time_total", 0) > 0]
    key = "self_device_time_total" if hasattr(rows[0], "self_device_time_total") else "self_cuda_time_total"
    rows.sort(key=lambda e: -getattr(e, key))
    total = sum(getattr(e, key) for e in rows) / STEPS / 1e3
    print(f"\n### {case.id}: {total:.3f} ms of kernels per step (first call + autotune {warm:.1f} s)")
    print("| kernel | calls/step | ms/step | share |")
    print("|---|---|---|---|")
    for e in rows[:25]:
        t = getattr(e, key) / STEPS / 1e3
        print(f"| {e.key[:110]} | {e.count / STEPS:g} | {t:.3f} | {100 * t / total:.0f}% |")
    r.restore()
    sys.stdout.flush()


def main(specs) -> int:
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    for spec in specs:
        for provider in ("fused", "eager"):
            try:
                profile_case(case_of(spec, provider), device)
            except Exception as e:  # noqa: BLE001 - one case's failure must not lose the others
                print(f"\n### {spec} {provider}: failed: {type(e).__name__}: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
