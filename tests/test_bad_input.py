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
