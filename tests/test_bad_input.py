"""Bad input gets a clear error naming the argument, what was expected and what was received."""
import pytest
import torch

import fusedres
from fusedres import functional as Fz

x = torch.randn(2, 8, 6, 6)
w = torch.randn(16, 8, 3, 3)
s = torch.rand(16) + 0.5
b = torch.randn(16)
meta = torch.randn(16, device="meta")

# id: (call, exception type, words the message must contain)
CASES = {
    "3-D input": (lambda: Fz.conv_bn_act(x[0], w, s, b), ValueError, ["input", "4-D", "3-D"]),
    "5-D input": (lambda: Fz.conv_bn_act(x[None], w, s, b), ValueError, ["input", "4-D", "5-D"]),
    "integer input": (lambda: Fz.conv_bn_act(x.long(), w, s, b), TypeError, ["input", "floating", "torch.int64"]),
    "not a tensor": (lambda: Fz.conv_bn_act(x.tolist(), w, s, b), TypeError, ["input", "Tensor", "list"]),
    "dtype mismatch": (lambda: Fz.conv_bn_act(x.half(), w, s, b), RuntimeError,
                       ["weight", "torch.float16", "torch.float32"]),
    "wrong channels": (lambda: Fz.conv_bn_act(x[:, :5], w, s, b), RuntimeError, ["input", "8 channels", "got 5"]),
    "mixed devices": (lambda: Fz.conv_bn_act(x, w, meta, b), RuntimeError, ["scale", "same device", "meta"]),
    "scale length": (lambda: Fz.conv_bn_act(x, w, s[:3], b), ValueError, ["scale", "16 elements", "got 3"]),
    "groups not dividing": (lambda: Fz.conv_bn_act(x, w[:15], s[:15], b[:15], groups=2), ValueError,
                            ["groups=2", "weight", "15"]),
    "zero-size output": (lambda: Fz.conv_bn_act(x[:, :, :1, :1], w, s, b), RuntimeError,
                         ["input", "kernel size", "too small"]),
    "bad stride": (lambda: Fz.conv_bn_act(x, w, s, b, stride=0), ValueError, ["stride", ">= 1", "0"]),
    "bad padding type": (lambda: Fz.conv_bn_act(x, w, s, b, padding="same"), TypeError, ["padding", "int", "same"]),
    "residual shape": (lambda: Fz.conv_bn_act(x, w, s, b, padding=1, residual=torch.randn(2, 16, 5, 6)),
                       RuntimeError, ["residual", "[2, <= 16, 6, 6]", "[2, 16, 5, 6]"]),
    "residual dtype": (lambda: Fz.conv_bn_act(x, w, s, b, padding=1, residual=torch.randn(2, 16, 6, 6).half()),
                       RuntimeError, ["residual", "torch.float32", "torch.float16"]),
    "partial shortcut": (lambda: Fz.conv_bn_act(x, w, s, b, padding=1, shortcut_input=x), ValueError,
                         ["shortcut_weight", "together"]),
    "shortcut weight not 1x1": (lambda: Fz.conv_bn_act(x, w, s, b, padding=1, shortcut_input=x, shortcut_weight=w,
                                                      shortcut_scale=s, shortcut_shift=b),
                                ValueError, ["shortcut_weight", "[16, 8, 1, 1]", "[16, 8, 3, 3]"]),
    "block wrong channels": (lambda: fusedres.FusedBasicBlock(4, 4).eval()(x), RuntimeError,
                             ["input", "4 channels", "got 8"]),
    "block 3-D input": (lambda: fusedres.FusedBasicBlock(8, 8).eval()(x[0]), ValueError, ["input", "4-D", "3-D"]),
    "block integer input": (lambda: fusedres.FusedBasicBlock(8, 8).eval()(x.int()), TypeError,
                            ["input", "floating", "torch.int32"]),
    # issue #6 (Reliability): devices ("meta" stands in for a second device on CPU), shapes, types
    "weight on another device": (lambda: Fz.conv_bn_act(x, w.to("meta"), s, b), RuntimeError,
                                 ["weight", "same device as input (cpu)", "meta"]),
    "residual on another device": (lambda: Fz.conv_bn_act(x, w, s, b, padding=1, residual=torch.randn(
        2, 16, 6, 6, device="meta")), RuntimeError, ["residual", "same device as input (cpu)", "meta"]),
    "shortcut_input on another device": (lambda: Fz.conv_bn_act(
        x, w, s, b, padding=1, shortcut_input=x.to("meta"), shortcut_weight=w[:, :, :1, :1], shortcut_scale=s,
        shortcut_shift=b), RuntimeError, ["shortcut_input", "same device as input (cpu)", "meta"]),
    "block parameters on another device": (lambda: fusedres.FusedBasicBlock(8, 8).to("meta").eval()(x), RuntimeError,
                                           ["weight", "same device as input (cpu)", "meta"]),
    "train block parameters on another device": (lambda: fusedres.FusedBasicBlock(8, 8).to("meta").train()(x),
                                                 RuntimeError, ["weight", "same device as input (cpu)", "meta"]),
    "block input on an unsupported device": (lambda: fusedres.FusedBasicBlock(8, 8).eval()(x.to("meta")),
                                             fusedres.FusedResFallbackError, ["FusedBasicBlock", "device type 'meta'"]),
    "train block half input, fp32 weights": (lambda: fusedres.FusedBasicBlock(8, 8).train()(x.half()), RuntimeError,
                                             ["weight", "torch.float16", "torch.float32"]),
    "3-D weight": (lambda: Fz.conv_bn_act(x, w[0], s, b), ValueError, ["weight", "4-D", "3-D", "[8, 3, 3]"]),
    "weight not a tensor": (lambda: Fz.conv_bn_act(x, w.tolist(), s, b), TypeError, ["weight", "Tensor", "list"]),
    "residual with more channels": (lambda: Fz.conv_bn_act(x, w, s, b, padding=1, residual=torch.randn(2, 17, 6, 6)),
                                    RuntimeError, ["residual", "[2, <= 16, 6, 6]", "[2, 17, 6, 6]"]),
    "residual batch": (lambda: Fz.conv_bn_act(x, w, s, b, padding=1, residual=torch.randn(3, 16, 6, 6)),
                       RuntimeError, ["residual", "[2, <= 16, 6, 6]", "[3, 16, 6, 6]"]),
    "3-D residual": (lambda: Fz.conv_bn_act(x, w, s, b, padding=1, residual=torch.randn(16, 6, 6)), ValueError,
                     ["residual", "4-D", "3-D"]),
    "shift length": (lambda: Fz.conv_bn_act(x, w, s, b[:4]), ValueError, ["shift", "16 elements", "got 4"]),
    "2-D scale": (lambda: Fz.conv_bn_act(x, w, s[None], b), ValueError, ["scale", "1-D", "2-D"]),
    "integer scale": (lambda: Fz.conv_bn_act(x, w, s.long(), b), TypeError, ["scale", "floating", "torch.int64"]),
    "groups 0": (lambda: Fz.conv_bn_act(x, w, s, b, groups=0), ValueError, ["groups", "positive int", "0"]),
    "groups float": (lambda: Fz.conv_bn_act(x, w, s, b, groups=2.0), ValueError, ["groups", "positive int", "2.0"]),
    "dilation 0": (lambda: Fz.conv_bn_act(x, w, s, b, dilation=0), ValueError, ["dilation", ">= 1", "0"]),
    "negative padding": (lambda: Fz.conv_bn_act(x, w, s, b, padding=-1), ValueError, ["padding", ">= 0", "-1"]),
    "stride of three": (lambda: Fz.conv_bn_act(x, w, s, b, stride=(1, 1, 1)), TypeError,
                        ["stride", "pair of ints", "(1, 1, 1)"]),
    "zero-height input": (lambda: Fz.conv_bn_act(torch.randn(2, 8, 0, 6), w, s, b, padding=1), RuntimeError,
                          ["input", "[2, 8, 0, 6]", "kernel size [3, 3]", "[0, 6]"]),
    "complex input": (lambda: Fz.conv_bn_act(x.to(torch.complex64), w, s, b), TypeError,
                      ["input", "floating", "torch.complex64"]),
    "shortcut_input spatial size": (lambda: Fz.conv_bn_act(
        x, w, s, b, padding=1, shortcut_input=torch.randn(2, 8, 9, 9), shortcut_weight=w[:, :, :1, :1],
        shortcut_scale=s, shortcut_shift=b), RuntimeError, ["shortcut_input", "6x6", "[2, 8, 9, 9]", "9x9"]),
    "shortcut_weight channels": (lambda: Fz.conv_bn_act(
        x, w, s, b, padding=1, shortcut_input=x, shortcut_weight=torch.randn(16, 4, 1, 1), shortcut_scale=s,
        shortcut_shift=b), RuntimeError, ["shortcut_weight", "[16, 4, 1, 1]", "4 channels", "got 8"]),
    "shortcut_stride per axis": (lambda: Fz.conv_bn_act(
        x, w, s, b, padding=1, shortcut_input=x, shortcut_weight=w[:, :, :1, :1], shortcut_scale=s, shortcut_shift=b,
        shortcut_stride=(1, 2)), ValueError, ["shortcut_stride", "equal along both axes", "(1, 2)"]),
    "shortcut_input dtype": (lambda: Fz.conv_bn_act(
        x, w, s, b, padding=1, shortcut_input=x.double(), shortcut_weight=w[:, :, :1, :1], shortcut_scale=s,
        shortcut_shift=b), RuntimeError, ["shortcut_input", "torch.float32", "torch.float64"]),
    "shortcut_scale length": (lambda: Fz.conv_bn_act(
        x, w, s, b, padding=1, shortcut_input=x, shortcut_weight=w[:, :, :1, :1], shortcut_scale=s[:3],
        shortcut_shift=b), ValueError, ["shortcut_scale", "16 elements", "got 3"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_message(case):
    call, exc, words = CASES[case]
    with pytest.raises(exc) as info:
        call()
    msg = str(info.value)
    missing = [word for word in words if word not in msg]
    assert not missing, f"message lacks {missing}: {msg}"


def test_state_dict_with_missing_or_mismatched_keys():
    block = fusedres.FusedBasicBlock(8, 8)
    sd = block.state_dict()
    del sd["bn2.running_var"]
    with pytest.raises(RuntimeError, match="bn2.running_var"):
        block.load_state_dict(sd, strict=True)
    sd = fusedres.FusedBasicBlock(8, 16, downsample=torch.nn.Sequential(
        fusedres.reference.conv1x1(8, 16), torch.nn.BatchNorm2d(16))).state_dict()
    with pytest.raises(RuntimeError, match="size mismatch for conv1.weight"):
        block.load_state_dict(sd, strict=False)
