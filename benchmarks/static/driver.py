"""A compile-only Triton driver: kernels compile for a real GPU target on a CPU-only machine.

``compile_only(arch)`` makes Triton believe the current device is an sm_<arch> GPU and turns every
launch into a compile-only warm-up whose compiled kernel is recorded. The fused paths' real
launchers run unchanged (on "meta" tensors: no activation memory), so the check follows them.
Autotuned launches compile every config that survives the autotuner's own pruning.
"""
import contextlib
import dataclasses
import os
import traceback
from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

import torch
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase
from triton.runtime import _allocation
from triton.runtime import driver as _driver
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

_ORIG_JIT_RUN = JITFunction.run
_ORIG_AUTOTUNE_RUN = Autotuner.run


class FakeCudaDriver(DriverBase):
    """Reports a GPU of compute capability ``arch``; never launches anything."""

    def __init__(self, arch: int):
        super().__init__()
        self.arch = arch

    @classmethod
    def is_active(cls):
        return True

    def map_python_to_cpp_type(self, ty: str) -> str:
        raise NotImplementedError("compile-only driver")

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_benchmarker(self):
        raise NotImplementedError("compile-only driver: nothing is timed")

    def get_current_device(self):
        return self.arch  # Triton caches compiled kernels per device: one "device" per arch

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0


class _PtrArg:
    """Stands in for a meta tensor at specialization: dtype, and a pointer with the view's alignment."""

    def __init__(self, t: torch.Tensor):
        self.dtype = t.dtype
        self._ptr = (1 << 20) + t.storage_offset() * t.element_size()

    def data_ptr(self):
        return self._ptr


@dataclass
class Launch:
    """One compiled kernel variant: the launch's kernel, its constexprs and config, and the artifacts."""
    kernel: str
    constexprs: Dict[str, Any]
    config: Dict[str, Any]
    ints: Dict[str, int]
    compiled: Any = None
    error: str = ""
    tags: Dict[str, Any] = field(default_factory=dict)
    grid: Tuple[int, ...] = ()  # the launch grid as the launcher passed it (a callable grid evaluated)
    elem_bytes: Dict[str, int] = field(default_factory=dict)  # element size of each tensor argument


@contextlib.contextmanager
def compile_only(arch: int, tf32: bool = True, extra_configs=()):
    """Within: every Triton launch compiles for sm_<arch> and is recorded in the yielded list; the
    yielded dict's entries tag each record (layer, mode, ...).

    tf32: fp32 dots as on a GPU with torch's default ``cudnn.allow_tf32`` (the launchers pick "ieee"
    off-GPU because their tensors are not CUDA tensors).
    extra_configs: triton.Configs compiled as given for every autotuned launch, besides the pruned
    ones (the launchers' pruning keeps only their per-arch lists), e.g. to see a budget catch a spill."""
    records: List[Launch] = []
    tags: Dict[str, Any] = {}
    prev = _driver._active

    def jit_run(self, *args, grid, warmup, **kwargs):
        names = self.arg_names
        bound = dict(zip(names, args))
        bound.update(kwargs)
        if tf32 and bound.get("DOT_PRECISION") == "ieee" and _dtype_of(bound) == torch.float32:
            kwargs["DOT_PRECISION"] = bound["DOT_PRECISION"] = "tf32"
        args = tuple(_stand_in(a) for a in args)
        kwargs = {k: _stand_in(v) for k, v in kwargs.items()}  # the launchers pass their arguments by keyword
        const = {n: bound[n] for n in names if n in bound and _is_constexpr(self, n)}
        config = {k: kwargs[k] for k in ("num_warps", "num_stages", "num_ctas", "maxnreg") if k in kwargs}
        ints = {n: v for n, v in bound.items() if type(v) is int and n not in const}
        rec = Launch(self.__name__, const, config, ints, tags=dict(tags), grid=_grid_of(grid, bound),
                     elem_bytes={n: v.element_size() for n, v in bound.items() if isinstance(v, torch.Tensor)})
        try:
            rec.compiled = _ORIG_JIT_RUN(self, *args, grid=grid, warmup=True, **kwargs)
        except Exception as exc:  # noqa: BLE001 - a failed compile is a result, reported per row
            rec.error = _error_text(exc)
        records.append(rec)
        return rec.compiled

    def autotune_run(self, *args, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))
        try:  # every config that survives the autotuner's own pruning may be picked: compile each
            configs = self.prune_configs(kwargs) if len(self.configs) > 1 else self.configs
            # an extra config applies where it sets exactly the tunables the shipped ones set
            extra = [c for c in extra_configs if set(c.kwargs) == set(configs[0].kwargs)]
            for cfg in [*configs, *extra]:
                self.fn.run(*args, **kwargs, **cfg.all_kwargs())
        finally:
            self.nargs = None

    _driver.set_active(FakeCudaDriver(arch))
    JITFunction.run = jit_run
    Autotuner.run = autotune_run
    try:
        yield records, tags
    finally:
        JITFunction.run = _ORIG_JIT_RUN
        Autotuner.run = _ORIG_AUTOTUNE_RUN
        _driver._active = prev


def _error_text(exc: Exception) -> str:
    """A failed compile in one line: its message's last line (a CompilationError's: the kernel line, not the caret
    under it) and, for a chained error (a CompilationError wraps the frontend's bare assertion), the root cause
    with the source line that raised it."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and ln.strip() != "^"]
    text = f"{type(exc).__name__}: {lines[-1] if lines else ''}"
    root = exc
    while root.__cause__ is not None:
        root = root.__cause__
    if root is not exc:
        tb = traceback.extract_tb(root.__traceback__)
        where = f" at {os.path.basename(tb[-1].filename)}:{tb[-1].lineno}: {tb[-1].line}" if tb else ""
        text += f" <- {type(root).__name__}{': ' + str(root) if str(root) else ''}{where}"
    return text


def _grid_of(grid, bound) -> Tuple[int, ...]:
    """The grid a launch runs, as triton evaluates it (a callable gets the bound arguments and config)."""
    try:
        g = grid(bound) if callable(grid) else grid
        return tuple(int(v) for v in (g if isinstance(g, (tuple, list)) else (g,)))
    except Exception:  # noqa: BLE001 - an unevaluable grid leaves the programs column empty
        return ()


def _stand_in(arg):
    """Meta tensors (also as the base of a host-side TMA descriptor) become pointer stand-ins."""
    if isinstance(arg, torch.Tensor):
        return _PtrArg(arg)
    base = getattr(arg, "base", None)
    if isinstance(base, torch.Tensor) and dataclasses.is_dataclass(arg):
        return dataclasses.replace(arg, base=_PtrArg(base))
    return arg


def _is_constexpr(fn: JITFunction, name: str) -> bool:
    p = fn.params[fn.arg_names.index(name)]
    return p.is_constexpr


def _dtype_of(bound) -> Any:
    for v in bound.values():
        if isinstance(v, torch.Tensor) and v.dtype.is_floating_point:
            return v.dtype
    return None


# ----------------------------------------------------------------------------------------------
# Launch-only mode: the real launch path's host cost, without a GPU (benchmarks/host_overhead.py)
# ----------------------------------------------------------------------------------------------

class _LaunchCounter:
    """What Triton calls to launch: counts launches. The count is kept on the class (one per process)."""
    launches = 0


class _NoopLauncher:
    """Stands in for the driver's launcher_cls (the C launcher: argument packing, cuLaunchKernel). Keeps the
    real launcher's Python part that runs per launch: the global-scratch allocation of descriptor kernels."""

    def __init__(self, src, metadata):
        self.num_ctas = getattr(metadata, "num_ctas", 1)
        self.global_scratch_size = metadata.global_scratch_size
        self.global_scratch_align = metadata.global_scratch_align

    def __call__(self, grid_x, grid_y, grid_z, stream, *args):
        if self.global_scratch_size > 0:
            size = grid_x * grid_y * grid_z * self.num_ctas * self.global_scratch_size
            _allocation._allocator.get()(size, self.global_scratch_align, stream)
        _LaunchCounter.launches += 1


class _NoopUtils:
    """The driver's utils: load_binary hands back dummy handles (one call per compiled kernel, not per launch)."""

    @staticmethod
    def load_binary(name, kernel, shared, device):
        return 1, 1, 0, 0, 1024  # module, function, registers, spills, max threads per block

    @staticmethod
    def unload_module(module):
        pass

    @staticmethod
    def get_device_properties(device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "warpSize": 32}


def _fixed_bench(kernel_call, quantiles=None, **_):
    """Autotuning's benchmarker: every config 'takes' 1 ms without running, so each key tunes once (to the first
    config left after pruning) and later calls take the autotuner's cached path."""
    return [1.0, 1.0, 1.0] if quantiles else 1.0


class FakeLaunchDriver(FakeCudaDriver):
    """An sm_<arch> GPU whose launches do nothing: JITFunction.run and Autotuner.run run for real (binding,
    specialization, cache lookups, grid, launch metadata); only the C launcher and the module load are no-ops."""

    def __init__(self, arch: int):
        super().__init__(arch)
        self.utils = _NoopUtils()
        self.launcher_cls = _NoopLauncher

    def get_benchmarker(self):
        return _fixed_bench


def _meta_scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="meta")


@contextlib.contextmanager
def launch_only(arch: int = 90):
    """Within: Triton compiles for sm_<arch> (Triton's disk cache as usual) and every launch runs the real
    JITFunction.run / Autotuner.run down to the launcher call, which only counts (``launch_count()``).
    Launch on "meta" tensors (the launchers take their CUDA-path branches on meta). Autotuned configs are
    picked without timing: set FUSEDRES_AUTOTUNE_CACHE=0 first, so no fake timing lands in Triton's disk cache."""
    prev = _driver._active
    var = _allocation._allocator
    token = var.set(_meta_scratch)  # descriptor kernels' global scratch (device_guard sets none for meta tensors)
    _driver.set_active(FakeLaunchDriver(arch))
    try:
        yield
    finally:
        _driver._active = prev
        var.reset(token)


def launch_count() -> int:
    """Launches made so far under launch_only (this process)."""
    return _LaunchCounter.launches
