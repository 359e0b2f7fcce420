"""Which cases the suite times: ResNet-50's distinct conv launches, the distinct blocks of ResNet-18/50,
and three whole models, each in inference and a training step, bf16 and fp16, per provider.

Shapes come from ``fusedres.bench.measure.model_shapes`` (a meta-device forward with hooks), never typed here.
FUSEDRES_BENCH_QUICK=1 keeps a representative handful (what benchmarks/gpu_check.sh runs).
"""
import os
from typing import List

from fusedres.bench import measure as B

QUICK = os.environ.get("FUSEDRES_BENCH_QUICK", "0") == "1"
# Self-test of the suite's machinery on the CPU (tests/test_cli.py): a few CIFAR cases in the interpreter.
TINY = os.environ.get("_FUSEDRES_BENCH_DEVICE") == "cpu"
DTYPE_NAMES = ("bf16",) if QUICK else ("bf16", "fp16")  # keys of fusedres.bench.measure.DTYPE_OF
MODEL_BATCH = {"inference": 256, "training": 128}
LAYER_BATCHES = (256,) if QUICK else (64, 256)

# Quick mode: the stem, a 3x3, a projection tail and a residual tail (torchvision's module paths);
# per level, only these providers.
QUICK_LAYERS = {"conv1", "layer1.0.conv2", "layer2.0.conv3", "layer3.1.conv3"}
QUICK_TRAIN_LAYERS = {"layer1.0.conv2"}
QUICK_BLOCKS = {("resnet50", "layer2.0"), ("resnet18", "layer2.1")}
QUICK_TRAIN_BLOCKS = {("resnet50", "layer2.0")}
QUICK_PROVIDERS = {"inference": ("eager", "fused", "compile"), "training": ("eager", "fused", B.AMP)}


def _providers(level: str, mode: str) -> List[str]:
    return [p for p in B.providers(level, mode) if not QUICK or p in QUICK_PROVIDERS[mode]]


def _tiny(level: str) -> List[B.Case]:
    shapes = B.model_shapes("cifar_resnet20")
    if level == "layer":
        return [B.Case("layer", "cifar_resnet20", lay.shape.label, mode, "fp32", 2, p, path=lay.names[0],
                       shape=lay.shape)
                for lay in shapes.layers[3:5] for mode in ("inference", "training") for p in ("eager", "fused")]
    if level == "block":
        b = shapes.blocks[1]
        return [B.Case("block", "cifar_resnet20", b.label, "inference", "fp32", 2, p, path=b.path)
                for p in ("eager", "fused")]
    return [B.Case("model", "cifar_resnet20", "cifar_resnet20", "inference", "fp32", 1, p) for p in ("eager", "fused")]


def layer_cases() -> List[B.Case]:
    if TINY:
        return _tiny("layer")
    cases = []
    for layer in B.model_shapes("resnet50").layers:
        path = layer.names[0]
        for n in LAYER_BATCHES:
            for mode in ("inference", "training"):
                if QUICK and path not in (QUICK_LAYERS if mode == "inference" else QUICK_TRAIN_LAYERS):
                    continue
                for dt in DTYPE_NAMES:
                    cases += [B.Case("layer", "resnet50", layer.shape.label, mode, dt, n, p, path=path,
                                     shape=layer.shape) for p in _providers("layer", mode)
                              if not (QUICK and mode == "training" and p.startswith("compile"))]
    return cases


def block_cases() -> List[B.Case]:
    if TINY:
        return _tiny("block")
    cases = []
    for model in ("resnet18", "resnet50"):
        for blk in B.model_shapes(model).blocks:
            for mode in ("inference", "training"):
                if QUICK and (model, blk.path) not in (QUICK_BLOCKS if mode == "inference" else QUICK_TRAIN_BLOCKS):
                    continue
                for dt in DTYPE_NAMES:
                    cases += [B.Case("block", model, blk.label, mode, dt, MODEL_BATCH[mode], p, path=blk.path)
                              for p in _providers("block", mode)
                              if not (QUICK and mode == "training" and p.startswith("compile"))]
    return cases


def model_cases() -> List[B.Case]:
    if TINY:
        return _tiny("model")
    models = ("resnet50", "cifar_resnet56") if QUICK else ("resnet50", "resnet18", "cifar_resnet56")
    cases = []
    for model in models:
        for mode in ("inference", "training"):
            if QUICK and model != "resnet50" and mode == "training":
                continue
            for dt in DTYPE_NAMES:
                provs = _providers("model", mode)
                if QUICK and model != "resnet50":
                    provs = [p for p in provs if not p.startswith("compile")]
                cases += [B.Case("model", model, model, mode, dt, MODEL_BATCH[mode], p) for p in provs]
    return cases


# Rough seconds per case on an H100, compile time included (a guess for planning, not a measurement).
_GUESS = {"eager": 2, "eager-amp": 3, "fused": 5, "compile": 8, "compile-max": 30}


def guess_seconds(case: B.Case) -> float:
    s = _GUESS[case.provider]
    if case.provider.startswith("compile"):
        s *= {"layer": 1, "block": 2, "model": 10}[case.level] * (2 if case.mode == "training" else 1)
    return s


def params(cases: List[B.Case]):
    import pytest
    return [pytest.param(c, id=c.id) for c in cases]
