"""Reliability (issue #6): regressions found by the property tests, special values in blocks,
int64 offsets, determinism, caches and memory, and the bad inputs test_bad_input.py lacks.

Tests marked ``xfail(strict=True)`` pin a bug in code this file does not own; each reason names
the cause. When the bug is fixed the test XPASSes, which fails the run: then drop the marker.
See tests/RELIABILITY.md for the numbers and the list.
"""
import copy
import gc
import os
import subprocess
import sys
import textwrap

import judges
import pytest
import torch
import triton
import triton.language as tl
from torch import nn

import fusedres
from fusedres import functional as Fz
from fusedres import kernels, reference
from fusedres.kernels._tiles import pixel_rows
from fusedres.reference import conv_bn_act_reference
from helpers import ON_GPU, assert_close, build_pair, rel_err
from test_properties import IllPosed, build_blocks, make_tensor, relu_margin, run_block_case, train_errors

F32 = torch.float32


# ----------------------------------------------------------------------------------------------
# Regressions: failures the property tests found (tests/test_properties.py), replayed exactly
# ----------------------------------------------------------------------------------------------

# The first failure of test_block_train_matches_float64 (ci profile), as hypothesis shrank it: a
# basic block with one channel on a 1x2 image, so every BN sees 2 values per channel. With two
# values the normalized output is +-1 whatever the input, so the weight gradients are O(eps/var)
# and come out of cancellation: fused 3.1e-5 on conv1.weight, eager fp32 8e-4. Not a kernel bug;
# the property now rejects such draws (IllPosed), and the shapes are judged by the test below.
HYPOTHESIS_TRAIN_M2 = dict(kind="basic", cin=1, planes=1, stride=1, groups=1, base_width=64, dilation=1,
                           shortcut="projection", n=1, h=1, w=2, dtype=F32, layout=("contiguous",), momentum=0.1,
                           seed=0)


# Found by the long profile, before IllPosed looked at every tensor: a bottleneck with one input
# channel (conv1 and the projection are 1x1 convs of a single channel, whose weight gradients are
# analytically ~0), on a 1x2 image. Eager fp32 misses TOL on conv1.weight (1.3e-2), the input gradient
# and the projection; the fused block on those and, by 2e-5, on bn1/bn2/conv2/conv3, where eager
# happened to round luckier. The cancellation feeds the whole backward chain.
HYPOTHESIS_TRAIN_BOTTLENECK_1CH = dict(HYPOTHESIS_TRAIN_M2, kind="bottleneck", base_width=128, seed=1)


# Found by the long profile when the judge was a single eager run: a grouped bottleneck on a 4x1
# image at stride 2 (2 values per channel after conv2), where bn2 channel 7 has a batch variance of
# 3e-7 (below eps) and bn3 channel 12 of 1e-5, so the normalization cancels. Output error: fused
# 2.7e-5, eager 8.5e-7, but the float64 reference with fp32-sized noise after every layer moves by
# 1e-5 (median of 40 runs, max 4.3e-5): eager was lucky. The nudged-eager ensemble now sees it.
HYPOTHESIS_TRAIN_LOW_VARIANCE = dict(kind="bottleneck", cin=2, planes=5, stride=2, groups=2, base_width=64,
                                     dilation=1, shortcut="A", n=1, h=4, w=1, dtype=F32, layout=("channels_last",),
                                     momentum=0.1, seed=5994)


# Found by the long profile when the margin was TOL/2: a plain basic block 16 -> 1 channel, whose
# bn1.weight gradient (one number) cancels 1400-fold (sum |g*xhat| 22.4, result 1.6e-2). fused
# 1.43e-5, eager's worst of 6 runs 2.4e-6; over 24 seeds fused misses TOL 5 times, eager once, with
# equal medians (1.1e-6 vs 9.1e-7). The cause is the interpreter: the fused BN mean is a sequential
# fp32 sum (numpy reduces a tile row by row), 7 ulps off, where eager sums pairwise (see FLOOR_MARGIN).
HYPOTHESIS_TRAIN_ONE_CHANNEL_BN = dict(kind="basic", cin=16, planes=1, stride=1, groups=1, base_width=64,
                                       dilation=1, shortcut="none", n=2, h=8, w=9, dtype=F32, momentum=0.1,
                                       layout=("view", (0, 3, 2, 1), (1, 1, 1, 1), (1, 0, 0, 1)), seed=1)


@pytest.mark.parametrize("case", [HYPOTHESIS_TRAIN_M2, HYPOTHESIS_TRAIN_BOTTLENECK_1CH, HYPOTHESIS_TRAIN_LOW_VARIANCE,
                                  HYPOTHESIS_TRAIN_ONE_CHANNEL_BN],
                         ids=["basic_1ch_1x2", "bottleneck_1ch_1x2", "bottleneck_var_below_eps", "basic_1ch_bn1"])
def test_regression_train_ill_posed_draw(case, device):
    if case is HYPOTHESIS_TRAIN_ONE_CHANNEL_BN and not triton.knobs.runtime.interpret:
        # ill-posed through the interpreter's sequential fp32 sum only: the H200 (2026-12-04) passed it at TOL
        try:
            run_block_case(case, train=True)  # parity at TOL, asserted inside
        except IllPosed:
            pass
        return
    with pytest.raises(IllPosed):
        run_block_case(case, train=True)


# Families of training shapes where float64-at-TOL is ill-posed (the regressions above with fresh seeds;
# a third of their draws miss TOL in eager fp32 too). They are judged by DESIGN.md's other rule through
# tests/judges.py: paired draws, eager as a nudged ensemble, geometric mean over ILL_POSED_DRAWS draws.
ILL_POSED_FAMILIES = {"basic_1ch_3_values": dict(HYPOTHESIS_TRAIN_M2, w=3),
                      "bottleneck_2_values": HYPOTHESIS_TRAIN_LOW_VARIANCE,
                      "basic_1ch_bn1": HYPOTHESIS_TRAIN_ONE_CHANNEL_BN}
# Measured (tests/RELIABILITY.md): with 40 draws a seed set fails a correct fused path (some tensor over
# 2x) in ~0.1% of bootstrap resamples of 200 draws per family; with the old 10-draw median, in ~40%.
ILL_POSED_DRAWS = 40
_ill_posed_cache = {}


def ill_posed_samples(name):
    """Per tensor, one (fused error, [errors of the EAGER_RUNS eager fp32 steps]) pair per draw."""
    if name in _ill_posed_cache:
        return _ill_posed_cache[name]
    family, samples = ILL_POSED_FAMILIES[name], {}
    for seed in range(ILL_POSED_DRAWS):
        case = dict(family, seed=seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            fused, ref = build_blocks(case)
            x = make_tensor((case["n"], case["cin"], case["h"], case["w"]), F32, case["layout"])
            margin, shape = relu_margin(ref, x)
            grad_out = torch.randn(shape, dtype=torch.float64).to(x.device)
        if margin < 5e-6:  # a ReLU input within rounding of its kink: no fp32 path can be judged on it
            continue
        fused.train()
        ref.train()
        errs, _ = train_errors(fused, ref, x, grad_out, seed)
        for key, err in errs["fused"].items():
            samples.setdefault(key, []).append((err, errs["eager_runs"][key]))
    assert samples, "every draw was redrawn for a ReLU kink"
    _ill_posed_cache[name] = samples
    return samples


@pytest.mark.slow  # a statistical judge over many draws per family: 0.5-1 minute each
@pytest.mark.parametrize("name", list(ILL_POSED_FAMILIES))
def test_ill_posed_training_shapes_within_twice_eager(name, device):
    """DESIGN.md section 4's other judge where float64-at-TOL is ill-posed: per tensor, over the draws,
    the geometric mean of (fused error + atol) / (eager ensemble's + atol) is at most 2 (judges.py)."""
    samples = ill_posed_samples(name)
    assert len(next(iter(samples.values()))) >= ILL_POSED_DRAWS // 2, "too many draws redrawn for ReLU kinks"
    bad = judges.failures(samples)
    assert not bad, f"fused error over 2x eager fp32's (geometric mean over draws): {bad}"


@pytest.mark.slow  # the slow judge above, re-run on worsened errors: 25-35 s each
@pytest.mark.parametrize("name", ["basic_1ch_3_values", "bottleneck_2_values"])
def test_ill_posed_judge_catches_a_real_accuracy_loss(name, device):
    """The judge above is not blind: the same draws with the fused errors made 4x worse fail on every
    tensor whose error is above the judge's atol (10x it, so atol does not absorb the loss). At exactly
    2x a fused path as accurate as eager sits on the rule's boundary; RELIABILITY.md has the rates."""
    samples = ill_posed_samples(name)
    visible = {k for k, draws in samples.items()
               if sorted(f for f, _ in draws)[len(draws) // 2] > 10 * judges.ATOL}
    assert visible, "no tensor of this family has an error above the judge's atol"
    assert not judges.failures(samples)
    missed = visible - set(judges.failures(judges.inflated(samples, 4.0)))
    assert not missed, f"a 4x accuracy loss went unseen on {missed}"


def test_strided_scale_shift_view(device):
    x = torch.randn(2, 4, 5, 5, device=device)
    w = torch.randn(6, 4, 3, 3, device=device)
    scale, shift = (torch.rand(12, device=device) + 0.5)[::2], torch.randn(12, device=device)[::2]
    out = Fz.conv_bn_act(x, w, scale, shift, padding=1, relu=True)
    assert_close(out, conv_bn_act_reference(x, w, scale, shift, padding=1, relu=True), F32)


# ----------------------------------------------------------------------------------------------
# Special values in blocks (the functional op's basic case is in test_conv_kernel.py)
# ----------------------------------------------------------------------------------------------

SPECIAL_BLOCKS = ["basic_identity", "basic_proj_s2", "basic_optionA_s2", "bottleneck_proj_s2"]
# Where the value goes: the input, a conv weight, an eval BN's running statistics or affine parameters.
SPECIAL_PLACES = ["input", "conv1.weight", "conv2.weight", "downsample.0.weight", "bn1.running_mean",
                  "bn1.running_var", "bn2.running_var", "bn1.weight", "bn2.bias"]


def assert_same_special_values(out, ref, what):
    """NaN, +Inf and -Inf at the same places as the float64 reference; the finite rest within TOL."""
    for name, fn in (("NaN", torch.isnan), ("+Inf", lambda t: t == float("inf")),
                     ("-Inf", lambda t: t == float("-inf"))):
        got, want = fn(out), fn(ref)
        assert torch.equal(got, want), f"{what}: {name} at {got.sum()} places, PyTorch {want.sum()}"
    finite = ref.isfinite()
    if finite.any():
        assert_close(out[finite], ref[finite], F32, what=f"{what} (finite part)")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter
@pytest.mark.parametrize("place", SPECIAL_PLACES)
@pytest.mark.parametrize("name", SPECIAL_BLOCKS)
def test_block_eval_special_values(name, place, device):
    """NaN / +-Inf in an eval block's input, weights or BN statistics (and a negative running_var)
    give PyTorch's float64 result: the same NaN/Inf masks, the finite part within TOL.

    The reference is float64 PyTorch on the CPU, whose im2col multiplies the zero padding: 0 * Inf =
    NaN at the borders, the mathematical definition, which the kernels follow. Eager fp32 on CPU
    (oneDNN) skips padded taps instead, so a non-finite weight gives fewer NaNs there."""
    fused, ref, cin = build_pair(name)
    if place != "input" and place not in fused.state_dict():
        pytest.skip(f"{name} has no {place}")
    values = [float("nan"), float("inf"), float("-inf")] + ([-1.0] if "running_var" in place else [])
    fused, ref = fused.to(device), ref.to(torch.float64)
    base = torch.randn(2, cin, 8, 8, device=device)
    tensors = dict(fused.named_parameters(), **dict(fused.named_buffers()))
    for value in values:
        x = base.clone()
        with torch.no_grad():
            if place == "input":
                x[0, cin - 1, 3, 4] = value
            else:
                saved = tensors[place].clone()
                tensors[place].view(-1)[1] = value   # in place: the folded-BN cache sees the change
            ref.load_state_dict(fused.state_dict())
            assert_same_special_values(fused(x).cpu(), ref(x.double().cpu()), f"{name}: {place} = {value}")
            if place != "input":
                tensors[place].copy_(saved)


def test_block_eval_negative_zero(device):
    """-0.0 in the input, conv weights and BN shift: the same values and the same zero signs as PyTorch."""
    for name in ("basic_identity", "basic_optionA_s2", "bottleneck_proj_s2", "basic_plain_s2"):
        fused, ref, cin = build_pair(name)
        x = torch.randn(2, cin, 6, 6, device=device)
        x[x.abs() < 0.5] = -0.0
        last_bn = fused.bn3 if hasattr(fused, "bn3") else fused.bn2
        with torch.no_grad():
            last_bn.bias[::2] = -0.0
            last_bn.running_mean[::2] = 0.0
            fused.conv1.weight[:2] = -0.0
        ref.load_state_dict(fused.state_dict())
        fused, ref = fused.to(device), ref.to(torch.float64)
        with torch.no_grad():
            out, want = fused(x).cpu(), ref(x.double().cpu())
        zeros = (want == 0) & (out == 0)
        assert zeros.sum() > want.numel() // 4, f"{name}: the test should produce many zeros"
        assert torch.equal(out.signbit()[zeros], want.signbit()[zeros]), f"{name}: signs of zeros differ"
        assert_close(out, want, F32, name)


# Found by the long profile (test_block_eval_matches_float64): bottleneck cin=2, planes=1, projection,
# input [1, 2, 1, 2] channels_last -> output NCHW.
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_memory_format_survives_one_channel_intermediate(mode, device):
    block = fusedres.FusedBottleneck(2, 1, downsample=nn.Sequential(reference.conv1x1(2, 4), nn.BatchNorm2d(4)))
    block.to(device).train(mode == "train")
    x = torch.randn(2, 2, 3, 3, device=device).to(memory_format=torch.channels_last)
    with torch.set_grad_enabled(mode == "train"):
        out = block(x)
    assert out.is_contiguous(memory_format=torch.channels_last)


def train_results(model, x, grad_out):
    xl = x.detach().clone().requires_grad_()
    out = model(xl)
    out.backward(grad_out.to(out.dtype))
    return {"output": out, "input grad": xl.grad, **{f"grad {n}": p.grad for n, p in model.named_parameters()},
            **{n: b for n, b in model.named_buffers() if b.dtype.is_floating_point}}


def nan_training_step(device):
    """A training step of a projection block with one NaN in the input: (fused, eager fp32) results."""
    fused, ref, cin = build_pair("basic_proj_s2")
    eager = copy.deepcopy(ref).to(device)
    fused.to(device).train()
    eager.train()
    x = torch.randn(2, cin, 6, 6, device=device)
    x[0, 1, 2, 3] = float("nan")
    grad_out = torch.randn(2, 32, 3, 3, device=device)
    return train_results(fused, x, grad_out), train_results(eager, x, grad_out)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_nan_training_input_forward_and_running_stats_like_eager(device):
    """One NaN pixel: eager's batch statistics of every channel it reaches are NaN, so are the output and
    the running statistics; the NaN-free projection branch (stride 2 skips the pixel) stays finite."""
    fused, eager = nan_training_step(device)
    for key in ("output", "bn1.running_mean", "bn1.running_var", "bn2.running_mean", "bn2.running_var",
                "downsample.1.running_mean", "downsample.1.running_var"):
        assert torch.equal(fused[key].isnan(), eager[key].isnan()), f"{key}: NaN mask differs from eager"
        finite = eager[key].isfinite()
        if finite.any():
            assert_close(fused[key][finite], eager[key][finite].double(), F32, key)
    assert fused["output"].isnan().all() and fused["bn1.running_mean"].isnan().all()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_nan_training_input_gradients_like_eager(device):
    fused, eager = nan_training_step(device)
    for key in fused:
        if key.startswith("grad") or key == "input grad":
            assert torch.equal(fused[key].isnan(), eager[key].isnan()), f"{key}: NaN mask differs from eager"
            finite = eager[key].isfinite()
            if finite.any():
                assert_close(fused[key][finite], eager[key][finite].double(), F32, key)


# ----------------------------------------------------------------------------------------------
# int64 offsets
# ----------------------------------------------------------------------------------------------
# How this is proven on a CPU: a view whose elements sit past 2**31 elements into its storage.
# torch.empty of such a storage (4-8 GB of fp16) only reserves address space: the OS maps a page
# when it is first written, and we write only the few viewed elements (measured: 0.3 GB resident,
# 0.1 s per conv). The interpreter passes CPU tensors by address and does its index arithmetic in
# numpy with the kernel's own dtypes (int32 wraps), so an offset computed in int32 overflows here
# as it would on the GPU. A wrapped offset points ~4 GB before the storage and segfaults (or reads
# garbage), so every case runs in a subprocess. On a GPU the same cases allocate the storage for
# real (up to ~8 GB); a dense > 2**31-element activation is checked there too (test_int64_dense_gpu).

INT64_SCRIPT = textwrap.dedent(r"""
    import os, sys
    import torch
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
    os.environ["FUSEDRES_STRICT"] = "1"
    import fusedres
    from fusedres import functional as Fz
    from fusedres.kernels import dgrad, wgrad
    from fusedres.reference import conv_bn_act_reference
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    torch.backends.cudnn.allow_tf32 = False

    def huge(shape, strides, dtype=torch.float32):
        # A view of an untouched storage, reaching past 2**31 elements; only its elements are written.
        numel = 1 + sum((s - 1) * st for s, st in zip(shape, strides))
        assert numel > 2 ** 31, numel
        v = torch.empty(numel, dtype=dtype, device=dev).as_strided(shape, strides)
        v.copy_(torch.randn(shape))
        return v

    def check(out, ref, what):
        err = ((out.double() - ref).norm() / ref.norm()).item()
        assert err < 1e-5, f"{what}: relative error {err:.2e}"
        print("ok", what, f"{err:.1e}")

    def conv(x, k=6, residual=None, shortcut=None, pad=1):
        w = torch.randn(k, x.shape[1], 3, 3, device=dev) / 6
        s, b = torch.rand(k, device=dev) + 0.5, torch.randn(k, device=dev)
        sc = {} if shortcut is None else dict(shortcut_input=shortcut, shortcut_weight=torch.randn(
            k, shortcut.shape[1], 1, 1, device=dev), shortcut_scale=s, shortcut_shift=b)
        out = Fz.conv_bn_act(x, w, s, b, 1, pad, residual=residual, relu=True, **sc)
        return out, conv_bn_act_reference(x, w, s, b, 1, pad, residual=residual, relu=True, **sc)

    G = 2 ** 30
    case = sys.argv[1]
    # Inputs of 5 channels: 4 or fewer would take the stem path, which reads a dense padded copy instead.
    if case == "pixel_strides":        # n * s_n, h * s_h, w * s_w past 2**31 (int64 rows: pixel_rows)
        check(*conv(huge((3, 5, 2, 3), (G + 1, 1, 15, 5))), "input batch stride")
        check(*conv(huge((1, 5, 3, 2), (5 * 3 * 2, 1, G + 3, 5))), "input row stride")
        check(*conv(huge((1, 5, 2, 3), (5 * 3 * 2, 1, 15, G + 5))), "input column stride")
        x = torch.randn(2, 4, 3, 3, device=dev)
        check(*conv(x, residual=huge((2, 6, 3, 3), (54, G // 2 + 1, 3, 1))), "residual channel stride")
        x3 = torch.randn(3, 4, 3, 3, device=dev)
        check(*conv(x3, residual=huge((3, 6, 3, 3), (G + 7, 9, 3, 1))), "residual batch stride")
        check(*conv(x3, shortcut=huge((3, 5, 3, 3), (G + 9, 1, 15, 5))), "shortcut batch stride")
    elif case == "input_channel_stride":      # cc * s_c in the conv's A-tile load
        check(*conv(huge((2, 5, 2, 2), (4, G // 2 + 1, 2, 1))), "input channel stride")
    elif case == "shortcut_channel_stride":   # cc * s_dc in the projection GEMM's load
        check(*conv(torch.randn(2, 4, 3, 3, device=dev), shortcut=huge((2, 5, 3, 3), (9, G // 2 + 1, 3, 1))),
              "shortcut channel stride")
    elif case == "training":    # a training step whose input sits past 2**31: forward, dgrad, wgrad, tail
        block = fusedres.FusedBasicBlock(5, 5).to(dev).train()   # 5 channels: not the C <= 4 stem path's copy
        ref = fusedres.reference.BasicBlock(5, 5).to(dev, torch.float64).train()
        ref.load_state_dict(block.state_dict())
        x = huge((3, 5, 3, 3), (G + 1, 1, 15, 5))
        g = torch.randn(3, 5, 3, 3, device=dev)
        xf, xr = x.detach().requires_grad_(), x.detach().double().requires_grad_()
        out, want = block(xf), ref(xr)
        out.backward(g)
        want.backward(g.double())
        check(out, want, "training output")
        check(xf.grad, xr.grad, "training input grad")
        check(block.conv1.weight.grad, ref.conv1.weight.grad, "training conv1 weight grad")
        dy = huge((2, 5, 3, 3), (45, G // 2 + 1, 3, 1))
        xw = torch.randn(2, 4, 3, 3, device=dev)
        w = torch.randn(5, 4, 3, 3, device=dev)
        dw = wgrad.conv_wgrad(dy, xw, w, (1, 1), (1, 1), (1, 1), 1)
        check(dw, torch.nn.grad.conv2d_weight(xw.double(), w.shape, dy.double(), padding=1), "wgrad dy channel stride")
    elif case == "dgrad_channel_stride":      # kk * s_dc in dgrad's A-tile load
        dy = huge((2, 5, 3, 3), (45, G // 2 + 1, 3, 1))
        w = torch.randn(5, 4, 3, 3, device=dev)
        dx = dgrad.conv_dgrad(dy, w, (2, 4, 3, 3), (1, 1), (1, 1), (1, 1), 1)
        check(dx, torch.nn.grad.conv2d_input((2, 4, 3, 3), w.double(), dy.double(), padding=1),
              "dgrad dy channel stride")
    elif case in ("dense_nhwc", "dense_nchw"):   # GPU only: a real activation of > 2**31 elements
        fmt = torch.channels_last if case == "dense_nhwc" else torch.contiguous_format
        x = torch.empty(1, 16, 12000, 12000, device=dev, dtype=torch.float16, memory_format=fmt)
        x.normal_()
        w = (torch.randn(4, 16, 1, 1, device=dev) / 4).half()
        s, b = torch.rand(4, device=dev) + 0.5, torch.randn(4, device=dev)
        out = Fz.conv_bn_act(x, w, s, b, relu=True)
        ref = conv_bn_act_reference(x[:, :, -3:], w, s, b, relu=True)
        err = ((out[:, :, -3:].double() - ref).norm() / ref.norm()).item()
        assert err < 2e-3, f"{case}: relative error of the last rows {err:.2e}"
        print("ok", case, f"{err:.1e}")
    print("DONE")
""")


def run_int64_case(case):
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-c", INT64_SCRIPT, case], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "DONE" in proc.stdout, (
        f"{case}: exit {proc.returncode} (-11 is a segfault: an offset wrapped in int32)\n"
        f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def _needs_memory(gib):
    if ON_GPU:
        free = torch.cuda.mem_get_info()[0] / 2 ** 30
        return pytest.mark.skipif(free < gib, reason=f"needs {gib} GiB of free GPU memory, {free:.0f} free")
    return pytest.mark.skipif(False, reason="")




@_needs_memory(10)
@pytest.mark.parametrize("case", [
    "pixel_strides", "training",
    "input_channel_stride",
    "shortcut_channel_stride",
    "dgrad_channel_stride",
])
def test_int64_offsets(case):
    run_int64_case(case)


@pytest.mark.skipif(not ON_GPU, reason="a dense activation of > 2**31 elements (4.6 GB fp16) is for the GPU: "
                                       "the interpreter would run its 2.6 million programs one by one")
@_needs_memory(14)
@pytest.mark.parametrize("case", [
    "dense_nhwc",
    "dense_nchw",
])
def test_int64_dense_gpu(case):
    run_int64_case(case)


@triton.jit
def _pixel_rows_probe(out_ptr, pid_m, M, P, Q, BLOCK_M: tl.constexpr):
    """Stores pixel_rows' (offset, n, p, q, mask) of pixel tile pid_m as int64 rows of out."""
    offs_m, n, p, q, mask = pixel_rows(pid_m, M, P, Q, BLOCK_M)
    i = tl.arange(0, BLOCK_M) * 5
    tl.store(out_ptr + i, offs_m)
    tl.store(out_ptr + i + 1, n)
    tl.store(out_ptr + i + 2, p)
    tl.store(out_ptr + i + 3, q)
    tl.store(out_ptr + i + 4, mask.to(tl.int64))


@pytest.mark.parametrize("pid_m", [2 ** 31 // 16 - 1, 2 ** 27 + 5])
def test_pixel_rows_int64(pid_m):
    """kernels._tiles.pixel_rows for a pixel tile far into M: offsets and (n, p, q) as int64 math gives."""
    if not kernels.INTERPRETED and not ON_GPU:
        pytest.skip("needs the interpreter or a GPU")
    p, q, m = 1000, 999, 2 ** 40
    out = torch.zeros(16, 5, dtype=torch.int64, device="cuda" if ON_GPU else "cpu")
    _pixel_rows_probe[(1,)](out, pid_m, m, p, q, BLOCK_M=16)
    offs = torch.arange(16, dtype=torch.int64) + pid_m * 16
    want = torch.stack([offs, offs // (p * q), offs % (p * q) // q, offs % q, torch.ones(16, dtype=torch.int64)], 1)
    assert torch.equal(out.cpu(), want)


# ----------------------------------------------------------------------------------------------
# Determinism: the same call twice gives the same bits
# ----------------------------------------------------------------------------------------------

@pytest.fixture
def deterministic():
    saved = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(saved)


@pytest.mark.parametrize("name", ["basic_proj_s2", "basic_optionA_s2", "bottleneck_proj_s1"])
def test_repeated_runs_are_bitwise_identical(name, deterministic, device):
    """Eval forward and a training step (output, input/parameter gradients, running statistics), three
    times each from the same state, under torch.use_deterministic_algorithms(True): bitwise equal. The
    wgrad split sums in a fixed order, the BN statistics merge per tile; no atomics. (On a GPU the
    inference conv is autotuned, but not in deterministic mode: a fixed config then keeps results
    bitwise equal across processes too.)"""
    fused, _, cin = build_pair(name)
    fused.to(device)
    x = torch.randn(3, cin, 9, 7, device=device).to(memory_format=torch.channels_last)
    with torch.no_grad():
        evals = [fused.eval()(x) for _ in range(3)]
    assert all(torch.equal(evals[0], e) for e in evals[1:]), "eval forward differs run to run"
    state = copy.deepcopy(fused.state_dict())
    grad_out = None
    runs = []
    for _ in range(3):
        fused.load_state_dict(state)
        fused.zero_grad(set_to_none=True)
        xl = x.clone().requires_grad_()
        out = fused.train()(xl)
        grad_out = torch.randn_like(out) if grad_out is None else grad_out
        out.backward(grad_out)
        runs.append([out, xl.grad] + [p.grad for p in fused.parameters()] + list(fused.buffers()))
    for i, r in enumerate(runs[1:], 1):
        for j, (a, b) in enumerate(zip(runs[0], r)):
            assert torch.equal(a, b), f"training run {i}: tensor {j} differs from run 0"


# ----------------------------------------------------------------------------------------------
# Caches and memory
# ----------------------------------------------------------------------------------------------

def live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) in (torch.Tensor, nn.Parameter))


def test_repeated_calls_keep_no_state(device):
    """Eval blocks keep no per-module caches (folded BN is recomputed from the current values); the
    autotune cache (GPU only) gains nothing on repeated shapes; no tensors pile up."""
    fused, _, cin = build_pair("bottleneck_proj_s2")
    fused.to(device).eval()
    x = torch.randn(2, cin, 8, 8, device=device)
    autotune_cache = kernels.conv._conv_bn_act_autotuned.cache
    before = {n: set(vars(m)) for n, m in fused.named_modules()}
    with torch.no_grad():
        fused(x)
        tuned = len(autotune_cache)
        tensors = live_tensors()
        for _ in range(10):
            fused(x)
        assert live_tensors() <= tensors, "tensors pile up per call"
    for n, m in fused.named_modules():
        assert set(vars(m)) == before[n], f"{n}: the forward added state {set(vars(m)) - before[n]}"
    assert len(autotune_cache) == tuned, "the autotune cache grew on a repeated shape"
    if not ON_GPU:
        assert tuned == 0, "the interpreter runs fixed configs: nothing should be autotuned"


def test_caches_follow_in_place_updates(device):
    """An optimizer step / load_state_dict changes parameters in place: the next eval forward uses
    the new values."""
    fused, ref, cin = build_pair("basic_proj_s2")
    fused.to(device)
    ref.to(device, torch.float64)
    x = torch.randn(2, cin, 8, 8, device=device)
    with torch.no_grad():
        fused(x)
        for p in fused.parameters():
            p.mul_(1.5)
        fused.bn1.running_var.add_(0.5)
        ref.load_state_dict(fused.state_dict())
        assert_close(fused(x), ref(x.double()), F32, "after in-place updates")
        sd = {k: v * 0.5 if v.dtype.is_floating_point else v for k, v in fused.state_dict().items()}
        fused.load_state_dict(sd)
        ref.load_state_dict(sd)
        assert_close(fused(x), ref(x.double()), F32, "after load_state_dict")


def test_caches_follow_writes_through_data(device):
    fused, ref, cin = build_pair("basic_identity")
    fused.to(device)
    ref.to(device, torch.float64)
    x = torch.randn(2, cin, 6, 6, device=device)
    with torch.no_grad():
        fused(x)
        fused.bn1.weight.data.mul_(3)
        fused.conv2.weight.data.normal_()
        # The weights are read at every launch. The folded BN is cached per module and follows version counters,
        # which writes through .data do not bump: eval() refolds (the documented refresh, fusedres._fold).
        fused.eval()
        ref.load_state_dict(fused.state_dict())
        assert_close(fused(x), ref(x.double()), F32, "after writes through .data")


@pytest.mark.skipif(not ON_GPU, reason="torch.cuda.memory_allocated exists on CUDA only; on CPU the cache "
                                       "test above checks that repeated calls keep no extra state")
def test_training_memory_is_flat_over_100_iterations():
    model = fusedres.cifar_resnet(20).cuda().half().to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(16, 3, 32, 32, device="cuda").half().contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 10, (16,), device="cuda")
    allocated = []
    for _ in range(100):
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x).float(), target).backward()
        opt.step()
        torch.cuda.synchronize()
        allocated.append(torch.cuda.memory_allocated())
    assert max(allocated[10:]) == min(allocated[10:]), \
        f"memory_allocated moves after warm-up: {min(allocated[10:])}..{max(allocated[10:])} bytes"


# ----------------------------------------------------------------------------------------------
# Bad input beyond the table in test_bad_input.py
# ----------------------------------------------------------------------------------------------

def float64_block_results(device):
    fused, ref, cin = build_pair("bottleneck_proj_s2")
    fused, ref = fused.to(device, torch.float64), ref.to(device, torch.float64)
    x = torch.randn(2, cin, 7, 7, device=device, dtype=torch.float64)
    with torch.no_grad():
        assert_close(fused(x), ref(x), torch.float64, "eval")
    fused.train()
    ref.train()
    grad_out = torch.randn(2, 128, 4, 4, device=device, dtype=torch.float64)
    return train_results(fused, x, grad_out), train_results(ref, x, grad_out)


def test_float64_is_supported_by_blocks(device):
    """float64 is a supported dtype (gradcheck uses it): eval output, training output and gradients
    match float64 eager to 1e-12."""
    got, want = float64_block_results(device)
    for key in want:
        if "running" not in key:
            assert_close(got[key], want[key], torch.float64, key)


def test_float64_running_statistics_are_exact(device):
    """fp64 running statistics within a few fp64 roundings of eager (momentum and eps reach the kernel
    as hi + lo fp32 parts; as one fp32 scalar, 0.1 became 0.10000000149: 3e-8 off)."""
    got, want = float64_block_results(device)
    for key in want:
        if "running" in key:
            err = rel_err(got[key], want[key])
            assert err <= 4 * 2.0 ** -53, f"{key}: relative error {err:.1e} is more than fp64 rounding"


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_identity_shortcut_channel_mismatch_raises_like_eager(mode, device):
    block = fusedres.FusedBottleneck(8, 4).to(device)   # no downsample: 16 output channels, 8 input
    block.train(mode == "train")
    x = torch.randn(2, 8, 6, 6, device=device)
    with pytest.raises(RuntimeError, match="16"):
        reference.Bottleneck(8, 4).to(device).train(mode == "train")(x)
    with pytest.raises(RuntimeError):
        block(x)


def test_train_block_on_too_small_input_names_the_kernel_size(device):
    block = fusedres.FusedBasicBlock(8, 8).to(device).train()
    with pytest.raises(RuntimeError, match="kernel size"):
        block(torch.randn(2, 8, 0, 4, device=device))


@pytest.mark.parametrize("name", ["basic_proj_s2", "basic_optionA_s2", "bottleneck_proj_s1"])
def test_empty_batch_in_training_like_eager(name, device):
    """nn.BatchNorm2d trains on an empty batch: empty output (in the input's memory format), zero
    parameter gradients, an empty input gradient, running statistics kept, num_batches_tracked + 1."""
    fused, ref, cin = build_pair(name)
    fused, ref = fused.to(device).train(), ref.to(device).train()
    x = torch.randn(0, cin, 8, 8, device=device).to(memory_format=torch.channels_last).requires_grad_()
    results = []
    for block in (fused, ref):
        before = {k: v.clone() for k, v in block.state_dict().items()}
        xb = x.detach().clone().requires_grad_()
        out = block(xb)
        out.sum().backward()
        results.append((out, xb.grad.shape, {n: p.grad for n, p in block.named_parameters()}))
        for key, value in block.state_dict().items():
            if key.endswith("num_batches_tracked"):
                assert int(value) == int(before[key]) + 1, key
            else:
                assert torch.equal(value, before[key]), f"{key} changed on an empty batch"
    (f_out, f_gshape, f_grads), (e_out, e_gshape, e_grads) = results
    assert f_out.shape == e_out.shape and f_gshape == e_gshape
    assert f_out.is_contiguous(memory_format=torch.channels_last)
    for n, g in e_grads.items():
        assert f_grads[n] is not None and torch.equal(f_grads[n], g), f"grad {n}: {f_grads[n]} != eager {g}"


def test_state_dict_unexpected_and_foreign_keys():
    """Loading names what is wrong: an unexpected key, and a bottleneck's state into a basic block."""
    block = fusedres.FusedBasicBlock(16, 16)
    sd = block.state_dict()
    sd["conv3.weight"] = torch.randn(16, 16, 1, 1)
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "conv3.weight"'):
        block.load_state_dict(sd, strict=True)
    foreign = fusedres.FusedBottleneck(16, 4).state_dict()
    with pytest.raises(RuntimeError, match=r"size mismatch for conv1.weight: copying a param with shape "
                                           r"torch.Size\(\[4, 16, 1, 1\]\) from checkpoint, the shape in current "
                                           r"model is torch.Size\(\[16, 16, 3, 3\]\)"):
        block.load_state_dict(foreign, strict=True)
