"""The suite, level by level, each against eager PyTorch and torch.compile (see _suite.py for the cases):

- layer: one fused ``conv_bn_act`` launch per distinct ResNet-50 conv (with its ReLU / residual /
  projection epilogue), batch 64 and 256;
- block: each distinct basic block (ResNet-18) and bottleneck (ResNet-50);
- model: ResNet-50, ResNet-18 and the CIFAR ResNet-56.

Run with ``pytest benchmarks/ --benchmark-only``; conftest.py says how a case is timed.
"""
import pytest
from _suite import block_cases, layer_cases, model_cases, params


@pytest.mark.parametrize("case", params(layer_cases()))
def test_layer(case, time_case):
    time_case(case)


@pytest.mark.parametrize("case", params(block_cases()))
def test_block(case, time_case):
    time_case(case)


@pytest.mark.parametrize("case", params(model_cases()))
def test_model(case, time_case):
    time_case(case)
