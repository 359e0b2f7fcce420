"""Modern training recipes on the fused kernels (issue 18): stochastic depth (timm's drop_path) and SE / ECA
attention tails, on real timm models (narrowed: one block per stage) where timm imports, else on the
look-alikes of tests/timm_like.py.

- No eager elementwise op touches an activation between the convs, forward and backward: a dispatch mode
  records every aten op on a tensor shaped like an activation ([N, C, H, W] with H * W > 1).
- torch.compile(fullgraph=True) and torch.export run them, in eval and in training, and match the
  uncompiled fused model.
- ECA (the other attention shape) against float64 in eval and by the 2x-eager rule in training.
"""
import copy

import pytest
import torch
from test_timm import _train_step, assert_within_twice_eager, converted
from timm_like import timm_like
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from helpers import assert_close, randomize_bn

BATCH = 2
# Ops allowed on activation-sized tensors: allocation, views, the fused ops themselves, and the model's own
# ops outside the blocks (the stem's max-pool, the head's global average pool and their backward).
ALLOWED = ("empty", "new_empty", "detach", "alias", "view", "expand", "as_strided", "slice", "permute",
           "fusedres.", "max_pool2d", "mean.dim", "div.Scalar")

RECIPES = {  # name -> (timm kwargs, look-alike name)
    "seresnet50": ({}, "seresnet50"),
    "ecaresnet50d": ({}, "ecaresnet50d"),
    "resnet50d-drop_path": ({"drop_path_rate": 0.5}, "resnet50d"),
}


def recipe_model(name: str):
    """Real timm's model narrowed to one block per stage, or the look-alike where timm does not import."""
    kwargs, like = RECIPES[name]
    try:
        import timm
    except Exception:
        return timm_like(like, **kwargs)
    return timm.create_model(name.split("-")[0], num_classes=10, layers=(1, 1, 1, 1), channels=(16, 32, 64, 128),
                             stem_width=8, **kwargs)


class ActivationOps(TorchDispatchMode):
    """The aten ops that read or write an activation-shaped tensor."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        if any(t.dim() == 4 and t.shape[0] == BATCH and t.shape[2] * t.shape[3] > 1 for t in tensors):
            self.ops.append(str(func))
        return out

    def eager(self):
        return sorted({op for op in self.ops if not any(word in op for word in ALLOWED)})


@pytest.mark.parametrize("name", [n if n == "seresnet50" else pytest.param(n, marks=pytest.mark.slow)
                                  for n in RECIPES])  # 12-17 s each interpreted: one in the fast set
def test_training_runs_no_eager_op_on_activations(name, device):
    model = converted(randomize_bn(recipe_model(name))).to(device).train()
    x = torch.randn(BATCH, 3, 64, 64, device=device, requires_grad=True)
    torch.manual_seed(0)
    with ActivationOps() as rec:
        model(x).sum().backward()
    assert any("fusedres.train_chain" in op for op in rec.ops), "the recorder saw no fused op: vacuous"
    if "drop_path" not in name:
        assert any("fusedres.attention_tail" in op for op in rec.ops)
    assert rec.eager() == [], f"eager ops on activations: {rec.eager()}"
    assert x.grad is not None and all(p.grad is not None for p in model.parameters())


def _seeded_step(model, x, train):
    torch.manual_seed(7)
    with torch.set_grad_enabled(train):
        out = model(x)
    if train:
        out.square().mean().backward()
    return out.detach()


@pytest.mark.slow
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("name", list(RECIPES))
def test_compile_fullgraph(name, train, device):
    model = converted(randomize_bn(recipe_model(name))).to(device).train(train)
    uncompiled = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    x = torch.randn(BATCH, 3, 64, 64, device=device)
    assert_close(_seeded_step(compiled, x, train), _seeded_step(uncompiled, x, train).double(), torch.float32)
    if train:
        for (n, p), q in zip(model.named_parameters(), uncompiled.parameters()):
            assert_close(p.grad, q.grad.double(), torch.float32, f"grad {n}")
        for (n, b), c in zip(model.named_buffers(), uncompiled.buffers()):
            if b.dtype.is_floating_point:
                assert_close(b, c.double(), torch.float32, n)
            else:
                assert torch.equal(b, c), n


@pytest.mark.slow
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("name", list(RECIPES))
def test_export(name, train, device):
    model = converted(randomize_bn(recipe_model(name))).to(device).train(train)
    reference = copy.deepcopy(model)
    x = torch.randn(BATCH, 3, 64, 64, device=device)
    exported = torch.export.export(model, (x,))
    targets = {str(n.target) for n in exported.graph.nodes}
    op = "fusedres.train_chain" if train else "fusedres.conv_bn_act"
    assert any(op in t for t in targets), targets
    if "drop_path" not in name:
        assert any(("attention_tail" if train else "gated_tail") in t for t in targets), targets
    torch.manual_seed(7)
    with torch.no_grad():
        out = exported.module()(x)
    torch.manual_seed(7)
    with torch.no_grad():
        want = reference(x)
    assert_close(out, want.double(), torch.float32)


@pytest.mark.slow  # ~17 s
def test_eca_eval_against_float64_and_training_within_twice_eager(device):
    model = randomize_bn(recipe_model("ecaresnet50d")).to(device)
    eager, ref = copy.deepcopy(model), copy.deepcopy(model).double()
    converted(model)
    x = torch.randn(BATCH, 3, 64, 64, device=device)
    with torch.no_grad():
        assert_close(model.eval()(x), ref.eval()(x.double()), torch.float32)
    grad_out = torch.randn(BATCH, 10, device=device, dtype=torch.float64)
    assert_within_twice_eager(_train_step(model.train(), x, grad_out), _train_step(eager.train(), x, grad_out),
                              _train_step(ref.train(), x.double(), grad_out))
