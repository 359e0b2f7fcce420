"""Host cost of the fused ResNet-50's real GPU launch path, measured on a CPU-only machine.

The first H200 run found the fused model host-bound (benchmarks/RESULTS.md, "Host overhead per launch"). This
script times what the host does per step when every launch goes through Triton's real JITFunction.run and
Autotuner.run and only the final C launcher call is a no-op (benchmarks/static/driver.py launch_only):

- tensors live on the "meta" device: the launchers take their CUDA-path branches there (target sm_90: descriptor
  configs, packed bf16 prologue), torch ops allocate nothing and compute nothing, and the fusedres:: custom ops run
  their real implementation (benchmarks/static/layers.py meta_fused_path);
- Triton compiles each variant for sm_90 once (its disk cache as usual: the first run compiles, later runs load);
  autotuning picks the first surviving config without timing (FUSEDRES_AUTOTUNE_CACHE=0 keeps the disk cache clean);
- not measured: the C launcher (argument packing and cuLaunchKernel, a few us per launch on a GPU host), CUDA
  allocator and stream calls, and torch.cuda.device / descriptor-allocator context switches (skipped for meta).

    python benchmarks/host_overhead.py                 # eval and train, batch 256, 224x224, bf16; markdown table
    python benchmarks/host_overhead.py --profile       # plus the cProfile breakdown and the aten op counts
    python benchmarks/host_overhead.py --device cuda   # on a GPU: real launches, each step's host (enqueue) time
                                                       # (first step autotunes: ~1-2 min for resnet50, seconds for
                                                       # --model layer); not yet run on a GPU
    python benchmarks/host_overhead.py --budget eval=200,train=110 --budget-calls eval=300,train=200
                                                       # exit 1 when a mode passes a limit per launch
"""
import argparse
import contextlib
import cProfile
import os
import pstats
import statistics
import sys
import time
from collections import Counter
from typing import Callable, Dict, List, Tuple

os.environ.pop("TRITON_INTERPRET", None)
ON_CUDA = any(a in ("cuda", "--device=cuda") for a in sys.argv[1:])
if not ON_CUDA:
    os.environ["FUSEDRES_AUTOTUNE_CACHE"] = "0"  # fake timings must not reach Triton's on-disk autotune cache
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch._library.custom_ops import OPDEFS  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import fusedres  # noqa: E402
from benchmarks.static.driver import launch_count, launch_only  # noqa: E402
from benchmarks.static.layers import meta_fused_path  # noqa: E402

# Ops that read a tensor's data on the host (a device sync on CUDA); on meta they raise, so the step would fail.
SYNC_OPS = ("aten._local_scalar_dense", "aten.item", "aten.equal", "aten.is_nonzero", "aten.nonzero",
            "aten.allclose")


MODEL = "torchvision + fusedres.convert"


def _input(shape, dtype: torch.dtype, device: str) -> torch.Tensor:
    t = torch.empty(shape, device=device, dtype=dtype) if device == "meta" else \
        torch.randn(shape, device=device).to(dtype)
    return t.contiguous(memory_format=torch.channels_last)


def build(train: bool, batch: int, image: int, dtype: torch.dtype,
          device: str = "meta") -> Tuple[torch.nn.Module, torch.Tensor]:
    try:
        import torchvision
        model = fusedres.convert(torchvision.models.resnet50())
    except ImportError:  # (the triton 3.6 venv has no torchvision) fusedres's own ResNet-50, the same layers
        global MODEL
        MODEL = "fusedres.resnet50"
        model = fusedres.resnet50(fused=True)
    model = model.to(device=device, dtype=dtype, memory_format=torch.channels_last).train(train)
    return model, _input((batch, 3, image, image), dtype, device)


def build_layer(train: bool, batch: int, dtype: torch.dtype,
                device: str = "meta") -> Tuple[torch.nn.Module, torch.Tensor]:
    """The GPU profile's layer case: ResNet-50's 3x3 64->64 conv at 56x56 with BN and ReLU, one fused launch in
    eval and a one-unit training chain in training (fusedres.bench.layers.FusedLayer)."""
    from fusedres.bench.layers import EagerLayer, FusedLayer
    from fusedres.bench.shapes import model_shapes
    wanted = (64, 64, 3, 56, 1, "none")
    shape = next(lay.shape for lay in model_shapes("resnet50").layers
                 if (lay.shape.c, lay.shape.k, lay.shape.r, lay.shape.h, lay.shape.stride, lay.shape.tail) == wanted)
    layer = FusedLayer(EagerLayer(shape)).to(device=device, dtype=dtype, memory_format=torch.channels_last)
    return layer.train(train), _input((batch, 64, 56, 56), dtype, device).requires_grad_(train)


def step_fn(model: torch.nn.Module, x: torch.Tensor, train: bool, sgd: bool = False) -> Callable[[], None]:
    """One step: eval, a forward; training, forward and backward, and with ``sgd`` an SGD step as the benchmarks'
    (foreach, as on CUDA; on meta its ops run Python shape functions that CUDA runs in C++)."""
    if not train:
        return lambda: model(x)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, foreach=True) if sgd else None

    def step():
        model.zero_grad(set_to_none=True)
        out = model(x)
        out.backward(torch.empty_like(out))
        if opt is not None:
            opt.step()
    return step


def mode_context(train: bool):
    return contextlib.nullcontext() if train else torch.inference_mode()


def enqueue_times(step, steps: int) -> List[float]:
    """On a GPU: seconds each step's host work takes, the device idle at its start (synchronized before, not
    after): while the launch queue does not fill, this is the host's cost alone, whatever the kernels take."""
    out = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        out.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return out


def cuda_launches(step) -> int:
    """Triton launches in one step on a GPU, counted by a launch hook (set for this step only: it costs time)."""
    from triton import knobs
    seen = []
    saved = knobs.runtime.launch_enter_hook
    knobs.runtime.launch_enter_hook = lambda metadata: seen.append(1)
    try:
        step()
        torch.cuda.synchronize()
    finally:
        knobs.runtime.launch_enter_hook = saved
    return len(seen)


def time_steps(step, steps: int, repeats: int) -> List[float]:
    """Seconds per step, one value per repeat of ``steps`` steps."""
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        out.append((time.perf_counter() - t0) / steps)
    return out


class OpCounter(TorchDispatchMode):
    """Counts every aten op, also those inside the fusedres:: custom ops' implementations (re-entered)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket) if hasattr(func, "overloadpacket") else str(func)
        self.ops[name] += 1
        if name.startswith("fusedres."):  # run its implementation under the mode, to see its own ops
            with self:
                return OPDEFS[func._schema.name]._init_fn(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


# cProfile breakdown: a function's own time (tottime) is charged to the first category one of whose path parts
# its file's path contains; C functions (file "~") are torch ops when their name says torch, else built-ins.
_CATEGORIES = [
    ("instrument (fake launcher, benchmark loop)", ("/benchmarks/",)),
    ("triton Autotuner.run + heuristics", ("/triton/runtime/autotuner.py",)),
    ("triton JITFunction.run (binder, cache key, launch metadata)",
     ("/triton/runtime/jit.py", "/triton/compiler/compiler.py", "<string>")),  # <string>: the generated binder
    ("triton other (driver, knobs, allocator)", ("/triton/",)),
    ("fusedres launchers (kernels/)", ("/kernels/",)),
    ("fusedres host code (fusedres/)", ("/fusedres/",)),
    ("torch.library custom_op dispatch", ("/torch/_library/", "/torch/_ops.py")),
    ("torch autograd / Tensor Python", ("/torch/autograd/", "/torch/_tensor.py")),
    ("torch meta kernels in Python (meta only)",  # shape functions that CUDA tensors run in C++
     ("/torch/_meta_registrations", "/torch/_refs", "/torch/_prims", "/torch/_decomp",
      "/torch/fx/experimental/symbolic_shapes")),
    ("torch.nn modules (Python)", ("/torch/nn/", "/torchvision/")),
    ("torch other Python", ("/torch/",)),
]


def _category(file: str, name: str) -> str:
    f = file.replace("\\", "/")
    for cat, parts in _CATEGORIES:
        if any(p in f for p in parts):
            return cat
    if f == "~":
        return "torch ops (C++, built-in calls)" if ("torch" in name or "Tensor" in name) else "Python built-ins"
    return "other Python"


def profile_breakdown(step, steps: int) -> Tuple[Dict[str, float], List[Tuple[str, float, int]]]:
    """Seconds per step per category, and the top functions by own time (name, s/step, calls/step)."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        step()
    prof.disable()
    stats = pstats.Stats(prof).stats
    cats: Dict[str, float] = Counter()
    rows = []
    for (file, line, name), (_cc, nc, tt, _ct, _callers) in stats.items():
        cats[_category(file, name)] += tt / steps
        rows.append((f"{os.path.basename(file)}:{line}({name})" if file != "~" else name, tt / steps, nc // steps))
    rows.sort(key=lambda r: -r[1])
    return dict(cats), rows[:25]


def measure(train: bool, args) -> dict:
    dtype = getattr(torch, args.dtype)
    model, x = build_layer(train, args.batch, dtype, args.device) if args.model == "layer" else \
        build(train, args.batch, args.image, dtype, args.device)
    step = step_fn(model, x, train, args.sgd)
    with mode_context(train):
        t0 = time.perf_counter()
        step()  # compiles (or loads) every variant, tunes every key once
        first = time.perf_counter() - t0
        for _ in range(args.warmup):
            step()
        if args.device == "cuda":
            launches = cuda_launches(step)
            per_step = enqueue_times(step, args.steps * args.repeats)
        else:
            n0 = launch_count()
            step()
            launches = launch_count() - n0
            per_step = time_steps(step, args.steps, args.repeats)
        calls = python_calls(step)
        what = ("train fwd+bwd+SGD" if args.sgd else "train fwd+bwd") if train else "eval fwd"
        res = dict(mode=f"{args.model} {what}", kind="train" if train else "eval", launches=launches,
                   calls=calls, first_s=first, host_ms=statistics.median(per_step) * 1e3,
                   spread_ms=(max(per_step) - min(per_step)) * 1e3)
        if args.profile:
            with OpCounter() as counter:
                step()
            res["ops"] = counter.ops
            res["cats"], res["top"] = profile_breakdown(step, args.steps)
    return res


def python_calls(step) -> int:
    """Python function calls (C functions included) in one step: machine-independent, unlike its time."""
    prof = cProfile.Profile()
    prof.enable()
    step()
    prof.disable()
    return sum(nc for (_cc, nc, _tt, _ct, _callers) in pstats.Stats(prof).stats.values())


def us_per_launch(r: dict) -> float:
    return r["host_ms"] * 1e3 / max(r["launches"], 1)


def calls_per_launch(r: dict) -> float:
    return r["calls"] / max(r["launches"], 1)


def table(results: List[dict]) -> str:
    lines = ["| mode | launches/step | host ms/step | host us/launch | spread ms | Python calls/launch "
             "| first step s |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['mode']} | {r['launches']} | {r['host_ms']:.2f} | {us_per_launch(r):.0f} | "
                     f"{r['spread_ms']:.2f} | {calls_per_launch(r):.0f} | {r['first_s']:.1f} |")
    return "\n".join(lines)


def _limits(text: str) -> Dict[str, float]:
    """"eval=160,train=100" -> {"eval": 160.0, "train": 100.0}; a bare number applies to both."""
    if "=" not in text:
        return {"eval": float(text), "train": float(text)}
    return {k: float(v) for k, v in (item.split("=") for item in text.split(","))}


def over_budget(results: List[dict], us: str, calls: str) -> List[str]:
    """BUDGET lines for the modes whose host us/launch or Python calls/launch pass their limits."""
    out = []
    for what, limits, figure in (("host_us_per_launch", us, us_per_launch), ("calls_per_launch", calls,
                                                                              calls_per_launch)):
        for r in results:
            limit = _limits(limits).get(r["kind"]) if limits else None
            if limit is not None and figure(r) > limit:
                out.append(f"BUDGET {what} {r['mode']}: {figure(r):.0f} > {limit:g}")
    return out


def profile_tables(r: dict) -> str:
    total = sum(r["cats"].values())
    out = [f"\n### {r['mode']}: cProfile own time by category (profiled {total * 1e3:.1f} ms/step, "
           f"unprofiled {r['host_ms']:.1f})", "| category | ms/step | share |", "|---|---|---|"]
    for cat, s in sorted(r["cats"].items(), key=lambda kv: -kv[1]):
        out.append(f"| {cat} | {s * 1e3:.2f} | {s / total:.0%} |")
    out += ["", "| top function (own time) | us/step | calls/step |", "|---|---|---|"]
    out += [f"| {name} | {s * 1e6:.0f} | {n} |" for name, s, n in r["top"][:15]]
    ops = r["ops"]
    syncs = {k: v for k, v in ops.items() if k in SYNC_OPS}
    aten = sum(v for k, v in ops.items() if k.startswith("aten."))
    out += ["", f"aten ops/step: {aten} (host syncs: {syncs or 'none'}); custom ops/step: "
            f"{sum(v for k, v in ops.items() if k.startswith('fusedres.'))}",
            "| op | calls/step |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in ops.most_common(20)]
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=["eval", "train", "both"], default="both")
    p.add_argument("--model", choices=["resnet50", "layer"], default="resnet50",
                   help="layer: the GPU profile's 3x3 64->64 conv at 56x56 (+BN, ReLU)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--image", type=int, default=224)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--device", choices=["meta", "cuda"], default="meta",
                   help="cuda: on a GPU, real launches; host ms/step is each step's enqueue time from an idle device")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--sgd", action="store_true", help="training steps end with an SGD step (momentum, foreach)")
    p.add_argument("--profile", action="store_true", help="cProfile breakdown and aten op counts per step")
    p.add_argument("--budget", default=None, metavar="US|eval=US,train=US",
                   help="fail when a mode's host us/launch passes its limit (timing: noisy on shared cores)")
    p.add_argument("--budget-calls", default=None, metavar="N|eval=N,train=N",
                   help="fail when a mode's Python calls per launch pass the limit (deterministic per torch/triton)")
    args = p.parse_args(argv)
    modes = {"eval": [False], "train": [True], "both": [False, True]}[args.mode]
    import triton
    results = []
    with (launch_only(args.arch) if args.device == "meta" else contextlib.nullcontext()), \
            (meta_fused_path() if args.device == "meta" else contextlib.nullcontext()):
        for train in modes:
            results.append(measure(train, args))
    where = f"launch-only sm_{args.arch}, meta tensors" if args.device == "meta" else \
        f"{torch.cuda.get_device_name()}, enqueue time from an idle device"
    print(f"fused {args.model} ({MODEL if args.model == 'resnet50' else 'FusedLayer'}) host cost, {where} (triton "
          f"{triton.__version__}, torch {torch.__version__}), {args.dtype}, batch {args.batch}; median of "
          f"{args.repeats} x {args.steps} steps\n")
    print(table(results))
    for r in results:
        if "cats" in r:
            print(profile_tables(r))
    broken = over_budget(results, args.budget, args.budget_calls)
    for line in broken:
        print(line)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
