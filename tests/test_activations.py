"""The kernels' one activation switch (ACTIVATION constexpr, kernels/_launch.py ACTIVATIONS): every launcher
refuses a name the kernels do not implement, and "none" turns each site off (the prologue then applies the BN
alone, the gates pass the gradient) against float64 references."""
import torch

from fusedres.kernels import _launch, conv, dgrad, tail, wgrad
from helpers import assert_close


def _case(device, c=8, k=16, h=9):
    x = torch.randn(2, c, h, h, device=device).to(memory_format=torch.channels_last)
    w = (torch.randn(k, c, 3, 3, device=device) / (9 * c) ** 0.5).to(memory_format=torch.channels_last)
    scale, shift = torch.rand(c, device=device) + 0.5, torch.randn(c, device=device)
    return x, w, scale, shift


def _bn(x, scale, shift):
    return x.double() * scale.double()[:, None, None] + shift.double()[:, None, None]


def test_unknown_activation_is_refused_by_every_launcher(device):
    x, w, scale, shift = _case(device)
    dy = torch.randn(2, 16, 9, 9, device=device)
    geo = ((1, 1), (1, 1), (1, 1), 1)
    calls = {
        "conv_bn_act": lambda: conv.conv_bn_act(x, w, scale[:1].expand(16), None, activation="silu"),
        "conv_bn_stats": lambda: conv.conv_bn_stats(x, w, prologue=(scale, shift), activation="silu"),
        "conv_wgrad": lambda: wgrad.conv_wgrad(dy, x, w, *geo, prologue=(scale, shift), activation="silu"),
        "conv_dgrad": lambda: dgrad.conv_dgrad(dy, w, x.shape, *geo, activation="silu"),
        "bn_act": lambda: tail.bn_act(x, scale, shift, activation="silu"),
        "bn_bwd_apply": lambda: tail.bn_bwd_apply(x, x, x, None, scale, shift, scale, shift, activation="silu"),
    }
    for name, call in calls.items():
        try:
            call()
        except ValueError as exc:
            assert "'silu'" in str(exc) and "supported: 'relu', 'none'" in str(exc), (name, exc)
        else:
            raise AssertionError(f"{name} accepted activation 'silu'")
    assert set(_launch.ACTIVATIONS) == {"relu", "none"}


def test_prologue_without_activation_is_the_bn_alone(device):
    """PROLOGUE_BN with ACTIVATION "none": forward conv, wgrad and dgrad read bn(y), zero-padded after it."""
    y, w, scale, shift = _case(device)
    x = _bn(y, scale, shift)  # the conv input: no activation
    ref = torch.nn.functional.conv2d(x, w.double(), padding=1)
    stats = conv.conv_bn_stats(y, w, (1, 1), (1, 1), prologue=(scale, shift), activation="none")
    assert_close(stats.out, ref, torch.float32, "forward prologue")
    relu_out = conv.conv_bn_stats(y, w, (1, 1), (1, 1), prologue=(scale, shift)).out  # default: ReLU
    assert_close(relu_out, torch.nn.functional.conv2d(x.relu(), w.double(), padding=1), torch.float32, "relu")

    dy = torch.randn_like(stats.out)
    geo = ((1, 1), (1, 1), (1, 1), 1)
    dw = wgrad.conv_wgrad(dy, y, w, *geo, prologue=(scale, shift), activation="none")
    assert_close(dw, torch.nn.grad.conv2d_weight(x, w.shape, dy.double(), 1, 1), torch.float32, "wgrad")

    mean, invstd = torch.randn(8, device=device), torch.rand(8, device=device) + 0.5
    d = dgrad.conv_dgrad_bn(dy, w, y.shape, *geo, (y, scale, shift, mean, invstd), activation="none")
    full = torch.nn.grad.conv2d_input(y.shape, w.double(), dy.double(), 1, 1)  # no gate
    xhat = (y.double() - mean.double()[:, None, None]) * invstd.double()[:, None, None]
    assert_close(d.dx, full, torch.float32, "dgrad")
    assert_close(d.sum_g, full.sum((0, 2, 3)), torch.float32, "sum of g")
    assert_close(d.sum_gxhat, (full * xhat).sum((0, 2, 3)), torch.float32, "sum of g*xhat")


def test_tail_without_activation(device):
    """bn_act and the tail's BN backward with ACTIVATION "none": no activation, no gate (the gate tensor unread)."""
    y, _, scale, shift = _case(device)
    res = torch.randn_like(y)
    out = tail.bn_act(y, scale, shift, residual=res, activation="none")
    assert_close(out, _bn(y, scale, shift) + res.double(), torch.float32, "bn_act")
    assert_close(tail.bn_act(y, scale, shift, residual=res), (_bn(y, scale, shift) + res.double()).relu(),
                 torch.float32, "bn_act relu")
    grad, mean, invstd = torch.randn_like(y), torch.randn(8, device=device), torch.rand(8, device=device) + 0.5
    gate = torch.full_like(y, -1.0)  # would zero every gradient under ReLU
    sums = tail.bn_bwd_reduce(grad, gate, y, mean, invstd, activation="none")
    xhat = (y.double() - mean.double()[:, None, None]) * invstd.double()[:, None, None]
    assert_close(sums.sum_g, grad.double().sum((0, 2, 3)), torch.float32, "sum g")
    assert_close(sums.sum_gx, (grad.double() * xhat).sum((0, 2, 3)), torch.float32, "sum g*xhat")
    assert tail.bn_bwd_reduce(grad, gate, y, mean, invstd).sum_g.abs().max().item() == 0  # ReLU: all gated
