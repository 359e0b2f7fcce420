"""A converted ResNet-50's training step against float64, per tensor within 2x eager fp32's error
(issue 12's acceptance test; the judge's reasoning is in tests/judges.py and RELIABILITY.md).

fp32 ResNet training is chaotic at ReLU kinks: on one draw eager's error at layer4 moved from 1.7e-2 to
1.9e-4 with the input scaled by 1 + 1e-7, and at batch 2 x 64 x 64 about one block-output element of
layer4 per draw lies within fp32's error of its kink, for fused and eager alike (measured: fused 1, 0, 0
and eager 0, 0, 0 flipped signs at layer4.2's output on three draws; a flip moves a bn3.bias gradient
by ~1e-3). Which fp32 computation flips is luck, so eager's error of a draw is the worst of an ensemble
of equally valid fp32 steps (as is, channels_last, and on one-ulp-nudged inputs and parameters): fp32's
envelope, not one run's luck. The verdict per tensor is on medians over DRAWS draws, so a flip in one
draw cannot decide it.
"""
import copy
import statistics

import pytest
import torch
from judges import ATOL, FACTOR

import fusedres
from helpers import randomize_bn, rel_err
from test_properties import nudge_, nudged, train_step

DRAWS = 3
EAGER_RUNS = 4


def _errors(want, got):
    return {k: rel_err(got[k], v) for k, v in want.items() if v.dtype.is_floating_point}


def resnet50_draw(seed):
    """(fused errors, [eager errors per ensemble run]) of one training step, per tensor."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ref = randomize_bn(fusedres.resnet50(fused=False, num_classes=10)).train()
        x = torch.randn(2, 3, 64, 64)
        grad_out = torch.randn(2, 10, dtype=torch.float64)
    want = train_step(copy.deepcopy(ref).double(), x.double(), grad_out, torch.float64)
    fused = fusedres.convert(copy.deepcopy(ref)).train()
    fused_errs = _errors(want, train_step(fused, x, grad_out, torch.float32))
    gen = torch.Generator().manual_seed(seed)
    eager_errs = []
    for i in range(EAGER_RUNS):
        eager, x_i = copy.deepcopy(ref), x
        if i == 1:  # the same step through channels_last kernels: another summation order
            eager, x_i = eager.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
        elif i:
            nudge_(eager, gen)
            x_i = nudged(x, gen)
        eager_errs.append(_errors(want, train_step(eager, x_i, grad_out, torch.float32)))
    return fused_errs, eager_errs


def median_verdicts(draws, scale=1.0):
    """Per tensor: (median fused error over draws, times ``scale``; median over draws of the eager
    ensemble's worst)."""
    out = {}
    for key in draws[0][0]:
        fused = scale * statistics.median(f[key] for f, _ in draws)
        eager = statistics.median(max(run[key] for run in e) for _, e in draws)
        out[key] = (fused, eager)
    return out


def over_twice_eager(verdicts):
    return {k: f"fused {f:.2e} > {FACTOR:g} x eager {e:.2e} + {ATOL:.0e}"
            for k, (f, e) in verdicts.items() if f > FACTOR * e + ATOL}


@pytest.mark.slow  # a whole ResNet-50 trained DRAWS x (1 + EAGER_RUNS) times
def test_converted_resnet50_training_step_within_twice_eager(device):
    """Measured (RELIABILITY.md): fused / eager-envelope median ratio 0.66 over the 269 tensors, max 1.07;
    the same draws with fused errors 3x worse fail on 81 tensors, 4x on 159: the judge is not blind."""
    if device != "cpu":
        pytest.skip("the float64 eager reference of a whole ResNet-50 runs on the CPU here")
    draws = [resnet50_draw(seed) for seed in range(DRAWS)]
    verdicts = median_verdicts(draws)
    assert len(verdicts) == 2 + 161 + 2 * 53  # output, input gradient, parameter gradients, running stats
    bad = over_twice_eager(verdicts)
    assert not bad, f"median over {DRAWS} draws: {bad}"
    caught = over_twice_eager(median_verdicts(draws, scale=4.0))
    assert len(caught) > len(verdicts) // 4, f"a 4x accuracy loss was seen on {len(caught)} tensors only"
