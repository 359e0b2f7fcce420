"""Kernel-level parity of the fused conv against the float64 PyTorch reference.

Runs through the launcher (fusedres.kernels.conv_bn_act) and the public functional op; on CPU in
the Triton interpreter with FUSEDRES_STRICT=1 (see conftest), on CUDA when there is a GPU.
"""
import pytest
import torch

from fusedres import functional as Fz
from fusedres import kernels
from fusedres.kernels._conv_configs import Tile, conv_fit
from fusedres.reference import conv_bn_act_reference
from helpers import DTYPES, ON_GPU, assert_close

# (N, C, H, W, K, kernel, stride, padding, dilation, groups)
CONV_SHAPES = {
    "stem7x7_s2_C3": (1, 3, 17, 13, 8, 7, 2, 3, 1, 1),
    "3x3_s1_odd": (2, 16, 9, 11, 24, 3, 1, 1, 1, 1),
    "3x3_s2": (2, 16, 9, 9, 32, 3, 2, 1, 1, 1),
    "1x1_s1": (3, 12, 7, 5, 20, 1, 1, 0, 1, 1),
    "1x1_s2_proj": (2, 20, 8, 8, 40, 1, 2, 0, 1, 1),
    "3x3_groups8": (2, 32, 8, 8, 32, 3, 1, 1, 1, 8),
    "3x3_groups32_s2": (2, 64, 7, 7, 64, 3, 2, 1, 1, 32),
    "3x3_dilation2": (2, 16, 10, 10, 16, 3, 1, 2, 2, 1),
    "3x3_C1": (1, 1, 5, 6, 3, 3, 1, 1, 1, 1),
    "3x3_1x1spatial": (2, 8, 1, 1, 16, 3, 1, 1, 1, 1),
    "3x3_wideC": (1, 160, 4, 4, 136, 3, 1, 1, 1, 1),  # more than one C-block and N-block per tile
    "asym_stride_pad": (2, 8, 9, 12, 8, (3, 1), (1, 2), (1, 0), 1, 1),
}
EPILOGUES = [(False, False), (False, True), (True, False), (True, True)]  # (residual, relu)
FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


def _pair(v):
    return (v, v) if isinstance(v, int) else v


def make_case(shape, dtype, device, fmt, residual):
    n, c, h, w, k, ks, stride, pad, dil, groups = shape
    r, s = _pair(ks)
    x = torch.randn(n, c, h, w, device=device).to(dtype).to(memory_format=fmt)
    weight = (torch.randn(k, c // groups, r, s, device=device) / (c // groups * r * s) ** 0.5).to(dtype)
    weight = weight.to(memory_format=fmt)
    scale = torch.rand(k, device=device) + 0.5
    shift = torch.randn(k, device=device)
    p = (h + 2 * _pair(pad)[0] - _pair(dil)[0] * (r - 1) - 1) // _pair(stride)[0] + 1
    q = (w + 2 * _pair(pad)[1] - _pair(dil)[1] * (s - 1) - 1) // _pair(stride)[1] + 1
    res = torch.randn(n, k, p, q, device=device).to(dtype).to(memory_format=fmt) if residual else None
    return x, weight, scale, shift, dict(stride=stride, padding=pad, dilation=dil, groups=groups), res


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("residual,relu", EPILOGUES, ids=["plain", "relu", "res", "res_relu"])
@pytest.mark.parametrize("name", list(CONV_SHAPES))
def test_conv_bn_act_parity(name, residual, relu, dtype, fmt, device):
    x, w, scale, shift, conv, res = make_case(CONV_SHAPES[name], dtype, device, FORMATS[fmt], residual)
    out = Fz.conv_bn_act(x, w, scale, shift, **conv, residual=res, relu=relu)
    ref = conv_bn_act_reference(x, w, scale, shift, **conv, residual=res, relu=relu)
    assert out.dtype == dtype
    assert_close(out, ref, dtype)
    if x.shape[1] > 1 and x.shape[2] * x.shape[3] > 1 and FORMATS[fmt] == torch.channels_last:
        assert out.is_contiguous(memory_format=torch.channels_last), \
            "channels_last input must give channels_last output"
    if FORMATS[fmt] == torch.contiguous_format:
        assert out.is_contiguous(), "NCHW-contiguous input must give NCHW-contiguous output"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("stride", [1, 2])
def test_projection_shortcut_in_epilogue(stride, dtype, device):
    """The downsample 1x1 conv + BN runs as a second GEMM in the same launch (with ReLU)."""
    n, cin, h, planes = 2, 12, 9, 24
    x = torch.randn(n, cin, h, h, device=device, dtype=dtype).to(memory_format=torch.channels_last)
    y1 = torch.randn(n, planes, (h - 1) // stride + 1, (h - 1) // stride + 1, device=device, dtype=dtype)
    w2 = torch.randn(planes, planes, 3, 3, device=device, dtype=dtype) / 15
    wd = torch.randn(planes, cin, 1, 1, device=device, dtype=dtype) / 4
    s2, b2, sd, bd = torch.rand(planes, device=device) + 0.5, torch.randn(planes, device=device), \
        torch.rand(planes, device=device) + 0.5, torch.randn(planes, device=device)
    kw = dict(shortcut_input=x, shortcut_weight=wd, shortcut_scale=sd, shortcut_shift=bd, shortcut_stride=stride)
    out = Fz.conv_bn_act(y1, w2, s2, b2, 1, 1, relu=True, **kw)
    ref = conv_bn_act_reference(y1, w2, s2, b2, 1, 1, relu=True, **kw)
    assert_close(out, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_projection_with_extreme_bn_scales(dtype, device):
    """The projection rescales its one accumulator by scale / scale_d between the two GEMMs: zero, negative,
    tiny and far-apart per-channel scales (zero_init_residual's gamma = 0 on the main branch, a dead shortcut
    channel) must still give scale * main + scale_d * shortcut."""
    torch.manual_seed(5)
    n, cin, planes = 2, 12, 16
    x = torch.randn(n, cin, 8, 8, device=device, dtype=dtype).to(memory_format=torch.channels_last)
    y1 = torch.randn(n, planes, 4, 4, device=device, dtype=dtype).to(memory_format=torch.channels_last)
    w2 = torch.randn(planes, planes, 3, 3, device=device, dtype=dtype) / 12
    wd = torch.randn(planes, cin, 1, 1, device=device, dtype=dtype) / 4
    f32 = dict(device=device, dtype=torch.float32)
    s2 = torch.tensor([0, 0, 1, 1, -2, 1e3, 1e-3, 1, 3, 1e-30, 1, 0.5, 1, 2, 1, -1], **f32)
    sd = torch.tensor([1, 0, 0, -1, 0.5, 1e-3, 1e3, 1e-30, 3, 1, 1e-20, -0.5, 2, 1, 1, 1], **f32)
    b2, bd = torch.randn(planes, **f32), torch.randn(planes, **f32)
    kw = dict(shortcut_input=x, shortcut_weight=wd, shortcut_scale=sd, shortcut_shift=bd, shortcut_stride=2)
    out = Fz.conv_bn_act(y1, w2, s2, b2, 1, 1, relu=False, **kw)
    ref = conv_bn_act_reference(y1, w2, s2, b2, 1, 1, relu=False, **kw)
    assert torch.isfinite(out).all()
    for c in range(planes):  # per channel: the 1e3-scaled channel would hide the others in one norm
        assert_close(out[:, c], ref[:, c], dtype, what=f"channel {c} (scale {s2[c]:g}, shortcut scale {sd[c]:g})")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_option_a_residual_is_a_strided_view_with_fewer_channels(dtype, device):
    """Option A: the residual is x[:, :, ::2, ::2] with C < K channels; the rest are zero."""
    x = torch.randn(2, 8, 10, 10, device=device, dtype=dtype).to(memory_format=torch.channels_last)
    y1 = torch.randn(2, 16, 5, 5, device=device, dtype=dtype)
    w2 = torch.randn(16, 16, 3, 3, device=device, dtype=dtype) / 12
    scale, shift = torch.rand(16, device=device) + 0.5, torch.randn(16, device=device)
    res = x[:, :, ::2, ::2]
    assert not res.is_contiguous() and not res.is_contiguous(memory_format=torch.channels_last)
    out = Fz.conv_bn_act(y1, w2, scale, shift, 1, 1, residual=res, relu=True)
    assert_close(out, conv_bn_act_reference(y1, w2, scale, shift, 1, 1, residual=res, relu=True), dtype)


def test_non_contiguous_views(device):
    """Sliced and permuted inputs and weights are read through their strides, never copied wrongly."""
    base = torch.randn(2, 20, 13, 11, device=device)
    x = base[:, 2:18, 1:, ::2]                     # sliced channels, rows and strided columns
    w = torch.randn(3, 3, 16, 24, device=device).permute(3, 2, 0, 1)  # permuted weight [24, 16, 3, 3]
    scale, shift = torch.rand(24, device=device) + 0.5, torch.randn(24, device=device)
    out = Fz.conv_bn_act(x, w, scale, shift, 1, 1, relu=True)
    assert_close(out, conv_bn_act_reference(x, w, scale, shift, 1, 1, relu=True), torch.float32)


def test_empty_batch_and_default_scale(device):
    x = torch.randn(0, 8, 6, 6, device=device)
    w = torch.randn(4, 8, 3, 3, device=device)
    out = Fz.conv_bn_act(x, w, padding=1)
    assert out.shape == (0, 4, 6, 6)
    x = torch.randn(2, 8, 6, 6, device=device)
    assert_close(Fz.conv_bn_act(x, w, padding=1), torch.nn.functional.conv2d(x.double(), w.double(), padding=1),
                 torch.float32)


def test_float64_is_exact(device):
    x = torch.randn(2, 6, 7, 7, device=device, dtype=torch.float64)
    w = torch.randn(10, 6, 3, 3, device=device, dtype=torch.float64)
    s, b = torch.rand(10, device=device, dtype=torch.float64), torch.randn(10, device=device, dtype=torch.float64)
    out = Fz.conv_bn_act(x, w, s, b, 2, 1, relu=True)
    assert_close(out, conv_bn_act_reference(x, w, s, b, 2, 1, relu=True), torch.float64)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter
def test_special_values_propagate_like_pytorch(device):
    """NaN propagates through ReLU (tl.maximum alone would drop it); Inf and -0.0 behave as in PyTorch."""
    x = torch.randn(1, 4, 6, 6, device=device)
    x[0, 1, 2, 3] = float("nan")
    x[0, 2, 4, 4] = float("inf")
    w = torch.randn(8, 4, 1, 1, device=device)
    scale, shift = torch.rand(8, device=device) + 0.5, torch.randn(8, device=device)
    shift[0] = -0.0
    out = Fz.conv_bn_act(x, w, scale, shift, relu=True)
    ref = conv_bn_act_reference(x, w, scale, shift, relu=True).float()
    assert torch.equal(out.isnan(), ref.isnan()), "NaN positions differ from PyTorch"
    assert torch.equal(out.isinf(), ref.isinf()), "Inf positions differ from PyTorch"
    finite = ref.isfinite()
    assert_close(out[finite], ref[finite].double(), torch.float32)
    neg_zero = Fz.conv_bn_act(torch.zeros(1, 1, 1, 1, device=device) - 1.0, torch.ones(1, 1, 1, 1, device=device),
                              torch.zeros(1, device=device), torch.full((1,), -0.0, device=device), relu=True)
    assert torch.equal(neg_zero.signbit(), torch.relu(torch.tensor([[[[-0.0]]]], device=device)).signbit())


@pytest.mark.skipif(not ON_GPU, reason="autotune configs compile for a GPU only")
@pytest.mark.parametrize("cfg_index", range(len(kernels.gpu_configs())))
def test_every_shipped_config(cfg_index, device):
    """Each autotune config, not only the winner, passes parity (a config-specific miscompile would hide)."""
    cfg = kernels.gpu_configs()[cfg_index]
    for name in ("stem7x7_s2_C3", "3x3_s2", "3x3_groups8", "3x3_wideC"):
        for dtype in DTYPES:
            x, w, scale, shift, conv, res = make_case(CONV_SHAPES[name], dtype, device, torch.channels_last, True)
            stride, pad, dil = (_pair(conv[k]) for k in ("stride", "padding", "dilation"))
            kc = conv_fit(Tile.of(cfg), w.shape[0] // conv["groups"], w.shape[1]).kwargs()  # the autotuner's own fit
            out = kernels.conv_bn_act(x, w, scale, shift, stride, pad, dil, conv["groups"], res, True, config=kc)
            ref = conv_bn_act_reference(x, w, scale, shift, **conv, residual=res, relu=True)
            assert_close(out, ref, dtype, what=f"{name} {dtype} config {cfg}")


@pytest.mark.skipif(not ON_GPU, reason="TF32 exists on the GPU only")
def test_fp32_follows_cudnn_tf32_switch(device):
    x, w, scale, shift, conv, _ = make_case(CONV_SHAPES["3x3_wideC"], torch.float32, device, torch.channels_last, False)
    ref = conv_bn_act_reference(x, w, scale, shift, **conv)
    torch.backends.cudnn.allow_tf32 = True
    err = (Fz.conv_bn_act(x, w, scale, shift, **conv).double() - ref).norm() / ref.norm()
    assert 1e-5 < err <= 5e-3, f"TF32 on should give TF32-level error, got {err:.2e}"
    torch.backends.cudnn.allow_tf32 = False
    assert_close(Fz.conv_bn_act(x, w, scale, shift, **conv), ref, torch.float32)

