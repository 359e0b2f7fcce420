"""20 SGD steps of the paper's CIFAR ResNet-20 with fused blocks track eager PyTorch.

Momentum 0.9 and weight decay 1e-4 as in the paper; the paper's learning rate 0.1 at batch 128,
scaled linearly to this batch of 8. Offline synthetic data (fusedres.data).

Training at batch 8 is chaotic: a 1e-7 difference grows ~1.5x per step. Eager fp32 itself leaves
float64 by 1e-3..5e-2 within 20 steps (measured), so the judge is DESIGN.md section 4's: at every
step and for every parameter and running statistic, |fused - float64| <= 2 |eager fp32 - float64| +
the fp32 tolerance; and the first steps, before the chaos grows, within the fp32 tolerance itself.

Which fp32 trajectory strays furthest is luck (a CPU whose kernels round differently changes it), so
eager's error is the worst of an ensemble of EAGER_RUNS eager fp32 trajectories, one from the exact
start and the others from parameters nudged by one ulp: fp32's chaos envelope, not one run's luck."""
import copy

import pytest
import torch

import fusedres
from fusedres.data import batches, synthetic_cifar
from helpers import TOL, rel_err
from test_properties import nudged

STEPS, BATCH, SIZE = 20, 8, 8
EAGER_RUNS = 4


def train(model, dtype, images, labels, device):
    model.to(device, dtype).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1 * BATCH / 128, momentum=0.9, weight_decay=1e-4)
    data = batches(images, labels, BATCH, seed=1)
    losses = []
    for _ in range(STEPS):
        x, y = next(data)
        loss = torch.nn.functional.cross_entropy(model(x.to(device, dtype)), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses)


def eager_ensemble(model, images, labels, device):
    """EAGER_RUNS fp32 trajectories of ``model`` (the first from its exact parameters): losses, states."""
    gen = torch.Generator().manual_seed(0)
    runs = []
    for i in range(EAGER_RUNS):
        run = copy.deepcopy(model)
        if i:
            with torch.no_grad():
                for t in run.parameters():
                    t.copy_(nudged(t, gen))
        runs.append((train(run, torch.float32, images, labels, device), run.state_dict()))
    return runs


@pytest.mark.slow  # 20 steps of a ResNet-20, fused and EAGER_RUNS + 1 reference trajectories: ~2 minutes
def test_twenty_sgd_steps_track_eager(device):
    images, labels = synthetic_cifar(128, size=SIZE)
    fused = fusedres.cifar_resnet(20)
    eager, eager64 = fusedres.cifar_resnet(20, fused=False), fusedres.cifar_resnet(20, fused=False)
    eager.load_state_dict(fused.state_dict())
    eager64.load_state_dict(fused.state_dict())
    loss = {"fused": train(fused, torch.float32, images, labels, device),
            "ref": train(eager64, torch.float64, images, labels, device)}
    ensemble = eager_ensemble(eager, images, labels, device)
    tol = TOL[torch.float32]
    assert rel_err(loss["fused"][:5], loss["ref"][:5]) <= tol, "first 5 losses"
    for step in range(STEPS):
        e_fused = abs(loss["fused"][step].item() - loss["ref"][step].item())
        e_eager = max(abs(losses[step].item() - loss["ref"][step].item()) for losses, _ in ensemble)
        assert e_fused <= 2 * e_eager + tol * loss["ref"][step].item(), f"loss at step {step + 1}"
    fused_state, ref_state = fused.state_dict(), eager64.state_dict()
    for key, ref in ref_state.items():
        if ref.dtype.is_floating_point:
            e_fused = rel_err(fused_state[key], ref)
            e_eager = max(rel_err(state[key], ref) for _, state in ensemble)
            assert e_fused <= 2 * e_eager + tol, f"{key} after {STEPS} steps: fused {e_fused:.2e}, eager {e_eager:.2e}"
        else:
            assert torch.equal(fused_state[key].cpu(), ref.cpu()), key
