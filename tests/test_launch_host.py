"""The launchers' host shortcuts (kernels/_launch.py) launch exactly what the Triton calls they replace would.

launch_tuned skips Autotuner.run once a key is tuned; the interpreter runs fixed configs, so the parity tests never
take that path: here an autotuned conv launch is made both ways, with the kernel call recorded instead of run, and
the recorded calls must be identical (same arguments, config, heuristics and grid).
"""
import pytest
import torch
import triton
from torch import nn

from fusedres.kernels import _conv_configs, _launch
from fusedres.kernels import conv as conv_k
from fusedres.kernels import wgrad as wgrad_k

# Tests that launch CPU tensors through the recording (sum_rows runs for real in the dgrad launch) need the
# interpreter: on a CUDA machine without it, the card's parity tests take launch_tuned's fast path for real instead.
needs_interpreter = pytest.mark.skipif(not triton.knobs.runtime.interpret,
                                       reason="records launches of CPU tensors: the Triton interpreter only")


@pytest.mark.parametrize("n", [*range(0, 70), 127, 128, 129, 1000, 4096, 4097, 2 ** 31 - 1, 2 ** 31, 2 ** 40 + 3])
def test_host_next_power_of_2_matches_triton(n):
    assert _launch.next_power_of_2(n) == triton.next_power_of_2(n)


@pytest.mark.parametrize("a", [0, 1, 2, 63, 64, 65, 802816, 2 ** 31 + 5])
@pytest.mark.parametrize("b", [1, 3, 16, 64, 128])
def test_host_cdiv_matches_triton(a, b):
    assert _launch.cdiv(a, b) == triton.cdiv(a, b)


def _capture_autotuned_launch(monkeypatch, which: str):
    """(tuner, grid, args) of one autotuned launch (fixed configs turned off), not launched. which: "conv" (an
    autotuner over heuristics), "conv_stats" (STATS, with a prologue) or "wgrad" (an autotuner over the kernel)."""
    seen = []
    monkeypatch.setattr(_conv_configs, "target_arch", lambda: 90)  # the prune's arch (the interpreter has no driver)
    for mod, fixed in ((conv_k, "conv_fixed_config"), (wgrad_k, "wgrad_fixed_config")):
        monkeypatch.setattr(mod, fixed, lambda *a, **k: None)
        monkeypatch.setattr(mod, "launch_tuned", lambda tuner, grid, args: seen.append((tuner, grid, args)))
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 32, 9, 7, generator=g).to(memory_format=torch.channels_last)
    w = torch.randn(40, 32, 3, 3, generator=g).to(memory_format=torch.channels_last)
    prologue = (torch.rand(32, generator=g) + 0.5, torch.randn(32, generator=g))
    if which == "conv_stats":
        conv_k.conv_bn_stats(x, w, padding=(1, 1), prologue=prologue)
    elif which == "conv":
        scale, shift = torch.rand(40, generator=g) + 0.5, torch.randn(40, generator=g)
        res = torch.randn(2, 40, 9, 7, generator=g).to(memory_format=torch.channels_last)
        conv_k.conv_bn_act(x, w, scale, shift, padding=(1, 1), residual=res, relu=True)
    else:
        dy = torch.randn(2, 40, 9, 7, generator=g).to(memory_format=torch.channels_last)
        wgrad_k.conv_wgrad(dy, x, w, (1, 1), (1, 1), (1, 1), 1, prologue=prologue)
    assert len(seen) == 1
    return seen[0]


def _defaults(kernel) -> dict:
    import inspect
    return {n: p.default for n, p in inspect.signature(kernel.fn).parameters.items()
            if p.default is not inspect.Parameter.empty}


@pytest.mark.parametrize("which", ["conv", "conv_stats", "wgrad"])
def test_launch_tuned_calls_the_kernel_as_the_autotuner_does(monkeypatch, which):
    tuner, grid, args = _capture_autotuned_launch(monkeypatch, which)
    assert len(tuner.configs) > 1
    monkeypatch.setattr(tuner, "cache", {})  # the shared tuner's cache is restored after the test
    timings = iter(range(1000, 0, -1))  # later configs 'faster': the tuner picks the last one it times
    monkeypatch.setattr(tuner, "_bench", lambda *a, config, **k: [float(next(timings))] * 3)
    calls, tuner_runs, positional = [], [], []
    kernel = tuner.fn.fn if which.startswith("conv") else tuner.fn

    def record(self, *a, grid, warmup, **kw):  # launch_tuned passes the parameters by position, defaults included
        assert not warmup and (not a or len(a) == len(self.arg_names))
        bound = {**_defaults(self), **dict(zip(self.arg_names, a)), **kw}
        calls.append((bound, grid(bound) if callable(grid) else grid))
        positional.append(bool(a))

    monkeypatch.setattr(type(kernel), "run", record)
    real_run = tuner.run
    monkeypatch.setattr(tuner, "run", lambda *a, **k: (tuner_runs.append(1), real_run(*a, **k))[1])

    _launch.launch_tuned(tuner, grid, dict(args))   # first call of the key: the autotuner tunes, then launches
    assert tuner_runs == [1] and len(tuner.cache) == 1
    _launch.launch_tuned(tuner, grid, dict(args))   # decided: straight to the kernel (which fills its dict in)
    assert tuner_runs == [1], "the tuned key went through Autotuner.run again"
    tuner[grid](**args)                       # the autotuner's own cached path, for reference
    assert len(calls) == 3
    (slow, slow_grid), (fast, fast_grid), (ref, ref_grid) = calls
    assert fast.keys() == ref.keys() == slow.keys()
    for k in ref:
        assert fast[k] is ref[k] or (type(fast[k]) is type(ref[k]) and fast[k] == ref[k]), k
    if which.startswith("conv"):
        assert ref["EVEN_C"] is True  # a heuristic that differs from its default
    assert fast_grid == ref_grid == slow_grid
    assert _launch.tune_key(tuner, args) in tuner.cache
    assert positional == [False, True, False]  # the tuned launch binds the kernel's parameters by position

    # keywords as before for a key that is neither a parameter nor an option, or a required parameter missing
    for odd in ({**fast, "not_a_parameter": 1}, {k: v for k, v in fast.items() if k != "M"}):
        positional.clear()
        _launch._run(kernel, (1, 1), dict(odd), {})
        assert positional == [False] and calls[-1][0] == {**_defaults(kernel), **odd}


@needs_interpreter
def test_launch_tuned_defers_to_a_replaced_autotuner_run(monkeypatch):
    """The static check's compile-only driver replaces Autotuner.run: launch_tuned must call it even for a key
    the tuner has decided."""
    tuner, grid, args = _capture_autotuned_launch(monkeypatch, "conv")
    monkeypatch.setattr(tuner, "cache", {_launch.tune_key(tuner, args): tuner.configs[0]})
    seen = []
    monkeypatch.setattr(type(tuner), "run", lambda self, *a, **k: seen.append(k))
    _launch.launch_tuned(tuner, grid, args)
    assert len(seen) == 1


def test_current_arch_is_cached_per_driver(monkeypatch):
    """target_arch asks the active driver once per (driver, device), and a swapped driver is asked again."""
    from triton.backends.compiler import GPUTarget

    class Drv:
        def __init__(self, arch):
            self.arch, self.asked = arch, 0

        def get_current_device(self):
            return 0

        def get_current_target(self):
            self.asked += 1
            return GPUTarget("cuda", self.arch, 32)

    from triton.runtime import driver
    for arch, family in ((90, 90), (80, 80), (100, 90), (80, 80)):
        d = Drv(arch)
        monkeypatch.setattr(driver, "_active", d)
        assert _launch.target_arch() == family and _launch.target_arch() == family
        assert d.asked == 1
    d.get_current_device = lambda: 1  # another GPU: asked again
    assert _launch.target_arch() == 80 and d.asked == 2


def test_saved_chain_round_trip():
    """SavedChain.flatten / unflatten (hand-written, for the training op's save_for_backward): every field back, in
    place, Nones included."""
    from fusedres.chain import BNStats, SavedChain
    g = torch.Generator().manual_seed(3)

    def t(*size):
        return torch.randn(*size, generator=g)
    for n, yd, row_scale, gamma in ((1, None, None, None), (3, t(2, 4, 3, 3), t(2), t(4))):
        saved = SavedChain(t(2, 3, 5, 5), t(2, 4, 3, 3), yd, [t(2, 4, 3, 3) for _ in range(n)],
                           [t(4, 3, 1, 1) for _ in range(n + 1)], [gamma] * (n + 1),
                           [BNStats(t(4), t(4), t(4), t(4)) for _ in range(n + 1)], row_scale)
        leaves, structure = saved.flatten()
        back = SavedChain.unflatten(tuple(leaves), structure)
        assert type(back) is SavedChain and len(back) == len(saved)
        for a, b in zip(torch.utils._pytree.tree_leaves(saved), torch.utils._pytree.tree_leaves(back)):
            assert a is b
        assert all(type(s) is BNStats for s in back.stats)
        assert [type(f) for f in back] == [type(f) for f in saved]
        assert back.yd is yd and back.row_scale is row_scale and back.gammas == saved.gammas


def _tuned_launches(monkeypatch):
    """(tuner, grid, args) of autotuned conv, dgrad and wgrad launches (fixed configs off; not launched): None and
    present pointers of every kind (residual, projection shortcut, prologue, STATS partials, BN-gated dgrad)."""
    from fusedres.kernels import dgrad as dgrad_k
    seen = []
    monkeypatch.setattr(_conv_configs, "target_arch", lambda: 90)
    for mod, fixed in ((conv_k, "conv_fixed_config"), (wgrad_k, "wgrad_fixed_config"),
                       (dgrad_k, "dgrad_fixed_config")):
        monkeypatch.setattr(mod, fixed, lambda *a, **k: None)
        monkeypatch.setattr(mod, "launch_tuned", lambda tuner, grid, args: seen.append((tuner, grid, args)))
    g = torch.Generator().manual_seed(11)

    def t(*size, cl=True):
        out = torch.randn(*size, generator=g)
        return out.to(memory_format=torch.channels_last) if cl and out.dim() == 4 else out
    x, w, w1 = t(2, 32, 9, 7), t(40, 32, 3, 3), t(40, 32, 1, 1)
    vec = (t(40).abs() + 0.5, t(40))
    pro = (t(32).abs() + 0.5, t(32))
    conv_k.conv_bn_act(x, w, *vec, padding=(1, 1), residual=t(2, 40, 9, 7), relu=True)          # residual
    conv_k.conv_bn_act(x, w1, None, vec[1], relu=False)                                         # scale None
    conv_k.conv_bn_act(x, w1, *vec, shortcut=(t(2, 16, 9, 7), t(40, 16, 1, 1), *vec, 1), relu=True)  # projection
    conv_k.conv_bn_stats(x, w, padding=(1, 1), prologue=pro)                                    # STATS + prologue
    conv_k.conv_bn_stats(t(2, 32, 9, 7, cl=False), w1, stride=(2, 2))                           # NCHW, strided
    dy = t(2, 40, 9, 7)
    dgrad_k.conv_dgrad(dy, w, x.shape, (1, 1), (1, 1), (1, 1), 1)
    y = t(2, 32, 9, 7)
    dgrad_k.conv_dgrad_bn(dy, w, x.shape, (1, 1), (1, 1), (1, 1), 1, (y, *pro, t(32), t(32).abs() + 0.5),
                          residual=(t(2, 32, 9, 7), None, 1))
    wgrad_k.conv_wgrad(dy, x, w, (1, 1), (1, 1), (1, 1), 1, prologue=pro)
    wgrad_k.conv_wgrad(dy, x, w1, (1, 1), (0, 0), (1, 1), 1)
    return seen


class _RecordingCache(dict):
    """An autotuner cache that has every key (its one config) and records the keys the autotuner looks up."""
    def __init__(self, config):
        super().__init__()
        self.config, self.looked_up = config, []

    def __contains__(self, key):
        self.looked_up.append(key)
        return True

    def __getitem__(self, key):
        return self.config


@needs_interpreter
def test_tune_key_is_the_autotuners_key(monkeypatch):
    """tune_key reads dtypes from the pointer arguments only: for every kind of conv, dgrad and wgrad launch it
    equals the key Autotuner.run builds itself (recorded from its cache lookup), and no other argument of the
    launch has a dtype."""
    launches = _tuned_launches(monkeypatch)
    assert len(launches) >= 9
    kinds, with_none = set(), 0
    for tuner, grid, args in launches:
        kinds.add(tuner)
        cache = _RecordingCache(tuner.configs[0])
        monkeypatch.setattr(tuner, "cache", cache)
        kernel = tuner.fn.fn if hasattr(tuner.fn, "values") else tuner.fn
        monkeypatch.setattr(type(kernel), "run", lambda self, *a, **k: None)
        tuner[grid](**args)
        assert cache.looked_up == [_launch.tune_key(tuner, args)]
        fewer = {k: v for k, v in args.items() if k != "in_scale_ptr"}  # a pointer not passed at all
        tuner[grid](**fewer)
        assert cache.looked_up[1:] == [_launch.tune_key(tuner, fewer)]
        with_none += any(v is None for k, v in args.items() if k.endswith("_ptr"))
        for name, v in args.items():
            if not name.endswith("_ptr"):
                assert type(v) in (int, float, bool, str, type(None)), (name, type(v))
        ptrs = [k for k in args if k.endswith("_ptr")]
        assert ptrs == [k for k in tuner.arg_names if k in ptrs]  # pointers in parameter order
    assert len(kinds) >= 4 and with_none >= 3  # conv, STATS conv, dgrad, wgrad tuners; None pointers


@needs_interpreter
def test_conv_launch_strides_are_stride_args(monkeypatch):
    """kernels/conv.py writes the launch's stride keywords out: each equals stride_args of its tensor (zeros for an
    absent one), and the launch binds every kernel parameter but the config's and the heuristics'."""
    launches = [(tu, a) for tu, _, a in _tuned_launches(monkeypatch) if "out_ptr" in a]
    assert len(launches) == 5
    for tuner, args in launches:
        absent = "xd_ptr" if args["xd_ptr"] is None else None
        for name, ptr, dims in (("x", "x_ptr", "nchw"), ("w", "w_ptr", "kcrs"), ("out", "out_ptr", "nchw"),
                                ("res", "res_ptr", "nchw"), ("sc", "xd_ptr", "nchw"), ("wd", "wd_ptr", "kc")):
            t = args[ptr]
            if name == "res" and not args["HAS_RESIDUAL"]:
                t = None
            if ptr in ("xd_ptr", "wd_ptr") and absent:
                t = None
            want = _launch.stride_args(name, t, dims)
            assert {k: args[k] for k in want} == want, name
        config_names = set(tuner.configs[0].all_kwargs()) | set(tuner.fn.values)
        assert set(args) == set(tuner.arg_names) - config_names - {"TMA", "PROLOGUE_MATH", "IN_BOUNDS", "TILE_W"} \
            | {"PROLOGUE_MATH", "IN_BOUNDS"}


def _fused_blocks():
    """Every fused block of converted torchvision ResNets (where torchvision imports) and of timm's families."""
    from timm_like import FAMILIES, timm_like

    import fusedres
    from fusedres.blocks import _FusedBlockMixin
    models = [fusedres.resnet50(fused=True), fusedres.resnet18(fused=True)]
    try:
        import torchvision
        models += [fusedres.convert(torchvision.models.resnet50()), fusedres.convert(torchvision.models.resnet18())]
    except ImportError:
        pass
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models += [fusedres.convert(timm_like(name)) for name in FAMILIES]
    return [m for model in models for m in model.modules() if isinstance(m, _FusedBlockMixin)]


def test_submodules_are_block_modules():
    """blocks.submodules (the walk _bn_mode takes per forward) visits the modules of block.modules(), each once:
    torchvision / timm blocks, and one with a module registered twice, a None child and a shared nested module."""
    from fusedres.blocks import submodules
    blocks = _fused_blocks()
    assert len(blocks) > 40
    odd = blocks[0]
    odd.extra = nn.Sequential(odd.bn1, nn.Identity(), nn.Sequential(odd.bn2, odd.conv1))
    odd.register_module("empty", None)
    odd.again = odd.extra
    for block in blocks:
        walked = submodules(block)
        assert len(walked) == len({id(m) for m in walked}) == len(list(block.modules()))
        assert {id(m) for m in walked} == {id(m) for m in block.modules()}


def test_tensor_attr_is_getattr():
    """_fold.tensor_attr (the per-launch reads of conv / BN tensors) returns what getattr does: parameters, buffers,
    None entries, replaced and deleted ones, instance attributes, subclasses with properties, submodules."""
    from fusedres._fold import tensor_attr

    class OwnBN(nn.BatchNorm2d):
        pass

    conv, bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
    no_bias, no_stats = nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4, affine=False, track_running_stats=False)
    replaced = nn.BatchNorm2d(4)
    replaced.weight = nn.Parameter(torch.randn(4))
    replaced.running_var = torch.rand(4)
    replaced.weight.data = torch.randn(4, dtype=torch.float64)
    deleted = nn.Conv2d(3, 4, 1)
    del deleted.bias
    shadowed = nn.Conv2d(3, 4, 1)
    shadowed.__dict__["bias"] = "instance"
    sync, own = nn.SyncBatchNorm(4), OwnBN(4)
    OwnBN.running_mean = property(lambda self: "property")  # a subclass's class attribute wins over the buffer
    nested = nn.Conv2d(3, 4, 1)
    nested.weight_sub = nn.Identity()
    names = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked", "weight_sub", "missing")
    for m in (conv, bn, no_bias, no_stats, replaced, deleted, shadowed, sync, own, nested):
        for name in names:
            assert tensor_attr(m, name, None) is getattr(m, name, None), (type(m).__name__, name)
            try:
                want = getattr(m, name)
            except AttributeError:
                with pytest.raises(AttributeError):
                    tensor_attr(m, name)
            else:
                assert tensor_attr(m, name) is want
