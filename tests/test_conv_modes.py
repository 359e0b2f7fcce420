"""The conv kernel's modes beyond conv_bn_act's scale/shift epilogue, against float64 references:
eval BN given as a BNFold (folded on the host; affine=False, conv bias, the projection's BN), the raw conv
(no scale/shift tensors at all), the projection shortcut and its precomputed fold, and the C <= 4 stem path.
Small shapes."""
import pytest
import torch
from torch import nn

import fusedres
from fusedres import functional as Fz
from fusedres import kernels
from fusedres._fold import of_module as eval_bn
from fusedres.blocks import folded_bn
from fusedres.reference import conv_bn_act_reference
from helpers import DTYPES, assert_close, randomize_bn

CL = torch.channels_last


def _bn(k, affine=True, stats_dtype=torch.float32, device="cpu"):
    bn = randomize_bn(nn.BatchNorm2d(k, affine=affine, eps=1e-3)).eval().to(device)
    return bn.to(stats_dtype)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("affine,bias", [(True, False), (False, False), (True, True)], ids=["affine", "no_affine",
                                                                                           "conv_bias"])
def test_bn_fold_matches_host_fold(affine, bias, dtype, device):
    """BNFold gives what folded_bn's scale/shift give, compared with the float64 reference."""
    torch.manual_seed(1)
    conv = nn.Conv2d(8, 24, 3, padding=1, bias=bias).to(device)
    bn = _bn(24, affine, device=device)
    x = torch.randn(2, 8, 7, 9, device=device, dtype=dtype).to(memory_format=CL)
    w = conv.weight.detach().to(dtype)
    out = Fz.conv_bn_act(x, w, None, None, 1, 1, relu=True, bn=eval_bn(conv, bn))
    scale, shift = folded_bn(conv, bn, torch.float64)
    ref = conv_bn_act_reference(x, w, scale, shift, 1, 1, relu=True)
    assert out.dtype == dtype and out.is_contiguous(memory_format=CL)
    assert_close(out, ref, dtype)
    if dtype == torch.float64:  # the fold runs in fp64
        assert (out - ref).abs().max().item() < 1e-12


@pytest.mark.parametrize("stats_dtype", [torch.float16, torch.float64], ids=str)
def test_bn_fold_upcasts_statistics_of_any_dtype(stats_dtype, device):
    conv = nn.Conv2d(4, 16, 1, bias=False).to(device)
    bn = _bn(16, stats_dtype=stats_dtype, device=device)
    x = torch.randn(2, 4, 5, 5, device=device)
    out = Fz.conv_bn_act(x, conv.weight.detach(), bn=eval_bn(conv, bn))
    scale, shift = folded_bn(conv, bn, torch.float64)
    assert_close(out, conv_bn_act_reference(x, conv.weight, scale, shift), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_projection_shortcut_bn_fold(dtype, device):
    torch.manual_seed(2)
    y1 = torch.randn(2, 16, 5, 5, device=device, dtype=dtype).to(memory_format=CL)
    x = torch.randn(2, 12, 9, 9, device=device, dtype=dtype).to(memory_format=CL)
    conv2, convd = nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.Conv2d(12, 32, 1, stride=2, bias=False)
    bn2, bnd = _bn(32, device=device), _bn(32, affine=False, device=device)
    w2, wd = conv2.weight.detach().to(device, dtype), convd.weight.detach().to(device, dtype)
    out = Fz.conv_bn_act(y1, w2, None, None, 1, 1, relu=True, bn=eval_bn(conv2, bn2), shortcut_input=x,
                         shortcut_weight=wd, shortcut_bn=eval_bn(convd, bnd), shortcut_stride=2)
    s2, b2 = folded_bn(conv2, bn2, torch.float64)
    sd, bd = folded_bn(convd, bnd, torch.float64)
    ref = conv_bn_act_reference(y1, w2, s2, b2, 1, 1, relu=True, shortcut_input=x, shortcut_weight=wd,
                                shortcut_scale=sd, shortcut_shift=bd, shortcut_stride=2)
    assert_close(out, ref, dtype)


def test_launcher_takes_a_named_shortcut_and_its_fold(device):
    """kernels.conv_bn_act: a ProjectionShortcut with its precomputed ``fold`` (what the fused modules pass)
    launches exactly what the plain 5-tuple with scale/shift (folded by the launcher) launches, and
    functional.conv_bn_act's ``shortcut_fold`` matches the float64 reference."""
    torch.manual_seed(3)
    y1 = torch.randn(2, 16, 5, 5, device=device).to(memory_format=CL)
    x = torch.randn(2, 12, 9, 9, device=device).to(memory_format=CL)
    conv2, convd = nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.Conv2d(12, 32, 1, stride=2, bias=False)
    w2, wd = conv2.weight.detach().to(device), convd.weight.detach().to(device)
    s2, b2 = folded_bn(conv2, _bn(32, device=device), torch.float32)
    sd, bd = folded_bn(convd, _bn(32, device=device), torch.float32)
    sd[3] = 0.0  # a dead shortcut column: not read
    geo = ((1, 1), (1, 1), (1, 1), 1)
    fold = kernels.conv.projection_fold(s2, b2, sd, bd, torch.float32)
    named = kernels.conv_bn_act(y1, w2, None, None, *geo, None, True, kernels.ProjectionShortcut(x, wd, stride=2,
                                                                                                fold=fold))
    positional = kernels.conv_bn_act(y1, w2, s2, b2, *geo, None, True, (x, wd, sd, bd, 2))
    assert torch.equal(named, positional)
    out = Fz.conv_bn_act(y1, w2, None, None, 1, 1, relu=True, shortcut_input=x, shortcut_weight=wd,
                         shortcut_stride=2, shortcut_fold=fold)
    ref = conv_bn_act_reference(y1, w2, s2, b2, 1, 1, relu=True, shortcut_input=x, shortcut_weight=wd,
                                shortcut_scale=sd, shortcut_shift=bd, shortcut_stride=2)
    assert_close(out, ref, torch.float32)
    with pytest.raises(ValueError, match="either shortcut_fold or"):
        Fz.conv_bn_act(y1, w2, s2, b2, 1, 1, shortcut_input=x, shortcut_weight=wd, shortcut_stride=2,
                       shortcut_fold=fold)
    with pytest.raises(ValueError, match=r"shortcut_fold to be a floating \[4, 32\]"):
        Fz.conv_bn_act(y1, w2, None, None, 1, 1, shortcut_input=x, shortcut_weight=wd, shortcut_stride=2,
                       shortcut_fold=fold[:3])


def test_bn_and_scale_together_is_an_error(device):
    conv, bn = nn.Conv2d(4, 8, 1, bias=False), _bn(8)
    x, w = torch.randn(1, 4, 3, 3), conv.weight.detach()
    with pytest.raises(ValueError, match="either bn or scale"):
        Fz.conv_bn_act(x, w, torch.ones(8), None, bn=eval_bn(conv, bn))
    with pytest.raises(ValueError, match="bn.running_var.*8 elements"):
        Fz.conv_bn_act(x, w, bn=Fz.BNFold(bn.running_mean, bn.running_var[:3], None, None, 1e-5))


def test_int64_pixel_split_matches_int32(device, monkeypatch):
    """Pixel indices are split in int32 (no 64-bit division routine in the kernel) unless M + BLOCK_M reaches
    2**31; the int64 split, forced here on a small conv, gives the same output bit for bit."""
    from fusedres.kernels import _launch
    assert _launch.rows_need_int64(2 ** 31 - 128, 128) and not _launch.rows_need_int64(2 ** 31 - 129, 128)
    x = torch.randn(3, 8, 9, 7, device=device).to(memory_format=CL)
    w = torch.randn(16, 8, 3, 3, device=device) / 8
    scale, shift = torch.rand(16, device=device) + 0.5, torch.randn(16, device=device)
    int32 = kernels.conv_bn_act(x, w, scale, shift, (2, 1), (1, 1), relu=True)
    monkeypatch.setattr(kernels.conv, "rows_need_int64", lambda m, block_m: True)
    assert torch.equal(kernels.conv_bn_act(x, w, scale, shift, (2, 1), (1, 1), relu=True), int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_raw_conv_without_scale_tensors(dtype, device):
    """No scale/shift at all (the STATS convs' case): the raw conv, no identity tensors made."""
    x = torch.randn(2, 6, 8, 8, device=device, dtype=dtype)
    w = torch.randn(10, 6, 3, 3, device=device, dtype=dtype) / 5
    out = kernels.conv_bn_act(x, w, None, None, (2, 2), (1, 1))
    ref = torch.nn.functional.conv2d(x.double(), w.double(), stride=2, padding=1)
    assert_close(out, ref, dtype)


def test_eval_block_forward_host_ops(device):
    """Eval BN is folded once per module (fusedres._fold): from its second call on, a channels_last fused
    block's forward dispatches nothing but its three fused ops; the first call folds each BN once."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    down = nn.Sequential(nn.Conv2d(16, 16, 1, 2, bias=False), nn.BatchNorm2d(16))
    block = randomize_bn(fusedres.FusedBottleneck(16, 4, 2, down)).eval().to(device, memory_format=CL)
    x = torch.randn(2, 16, 8, 8, device=device).to(memory_format=CL)
    with torch.no_grad(), Record():
        block(x)
    first = [op for op in seen if not op.startswith("fusedres.")]
    assert 0 < len(first) <= 4 * 16, first  # 4 BNs (one in the projection's fold), each a few [K] ops
    seen.clear()
    with torch.no_grad(), Record():
        block(x)
    assert seen == ["fusedres.conv_bn_act.default"] * 3, seen


# (C, K, kernel, stride, padding, dilation): the C <= 4 stem path, incl. ResNet's 7x7 / 2 / pad 3
STEMS = {"resnet_7x7_s2_p3_C3": (3, 8, (7, 7), 2, (3, 3), (1, 1)), "C1_3x3": (1, 4, (3, 3), 1, (1, 1), (1, 1)),
         "C4_3x5_dilh2": (4, 6, (3, 5), (2, 1), (2, 2), (2, 1)), "C2_1x11": (2, 8, (1, 11), 1, (0, 5), (1, 1))}


@pytest.mark.parametrize("fmt", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("name", list(STEMS))
def test_stem_path_matches_float64(name, dtype, fmt, device):
    """C <= 4 runs the stem path (channels padded to 4, one K-step per filter row)."""
    c, k, ks, stride, pad, dil = STEMS[name]
    torch.manual_seed(3)
    x = torch.randn(2, c, 13, 11, device=device, dtype=dtype)
    x = x.to(memory_format=CL) if fmt == "nhwc" else x
    w = torch.randn(k, c, *ks, device=device, dtype=dtype) / (c * ks[0] * ks[1]) ** 0.5
    scale, shift = torch.rand(k, device=device) + 0.5, torch.randn(k, device=device)
    stride = stride if isinstance(stride, tuple) else (stride, stride)
    out = kernels.conv_bn_act(x, w, scale, shift, stride, pad, dil, relu=True)
    ref = conv_bn_act_reference(x, w, scale, shift, stride, pad, dil, relu=True)
    assert_close(out, ref, dtype)
    assert out.is_contiguous(memory_format=CL if fmt == "nhwc" else torch.contiguous_format)


def test_stem_path_statistics(device):
    """The training stem (STATS, no scale) on the stem path: raw output and per-tile partials."""
    x = torch.randn(2, 3, 15, 15, device=device)
    w = torch.randn(8, 3, 7, 7, device=device) / 10
    y, pm, pm2, block_m = kernels.conv.conv_bn_stats(x, w, (2, 2), (3, 3))
    ref = torch.nn.functional.conv2d(x.double(), w.double(), stride=2, padding=3)
    assert_close(y, ref, torch.float32)
    rows = ref.permute(0, 2, 3, 1).reshape(-1, 8)
    for t in range(pm.shape[0]):
        tile = rows[t * block_m:(t + 1) * block_m]
        torch.testing.assert_close(pm[t].double(), tile.mean(0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pm2[t].double(), ((tile - tile.mean(0)) ** 2).sum(0), rtol=1e-4, atol=1e-4)


def test_stem_copy_holds_the_padding():
    """The stem paths' copy (pad_channels_nhwc with the conv's padding): dense NHWC, x in the middle, zero channels
    past C and zero rows and columns around each image, from either memory format."""
    from fusedres.kernels._launch import pad_channels_nhwc
    x = torch.randn(2, 3, 5, 7)
    for t in (x, x.to(memory_format=CL)):
        out = pad_channels_nhwc(t, 4, (3, 2))
        dense = out.permute(0, 2, 3, 1) if out.dim() == 4 and out.shape[1] == 4 else out
        assert dense.shape == (2, 11, 11, 4) and dense.is_contiguous()
        torch.testing.assert_close(dense[:, 3:8, 2:9, :3], x.permute(0, 2, 3, 1), rtol=0, atol=0)
        inner = torch.zeros_like(dense, dtype=torch.bool)
        inner[:, 3:8, 2:9, :3] = True
        assert (dense[~inner] == 0).all()


@pytest.mark.parametrize("stride", [1, 2])
def test_stem_path_non_finite_input_reaches_its_outputs_only(stride, device):
    """A NaN / inf pixel reaches exactly the outputs whose window holds it, as in float64 conv2d: the stem path's
    padded copy and its filter-row runs (8 pixels read per 7x7 row, the 8th masked) add no other reader."""
    x = torch.randn(1, 3, 16, 16, device=device)
    x[0, 1, 6, 9] = float("nan")
    x[0, 2, 11, 4] = float("inf")
    w = torch.randn(8, 3, 7, 7, device=device) / 10
    out = kernels.conv_bn_act(x, w, None, None, (stride, stride), (3, 3), (1, 1), relu=False)
    ref = torch.nn.functional.conv2d(x.double(), w.double(), stride=stride, padding=3)
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
    finite = ref.isfinite()
    torch.testing.assert_close(out[finite].double(), ref[finite], rtol=1e-4, atol=1e-4)


def test_opcheck_shortcut_fold_schema(device):
    """fusedres::conv_bn_act with a precomputed projection fold (what the fused blocks pass) passes
    torch.library.opcheck."""
    x, w = torch.randn(2, 8, 7, 7, device=device), torch.randn(16, 8, 3, 3, device=device)
    xd, wd = torch.randn(2, 4, 13, 13, device=device), torch.randn(16, 4, 1, 1, device=device)
    fold = kernels.conv.projection_fold(torch.rand(16, device=device) + 0.5, torch.randn(16, device=device),
                                        torch.rand(16, device=device) + 0.5, torch.randn(16, device=device),
                                        torch.float32)
    args = (x, w, None, None, [1, 1], [1, 1], [1, 1], 1, None, True, xd, wd, None, None, 2, fold)
    torch.library.opcheck(torch.ops.fusedres.conv_bn_act.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                      "test_aot_dispatch_dynamic"))
