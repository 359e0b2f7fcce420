"""Kernel-level tests of the conv backward launchers (kernels/dgrad.py, kernels/wgrad.py) against float64
autograd of F.conv2d: strides, kernel sizes (the C=3 stem), groups, dilation, padding, both memory
formats, the fused prologue/epilogues, and the phase decomposition's FLOP budget."""
import pytest
import torch

from fusedres.kernels import dgrad, wgrad
from helpers import assert_close

# (N, C, K, H, R, stride, padding, dilation, groups)
GEOMETRIES = {
    "3x3_s1": (2, 8, 16, 9, 3, 1, 1, 1, 1),
    "3x3_s2": (2, 8, 16, 9, 3, 2, 1, 1, 1),
    "3x3_s2_c16": (2, 16, 16, 9, 3, 2, 1, 1, 1),
    "1x1_s2": (2, 16, 8, 8, 1, 2, 0, 1, 1),
    "stem_7x7_c3": (2, 3, 16, 14, 7, 2, 3, 1, 1),
    "grouped_dilated": (2, 8, 12, 9, 3, 1, 2, 2, 2),
    "5x5_s2_dil3": (1, 4, 8, 16, 5, 2, 1, 3, 1),
}
# Small blocks: several pixel steps and K blocks per program, carries across image rows and images.
SMALL = dict(dgrad=dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16), wgrad=dict(BLOCK_M=16, BLOCK_K=16, BLOCK_N=16))


def _tensors(geo, dtype, device, channels_last):
    n, c, k, h, r, st, pad, dil, g = geo
    p = (h + 2 * pad - dil * (r - 1) - 1) // st + 1
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(n, c, h, h, device=device, dtype=dtype).to(memory_format=fmt)
    w = (torch.randn(k, c // g, r, r, device=device) / (c // g * r * r) ** 0.5).to(dtype).to(memory_format=fmt)
    dy = torch.randn(n, k, p, p, device=device, dtype=dtype).to(memory_format=fmt)
    return x, w, dy, ((st, st), (pad, pad), (dil, dil), g)


@pytest.mark.parametrize("dtype,channels_last,small", [
    (torch.float32, True, False), (torch.float32, False, False), (torch.float16, True, False),
    (torch.float16, False, False), (torch.float32, True, True)],
    ids=["fp32-nhwc", "fp32-nchw", "fp16-nhwc", "fp16-nchw", "fp32-nhwc-small_blocks"])
@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_dgrad_wgrad_match_float64(name, dtype, channels_last, small, device):
    x, w, dy, geo = _tensors(GEOMETRIES[name], dtype, device, channels_last)
    stride, pad, dil, g = geo
    dx = dgrad.conv_dgrad(dy, w, x.shape, *geo, config=SMALL["dgrad"] if small else None)
    dw = wgrad.conv_wgrad(dy, x, w, *geo, config=SMALL["wgrad"] if small else None)
    ref_dx = torch.nn.grad.conv2d_input(x.shape, w.double(), dy.double(), stride, pad, dil, g)
    ref_dw = torch.nn.grad.conv2d_weight(x.double(), w.shape, dy.double(), stride, pad, dil, g)
    assert_close(dx, ref_dx, dtype, "dgrad")
    assert_close(dw, ref_dw, dtype, "wgrad")
    assert dx.dtype == dtype and dw.dtype == dtype
    assert dw.stride() == w.stride(), "wgrad keeps the weight's memory format"
    assert dx.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("splits", [1, 5])
@pytest.mark.parametrize("config", [None, dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=64), SMALL["wgrad"]],
                         ids=["default", "tile_4x16", "tile_1x16"])
def test_stem_wgrad_over_spatial_tiles(config, splits, device, monkeypatch):
    """The stem wgrad walks each split's output pixels in spatial tiles (BLOCK_K pixels: 4 x 16, or 1 x 16): 13 x 13
    outputs leave partial tiles in both directions, and at 4 x 16 the 3 splits that 169 pixels allow share 4 tiles as
    2, 2 and none (one masked step past the last image)."""
    monkeypatch.setattr(wgrad, "_num_splits", lambda *a: splits)
    torch.manual_seed(5)
    x = torch.randn(1, 3, 25, 26, device=device).to(memory_format=torch.channels_last)
    w = (torch.randn(8, 3, 7, 7, device=device) / 12).to(memory_format=torch.channels_last)
    dy = torch.randn(1, 8, 13, 13, device=device)
    geo = ((2, 2), (3, 3), (1, 1), 1)
    dw = wgrad.conv_wgrad(dy, x, w, *geo, config=config)
    ref = torch.nn.grad.conv2d_weight(x.double(), w.shape, dy.double(), (2, 2), (3, 3), (1, 1), 1)
    assert_close(dw, ref, torch.float32, "wgrad")


@pytest.mark.parametrize("width", [26, 25])
def test_stem_wgrad_non_finite_pixel_reaches_its_taps_only(width, device):
    """The stem wgrad loads 8 pixels per 7-wide filter row (the 8th's columns are never stored): a NaN pixel on the
    image's right edge, which only the filter's right taps read, leaves the other taps' gradients finite, as in
    float64; an odd width needs the copy's extra right column for that 8th pixel."""
    torch.manual_seed(6)
    x = torch.randn(1, 3, 25, width, device=device).to(memory_format=torch.channels_last)
    x[0, 1, 12, width - 1] = float("nan")
    w = (torch.randn(8, 3, 7, 7, device=device) / 12).to(memory_format=torch.channels_last)
    q = (width + 6 - 7) // 2 + 1
    dy = torch.randn(1, 8, 13, q, device=device)
    dw = wgrad.conv_wgrad(dy, x, w, (2, 2), (3, 3), (1, 1), 1)
    ref = torch.nn.grad.conv2d_weight(x.double(), w.shape, dy.double(), (2, 2), (3, 3), (1, 1), 1)
    assert ref.isnan().any() and not ref.isnan().all()
    assert torch.equal(dw.isnan(), ref.isnan())
    assert_close(dw[ref.isfinite()], ref[ref.isfinite()], torch.float32, "wgrad")


@pytest.mark.parametrize("name", ["3x3_s1", "1x1_s2", "3x3_s2"])
def test_dgrad_int64_index_math(name, device, monkeypatch):
    """The 64-bit index path (IDX64, taken past 2**31 elements) of both loop shapes: a one-tap phase (ONE_TAP:
    1x1, strided phases) and the tap-counting one, forced here on small tensors."""
    monkeypatch.setattr(dgrad, "max_offset", lambda t: 2**31)
    x, w, dy, geo = _tensors(GEOMETRIES[name], torch.float32, device, True)
    stride, pad, dil, g = geo
    dx = dgrad.conv_dgrad(dy, w, x.shape, *geo, config=SMALL["dgrad"])
    assert_close(dx, torch.nn.grad.conv2d_input(x.shape, w.double(), dy.double(), stride, pad, dil, g),
                 torch.float32, "dgrad")


@pytest.mark.parametrize("name,config", [
    ("3x3_s2", None), ("grouped_dilated", None), ("stem_7x7_c3", None),
    ("3x3_s2_c16", dict(BLOCK_M=16, BLOCK_K=16, BLOCK_N=16)),  # one tap per column tile (TAP_PER_TILE)
])
def test_wgrad_prologue_pads_the_activated_tensor(name, config, device):
    x, w, dy, geo = _tensors(GEOMETRIES[name], torch.float32, device, True)
    c = x.shape[1]
    scale, shift = torch.rand(c, device=device) + 0.5, torch.randn(c, device=device) + 0.5  # relu(shift) != 0
    x[1, 0, 2, 3] = float("nan")  # propagates through the ReLU like torch.relu
    dw = wgrad.conv_wgrad(dy, x, w, *geo, prologue=(scale, shift), config=config)
    act = torch.relu(x.double() * scale.double()[:, None, None] + shift.double()[:, None, None])
    stride, pad, dil, g = geo
    ref = torch.nn.grad.conv2d_weight(act, w.shape, dy.double(), stride, pad, dil, g)
    assert torch.equal(dw.isnan(), ref.isnan()) and ref.isnan().any()
    assert_close(dw.nan_to_num(), ref.nan_to_num(), torch.float32, "wgrad with prologue")


def test_wgrad_float64(device):
    x, w, dy, geo = _tensors(GEOMETRIES["3x3_s2"], torch.float64, device, True)
    dw = wgrad.conv_wgrad(dy, x, w, *geo, config=SMALL["wgrad"])
    ref = torch.nn.grad.conv2d_weight(x, w.shape, dy, geo[0], geo[1], geo[2], geo[3])
    assert dw.dtype == torch.float64 and (dw - ref).abs().max().item() < 1e-12


@pytest.mark.parametrize("name", ["3x3_s1", "3x3_s2", "1x1_s2"])
@pytest.mark.parametrize("small", [False, True], ids=["default_blocks", "small_blocks"])
def test_dgrad_epilogues(name, small, device):
    """BN_GRAD (ReLU gate + partial sums over the stored values, every pixel once across phases) and
    an option-A residual at stride 2 gated by the block output's ReLU."""
    dtype = torch.float16
    x, w, dy, geo = _tensors(GEOMETRIES[name], dtype, device, True)
    n, c, h, _ = x.shape
    y = torch.randn_like(x)
    scale, shift = torch.rand(c, device=device) + 0.5, torch.randn(c, device=device)
    mean, invstd = torch.randn(c, device=device), torch.rand(c, device=device) + 0.5
    hr = (h + 1) // 2
    res = torch.randn(n, c // 2, hr, hr, device=device, dtype=dtype)
    rmask = torch.randn_like(res)
    dx, sum_g, sum_gx = dgrad.conv_dgrad_bn(dy, w, x.shape, *geo, (y, scale, shift, mean, invstd),
                                               residual=(res, rmask, 2), config=SMALL["dgrad"] if small else None)
    stride, pad, dil, g = geo
    full = torch.nn.grad.conv2d_input(x.shape, w.double(), dy.double(), stride, pad, dil, g)
    gate = y.double() * scale.double()[:, None, None] + shift.double()[:, None, None] > 0
    grad = torch.where(gate, full, 0.0)
    want = grad.clone()
    want[:, :c // 2, ::2, ::2] += torch.where(rmask.double() > 0, res.double(), 0.0)
    assert_close(dx, want, dtype, "dgrad with BN-ReLU gate and residual")
    xhat = (y.double() - mean.double()[:, None, None]) * invstd.double()[:, None, None]
    assert_close(sum_g, grad.sum((0, 2, 3)), dtype, "sum of g")
    assert_close(sum_gx, (grad * xhat).sum((0, 2, 3)), dtype, "sum of g*xhat")


def test_dgrad_accumulates_in_place_into_the_residual(device):
    """The projection path: dx += dgrad(dy_d) with out aliasing the residual, stride 2, every phase."""
    x, w, dy, geo = _tensors(GEOMETRIES["1x1_s2"], torch.float32, device, True)
    acc = torch.randn(x.shape, device=device).to(memory_format=torch.channels_last)
    want = acc.double() + torch.nn.grad.conv2d_input(x.shape, w.double(), dy.double(), geo[0], geo[1], geo[2],
                                                     geo[3])
    out = dgrad.conv_dgrad(dy, w, x.shape, *geo, residual=(acc, None, 1), out=acc)
    assert out.data_ptr() == acc.data_ptr()
    assert_close(acc, want, torch.float32, "in-place dgrad")


# ResNet-50 layer classes at batch 128 (x shape, weight shape, stride, padding).
RESNET50 = [((128, 64, 56, 56), (64, 64, 3, 3), 1, 1), ((128, 128, 56, 56), (128, 128, 3, 3), 2, 1),
            ((128, 256, 56, 56), (512, 256, 1, 1), 2, 0), ((128, 512, 7, 7), (512, 512, 3, 3), 1, 1),
            ((128, 3, 224, 224), (64, 3, 7, 7), 2, 3), ((128, 1024, 14, 14), (2048, 1024, 1, 1), 2, 0)]


@pytest.mark.parametrize("x_shape,w_shape,stride,pad", RESNET50)
def test_dgrad_issues_only_useful_flops(x_shape, w_shape, stride, pad):
    issued, useful = dgrad.dgrad_flops(x_shape, w_shape, (stride, stride), (pad, pad), (1, 1), 1)
    assert issued == useful, f"dgrad issues {issued} MMA FLOPs for {useful} useful"


@pytest.mark.parametrize("name", ["3x3_s1", "3x3_s2", "1x1_s2", "stem_7x7_c3"])
def test_dgrad_never_issues_more_than_the_forward(name):
    """With ResNet-style padding (dilation 1, every input row reached); a dilated strided conv whose taps
    reach few rows of each phase, or an unpadded one, still issues MMAs for its border rows."""
    n, c, k, h, r, st, pad, dil, g = GEOMETRIES[name]
    issued, useful = dgrad.dgrad_flops((n, c, h, h), (k, c // g, r, r), (st, st), (pad, pad), (dil, dil), g)
    assert 0 < issued <= useful
    # every input pixel is in exactly one phase
    phases = dgrad.dgrad_phases((n, c, h, h), (k, c // g, r, r), (st, st), (pad, pad), (dil, dil))
    assert sum(hp * wp for _, (hp, wp), _, _ in phases) == h * h


def _config_cases():
    from fusedres.kernels import dgrad, wgrad
    def name(kind, cfg):
        return f"{kind}-{'x'.join(map(str, cfg.kwargs.values()))}-w{cfg.num_warps}s{cfg.num_stages}"
    return [pytest.param(kind, cfg, id=name(kind, cfg))
            for kind, mod in (("dgrad", dgrad), ("wgrad", wgrad)) for cfg in mod.gpu_configs()]


@pytest.mark.parametrize("kind,cfg", _config_cases())
def test_every_autotune_config(kind, cfg, device):
    """Each config the autotuners may pick, forced (on the GPU: num_warps/num_stages-specific
    miscompiles would hide behind autotuning), with the fused epilogue / prologue."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    x, w, dy, geo = _tensors((2, 64, 64, 8, 3, 2, 1, 1, 1), dtype, device, True)
    config = dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    stride, pad, dil, g = geo
    c = x.shape[1]
    scale, shift = torch.rand(c, device=device) + 0.5, torch.randn(c, device=device)
    if kind == "dgrad":
        y, mean, invstd = torch.randn_like(x), torch.randn(c, device=device), torch.rand(c, device=device) + 0.5
        out, sum_g, _ = dgrad.conv_dgrad_bn(dy, w, x.shape, *geo, (y, scale, shift, mean, invstd), config=config)
        full = torch.nn.grad.conv2d_input(x.shape, w.double(), dy.double(), stride, pad, dil, g)
        want = torch.where(y.double() * scale.double()[:, None, None] + shift.double()[:, None, None] > 0, full, 0.0)
        assert_close(sum_g, want.sum((0, 2, 3)), dtype, "sum of g")
    else:
        out = wgrad.conv_wgrad(dy, x, w, *geo, prologue=(scale, shift), config=config)
        act = torch.relu(x.double() * scale.double()[:, None, None] + shift.double()[:, None, None])
        want = torch.nn.grad.conv2d_weight(act, w.shape, dy.double(), stride, pad, dil, g)
    assert_close(out, want, dtype, f"{kind} with config {config}")
