"""Eval BN folded once per module (fusedres._fold, issue 17 item 7): the cached (scale, shift) and projection fold
stay valid across calls (no fold op in the steady state) and are refolded whenever a BN tensor changes:
in-place writes, load_state_dict, an optimizer step after training, .to(dtype) (also .half().float(), whose
fp32 storage may come back at the old address), inference_mode, and eval() after writes through .data.
Each case compares the fused block with a float64 reference block holding the same state."""
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fusedres import _fold
from helpers import assert_close, build_pair

F32 = torch.float32
CL = torch.channels_last


class _Ops(TorchDispatchMode):
    """The ops dispatched (a custom op counts as one: its body runs below the mode)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))

    @property
    def host_math(self):
        return [op for op in self.seen if not op.startswith("fusedres.")]


def _pair(device, name="basic_proj_s2"):
    """A fused block and its float64 reference, channels_last (so no per-call weight repacking), and an input."""
    fused, ref, cin = build_pair(name)
    x = torch.randn(2, cin, 8, 8, device=device).to(memory_format=CL)
    return fused.to(device, memory_format=CL), ref.to(device, torch.float64), x


def _check(fused, ref, x, what, dtype=F32):
    ref.load_state_dict(fused.state_dict())
    assert_close(fused(x.to(dtype)), ref(x.double()), dtype, what)


def test_fold_runs_once_then_no_host_math(device):
    fused, ref, x = _pair(device)
    with torch.no_grad():
        with _Ops() as first:
            fused(x)
        with _Ops() as second:
            out = fused(x)
    assert first.host_math, "the first call folds the BNs"
    assert second.host_math == [] and second.seen == ["fusedres.conv_bn_act.default"] * 2, second.seen
    ref.load_state_dict(fused.state_dict())
    with torch.no_grad():
        assert_close(out, ref(x.double()), F32)


def test_in_place_running_var_edit_refolds(device):
    fused, ref, x = _pair(device)
    with torch.no_grad():
        fused(x)
        fused.bn2.running_var.mul_(3)               # the projection fold's main BN
        fused.downsample[1].running_mean.add_(0.5)  # its shortcut BN
        fused.bn1.bias.copy_(torch.randn_like(fused.bn1.bias))
        _check(fused, ref, x, "after in-place edits")


def test_load_state_dict_refolds(device):
    fused, ref, x = _pair(device)
    other, _, _ = build_pair("basic_proj_s2")
    with torch.no_grad():
        fused(x)
        fused.load_state_dict(other.state_dict())
        _check(fused, ref, x, "after load_state_dict")
        fused.load_state_dict(copy.deepcopy(fused.state_dict()), assign=True)  # new tensors
        fused.bn1.running_var.add_(1.0)
        _check(fused, ref, x, "after load_state_dict(assign=True)")


def test_train_step_then_eval_refolds(device):
    fused, ref, x = _pair(device)
    with torch.no_grad():
        fused(x)
    fused.train()
    opt = torch.optim.SGD(fused.parameters(), lr=0.5)
    fused(x).square().mean().backward()  # new running statistics
    opt.step()                           # new gamma / beta
    fused.eval()
    with torch.no_grad():
        _check(fused, ref, x, "after a training step")
    opt.step()  # a step in eval mode (frozen-BN fine-tuning): only the version counters tell
    with torch.no_grad():
        _check(fused, ref, x, "after an optimizer step in eval mode")


def test_dtype_changes_refold(device):
    fused, ref, x = _pair(device)
    with torch.no_grad():
        fused(x)
        fused.double()
        _check(fused, ref, x, "after .double()", torch.float64)
        fused.float()
        fused(x)
        fused.half().float()  # parameters keep their object and version; the values are now fp16-rounded
        _check(fused, ref, x, "after .half().float()")


def test_inference_mode(device):
    fused, ref, x = _pair(device)
    with torch.inference_mode():
        fused(x)
        fused.bn1.running_var.mul_(2)  # a normal tensor edited under inference_mode bumps its version
        out = fused(x)
    ref.load_state_dict(fused.state_dict())
    with torch.no_grad():
        assert_close(out, ref(x.double()), F32, "edit under inference_mode")
    with torch.inference_mode():  # a model made under inference_mode has inference tensors: no version counter
        inf, _, _ = build_pair("basic_proj_s2")
        inf.to(device)
        inf(x)
        inf.bn2.running_var.mul_(2)
        inf.downsample[1].weight.mul_(-1)
        out = inf(x)
    ref.load_state_dict(inf.state_dict())
    with torch.no_grad():
        assert_close(out, ref(x.double()), F32, "inference tensors")


def test_cache_is_not_state(device):
    """No new buffer, parameter or attribute: the cache lives outside the module (weak keys)."""
    fused, _, x = _pair(device)
    keys, attrs = list(fused.state_dict()), set(vars(fused)) | set(vars(fused.bn1))
    with torch.no_grad():
        fused(x)
    assert list(fused.state_dict()) == keys and set(vars(fused)) | set(vars(fused.bn1)) == attrs
    assert fused.bn1 in _fold._CACHE
    fused.eval()
    assert fused.bn1 not in _fold._CACHE  # train()/eval() drops the block's folds


@pytest.mark.parametrize("name", ["basic_identity", "bottleneck_proj_s2"])
def test_compile_fullgraph_traces_the_fold(name, device):
    """Under torch.compile the fold is traced into the graph (no cache read there): an in-place edit between
    calls shows without recompiling."""
    fused, ref, x = _pair(device, name)
    backend = "aot_eager" if device == "cpu" else "inductor"
    compiled = torch.compile(fused, fullgraph=True, backend=backend)
    with torch.no_grad():
        compiled(x)
        fused.bn2.running_var.mul_(2)
        ref.load_state_dict(fused.state_dict())
        assert_close(compiled(x), ref(x.double()), F32, "compiled, after an in-place edit")
