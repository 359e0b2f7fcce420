"""Measuring, shared by the command line (``python -m fusedres``) and the suite in ``benchmarks/``.

- shapes and FLOP / byte counts: ``fusedres.bench.shapes`` (re-exported here);
- the floor of DESIGN.md section 7: max(FLOPs / peak, fewest bytes / bandwidth) with the card's ceilings;
- cases: a plain-data description of one measurement (level, what, mode, dtype, batch, provider) that
  builds, on a device, the callable to time: ``fused`` (our kernels), ``eager`` (PyTorch modules, same
  dtype and channels_last), ``compile`` (``torch.compile``) or ``compile-max`` (max-autotune + freezing);
- timing: first call (autotune / compile) apart, then the median of ``triton.testing.do_bench`` (CUDA
  events, L2 flushed before each run) over input sets that together exceed twice the L2 cache.

A training step is forward, backward and an SGD (momentum 0.9) step, in the benchmark dtype throughout
(parameters, activations, gradients) for ``eager``, ``fused`` and ``compile``. The fused blocks also
run under ``torch.autocast`` (``fusedres/_autocast.py``), but no case times them that way. At the model
level ``eager-amp`` adds the usual mixed-precision baseline: fp32 parameters and inputs under
``torch.autocast`` (a GradScaler for fp16). Nothing here touches CUDA at import.
"""
import itertools
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..reference import rel_err
from .layers import EagerLayer, FusedLayer, layer_inputs
from .shapes import ConvShape, image_size, init_module, model_shapes, total_flops_bytes, twins

# The command line's and the benchmarks' dtype names.
DTYPE_OF = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# What is timed per mode (every level); the command line's PROVIDERS lists every name.
PROVIDERS_BY_MODE = {"inference": ("eager", "fused", "compile", "compile-max"),
                     "training": ("eager", "fused", "compile")}
AMP = "eager-amp"  # model-level training baseline: torch.autocast over fp32 parameters


def log(msg: str) -> None:
    """Progress, on stderr (the tables go to stdout)."""
    print(msg, file=sys.stderr, flush=True)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def interrupt_on_sigterm() -> None:
    """SIGTERM (``timeout``) raises KeyboardInterrupt, so a run can still write what it measured."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)


def environment() -> Dict:
    """Versions, card and switches, for the JSON that goes with every result."""
    import platform
    import subprocess
    from datetime import datetime, timezone

    import triton

    import fusedres
    env = dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), fusedres=fusedres.__version__,
               python=platform.python_version(), torch=torch.__version__, triton=triton.__version__,
               platform=platform.platform())
    if torch.cuda.is_available():
        env.update(card=torch.cuda.get_device_name(), cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                   tf32_conv=torch.backends.cudnn.allow_tf32, tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(fusedres.__file__)))
        env["commit"] = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                                       timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["commit"] = None
    return env


def write_json(path: str, payload: Dict) -> None:
    """Write atomically (a run killed mid-write keeps the previous file)."""
    import json
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1, default=str)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------
# The card's ceilings and the floor
# ------------------------------------------------------------------------------------------------

# Measured on one H100 and one H200 (2026-11, torch 2.11): an 8192^3 bf16 matmul at ~790 TFLOP/s on both,
# a device-to-device copy at ~3.0 TB/s (H100) and ~4.3 TB/s (H200), read + write counted. fp32 scales by
# the datasheet's ratios. Other cards: FUSEDRES_PEAK_TFLOPS / FUSEDRES_PEAK_TBPS.
_CARDS = (("H200", 790.0, 4.3), ("H100", 790.0, 3.0))


@dataclass
class Ceilings:
    card: str
    tflops: Optional[float]   # for the dtype asked
    tbps: Optional[float]
    l2_bytes: int
    source: str


def ceilings(device: torch.device, dtype: torch.dtype) -> Ceilings:
    if device.type != "cuda":
        return Ceilings("cpu", None, None, 0, "no ceilings on the CPU")
    props = torch.cuda.get_device_properties(device)
    l2 = int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)
    tflops = tbps = None
    source = "unknown card: set FUSEDRES_PEAK_TFLOPS and FUSEDRES_PEAK_TBPS for % of floor"
    for tag, tf, bw in _CARDS:
        if tag in props.name:
            tflops, tbps, source = tf, bw, f"{tag} ceilings measured on one such card (2026-11)"
    if os.environ.get("FUSEDRES_PEAK_TFLOPS"):
        tflops, source = float(os.environ["FUSEDRES_PEAK_TFLOPS"]), "FUSEDRES_PEAK_TFLOPS"
    if os.environ.get("FUSEDRES_PEAK_TBPS"):
        tbps, source = float(os.environ["FUSEDRES_PEAK_TBPS"]), source + ", FUSEDRES_PEAK_TBPS"
    if tflops is not None and dtype == torch.float32:
        tflops = tflops / 2 if torch.backends.cudnn.allow_tf32 else tflops * 67 / 989
    return Ceilings(props.name, tflops, tbps, l2, source)


def summarize(timing: Dict, images: int, flops: float, nbytes: float, ceil: Ceilings) -> Dict:
    """The figures of one measurement: median ms, images/s, TFLOP/s, the floor and % of it."""
    ms = timing["median_ms"]
    out = dict(timing, images_per_s=images / (ms / 1e3), tflops=flops / (ms / 1e3) / 1e12, gflop=flops / 1e9,
               min_mbytes=nbytes / 1e6)
    if ceil.tflops and ceil.tbps:
        floor_ms = max(flops / (ceil.tflops * 1e12), nbytes / (ceil.tbps * 1e12)) * 1e3
        out.update(floor_ms=floor_ms, pct_of_floor=100.0 * floor_ms / ms,
                   bound="compute" if flops / ceil.tflops >= nbytes / ceil.tbps else "memory")
    return out


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], device: torch.device, rep_ms: float = 300.0, warmup_ms: float = 100.0) -> Dict:
    """First call (compile / autotune) timed apart, then the median (and 20/80 %) of timed runs."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    first = time.perf_counter() - t0
    if device.type == "cuda":
        from triton.testing import do_bench
        med, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return dict(first_call_s=first, median_ms=med, p20_ms=p20, p80_ms=p80, timer="triton.testing.do_bench")
    times = []
    end = time.perf_counter() + rep_ms / 1e3
    while len(times) < 3 or (time.perf_counter() < end and len(times) < 100):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    pick = lambda f: times[min(len(times) - 1, int(f * len(times)))]  # noqa: E731
    return dict(first_call_s=first, median_ms=pick(0.5), p20_ms=pick(0.2), p80_ms=pick(0.8), timer="perf_counter")


def providers(level: str, mode: str) -> Tuple[str, ...]:
    return PROVIDERS_BY_MODE[mode] + ((AMP,) if (level, mode) == ("model", "training") else ())


# ------------------------------------------------------------------------------------------------
# Cases: what to time, as plain data, and the callable it builds on a device
# ------------------------------------------------------------------------------------------------

class Unsupported(Exception):
    """This provider cannot run this case (the message says why): skip it, do not fail."""


@dataclass(frozen=True)
class Case:
    level: str                          # "layer" | "block" | "model"
    model: str                          # the model the layer / block comes from (or is)
    what: str                           # the layer's or block's label, or the model's name
    mode: str                           # "inference" | "training"
    dtype: str                          # a key of DTYPE_OF
    batch: int
    provider: str                       # "fused" | "eager" | "compile" | "compile-max"
    path: str = ""                      # block: module path of its first occurrence
    shape: Optional[ConvShape] = None   # layer: the launch
    size: Optional[int] = None          # model input size (default: the model's own)

    @property
    def group(self) -> str:
        """One group per row of the comparison: the providers of the same thing."""
        return f"{self.level} | {self.what} | {self.mode} {self.dtype} b{self.batch}"

    @property
    def id(self) -> str:
        what = self.what.replace(" ", "_").replace("@", "at")
        return f"{self.level}-{what}-{self.mode}-{self.dtype}-b{self.batch}-{self.provider}"

    def record(self) -> Dict:
        """The case as a flat dict: the start of every result row (JSON, extra_info, report.py)."""
        return dict(level=self.level, model=self.model, what=self.what, path=self.path, mode=self.mode,
                    dtype=self.dtype, batch=self.batch, provider=self.provider, group=self.group)


@dataclass
class Runnable:
    fn: Callable[[], object]            # one step on the next input set
    images: int
    flops: float
    nbytes: float
    rep_ms: float
    check: Optional[Callable[[], float]] = None   # fused: relative difference to eager on the same inputs
    restore: Callable[[], None] = lambda: None


def _n_sets(set_bytes: float, device: torch.device, ceil: Ceilings) -> int:
    """Enough input sets that rotating through them overflows the L2 cache twice (1 on the CPU)."""
    if device.type != "cuda" or set_bytes <= 0:
        return 1
    return max(1, min(16, math.ceil(2 * ceil.l2_bytes / set_bytes)))


def _nbytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))


def build(case: Case, device: torch.device, ceil: Optional[Ceilings] = None) -> Runnable:
    """The callable that runs ``case`` once per call, with its counts; raises Unsupported to skip."""
    dt, training, n = DTYPE_OF[case.dtype], case.mode == "training", case.batch
    ceil = ceil or ceilings(device, dt)
    if case.provider not in providers(case.level, case.mode):
        raise Unsupported(f"provider {case.provider!r} is not measured for {case.level} {case.mode}")
    if case.provider == "fused" and training:
        if case.level == "layer" and (case.shape.tail != "none" or not case.shape.relu):
            raise Unsupported("a launch with a shortcut epilogue trains inside its block (the fused chain has no "
                              "such single launch): see the block level")
    amp = case.provider == AMP
    if amp and dt == torch.float32:
        raise Unsupported("AMP needs a 16-bit dtype")
    gen = torch.Generator(device=device).manual_seed(1)
    elsize = torch.empty((), dtype=dt).element_size()
    size = case.size or image_size(case.model)

    if case.level == "layer":
        sh = case.shape
        ref = EagerLayer(sh).to(device)
        init_module(ref, layer_inputs(sh, 4, device, torch.float32, gen), gen)
        fused = FusedLayer(ref)
        make = lambda: layer_inputs(sh, n, device, dt, gen)  # noqa: E731
        flops, nbytes, rep = sh.flops(n, training), sh.min_bytes(n, elsize, training), 300.0
        grad_inputs = sh.dgrad
    elif case.level == "block":
        ref, fused = twins(case.model, device, case.path, size=size)
        blk = next(b for b in model_shapes(case.model, size).blocks if case.path in b.names)
        make = lambda: [torch.randn(n, blk.c, blk.h, blk.w, device=device, generator=gen).to(dt).contiguous(  # noqa
            memory_format=torch.channels_last)]
        flops = sum(s.flops(n, training) for s in blk.convs)
        nbytes = sum(s.min_bytes(n, elsize, training) for s in blk.convs)
        rep, grad_inputs = 500.0, True
    elif case.level == "model":
        ref, fused = twins(case.model, device, size=size)
        in_dt = torch.float32 if amp else dt  # AMP is fed fp32 images
        make = lambda: [torch.randn(n, 3, size, size, device=device, generator=gen).to(in_dt).contiguous(  # noqa
            memory_format=torch.channels_last)]
        flops, nbytes = total_flops_bytes(model_shapes(case.model, size), n, elsize, training)
        rep, grad_inputs = 1500.0, False
    else:
        raise ValueError(f"unknown level {case.level!r}")

    one = make()
    sets = [one] + [make() for _ in range(_n_sets(_nbytes(one), device, ceil) - 1)]
    if training:
        return _training(case, ref, fused, sets, dt, device, flops, nbytes, rep, grad_inputs, gen)
    return _inference(case, ref, fused, sets, dt, device, flops, nbytes, rep)


def _compiled(module: nn.Module, provider: str) -> Tuple[nn.Module, Callable[[], None]]:
    import torch._dynamo
    import torch._inductor.config as inductor_config
    torch._dynamo.reset()  # a fresh cache per case: no recompile limit hit, no stale graphs
    if provider == "compile":
        return torch.compile(module), lambda: None
    saved = inductor_config.freezing
    inductor_config.freezing = True  # weights become constants: Inductor folds BN into the conv

    def restore():
        inductor_config.freezing = saved
    return torch.compile(module, mode="max-autotune"), restore


def _inference(case, ref, fused, sets, dt, device, flops, nbytes, rep) -> Runnable:
    for m in (ref, fused):
        m.to(dtype=dt, memory_format=torch.channels_last).eval()
    restore, check = (lambda: None), None
    if case.provider == "fused":
        module = fused

        def check():
            with torch.inference_mode():
                return rel_err(fused(*sets[0]), ref(*sets[0]))
    elif case.provider == "eager":
        module = ref
    else:
        module, restore = _compiled(ref, case.provider)
    it = itertools.cycle(sets)

    def fn():
        with torch.inference_mode():
            return module(*next(it))
    return Runnable(fn, case.batch, flops, nbytes, rep, check, restore)


def _training(case, ref, fused, sets, dt, device, flops, nbytes, rep, grad_inputs, gen) -> Runnable:
    amp = case.provider == AMP
    module = fused if case.provider == "fused" else ref
    for m in (ref, module):
        m.to(dtype=torch.float32 if amp else dt, memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(module.parameters(), lr=1e-3, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type) if amp and dt == torch.float16 else None
    autocast = lambda: torch.autocast(device.type, dtype=dt, enabled=amp)  # noqa: E731
    data = []
    for inputs in sets:
        if grad_inputs:
            inputs = [None if t is None else t.requires_grad_() for t in inputs]
        if case.level == "model":
            target = torch.randint(0, ref.fc.out_features, (case.batch,), device=device, generator=gen)
        else:
            with torch.no_grad(), autocast():
                target = torch.randn_like(ref(*inputs), memory_format=torch.channels_last)  # the upstream grad
        data.append((inputs, target))
    restore = lambda: None  # noqa: E731
    if case.provider.startswith("compile"):
        module, restore = _compiled(module, case.provider)
    it = itertools.cycle(data)

    def fn():
        inputs, target = next(it)
        with autocast():
            out = module(*inputs)
        if case.level == "model":  # a loss on the logits (scaled for fp16 AMP)
            loss = F.cross_entropy(out.float(), target)
            (scaler.scale(loss) if scaler else loss).backward()
        else:                      # a layer or block inside a net: the upstream gradient is given
            out.backward(target)
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        for t in inputs:
            if t is not None:
                t.grad = None
    return Runnable(fn, case.batch, flops, nbytes, rep, None, restore)


def run_case(case: Case, device: torch.device, ceil: Optional[Ceilings] = None,
             then: Optional[Callable[[Runnable, Dict], None]] = None) -> Dict:
    """Build, time, check (fused) and summarize one case; ``then(runnable, summary)`` runs before the
    case is torn down (pytest-benchmark's own timing)."""
    ceil = ceil or ceilings(device, DTYPE_OF[case.dtype])
    r = build(case, device, ceil)
    try:
        out = summarize(measure(r.fn, device, rep_ms=r.rep_ms), r.images, r.flops, r.nbytes, ceil)
        if r.check is not None:
            out["rel_diff_vs_eager"] = r.check()
        if then is not None:
            then(r, out)
    finally:
        r.restore()
    return out


# Fused vs eager in the same dtype, relative: far above rounding (~1e-2 in bf16 through a deep net),
# far below garbage (~1). A timing sanity check, not the parity tests.
SANITY = 0.2


def verdict(summary: Dict) -> str:
    diff = summary.get("rel_diff_vs_eager")
    if diff is not None and not diff <= SANITY:
        return f"wrong: fused differs from eager by {diff:.2e} (relative; sanity bound {SANITY})"
    return "ok"
