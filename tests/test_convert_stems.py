"""convert() fuses torchvision's ResNet stem too: a converted torchvision ResNet runs no aten conv / BN in
forward or backward (only fc and maxpool stay eager), keeps every object and key, and matches float64;
summary() and the one convert warning say what was fused; fallback warnings point at the user's line.

torchvision does not import beside the local torch 2.13 CPU build: the models here are torchvision's
layout (tests/timm_like.py), with real torchvision's models added where it imports."""
import copy
import io
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.distributed as dist
from test_distributed import free_port
from test_no_torch_compute import RecordOps
from torch import nn
from torchvision_like import ResNet, torchvision_resnet

import fusedres
from helpers import TOL, assert_close, randomize_bn, rel_err

TORCHVISION_NAMES = ["resnet18", "resnet50", "resnext50_32x4d"]


# narrow torchvision layouts (interpreter-cheap): block type and grouped convs as in the named model
LAYOUTS = {"resnet18": dict(bottleneck=False), "resnet50": dict(bottleneck=True),
           "resnext50_32x4d": dict(bottleneck=True, groups=4, base_width=16)}


def torchvision_model(name, source):
    if source == "torchvision":
        try:
            import torchvision
        except Exception as exc:  # absent, or built for another torch
            pytest.skip(f"torchvision does not import here: {type(exc).__name__}: {exc}")
        return getattr(torchvision.models, name)(num_classes=10)
    return torchvision_resnet(**LAYOUTS[name])


def convert_quietly(model):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # everything fuses: no warning at all
        return fusedres.convert(model)


# real torchvision models (full width, where torchvision imports) are slow: 1-5 minutes each interpreted
@pytest.mark.parametrize("source", ["layout", pytest.param("torchvision", marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", TORCHVISION_NAMES)
def test_converted_torchvision_resnet_runs_no_aten_conv_or_bn(name, source, device):
    """Training forward and backward of the whole model: only fc (addmm) and maxpool stay PyTorch's."""
    model = torchvision_model(name, source).to(device).train()
    objects, keys = dict(model.named_modules()), list(model.state_dict())
    convert_quietly(model)
    assert type(model).__name__ == "FusedStemResNet"
    assert {n: id(m) for n, m in model.named_modules()} == {n: id(m) for n, m in objects.items()}
    assert list(model.state_dict()) == keys
    x = torch.randn(2, 3, 32, 32, device=device, requires_grad=True)
    with RecordOps() as rec:
        model(x).sum().backward()
    assert rec.forbidden() == [], f"PyTorch conv/BN ran: {rec.forbidden()}"
    assert any("max_pool" in op for op in rec.ops) and any("addmm" in op for op in rec.ops)
    assert x.grad is not None and all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("bottleneck", [True])  # basic blocks: test_timm.py's train parity
def test_stem_parity_eval_and_training(bottleneck, device):
    model = randomize_bn(torchvision_resnet(bottleneck)).to(device)
    eager, ref = copy.deepcopy(model), copy.deepcopy(model).double()
    convert_quietly(model)
    x = torch.randn(2, 3, 32, 32, device=device)
    with torch.no_grad():
        assert_close(model.eval()(x), ref.eval()(x.double()), torch.float32, "eval output")
    x = torch.randn(2, 3, 64, 64, device=device)  # training: 2x2 pixels (8 values per BN channel) at the end
    results = []
    for m, dt in ((model, torch.float32), (eager, torch.float32), (ref, torch.float64)):
        m.train().zero_grad()
        out = m(x.to(dt))
        out.square().sum().backward()
        results.append({"output": out.detach(), **{f"grad {n}": p.grad for n, p in m.named_parameters()},
                        **{n: b for n, b in m.named_buffers() if b.dtype.is_floating_point}})
    fused, eager_r, ref_r = results
    for what in ref_r:
        e_fused, e_eager = rel_err(fused[what], ref_r[what]), rel_err(eager_r[what], ref_r[what])
        assert e_fused <= 2 * e_eager + TOL[torch.float32], f"{what}: fused {e_fused:.2e}, eager {e_eager:.2e}"


def test_checkpoints_load_both_ways():
    model = convert_quietly(torchvision_resnet(True))
    plain = torchvision_resnet(True)
    plain.load_state_dict(randomize_bn(model).state_dict(), strict=True)
    model.load_state_dict(randomize_bn(torchvision_resnet(True)).state_dict(), strict=True)
    assert list(model.state_dict()) == list(plain.state_dict())


def test_summary_has_a_line_per_block_and_stem():
    model = torchvision_resnet(True)
    before = fusedres.summary(model, file=io.StringIO())
    assert "stem eager" in before and "not converted" in before
    model.layer2[0].bn1 = nn.GroupNorm(2, 16)
    with pytest.warns(UserWarning, match="layer2.0.*GroupNorm.*layer2.0.conv1, layer2.0.bn1"):
        fusedres.convert(model)
    out = io.StringIO()
    text = fusedres.summary(model, file=out)
    assert out.getvalue().strip() == text
    lines = text.splitlines()
    assert len(lines) == 1 + 4 + 1  # stem, 4 blocks, the total
    assert lines[0].split()[:3] == ["<model>", "FusedStemResNet", "stem"] and "stem fused" in lines[0]
    assert "1 launch" in lines[0]
    assert "layer1.0" in lines[1] and " fused " in lines[1] and "3 launch" in lines[1]
    assert "layer2.0" in lines[2] and " eager " in lines[2] and "GroupNorm" in lines[2]
    assert lines[-1].startswith("4 of 5 blocks / stems fused; 8 conv / BN layer(s) eager: layer2.0.conv1, ")


def test_unfusable_stem_is_named_in_the_one_warning():
    model = torchvision_resnet(False)
    model.bn1 = nn.GroupNorm(2, 8)
    with pytest.warns(UserWarning) as record:
        fusedres.convert(model)
    messages = [str(w.message) for w in record if "fusedres.convert" in str(w.message)]
    assert len(messages) == 1
    assert "<model> stem" in messages[0] and "GroupNorm" in messages[0] and "stay eager: conv1, bn1" in messages[0]
    assert type(model) is ResNet and type(model.layer1[0]).__name__ == "FusedBasicBlock"


def test_fallback_warning_points_at_the_callers_line(monkeypatch):
    monkeypatch.setenv("FUSEDRES_STRICT", "0")
    monkeypatch.setattr(fusedres._dispatch, "_warned", set())
    model = nn.Sequential(nn.Sequential(fusedres.convert(torchvision_resnet(False)).layer1)).train()
    model[0][0][0].bn2.eval()  # a frozen BN inside a training block: that block falls back
    with pytest.warns(fusedres.FusedResFallbackWarning) as record:
        model(torch.randn(2, 8, 8, 8))  # through torch's Module.__call__ and Sequential.forward, 3 deep
    assert [os.path.basename(w.filename) for w in record] == [os.path.basename(__file__)]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_syncbn_whole_converted_torchvision_resnet_two_ranks():
    """nn.SyncBatchNorm.convert_sync_batchnorm + convert on a whole torchvision-shaped ResNet, stem included,
    over 2 gloo ranks: each rank's output, the summed gradients and the running statistics equal eager
    BatchNorm over the whole batch in float64."""
    port, world = free_port(), 2
    here = os.path.dirname(__file__)
    env = dict(os.environ, TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "1"), FUSEDRES_STRICT="1",
               PYTHONPATH=os.pathsep.join([here, os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, os.path.join(here, "_dist_stem_worker.py"), str(rank), str(world),
                               str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in range(world)]
    results = [p.communicate(timeout=300) for p in procs]
    for rank, (p, (out, err)) in enumerate(zip(procs, results)):
        assert p.returncode == 0, f"rank {rank} failed:\n{out}\n{err[-3000:]}"
        assert f"rank {rank} OK" in out
