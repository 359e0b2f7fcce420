"""Host helpers shared by the launchers: interpreter detection, tile sizes, output layout."""
import contextlib
import inspect
import struct
from operator import itemgetter
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.runtime import _allocation  # the global-scratch allocator (a ContextVar in triton 3.6 and 3.8)
from triton.runtime import driver as _driver
from triton.runtime.autotuner import Autotuner, Heuristics


@triton.jit
def _probe(x_ptr):
    tl.store(x_ptr, 0)


# True when TRITON_INTERPRET=1 was set before fusedres was imported: the kernels then run on CPU
# tensors through numpy, one program at a time.
INTERPRETED = type(_probe).__name__ == "InterpretedFunction"


# The activations the kernels implement, each with what its gradient is gated by: "output" (ReLU: 0 where
# the output is <= 0; its input gives the same gate, so a kernel that recomputes the pre-activation gates on
# that) or None (no gate). Device side: kernels/_tiles.py activation / activation_grad, one branch each.
# Adding an activation means a branch in those two helpers and an entry here (kernels/ACTIVATIONS.md: SiLU).
ACTIVATIONS = {"relu": "output", "none": None}


def check_activation(activation: str) -> str:
    """The kernels' ACTIVATION constexpr for ``activation``; a ValueError naming the supported ones otherwise."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is not implemented by the fused kernels; "
                         f"supported: {', '.join(map(repr, ACTIVATIONS))}")
    return activation


def site_activation(activation: str, used: bool) -> str:
    """ACTIVATION of a launch whose one activation site may be off: the checked name, or "none" when the site
    is unused (no prologue, no gate tensor), so such launches compile one variant."""
    check_activation(activation)
    return activation if used else "none"


def activation_of(relu: bool, activation=None) -> str:
    """A launcher's activation: ``activation`` when given, else its legacy flag (relu=True -> "relu")."""
    return check_activation(activation if activation is not None else ("relu" if relu else "none"))


def rows_need_int64(m: int, block_m: int) -> bool:
    """_tiles.pixel_rows' IDX64: some row index of an M-pixel launch in BLOCK_M tiles may pass int32."""
    return m + block_m >= 2 ** 31


def cdiv(a: int, b: int) -> int:
    """Ceiling division on the host. triton.cdiv is a constexpr_function in triton 3.6 and 3.8, whose call unwraps
    its arguments: several microseconds per host call, and the launchers make thousands per training step.
    triton's formula: the interpreter hands grid functions its own integer tensors, whose division truncates."""
    return (a + b - 1) // b


def next_power_of_2(n: int) -> int:
    """triton.next_power_of_2 on the host (0 for n <= 0, as triton's), without the constexpr_function call."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def clamp_block(block: int, size: int, minimum: int = 16) -> int:
    """A power-of-two block no larger than needed for ``size`` elements (tl.dot needs >= 16)."""
    return max(minimum, min(block, next_power_of_2(max(size, 1))))


def out_size(size: int, k: int, stride: int, pad: int, dil: int) -> int:
    """A conv's output size along one axis (input ``size``, filter ``k``)."""
    return (size + 2 * pad - dil * (k - 1) - 1) // stride + 1


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last when x is laid out NHWC, else contiguous. A one-channel or an empty tensor is both;
    it counts as channels_last when it was made so (channel stride 1), so a width-1 bottleneck and an
    empty batch keep the format."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        if not x.is_contiguous() or (x.stride(1) == 1 and x.shape[2] * x.shape[3] > 1):
            return torch.channels_last
    return torch.contiguous_format


def empty_activation(like: torch.Tensor, shape, dtype=None) -> torch.Tensor:
    """A new [N, C, H, W] tensor in ``like``'s memory format: channels_last in, channels_last out."""
    return torch.empty(shape, device=like.device, dtype=dtype or like.dtype, memory_format=memory_format_of(like))


_STRIDE_NAMES: dict = {}  # (name, dims) -> the keyword names: built once, not per launch


def stride_args(name: str, t, dims: str = "nchw") -> dict:
    """The keyword arguments stride_<name>_<dim> of a kernel launch: a tensor's leading strides (or a tuple
    of strides), one per letter of ``dims``; zeros for None (a pointer the kernel never reads)."""
    names = _STRIDE_NAMES.get((name, dims))
    if names is None:
        names = _STRIDE_NAMES[(name, dims)] = tuple(f"stride_{name}_{d}" for d in dims)
    st = (0,) * len(dims) if t is None else (t if isinstance(t, tuple) else t.stride())
    return dict(zip(names, st))


_NULL_CONTEXT = contextlib.nullcontext()  # reusable: nothing to enter or exit


def device_guard(x: torch.Tensor):
    """Launch on the tensor's device (cuda:1 must work), on its current stream."""
    return torch.cuda.device(x.device) if x.is_cuda else _NULL_CONTEXT


def _scratch(size: int, alignment: int, stream):
    """Triton's allocator for a kernel's global scratch (device-side tensor descriptors: 128 B per descriptor per
    program), on the current device (the launch runs under device_guard) and stream: PyTorch's caching allocator,
    so a CUDA-graph capture takes it from the graph's pool. alignment: at most 128, below torch's 512."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def descriptor_scratch(x: Optional[torch.Tensor]):
    """Within: Triton has an allocator for a descriptor kernel's global scratch when ``x`` is a CUDA tensor and the
    caller set none (a user's own, set by triton.set_allocator, stays in use). Triton keeps the allocator in a
    ContextVar (triton 3.6 and 3.8): ours is set for this launch only and reset after it, so nothing leaks out to
    the caller's context. None, or a CPU/meta tensor (the interpreter and the compile-only driver allocate
    nothing): no change (a shared null context, not a generator per launch)."""
    return _NULL_CONTEXT if x is None or not x.is_cuda else _cuda_scratch(x)


@contextlib.contextmanager
def _cuda_scratch(x: torch.Tensor):
    var = getattr(_allocation, "_allocator", None)
    if var is None or not isinstance(var.get(), _allocation.NullAllocator):
        yield
        return
    token = var.set(_scratch)
    try:
        yield
    finally:
        var.reset(token)


def stats_dtype(x: torch.Tensor) -> torch.dtype:
    """Per-channel statistics and epilogue math: fp32, or fp64 for fp64 activations (gradcheck)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def dot_precision(x: torch.Tensor) -> str:
    if x.dtype == torch.float64:
        return "ieee"
    if x.dtype == torch.float32:
        # Follow PyTorch's switch for convolutions so fused fp32 matches eager fp32.
        return "tf32" if (x.is_cuda and torch.backends.cudnn.allow_tf32) else "ieee"
    return "tf32"  # ignored for 16-bit operands; the backend default


def upcast_dot(x: torch.Tensor) -> bool:
    """The interpreter's bf16 tl.dot is wrong (DESIGN.md section 5): dot in fp32 there instead."""
    return INTERPRETED and x.dtype == torch.bfloat16


def prologue_math(x: torch.Tensor) -> str:
    """The BN-apply + ReLU prologue's arithmetic for inputs like x (_tiles.bn_act's MATH): "packed" (bf16x2 FMA with
    ReLU, inline PTX) for bf16 on an sm_80+ target, "rounded" (the same rounding, portable) for bf16 in the
    interpreter, else "acc" (fp32 / fp64 math). fp16 keeps fp32 math: see benchmarks/RESULTS.md, issue 17 item 2."""
    if x.dtype != torch.bfloat16:
        return "acc"
    if INTERPRETED:
        return "rounded"
    arch = current_arch()
    return "packed" if isinstance(arch, int) and arch >= 80 else "acc"


def dot_args(x: torch.Tensor) -> dict:
    """The MMA constexprs of a conv kernel whose operands have x's dtype: DOT_PRECISION and UPCAST_DOT."""
    return dict(DOT_PRECISION=dot_precision(x), UPCAST_DOT=upcast_dot(x))


# The stem paths (forward and wgrad) pad C <= 4 input channels to this many (8-byte fp16/bf16 loads, 16-byte
# fp32): a filter row of the padded NHWC copy is one contiguous, aligned run.
STEM_CPAD = 4


def pad_channels_nhwc(t: torch.Tensor, cpad: int, padding=(0, 0), right: int = 0) -> torch.Tensor:
    """[A, C, B, D] (any layout) -> a new tensor whose memory is dense [A, B + 2 pad_b, D + 2 pad_d + right, cpad]
    (NHWC, channels C.. zero, and ``padding`` = (pad_b, pad_d) zero rows and columns around each image, ``right``
    more columns on its right), for the stem paths' kernels, which read it through its data pointer and NHWC strides
    only: a 7x7 filter row becomes one contiguous run, and with the conv's padding in memory no tap needs a bounds
    mask. One aten op for a channels_last t (the pad keeps its layout; the result is [A, cpad, B', D']
    channels_last), two otherwise (a permuted view, then the pad: [A, B', D', cpad])."""
    pb, pd = padding
    if t.is_contiguous(memory_format=torch.channels_last) and t.shape[1] > 1:
        out = torch.nn.functional.pad(t, (pd, pd + right, pb, pb, 0, cpad - t.shape[1]))
        if out.is_contiguous(memory_format=torch.channels_last):
            return out
    return torch.nn.functional.pad(t.permute(0, 2, 3, 1), (0, cpad - t.shape[1], pd, pd + right, pb, pb)).contiguous()


def fp32_hi_lo(value: float):
    """value as two fp32-exact floats whose sum carries ~48 bits. Triton passes a Python float as an
    fp32 scalar, which would round fp64 BN's eps and momentum (0.1 -> 0.10000000149)."""
    hi = struct.unpack("f", struct.pack("f", value))[0]
    return hi, struct.unpack("f", struct.pack("f", value - hi))[0]


# The last (driver, device, arch) seen: the launchers ask per launch, and a real driver's get_current_target
# queries the device's capability each time. Checked against the active driver object and its current device, so
# the static check's compile-only drivers (one per arch) and a second GPU each get their own answer.
_LAST_TARGET = (None, None, None)


def current_arch():
    """The active driver's compile target arch for its current device (an int on CUDA)."""
    global _LAST_TARGET
    drv = _driver.active
    current = getattr(drv, "get_current_device", None)  # stand-in drivers (tests) may lack it
    device = current() if current is not None else None
    last_drv, last_device, arch = _LAST_TARGET
    if last_drv is not drv or last_device != device:
        arch = drv.get_current_target().arch
        _LAST_TARGET = (drv, device, arch)
    return arch


def target_arch() -> int:
    """The compile target's config family: 90 (Hopper and newer) or 80. Read from the active driver, so the
    static check's compile-only driver selects an arch's configs exactly as a real card does."""
    arch = current_arch()
    return 90 if isinstance(arch, int) and arch >= 90 else 80


_AUTOTUNER_RUN = Autotuner.run


# tuner -> (a copy of its keys, getters of their values and of its kernel's pointer parameters, in parameter order)
_POINTERS: dict = {}


def _getter(names):
    """itemgetter(*names) as a function that always returns a sequence (itemgetter of one name returns the item)."""
    if len(names) > 1:
        return itemgetter(*names)
    return lambda args: [args[n] for n in names]
_DTYPE_NAMES: dict = {}  # torch.dtype -> str(dtype), as the autotuner's key spells it
_ABSENT = object()


def tune_key(tuner: Autotuner, args: dict) -> tuple:
    """The key under which ``tuner`` caches its decision for a launch with keyword arguments ``args`` (all of them
    kernel arguments), built as Autotuner.run builds it (triton 3.6 and 3.8): the key arguments, then the dtype of
    every argument that has one, in argument order. Only the kernel's pointer arguments (*_ptr) are read for dtypes:
    the launchers pass everything else as int / float / bool / str / None and the pointers in parameter order
    (tests/test_launch_host.py checks both against the autotuner's own key for conv, dgrad and wgrad launches). Were
    a launcher to break that, this key would miss (the autotuner's run then launches: slower, not wrong) or find the
    config tuned for a launch with the same shape key and pointer dtypes."""
    getters = _POINTERS.get(tuner)
    if getters is None or getters[0] != tuner.keys:  # tuner.keys: a list the autotuner reads per call, so here too
        getters = _POINTERS[tuner] = (list(tuner.keys), _getter(tuner.keys),
                                      _getter([n for n in tuner.arg_names if n.endswith("_ptr")]))
    try:
        key, values = list(getters[1](args)), getters[2](args)
    except KeyError:  # a key argument or a pointer not passed (absent from the autotuner's key as well)
        key = [args[k] for k in tuner.keys if k in args]
        values = [args.get(n) for n in tuner.arg_names if n.endswith("_ptr")]
    for v in values:
        if v is not None:
            dtype = getattr(v, "dtype", _ABSENT)  # hasattr(v, "dtype"), then v.dtype, in one lookup
            if dtype is not _ABSENT:
                text = _DTYPE_NAMES.get(dtype)
                if text is None:
                    text = _DTYPE_NAMES[dtype] = str(dtype)
                key.append(text)
    return tuple(key)


def launch_tuned(tuner: Autotuner, grid, args: dict) -> None:
    """``tuner[grid](**args)`` (``args``: a dict the call may fill in, not to be reused by the caller) for an
    autotuner over the kernel or over a Heuristics over it, without the
    autotuner's per-call Python once it has decided this launch's key (its run rebuilds a dict of every argument and
    filters it through a list: ~25 us a launch). The config it cached, then the heuristics in order on one dict,
    straight to the kernel: what the autotuner's cached path calls. The first launch of a key, a config with a
    pre-hook, and a replaced Autotuner.run (the static check's compile-only driver) go through the autotuner."""
    config = tuner.cache.get(tune_key(tuner, args)) if len(tuner.configs) > 1 else None
    fn, heuristics = tuner.fn, None
    if isinstance(fn, Heuristics):
        fn, heuristics = fn.fn, fn.values
    if config is None or config.pre_hook is not None or type(tuner).run is not _AUTOTUNER_RUN \
            or isinstance(fn, (Autotuner, Heuristics)):  # (deeper stacks: not ours)
        tuner[grid](**args)
        return
    # args is the launcher's own dict, built per launch and not read after it: the config's and the heuristics'
    # keywords go into it (a copy of its ~70 entries per launch otherwise)
    config_kwargs = config.all_kwargs()
    args.update(config_kwargs)
    if heuristics is not None:
        for name, heuristic in heuristics.items():
            args[name] = heuristic(args)
    _run(fn, grid, args, config_kwargs)


_SIGNATURES: dict = {}  # kernel -> (getter of its parameters, their names, defaults), or None: read once per kernel


def _signature(fn):
    sig = _SIGNATURES.get(fn, _ABSENT)
    if sig is _ABSENT:
        params = inspect.signature(fn.fn).parameters
        plain = list(params) == list(fn.arg_names) and len(params) > 1 and \
            all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params.values())
        sig = _SIGNATURES[fn] = (itemgetter(*params), frozenset(params), {
            n: p.default for n, p in params.items() if p.default is not inspect.Parameter.empty}) if plain else None
    return sig


def _run(fn, grid, args: dict, config_kwargs: dict) -> None:
    """fn.run(grid=grid, warmup=False, **args), as the autotuner's cached path calls it (tuner[grid]: warmup=False),
    with the kernel's parameters passed by position (its defaults filled in: the values its binder would bind) and
    only the compile options (num_warps, ...) by keyword: binding ~75 keywords costs ~5 us a launch. Keywords as
    before when a key is neither a parameter nor a config option, a parameter without a default is missing, or the
    kernel has pre-run hooks (they are called with the run's arguments as given)."""
    sig = _signature(fn)
    if sig is not None and not getattr(fn, "pre_run_hooks", None):
        getter, names, defaults = sig
        options = {k: v for k, v in config_kwargs.items() if k not in names}
        bound = {**defaults, **args}
        if len(bound) == len(names) + len(options):  # every key a parameter or an option
            try:
                values = getter(bound)
            except KeyError:  # a parameter without a default missing (and an unknown key): binding raises it
                values = None
            if values is not None:
                fn.run(*values, grid=grid, warmup=False, **options)
                return
    fn.run(grid=grid, warmup=False, **args)
