"""fusedres.precompile: a no-op that says so in the interpreter; with a GPU target (a real one, or sm_90 compiled
without a GPU in a subprocess, where TRITON_INTERPRET is unset) it compiles the step's variants and leaves the
model untouched: parameters, buffers (running statistics, num_batches_tracked) and gradients."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fusedres
from fusedres import _precompile as pc

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(model, before) -> bool:
    after = model.state_dict()
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's no-op")
def test_interpreter_no_op_says_so():
    model = fusedres.cifar_resnet(20).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    before = _state(model)
    rep = fusedres.precompile(model, x, train=True)
    assert (rep.target, rep.launches, rep.compiled) == ("interpreter", 0, 0)
    assert "interpreter" in rep.note and rep.seconds < 1.0
    assert _same_state(model, before) and all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        fusedres.precompile(model, x, arch=90)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_precompile_then_step_compiles_nothing_more():
    model = fusedres.cifar_resnet(20).cuda().to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 32, 32, device="cuda").to(memory_format=torch.channels_last)
    before = _state(model)
    rep = fusedres.precompile(model, x, train=True)
    assert rep.compiled > 0 and rep.target.startswith("sm_")
    assert _same_state(model, before) and all(p.grad is None for p in model.parameters())
    model(x).sum().backward()  # the real step: autotuning still times configs, but each one is compiled
    assert fusedres.precompile(model, x, train=True).compiled == 0


# Runs in a fresh process without TRITON_INTERPRET: the kernels are real @triton.jit functions compiled for sm_90.
_SCRIPT = textwrap.dedent("""
    import json, sys, time, torch, fusedres
    from fusedres._precompile import count_variants
    torch.use_deterministic_algorithms(True)  # fixed tiles, no autotuning: one config per launch, few variants
    model = fusedres.FusedBasicBlock(16, 16).to(memory_format=torch.channels_last)
    x = torch.randn(2, 16, 8, 8).to(memory_format=torch.channels_last)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = dict(train=count_variants(model, x, True, arch=90), eval=count_variants(model, x, False, arch=90))
    if sys.argv[1] == "compile":
        rep = fusedres.precompile(model.eval(), x, train=False, workers=2, arch=90)
        out.update(compiled=rep.compiled, seconds=rep.seconds, target=rep.target,
                   again=fusedres.precompile(model, x, train=False, workers=2, arch=90).compiled)
    after = model.state_dict()
    out["untouched"] = all(torch.equal(before[k], after[k]) for k in before)
    out["grads"] = sum(p.grad is not None for p in model.parameters())
    print(json.dumps(out))
""")


def _compile_only(what: str, tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    run = subprocess.run([sys.executable, "-c", _SCRIPT, what], cwd=_ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_compile_only_count_leaves_the_model_untouched(tmp_path):
    out = _compile_only("count", tmp_path)
    assert out["untouched"] and out["grads"] == 0, "the step ran on a meta copy"
    assert 0 < out["eval"] < out["train"], out


@pytest.mark.slow
def test_compile_only_precompile_compiles_each_variant_once(tmp_path):
    out = _compile_only("compile", tmp_path)
    assert out["target"] == "sm_90" and out["compiled"] == out["eval"], out
    assert out["again"] == 0, "a second call finds every variant in Triton's cache"
    assert out["untouched"] and out["grads"] == 0


def test_meta_copy_shares_nothing_with_the_model():
    model = fusedres.cifar_resnet(20)
    replica = pc._meta_copy(model)
    assert all(p.is_meta for p in replica.parameters()) and all(b.is_meta for b in replica.buffers())
    assert [p.shape for p in replica.parameters()] == [p.shape for p in model.parameters()]
    assert not any(p.is_meta for p in model.parameters())


def test_resnet50_training_step_compile_budget():
    """Issue 17 item 8: a ResNet-50 training step (bf16, batch 128, 224 px, sm_90) compiles at most 90 kernel
    variants (186 before do_not_specialize / ONE_TAP); counted from Triton's compile keys, compiling none."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, os.path.join(_ROOT, "benchmarks", "cold_start.py"), "--budget"], cwd=_ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
