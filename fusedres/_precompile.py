"""fusedres.precompile: compile every Triton kernel variant a model will launch, before its first step.

How: the model's fused path runs once on a "meta" copy of the model (parameters and buffers are empty meta
tensors, so nothing is computed and the user's model, its running statistics and gradients are untouched),
with every Triton launch recorded instead of run, and every config an autotuned launch may try recorded too.
The recorded launches are deduplicated by Triton's own compile keys and each new variant is compiled ahead of
time (Triton's warm-up, no launch) in a pool of forked processes: Triton's frontend and MLIR passes hold the GIL,
so threads overlapped only ptxas (measured: 2 threads no faster than 1). The workers write Triton's on-disk
cache; this process then loads every variant from it into its in-memory cache, so the first real step finds
them, and later processes load them from disk.

``arch=`` compiles for a GPU target without one (a compile-only Triton driver), which is how the compile
count and time of a ResNet-50 step are measured on a CPU-only machine (benchmarks/cold_start.py).
"""
import contextlib
import copy
import multiprocessing
import os
import threading
import time
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from typing import List, NamedTuple, Optional, Tuple

import torch
from torch import nn

from . import _autocast, _dispatch, ops  # noqa: F401 - ops registers the fusedres:: custom ops

_LOCK = threading.Lock()  # the recording patches Triton's launch entry points process-wide


class PrecompileReport(NamedTuple):
    """What ``precompile`` did."""
    target: str      # "sm_90", "interpreter", "none" (nothing to compile there)
    launches: int    # kernel launches the step makes, each autotuned one counted once per config it may try
    compiled: int    # distinct kernel variants compiled now (not already in this process's Triton cache)
    seconds: float   # wall time of the whole call
    workers: int     # compile processes
    note: str        # one line for people


def precompile(model: nn.Module, example_input: torch.Tensor, train: bool = True, *,
               workers: Optional[int] = None, arch: Optional[int] = None) -> PrecompileReport:
    """Compile every Triton kernel variant ``model`` launches for ``example_input``'s shape, dtype and memory
    format: a training step (forward + backward) when ``train``, else an eval forward; for autotuned kernels
    every config the autotuner may try. Nothing runs on the GPU and nothing of ``model`` changes (no
    parameter, buffer, running statistic or gradient; the step runs on a meta copy). Call it under the same
    ``torch.autocast`` as the step to compile the autocast dtype's variants.

    workers: compile processes (default: the CPU count; forked, so POSIX only: elsewhere one).
    arch: compile for sm_<arch> (80, 90, ...) without a GPU, e.g. to measure compile time on a CPU machine;
    by default the example input's CUDA device.
    Where the kernels do not compile (the Triton interpreter, or CPU tensors that fall back to PyTorch)
    it does nothing and says so in the report's note."""
    t0 = time.perf_counter()
    workers = workers or os.cpu_count() or 1
    if _dispatch.interpreted():
        if arch is not None:
            raise ValueError("precompile(arch=...) compiles GPU code: unset TRITON_INTERPRET before importing fusedres")
        return PrecompileReport("interpreter", 0, 0, time.perf_counter() - t0, 0,
                                "the kernels run in the Triton interpreter (TRITON_INTERPRET=1): nothing to compile")
    if arch is None and not example_input.is_cuda:
        reason = _dispatch.unsupported_device_reason(example_input.device)
        return PrecompileReport("none", 0, 0, time.perf_counter() - t0, 0,
                                f"no GPU target: {reason}; pass arch= to compile for one without a GPU")
    with _LOCK, _target(arch, example_input) as target_arch:
        launches = _record_step(model, example_input, train)
        compiled = _compile_all(launches, workers, target_arch)
    seconds, target = time.perf_counter() - t0, _target_name(target_arch)
    return PrecompileReport(target, len(launches), compiled, seconds, workers,
                            f"{compiled} kernel variants compiled for {target} from {len(launches)} launches "
                            f"in {seconds:.1f} s with {workers} compile processes")


# ----------------------------------------------------------------------------------------------
# The compile target
# ----------------------------------------------------------------------------------------------

def _target_name(arch) -> str:
    return f"sm_{arch}"


@contextlib.contextmanager
def _target(arch: Optional[int], example_input: torch.Tensor):
    """The active Triton target for the block (yields its arch): the example's CUDA device, or a compile-only
    sm_<arch>."""
    if arch is None:
        with torch.cuda.device(example_input.device):
            major, minor = torch.cuda.get_device_capability()
            yield major * 10 + minor
        return
    from triton.runtime import driver
    saved = driver._active
    driver.set_active(_compile_only_driver(arch))
    try:
        yield arch
    finally:
        driver._active = saved


def _compile_only_driver(arch: int):
    """A Triton driver that reports an sm_<arch> GPU and launches nothing (only warm-up compiles reach it)."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase

    class CompileOnly(DriverBase):
        @classmethod
        def is_active(cls):
            return True

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_current_device(self):
            return f"compile-only-sm_{arch}"  # Triton's per-device kernel cache: one entry per target

        def get_current_stream(self, device=None):
            return 0

        def set_current_device(self, device):
            pass

        def get_active_torch_device(self):
            return torch.device("cpu")

        def map_python_to_cpp_type(self, ty: str) -> str:
            raise NotImplementedError("compile-only target: nothing launches")

        def get_benchmarker(self):
            raise NotImplementedError("compile-only target: nothing is timed")

    return CompileOnly()


# ----------------------------------------------------------------------------------------------
# Recording a step's launches
# ----------------------------------------------------------------------------------------------

class _Pointer:
    """A meta tensor as a kernel argument: its dtype, and a pointer with a real allocation's alignment plus the
    view's offset, so the recorded variant specializes as the real launch will."""

    def __init__(self, t: torch.Tensor):
        self.dtype = t.dtype
        self._ptr = 4096 + t.storage_offset() * t.element_size()

    def data_ptr(self) -> int:
        return self._ptr


def _arg(a):
    return _Pointer(a) if isinstance(a, torch.Tensor) else a


Launch = Tuple[object, tuple, dict]  # (JITFunction, positional arguments, keyword arguments)


@contextlib.contextmanager
def _recording(launches: List[Launch]):
    """Within: a Triton launch is recorded, not run; an autotuned launch records each config it may try."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    jit_run, tune_run = JITFunction.run, Autotuner.run
    tf32 = torch.backends.cudnn.allow_tf32

    def record(fn, *args, grid, warmup, **kwargs):
        if kwargs.get("DOT_PRECISION") == "ieee" and tf32 and _first_float(args, kwargs) == torch.float32:
            kwargs["DOT_PRECISION"] = "tf32"  # the launchers chose on meta tensors; a CUDA fp32 one follows torch
        launches.append((fn, tuple(_arg(a) for a in args), {k: _arg(v) for k, v in kwargs.items()}))

    def record_configs(tuner, *args, **kwargs):
        tuner.nargs = dict(zip(tuner.arg_names, args))
        try:
            for cfg in (tuner.prune_configs(kwargs) if len(tuner.configs) > 1 else tuner.configs):
                tuner.fn.run(*args, **kwargs, **cfg.all_kwargs())
        finally:
            tuner.nargs = None

    JITFunction.run, Autotuner.run = record, record_configs
    try:
        yield
    finally:
        JITFunction.run, Autotuner.run = jit_run, tune_run


def _first_float(args, kwargs) -> Optional[torch.dtype]:
    for v in (*args, *kwargs.values()):
        if isinstance(v, torch.Tensor) and v.dtype.is_floating_point:
            return v.dtype
    return None


@contextlib.contextmanager
def _fused_on_meta(device_type: str):
    """fusedres runs its launchers on meta tensors: the dispatcher accepts meta, the fusedres:: custom ops run
    their real implementation (not their shape-only fake), and autocast follows ``device_type``'s."""
    from torch._library.custom_ops import OPDEFS

    custom = [op for name, op in list(OPDEFS.items()) if name.startswith("fusedres::")]
    fakes = [op._abstract_fn for op in custom]
    reason, autocast = _dispatch.unsupported_device_reason, _autocast.autocast_dtype
    for op in custom:
        op._abstract_fn = op._init_fn
    _dispatch.unsupported_device_reason = lambda dev: None if dev.type == "meta" else reason(dev)
    _autocast.autocast_dtype = lambda dev: autocast(device_type if dev == "meta" else dev)
    try:
        yield
    finally:
        for op, fake in zip(custom, fakes):
            op._abstract_fn = fake
        _dispatch.unsupported_device_reason, _autocast.autocast_dtype = reason, autocast


def _meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are empty meta tensors (same shapes, strides and
    requires_grad): no data is copied, and what the step writes lands in the copy."""
    memo = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def _record_step(model: nn.Module, example_input: torch.Tensor, train: bool) -> List[Launch]:
    """The launches of one step of a meta copy of ``model`` on an empty tensor like ``example_input``."""
    launches: List[Launch] = []
    replica = _meta_copy(model).train(train)
    x = torch.empty_like(example_input, device="meta")
    device_type = example_input.device.type if example_input.is_cuda else "cuda"
    with _fused_on_meta(device_type), _recording(launches):
        if not train:
            with torch.no_grad():
                replica(x)
            return launches
        out = [t for t in torch.utils._pytree.tree_leaves(replica(x))
               if isinstance(t, torch.Tensor) and t.requires_grad]
        if out:
            torch.autograd.backward(out, [torch.empty_like(t) for t in out])
    return launches


# ----------------------------------------------------------------------------------------------
# Compiling them
# ----------------------------------------------------------------------------------------------

class _CountOnly(Executor):
    """An executor that runs nothing: each submitted compile is done at once, with no kernel."""

    def submit(self, fn, *args, **kwargs):
        done = Future()
        done.set_result(None)
        return done


def _new_variants(launches: List[Launch]) -> List[Launch]:
    """One launch per kernel variant not yet in this process's Triton cache, by Triton's own compile keys:
    AsyncCompileMode submits a compile once per new key (here to an executor that compiles nothing)."""
    from triton.runtime._async_compile import AsyncCompileMode
    from triton.runtime.jit import JITFunction

    new = []
    with _CountOnly() as pool, AsyncCompileMode(pool, ignore_errors=True) as mode:
        for fn, args, kwargs in launches:
            before = len(mode.raw_futures)
            JITFunction.run(fn, *args, grid=None, warmup=True, **kwargs)
            if len(mode.raw_futures) > before:
                new.append((fn, args, kwargs))
    return new


_JOBS: List[Launch] = []  # what forked compile workers read (inherited memory: nothing is pickled)


def _worker_start(arch: int) -> None:
    from triton.runtime import driver
    driver.set_active(_compile_only_driver(arch))  # never touch the parent's GPU context


def _worker_compile(i: int) -> None:
    from triton.runtime.jit import JITFunction
    fn, args, kwargs = _JOBS[i]
    JITFunction.run(fn, *args, grid=None, warmup=True, **kwargs)  # written to Triton's on-disk cache


def _compile_all(launches: List[Launch], workers: int, arch: int, count_only: bool = False) -> int:
    """Compile (warm up, no launch) one launch per new variant; the number of variants. Triton's frontend and
    MLIR passes hold the GIL (threads were measured no faster than one), so ``workers`` forked processes compile
    into Triton's on-disk cache, then this process loads each compiled kernel from there into its in-memory
    cache. Without fork (or with one worker) it compiles here, one at a time.
    count_only: count the variants that would compile, compiling none."""
    from triton.runtime.jit import JITFunction

    new = _new_variants(launches)
    if count_only or not new:
        return len(new)
    if workers > 1 and len(new) > 1 and "fork" in multiprocessing.get_all_start_methods():
        _JOBS[:] = new
        try:
            ctx = multiprocessing.get_context("fork")
            with ProcessPoolExecutor(min(workers, len(new)), mp_context=ctx, initializer=_worker_start,
                                     initargs=(arch,)) as pool:
                list(pool.map(_worker_compile, range(len(new))))
        finally:
            _JOBS.clear()
    for fn, args, kwargs in new:  # compiles here when no worker did; else an on-disk cache hit
        JITFunction.run(fn, *args, grid=None, warmup=True, **kwargs)
    return len(new)


def count_variants(model: nn.Module, example_input: torch.Tensor, train: bool = True, *,
                   arch: Optional[int] = None) -> int:
    """How many kernel variants ``precompile`` would compile in a fresh process, compiling none (a cold-start
    budget's count; benchmarks/cold_start.py)."""
    with _LOCK, _target(arch, example_input) as target_arch:
        return _compile_all(_record_step(model, example_input, train), 1, target_arch, count_only=True)
