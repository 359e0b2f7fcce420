"""Training mode: forward, gradients and running statistics of the fused blocks against float64 eager.

On CPU these run in the Triton interpreter with FUSEDRES_STRICT=1, so every number below comes from
our kernels (the fallback would raise)."""
import copy
import functools

import pytest
import torch
from torch import nn

import fusedres
from fusedres import kernels, reference
from fusedres.kernels import bn as bn_k
from helpers import BLOCKS, TOL, assert_close, build_pair, rel_err, relu_margin

# Gradients pass through one more rounding of the activation dtype per conv than the forward does;
# fp16 is held to the forward tolerance where eager itself stays under it, see test_fp16_grads_vs_eager.
TRAIN_SHAPES = {"odd_9x7": (3, 9, 7), "batch1_5x5": (1, 5, 5)}


def output_shape(model, x):
    with torch.no_grad():
        return copy.deepcopy(model).eval()(x.to(next(model.parameters()).dtype)).shape


def kink_free_input(ref, draw, band=5e-6, tries=20):
    """A draw whose ReLU inputs (float64 reference, train mode) all stay clear of 0 by ``band`` (see relu_margin)."""
    for _ in range(tries):
        x = draw()
        if relu_margin(ref, x)[0] > band:
            return x
    raise AssertionError(f"no draw in {tries} kept every ReLU input {band} away from 0")


def run_train_step(model, x, grad_out):
    x = x.clone().requires_grad_()
    out = model(x)
    out.backward(grad_out.to(out.dtype))
    return out, x.grad


def compare_block(fused, ref, dtype, what=""):
    for (name, p), p_ref in zip(fused.named_parameters(), ref.parameters()):
        assert p.grad is not None, f"{what}: no gradient for {name}"
        assert_close(p.grad, p_ref.grad, dtype, what=f"{what} grad {name}")
    for (name, b), b_ref in zip(fused.named_buffers(), ref.buffers()):
        if b.dtype.is_floating_point:
            assert_close(b, b_ref, dtype, what=f"{what} buffer {name}")
        else:
            assert torch.equal(b.cpu(), b_ref.cpu()), f"{what}: {name} {b} != {b_ref}"


@pytest.mark.parametrize("fmt", ["nchw", "nhwc"])
@pytest.mark.parametrize("shape", list(TRAIN_SHAPES))
@pytest.mark.parametrize("name", list(BLOCKS))
def test_block_train_parity_fp32(name, shape, fmt, device):
    fused, ref, cin = build_pair(name)
    fused, ref = fused.to(device).train(), ref.to(device, torch.float64).train()
    n, h, w = TRAIN_SHAPES[shape]
    memfmt = torch.channels_last if fmt == "nhwc" else torch.contiguous_format
    x = kink_free_input(ref, lambda: torch.randn(n, cin, h, w, device=device).to(memory_format=memfmt))
    grad_out = torch.randn(output_shape(ref, x), device=device, dtype=torch.float64)
    out_ref, dx_ref = run_train_step(ref, x.double(), grad_out)
    out, dx = run_train_step(fused, x, grad_out)
    assert out.is_contiguous(memory_format=memfmt)
    assert_close(out, out_ref, torch.float32, "output")
    assert_close(dx, dx_ref, torch.float32, "input gradient")
    compare_block(fused, ref, torch.float32, name)


@pytest.mark.parametrize("name", ["basic_proj_s2", "bottleneck_proj_s2", "basic_optionA_s2"])
def test_fp16_within_twice_eager_error(name, device):
    """fp16 training: the fused error against float64 is at most twice eager fp16's, plus atol.

    Summed over several draws: in fp16 a few ReLU outputs near 0 round to the other side, in eager
    and fused alike but at different places, and one draw's gradient error is mostly which of those
    flipped (measured: single draws range 6e-4..5e-2 for both, the sums agree within 10%)."""
    errors = {}
    for _ in range(5):
        fused, ref, cin = build_pair(name)
        eager = build_pair(name)[1]
        eager.load_state_dict(fused.state_dict())
        fused, eager = fused.to(device, torch.float16).train(), eager.to(device, torch.float16).train()
        ref = ref.to(device, torch.float64).train()
        x = torch.randn(4, cin, 8, 8, device=device)
        grad_out = torch.randn(output_shape(ref, x), device=device, dtype=torch.float64)
        models = {"ref": (ref, torch.float64), "fused": (fused, torch.float16), "eager": (eager, torch.float16)}
        got = {}
        for key, (model, dt) in models.items():
            out, dx = run_train_step(model, x.to(dt), grad_out)
            got[key] = {"output": out, "input grad": dx, **{f"grad {n}": p.grad for n, p in model.named_parameters()}}
        for what in got["ref"]:
            e = errors.setdefault(what, [0.0, 0.0])
            e[0] += rel_err(got["fused"][what], got["ref"][what])
            e[1] += rel_err(got["eager"][what], got["ref"][what])
    for what, (e_fused, e_eager) in errors.items():
        assert e_fused <= 2 * e_eager + TOL[torch.float16], f"{name} {what}: fused {e_fused:.2e}, eager {e_eager:.2e}"
    assert errors["output"][0] <= 5 * TOL[torch.float16], "fp16 forward is held to the table's tolerance"


@pytest.mark.parametrize("bn_kwargs", [dict(momentum=None), dict(affine=False), dict(momentum=0.3, eps=1e-3),
                                       dict(track_running_stats=False)],
                         ids=["cumulative", "no_affine", "momentum_eps", "no_running_stats"])
def test_batchnorm_options_match_eager(bn_kwargs, device):
    norm = functools.partial(nn.BatchNorm2d, **bn_kwargs)
    ds = lambda: nn.Sequential(reference.conv1x1(8, 16, 2), norm(16))  # noqa: E731
    fused = fusedres.FusedBasicBlock(8, 16, 2, ds(), norm_layer=norm).to(device).train()
    ref = reference.BasicBlock(8, 16, 2, ds(), norm_layer=norm).to(device, torch.float64).train()
    ref.load_state_dict(fused.state_dict())
    for step in range(3):  # several steps: the cumulative average and num_batches_tracked move
        x = torch.randn(4, 8, 6, 6, device=device) + step
        grad_out = torch.randn(4, 16, 3, 3, device=device)
        out, dx = run_train_step(fused, x, grad_out)
        out_ref, dx_ref = run_train_step(ref, x.double(), grad_out.double())
        assert_close(out, out_ref, torch.float32, f"step {step} output")
        assert_close(dx, dx_ref, torch.float32, f"step {step} input grad")
    compare_block(fused, ref, torch.float32, str(bn_kwargs))
    fused.eval()
    ref.eval()
    with torch.no_grad():  # eval after training: running statistics (or batch statistics without them)
        x = torch.randn(2, 8, 6, 6, device=device)
        assert_close(fused(x), ref(x.double()), torch.float32, "eval after training")


def test_single_value_per_channel_raises_like_pytorch(device):
    fused = fusedres.FusedBasicBlock(4, 4).to(device).train()
    ref = reference.BasicBlock(4, 4).to(device).train()
    x = torch.randn(1, 4, 1, 1, device=device)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training") as eager_err:
        ref(x)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training") as fused_err:
        fused(x)
    assert str(fused_err.value) == str(eager_err.value)


def test_residual_that_does_not_fit_raises(device):
    block = fusedres.FusedBasicBlock(8, 16, 2).to(device).train()  # no downsample: identity cannot fit
    with pytest.raises(RuntimeError, match="16 channels for the identity shortcut.*with 8 channels"):
        block(torch.randn(2, 8, 6, 6, device=device))


def test_bn_finalize_is_stable_when_mean_dwarfs_std(device):
    """Chan's merge of per-tile (mean, M2): exact-ish where sum(y^2) - sum(y)^2/n would lose it all."""
    k, tile, tiles = 8, 64, 300  # 300 tiles: several BLOCK_T blocks merged across, plus a ragged last tile
    m = tile * tiles - 17
    y = (500.0 + torch.randn(m, k, device=device, dtype=torch.float64)).float()
    pm = torch.zeros(tiles, k, device=device)
    pm2 = torch.zeros(tiles, k, device=device)
    for t in range(tiles):
        chunk = y[t * tile:(t + 1) * tile].double()
        pm[t] = chunk.mean(0).float()
        pm2[t] = ((chunk - chunk.mean(0)) ** 2).sum(0).float()
    mean, invstd, *_ = bn_k.bn_finalize(pm, pm2, tile, m, None, None, 0.0)
    var_ref, mean_ref = torch.var_mean(y.double(), dim=0, unbiased=False)
    assert rel_err(mean, mean_ref) < 1e-7
    assert rel_err(invstd.double() ** -2, var_ref) < 1e-5
    naive = (y.double().pow(2).sum(0).float() - y.double().sum(0).float() ** 2 / m) / m
    assert rel_err(naive, var_ref) > 1e-3, "the test data must defeat the naive formula"


def test_conv_stats_epilogue_with_large_mean(device):
    x = 300.0 + torch.randn(4, 3, 20, 20, device=device)
    w = torch.rand(8, 3, 1, 1, device=device)
    y, pm, pm2, tile = kernels.conv.conv_bn_stats(x, w)
    mean, invstd, *_ = bn_k.bn_finalize(pm, pm2, tile, y.numel() // 8, None, None, 0.0)
    var_ref, mean_ref = torch.var_mean(y.double(), dim=(0, 2, 3), unbiased=False)
    assert rel_err(mean, mean_ref) < 1e-6  # fp32 results: the ulp of 300 is 3e-5, relative 1e-7
    assert rel_err(invstd.double() ** -2, var_ref) < 1e-4


def test_gradcheck_float64(device):
    """torch.autograd.gradcheck through the whole fused block (input, conv weights, BN affine)."""
    block = fusedres.FusedBasicBlock(3, 4, 2, nn.Sequential(reference.conv1x1(3, 4, 2), nn.BatchNorm2d(4)))
    block = block.to(device, torch.float64).train()
    names = [n for n, _ in block.named_parameters()]

    def f(x, *params):
        return torch.func.functional_call(block, dict(zip(names, params)), (x,))

    x = torch.randn(2, 3, 5, 5, device=device, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in block.parameters()]
    assert torch.autograd.gradcheck(f, (x, *params), fast_mode=True)


def test_chain_outputs_and_grads_pack_unpack_roundtrip():
    """The custom ops' flat lists and the named tuples: one layout, absent tensors back as None."""
    from fusedres.chain import BNStats, ChainGrads, ChainOutputs

    def t(*shape):
        return torch.randn(*shape)
    stats = [BNStats(t(4), t(4), t(4), t(4)) for _ in range(3)]
    res = ChainOutputs(t(2, 4, 3, 3), None, None, [t(2, 4, 3, 3)], stats, [t(4), None, t(4)], [t(4), None, t(4)])
    back = ChainOutputs.unpack(res.pack(), num_layers=3)
    assert back.yd is None and back.running_means[1] is None and back.running_vars[1] is None
    assert len(back.ys) == 1 and torch.equal(back.ys[0], res.ys[0]) and torch.equal(back.out, res.out)
    for a, b in zip(back.stats, stats):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    grads = ChainGrads(None, [t(4, 2, 1, 1), None], [t(4), None], [t(4), None])
    back = ChainGrads.unpack(grads.pack(res.out))
    assert back.dx is None and back.dweights[1] is None and back.dgammas[1] is None and back.dbetas[1] is None
    assert torch.equal(back.dweights[0], grads.dweights[0]) and torch.equal(back.dbetas[0], grads.dbetas[0])


class _Twice(nn.Module):
    """One block called twice in one model call: its BNs update twice, each from the previous update."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block(self.block(x))


def test_running_statistics_written_once_per_call(device):
    """A converted model's training step writes every running statistic and num_batches_tracked of all its
    blocks with one _foreach_copy_ and one _foreach_add_ (fusedres._running)."""
    from test_no_torch_compute import RecordOps
    model = fusedres.convert(nn.Sequential(reference.BasicBlock(8, 8), reference.BasicBlock(8, 8))).to(device)
    with RecordOps() as rec:
        model.train()(torch.randn(2, 8, 6, 6, device=device))
    ops = [op for op in rec.ops if "copy_" in op or "add_" in op]
    assert ops == ["aten._foreach_add_.Scalar", "aten._foreach_copy_.default"], ops


@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_statistics_of_a_block_called_twice(momentum, device):
    """The values are eager's when one block runs twice in one call (its second update reads the first)."""
    eager = _Twice(reference.BasicBlock(8, 8))
    for m in eager.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum
    fused = fusedres.convert(copy.deepcopy(eager)).to(device).train()
    eager = eager.double().to(device).train()
    for step in range(2):
        x = torch.randn(2, 8, 6, 6, device=device)
        fused(x)
        eager(x.double())
        for (name, b), e in zip(fused.named_buffers(), eager.buffers()):
            if b.dtype.is_floating_point:
                assert_close(b, e, torch.float32, f"step {step} {name}")
            else:
                assert torch.equal(b, e), name


class _Raise(nn.Module):
    def forward(self, x):
        raise RuntimeError("a layer after the block fails")


def test_a_raising_call_still_writes_the_running_statistics_of_what_ran(device):
    model = fusedres.convert(nn.Sequential(reference.BasicBlock(8, 8), _Raise())).to(device).train()
    bn = model[0].bn1
    before, mean = bn.num_batches_tracked.clone(), bn.running_mean.clone()
    with pytest.raises(RuntimeError, match="fails"):
        model(torch.randn(2, 8, 6, 6, device=device))
    assert bn.num_batches_tracked == before + 1 and not torch.equal(bn.running_mean, mean)
    model[1] = nn.Identity()
    model(torch.randn(2, 8, 6, 6, device=device))  # and the next call writes as before
    assert bn.num_batches_tracked == before + 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_prologue_factors_rounded_once_by_the_finalize(dtype, device, monkeypatch):
    """A bf16 chain hands each next conv its BN scale and shift already rounded to bf16 by the finalize (the packed
    prologue would round them in every k-step: issue 17 item 2), and not a bit of the training step changes;
    fp32 (and fp16) chains keep fp32 factors."""
    from fusedres import chain
    seen = []
    real_conv = chain.conv_bn_stats

    def spy(x, weight, *args, prologue=None, **kw):
        seen.append(None if prologue is None else (prologue[0].dtype, prologue[1].dtype))
        return real_conv(x, weight, *args, prologue=prologue, **kw)

    monkeypatch.setattr(chain, "conv_bn_stats", spy)
    fused = build_pair("bottleneck_proj_s2")[0].to(device, dtype).train()
    x = torch.randn(2, 64, 8, 8, device=device, dtype=dtype).to(memory_format=torch.channels_last)
    grad_out = torch.randn_like(fused(x))
    steps, forwards = [], []
    for rounded in (True, False):
        if not rounded:  # the same step with fp32 factors: the conv rounds them itself
            monkeypatch.setattr(chain, "prologue_math", lambda y: "acc")
        model = copy.deepcopy(fused)
        xi = x.clone().requires_grad_()
        seen.clear()
        out = model(xi)
        forwards.append(list(seen))
        out.backward(grad_out)
        steps.append([out, xi.grad, *(p.grad for p in model.parameters()), *model.buffers()])
    factor = (dtype,) * 2 if dtype == torch.bfloat16 else (torch.float32,) * 2
    fp32 = (torch.float32,) * 2
    assert forwards == [[None, factor, factor, None], [None, fp32, fp32, None]]  # conv1-3 (2, 3: prologues), proj.
    n_fwd = 1 + len(list(fused.parameters()))
    outs = [[st[0], *st[n_fwd:]] for st in steps]  # the output and the running statistics: not a bit changes
    assert all(torch.equal(a, b) for a, b in zip(*outs))
    if dtype != torch.bfloat16:
        assert all(torch.equal(a, b) for a, b in zip(*steps))
    # bf16 gradients: dgrad's ReLU gate now reads the factors the forward applied, so elements on the ReLU
    # boundary may flip against the fp32-factor gate (tests/test_conv_prologue.py: the gate follows the forward)
