"""Bad input gets a clear error naming the argument, what was expected and what was received: on the test
device, and on CPU tensors where the kernels are not interpreted (a GPU machine's), where it must come before
the fused path's own error (the first GPU run gave the block cases the path's)."""
import pytest
import torch

import fusedres
from fusedres import _dispatch
from fusedres import functional as Fz


def _cases(x, w, s, b, meta, r, dev):
    """id: (call, exception type, words the message must contain), over the given tensors: x [2, 8, 6, 6], w
    [16, 8, 3, 3], s and b [16], meta [16] on the meta device, r(*shape) a random tensor, all on device dev."""
    return {
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
        "residual shape": (lambda: Fz.conv_bn_act(x, w, s, b, padding=1, residual=r(2, 16, 5, 6)),
                           RuntimeError, ["residual", "[2, <= 16, 6, 6]", "[2, 16, 5, 6]"]),
        "residual dtype": (lambda: Fz.conv_bn_act(x, w, s, b, padding=1, residual=r(2, 16, 6, 6).half()),
                           RuntimeError, ["residual", "torch.float32", "torch.float16"]),
        "partial shortcut": (lambda: Fz.conv_bn_act(x, w, s, b, padding=1, shortcut_input=x), ValueError,
                             ["shortcut_weight", "together"]),
        "shortcut weight not 1x1": (lambda: Fz.conv_bn_act(x, w, s, b, padding=1, shortcut_input=x, shortcut_weight=w,
                                                          shortcut_scale=s, shortcut_shift=b),
                                    ValueError, ["shortcut_weight", "[16, 8, 1, 1]", "[16, 8, 3, 3]"]),
        "block wrong channels": (lambda: fusedres.FusedBasicBlock(4, 4).to(dev).eval()(x), RuntimeError,
                                 ["input", "4 channels", "got 8"]),
        "block 3-D input": (lambda: fusedres.FusedBasicBlock(8, 8).to(dev).eval()(x[0]), ValueError,
                            ["input", "4-D", "3-D"]),
        "block integer input": (lambda: fusedres.FusedBasicBlock(8, 8).to(dev).eval()(x.int()), TypeError,
                                ["input", "floating", "torch.int32"]),
        # issue #6 (Reliability): devices ("meta" stands in for a second device on CPU), shapes, types
        "weight on another device": (lambda: Fz.conv_bn_act(x, w.to("meta"), s, b), RuntimeError,
                                     ["weight", f"same device as input ({dev})", "meta"]),
        "residual on another device": (lambda: Fz.conv_bn_act(x, w, s, b, padding=1, residual=torch.randn(
            2, 16, 6, 6, device="meta")), RuntimeError, ["residual", f"same device as input ({dev})", "meta"]),
        "shortcut_input on another device": (lambda: Fz.conv_bn_act(
            x, w, s, b, padding=1, shortcut_input=x.to("meta"), shortcut_weight=w[:, :, :1, :1], shortcut_scale=s,
            shortcut_shift=b), RuntimeError, ["shortcut_input", f"same device as input ({dev})", "meta"]),
        "block parameters on another device": (lambda: fusedres.FusedBasicBlock(8, 8).to("meta").eval()(x),
                                               RuntimeError, ["weight", f"same device as input ({dev})", "meta"]),
        "train block parameters on another device": (lambda: fusedres.FusedBasicBlock(8, 8).to("meta").train()(x),
                                                     RuntimeError, ["weight", f"same device as input ({dev})", "meta"]),
        # a block and its input on a device the kernels do not run on: the path's error (the input is fine)
        "block on an unsupported device": (lambda: fusedres.FusedBasicBlock(8, 8).to("meta").eval()(x.to("meta")),
                                           fusedres.FusedResFallbackError, ["FusedBasicBlock", "device type 'meta'"]),
        # an input on another device than the block's parameters: an argument error, whichever device is unsupported
        "block input on another device": (lambda: fusedres.FusedBasicBlock(8, 8).to(dev).eval()(x.to("meta")),
                                          RuntimeError, ["weight", "same device as input (meta)", dev]),
        "model stem wrong channels": (lambda: fusedres.resnet18().to(dev).eval()(r(1, 4, 16, 16)), RuntimeError,
                                      ["input", "3 channels", "got 4"]),
        "train block half input, fp32 weights": (lambda: fusedres.FusedBasicBlock(8, 8).to(dev).train()(x.half()),
                                                 RuntimeError, ["weight", "torch.float16", "torch.float32"]),
        "3-D weight": (lambda: Fz.conv_bn_act(x, w[0], s, b), ValueError, ["weight", "4-D", "3-D", "[8, 3, 3]"]),
        "weight not a tensor": (lambda: Fz.conv_bn_act(x, w.tolist(), s, b), TypeError, ["weight", "Tensor", "list"]),
        "residual with more channels": (lambda: Fz.conv_bn_act(x, w, s, b, padding=1, residual=r(2, 17, 6, 6)),
                                        RuntimeError, ["residual", "[2, <= 16, 6, 6]", "[2, 17, 6, 6]"]),
        "residual batch": (lambda: Fz.conv_bn_act(x, w, s, b, padding=1, residual=r(3, 16, 6, 6)),
                           RuntimeError, ["residual", "[2, <= 16, 6, 6]", "[3, 16, 6, 6]"]),
        "3-D residual": (lambda: Fz.conv_bn_act(x, w, s, b, padding=1, residual=r(16, 6, 6)), ValueError,
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
        "zero-height input": (lambda: Fz.conv_bn_act(r(2, 8, 0, 6), w, s, b, padding=1), RuntimeError,
                              ["input", "[2, 8, 0, 6]", "kernel size [3, 3]", "[0, 6]"]),
        "complex input": (lambda: Fz.conv_bn_act(x.to(torch.complex64), w, s, b), TypeError,
                          ["input", "floating", "torch.complex64"]),
        "shortcut_input spatial size": (lambda: Fz.conv_bn_act(
            x, w, s, b, padding=1, shortcut_input=r(2, 8, 9, 9), shortcut_weight=w[:, :, :1, :1],
            shortcut_scale=s, shortcut_shift=b), RuntimeError, ["shortcut_input", "6x6", "[2, 8, 9, 9]", "9x9"]),
        "shortcut_weight channels": (lambda: Fz.conv_bn_act(
            x, w, s, b, padding=1, shortcut_input=x, shortcut_weight=r(16, 4, 1, 1), shortcut_scale=s,
            shortcut_shift=b), RuntimeError, ["shortcut_weight", "[16, 4, 1, 1]", "4 channels", "got 8"]),
        "shortcut_stride per axis": (lambda: Fz.conv_bn_act(
            x, w, s, b, padding=1, shortcut_input=x, shortcut_weight=w[:, :, :1, :1], shortcut_scale=s,
            shortcut_shift=b, shortcut_stride=(1, 2)), ValueError,
            ["shortcut_stride", "equal along both axes", "(1, 2)"]),
        "shortcut_input dtype": (lambda: Fz.conv_bn_act(
            x, w, s, b, padding=1, shortcut_input=x.double(), shortcut_weight=w[:, :, :1, :1], shortcut_scale=s,
            shortcut_shift=b), RuntimeError, ["shortcut_input", "torch.float32", "torch.float64"]),
        "shortcut_scale length": (lambda: Fz.conv_bn_act(
            x, w, s, b, padding=1, shortcut_input=x, shortcut_weight=w[:, :, :1, :1], shortcut_scale=s[:3],
            shortcut_shift=b), ValueError, ["shortcut_scale", "16 elements", "got 3"]),
    }


CASES = list(_cases(*[None] * 7))  # the ids (no call is made)


def _run_case(case, device):
    x = torch.randn(2, 8, 6, 6, device=device)
    call, exc, words = _cases(x, torch.randn(16, 8, 3, 3, device=device), torch.rand(16, device=device) + 0.5,
                              torch.randn(16, device=device), torch.randn(16, device="meta"),
                              lambda *shape: torch.randn(*shape, device=device), str(x.device))[case]
    with pytest.raises(exc) as info:
        call()
    msg = str(info.value)
    missing = [word for word in words if word not in msg]
    assert not missing, f"message lacks {missing}: {msg}"


@pytest.mark.parametrize("case", CASES)
def test_bad_input_message(case, device):
    _run_case(case, device)


@pytest.mark.parametrize("case", CASES)
def test_bad_input_message_before_the_path_error(case, monkeypatch):
    """CPU tensors where the kernels are not interpreted (a GPU machine's): the fused path cannot run them, and
    bad input still gets its argument error, not the path's (FUSEDRES_STRICT=1: the path's is an error too)."""
    monkeypatch.setattr(_dispatch, "interpreted", lambda: False)
    monkeypatch.setenv("FUSEDRES_STRICT", "1")
    assert _dispatch.unsupported_device_reason(torch.device("cpu")) is not None
    _run_case(case, "cpu")


def test_good_input_without_the_interpreter_gets_the_path_error(monkeypatch):
    """The same check's other side: valid CPU input there gets the path's error, naming TRITON_INTERPRET."""
    monkeypatch.setattr(_dispatch, "interpreted", lambda: False)
    monkeypatch.setenv("FUSEDRES_STRICT", "1")
    x = torch.randn(2, 8, 6, 6)
    for call in (lambda: fusedres.FusedBasicBlock(8, 8).eval()(x), lambda: fusedres.FusedBasicBlock(8, 8).train()(x),
                 lambda: Fz.conv_bn_act(x, torch.randn(16, 8, 3, 3), padding=1)):
        with pytest.raises(fusedres.FusedResFallbackError, match="TRITON_INTERPRET=1"):
            call()


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
