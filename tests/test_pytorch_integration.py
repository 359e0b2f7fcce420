"""The fused ops as PyTorch citizens: torch.library custom ops (opcheck), torch.compile with fullgraph,
torch.export, and (on a GPU) Inductor and CUDA graphs."""
import copy

import pytest
import torch
from torch import nn

import fusedres
from fusedres import reference
from fusedres.chain import BNState, BNStats, ChainOutputs, ChainParams, ChainSpec
from helpers import ON_GPU, TOL, assert_close, randomize_bn, rel_err

OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def test_ops_are_registered():
    for name in ("conv_bn_act", "train_chain", "train_chain_backward", "attention_tail", "attention_tail_backward",
                 "image_mean", "gated_tail"):
        assert hasattr(torch.ops.fusedres, name), name


@pytest.mark.parametrize("case", ["plain", "residual_relu", "projection", "option_a"])
def test_opcheck_conv_bn_act(case, device):
    x = torch.randn(2, 8, 7, 7, device=device)
    w = torch.randn(16, 8, 3, 3, device=device)
    scale, shift = torch.rand(16, device=device) + 0.5, torch.randn(16, device=device)
    residual, sc = None, [None, None, None, None, 1]
    if case == "residual_relu":
        residual = torch.randn(2, 16, 7, 7, device=device)
    if case == "option_a":
        residual = torch.randn(2, 4, 14, 14, device=device)[:, :, ::2, ::2]
    if case == "projection":
        sc = [torch.randn(2, 4, 13, 13, device=device), torch.randn(16, 4, 1, 1, device=device),
              torch.rand(16, device=device), torch.randn(16, device=device), 2]
    args = (x, w, scale, shift, [1, 1], [1, 1], [1, 1], 1, residual, case != "plain", *sc)
    torch.library.opcheck(torch.ops.fusedres.conv_bn_act.default, args, test_utils=OPCHECK_TESTS)


def _chain_args(kind, device, recompute=False, tail="relu", row_scale=False):
    """train_chain arguments for a basic block (conv1/bn1, conv2/bn2 [, projection]) with fresh BNs."""
    block = fusedres.FusedBasicBlock(8, 16, 2, nn.Sequential(reference.conv1x1(8, 16, 2), nn.BatchNorm2d(16))
                                     if kind == "projection" else fusedres.PadChannelsShortcut(8, 16, 2)).to(device)
    layers = [(block.conv1, block.bn1), (block.conv2, block.bn2)]
    if kind == "projection":
        layers.append((block.downsample[0], block.downsample[1]))
    for _, bn in layers:  # the op must not write them: opcheck compares its inputs before and after
        bn.running_mean, bn.running_var = bn.running_mean.clone(), bn.running_var.clone()
    x = torch.randn(3, 8, 8, 8, device=device, requires_grad=True)
    states = [BNState.of(bn) for _, bn in layers]
    scale = torch.rand(3, device=device) if row_scale else None
    return x, ChainParams.build([c.weight for c, _ in layers], states, scale), \
        ChainSpec.build([c for c, _ in layers], states, kind, 2, recompute, tail=tail)


@pytest.mark.parametrize("kind,recompute,tail,row_scale", [("projection", False, "relu", False),
                                                           ("A", True, "relu", True),
                                                           ("projection", False, "attention", True)])
def test_opcheck_train_chain(kind, recompute, tail, row_scale, device):
    x, params, spec = _chain_args(kind, device, recompute, tail, row_scale)
    torch.library.opcheck(torch.ops.fusedres.train_chain.default, (x, *params, *spec), test_utils=OPCHECK_TESTS)


@pytest.mark.parametrize("tail", ["relu", "attention"])
def test_opcheck_train_chain_backward(tail, device):
    x, params, spec = _chain_args("projection", device, tail=tail, row_scale=True)
    with torch.no_grad():
        res = ChainOutputs.unpack(torch.ops.fusedres.train_chain(x, *params, *spec), spec.num_layers)
    weights, gammas = [w.detach() for w in params.weights], [g.detach() for g in params.gammas]
    attention = [] if tail == "relu" else [torch.randn_like(res.ys[-1]), torch.randn(16, device=device),
                                           torch.randn(16, device=device), torch.randn_like(res.yd),
                                           torch.randn(16, device=device), torch.randn(16, device=device), None]
    bwd_args = (torch.randn_like(res.out), attention, x.detach(), res.out, res.yd, res.ys, weights, gammas,
                BNStats.flatten(res.stats), params.row_scale, [True] * 4, *spec)
    torch.library.opcheck(torch.ops.fusedres.train_chain_backward.default, bwd_args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("shortcut", ["identity", "projection"])
def test_opcheck_attention_tail(shortcut, device):
    def t(*shape, positive=False):
        v = torch.randn(*shape, device=device)
        return (v.abs() + 0.5 if positive else v).requires_grad_()
    y = t(2, 16, 5, 5)
    proj = [None] * 5 if shortcut == "identity" else [t(2, 16, 5, 5), t(16), t(16, positive=True), t(16), t(16)]
    gate, row_scale = torch.rand(2, 16, device=device), torch.rand(2, device=device)
    args = (y, t(16), t(16, positive=True), t(16), t(16), gate, row_scale,
            t(2, 16, 5, 5) if shortcut == "identity" else None, None, *proj, True)
    torch.library.opcheck(torch.ops.fusedres.attention_tail.default, args, test_utils=OPCHECK_TESTS)


def _twins(train: bool, device):
    """A fused model and an uncompiled copy of it."""
    torch.manual_seed(0)
    fused = randomize_bn(fusedres.cifar_resnet(8, "B")).to(device).train(train)
    return fused, copy.deepcopy(fused)


def _backend(device):
    return "aot_eager" if device == "cpu" else "inductor"  # Inductor cannot compile for the interpreter


def test_compile_fullgraph_eval_matches_uncompiled(device):
    fused, uncompiled = _twins(False, device)
    compiled = torch.compile(fused, fullgraph=True, backend=_backend(device))
    x = torch.randn(2, 3, 16, 16, device=device)
    with torch.no_grad():
        assert torch.equal(compiled(x), uncompiled(x))


@pytest.mark.slow  # ~30 s interpreted; the fast set compiles a training model in test_timm (train=True)
def test_compile_fullgraph_train_matches_uncompiled(device):
    """Same outputs, gradients and running statistics as the uncompiled fused model, over two steps."""
    fused, uncompiled = _twins(True, device)
    compiled = torch.compile(fused, fullgraph=True, backend=_backend(device))
    for step in range(2):
        x = torch.randn(4, 3, 16, 16, device=device)
        outs = []
        for model in (compiled, uncompiled):
            model.zero_grad()
            out = model(x)
            out.square().mean().backward()
            outs.append(out.detach())
        assert_close(outs[0], outs[1].double(), torch.float32, what=f"step {step} output")
    for (name, p), q in zip(fused.named_parameters(), uncompiled.parameters()):
        assert_close(p.grad, q.grad.double(), torch.float32, what=f"grad {name}")
    for (name, b), c in zip(fused.named_buffers(), uncompiled.buffers()):
        if b.dtype.is_floating_point:
            assert_close(b, c.double(), torch.float32, what=name)
        else:
            assert torch.equal(b, c), name


def test_export_eval_model(device):
    fused, _ = _twins(False, device)
    x = torch.randn(2, 3, 16, 16, device=device)
    exported = torch.export.export(fused, (x,))
    assert any("fusedres.conv_bn_act" in str(n.target) for n in exported.graph.nodes), \
        "the fused op must be in the graph"
    with torch.no_grad():
        assert torch.equal(exported.module()(x), fused(x))


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_cuda_graph_replay(device):
    fused, _ = _twins(False, device)
    x = torch.randn(8, 3, 32, 32, device=device)
    with torch.no_grad():
        want = fused(x)  # warm-up: autotuning happens here, never during capture
        graph = torch.cuda.CUDAGraph()
        static_x = x.clone()
        with torch.cuda.graph(graph):
            static_out = fused(static_x)
        new_x = torch.randn_like(x)
        static_x.copy_(new_x)
        graph.replay()
        assert_close(static_out, fused(new_x).double(), torch.float32)
        assert want.shape == static_out.shape


@pytest.mark.skipif(not ON_GPU, reason="Inductor with reduce-overhead (CUDA graphs) needs a GPU")
def test_compile_reduce_overhead(device):
    fused, uncompiled = _twins(False, device)
    compiled = torch.compile(fused, mode="reduce-overhead")
    x = torch.randn(8, 3, 32, 32, device=device)
    with torch.no_grad():
        for _ in range(3):
            out = compiled(x)
        assert_close(out, uncompiled(x).double(), torch.float32)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_autocast_computes_in_the_autocast_dtype(mode, device):
    """Under torch.autocast the fused blocks compute in its dtype as eager convolutions do; BN statistics
    and the master weights stay fp32, and the error stays within twice eager's under the same autocast."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float16  # bf16 is broken in the CPU interpreter
    block = randomize_bn(fusedres.FusedBottleneck(32, 8, 2, nn.Sequential(reference.conv1x1(32, 32, 2),
                                                                        nn.BatchNorm2d(32)))).to(device)
    eager = reference.Bottleneck(32, 8, 2, nn.Sequential(reference.conv1x1(32, 32, 2), nn.BatchNorm2d(32)))
    eager.load_state_dict(block.state_dict())
    ref = copy.deepcopy(eager).double()
    eager.to(device)
    ref.to(device)
    for m in (block, eager, ref):
        m.train(mode == "train")
    x = torch.randn(4, 32, 8, 8, device=device)
    with torch.autocast(device, dtype=dtype):
        out, out_eager = block(x), eager(x)
    want = ref(x.double())
    assert out.dtype == out_eager.dtype == dtype
    assert block.bn1.running_mean.dtype == torch.float32
    err, err_eager = rel_err(out, want), rel_err(out_eager, want)
    assert err <= 2 * err_eager + TOL[torch.float32], f"fused {err:.2e}, eager {err_eager:.2e}"
    if mode == "train":
        out.float().square().mean().backward()
        assert block.conv1.weight.grad.dtype == torch.float32
        for name in ("running_mean", "running_var"):
            assert_close(getattr(block.bn2, name), getattr(ref.bn2, name), torch.float16, what=name)


def test_deterministic_mode_is_bitwise_repeatable(device):
    fused, _ = _twins(True, device)
    x = torch.randn(4, 3, 16, 16, device=device)
    runs = []
    saved = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for _ in range(2):
            model = copy.deepcopy(fused)
            out = model(x)
            out.square().mean().backward()
            runs.append([out] + [p.grad for p in model.parameters()] + list(model.buffers()))
    finally:
        torch.use_deterministic_algorithms(saved)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_gpu():
    """Kernels launch on the tensor's device, not the current one."""
    fused, _ = _twins(False, "cuda:1")
    ref = fusedres.cifar_resnet(8, "B", fused=False).eval()
    ref.load_state_dict(fused.state_dict())
    x = torch.randn(2, 3, 16, 16, device="cuda:1")
    with torch.no_grad():
        out = fused(x)
        want = ref.to("cuda:1").double()(x.double())
    assert out.device == x.device
    assert_close(out, want, torch.float32)
