"""The launchers' host shortcuts (kernels/_launch.py) launch exactly what the Triton calls they replace would.

launch_tuned skips Autotuner.run once a key is tuned; the interpreter runs fixed configs, so the parity tests never
take that path: here an autotuned conv launch is made both ways, with the kernel call recorded instead of run, and
the recorded calls must be identical (same arguments, config, heuristics and grid).
"""
import pytest
import torch
import triton

from fusedres.kernels import _conv_configs, _launch
from fusedres.kernels import conv as conv_k
from fusedres.kernels import wgrad as wgrad_k


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


@pytest.mark.parametrize("which", ["conv", "conv_stats", "wgrad"])
def test_launch_tuned_calls_the_kernel_as_the_autotuner_does(monkeypatch, which):
    tuner, grid, args = _capture_autotuned_launch(monkeypatch, which)
    assert len(tuner.configs) > 1
    monkeypatch.setattr(tuner, "cache", {})  # the shared tuner's cache is restored after the test
    timings = iter(range(1000, 0, -1))  # later configs 'faster': the tuner picks the last one it times
    monkeypatch.setattr(tuner, "_bench", lambda *a, config, **k: [float(next(timings))] * 3)
    calls, tuner_runs = [], []
    kernel = tuner.fn.fn if which.startswith("conv") else tuner.fn

    def record(self, *a, grid, warmup, **kw):
        assert not a and not warmup
        calls.append((dict(kw), grid(dict(kw)) if callable(grid) else grid))

    monkeypatch.setattr(type(kernel), "run", record)
    real_run = tuner.run
    monkeypatch.setattr(tuner, "run", lambda *a, **k: (tuner_runs.append(1), real_run(*a, **k))[1])

    _launch.launch_tuned(tuner, grid, args)   # first call of the key: the autotuner tunes, then launches
    assert tuner_runs == [1] and len(tuner.cache) == 1
    _launch.launch_tuned(tuner, grid, args)   # decided: straight to the kernel
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
