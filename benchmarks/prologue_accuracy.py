"""Accuracy cost of the forward prologue's 16-bit math (issue 17 item 2), in the Triton interpreter.

A training forward + backward of fused bottleneck and basic blocks in a 16-bit dtype, with the conv prologue's
BN-apply + ReLU in fp32 ("acc") or in the dtype ("rounded": scale and shift rounded to the dtype, one rounding of
a * scale + shift, what the GPU's packed fma.rn.relu computes), each against float64 and beside eager in the same
dtype. Per tensor: DESIGN.md's rule |fused - ref64| <= 2 |eager - ref64|, judged as tests/judges.py does (the
geometric mean over draws of (fused + atol) / (eager + atol)). Input families: standard normal, and an offset
input (mean 3, std 1) whose BN means are large against the standard deviations (cancellation in a*scale + shift).

    TRITON_INTERPRET=1 python benchmarks/prologue_accuracy.py --dtype bf16 --draws 6
"""
import argparse
import copy
import math
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import torch  # noqa: E402

import fusedres  # noqa: E402
from fusedres import (
    kernels,  # noqa: E402
    reference,  # noqa: E402
)
from helpers import randomize_bn  # noqa: E402

ATOL = 1e-6  # tests/judges.py's atol


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def step(model, x, gout):
    x = x.clone().requires_grad_(True)
    out = model(x)
    out.backward(gout.to(out.dtype))
    got = {"out": out.detach(), "grad_x": x.grad}
    for name, p in model.named_parameters():
        got["grad." + name] = p.grad
    for name, b in model.named_buffers():
        if b.dtype.is_floating_point:
            got[name] = b
    return got


def make(kind):
    if kind == "bottleneck":
        return reference.Bottleneck(32, 8)  # 32 -> 8 -> 8 -> 32, identity shortcut
    return reference.BasicBlock(16, 16)


def draw(kind, family, dt, seed, math_of):
    torch.manual_seed(seed)
    ref = randomize_bn(make(kind)).train()
    c = 32 if kind == "bottleneck" else 16
    x = torch.randn(4, c, 8, 8)
    if family == "offset":
        x = x + 3.0
    x = x.to(memory_format=torch.channels_last)
    gout = torch.randn(4, c, 8, 8, dtype=torch.float64)
    want = step(copy.deepcopy(ref).double(), x.double(), gout)
    errs = {}
    for name in ("acc", "rounded"):
        kernels.conv.prologue_math = lambda t, _n=name: _n if t.dtype in (torch.bfloat16, torch.float16) else "acc"
        fused = fusedres.convert(copy.deepcopy(ref)).to(dt).train()
        got = step(fused, x.to(dt), gout)
        errs[name] = {k: rel(got[k], v) for k, v in want.items()}
    kernels.conv.prologue_math = math_of
    eager = step(copy.deepcopy(ref).to(dt).train(), x.to(dt), gout)
    errs["eager"] = {k: rel(eager[k], v) for k, v in want.items()}
    return errs


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--draws", type=int, default=6)
    a = p.parse_args()
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    orig = kernels.conv.prologue_math
    print(f"dtype {a.dtype}, {a.draws} draws per family; per tensor: geometric-mean ratio fused/eager (rule: <= 2)")
    for kind in ("bottleneck", "basic"):
        for family in ("normal", "offset"):
            runs = [draw(kind, family, dt, 1000 + i, orig) for i in range(a.draws)]
            keys = runs[0]["eager"].keys()
            ratio = {m: {k: math.exp(sum(math.log((r[m][k] + ATOL) / (r["eager"][k] + ATOL)) for r in runs) / len(runs))
                         for k in keys} for m in ("acc", "rounded")}
            worst = {m: max(ratio[m].items(), key=lambda kv: kv[1]) for m in ratio}
            med = {m: sorted(ratio[m].values())[len(keys) // 2] for m in ratio}
            out_err = {m: sorted(r[m]["out"] for r in runs)[len(runs) // 2] for m in ("acc", "rounded", "eager")}
            errs = " ".join(f"{m} {out_err[m]:.2e}" for m in ("eager", "acc", "rounded"))
            ratios = "; ".join(f"{m} worst {worst[m][1]:.2f} ({worst[m][0]}) median {med[m]:.2f}"
                               for m in ("acc", "rounded"))
            print(f"{kind:10s} {family:6s} | out rel err (median) {errs} | ratio: {ratios}", flush=True)
            over = {m: sorted(k for k, v in ratio[m].items() if v > 2) for m in ratio}
            print(f"{'':17s} over 2x: acc {over['acc'] or '-'}; rounded {over['rounded'] or '-'}", flush=True)


if __name__ == "__main__":
    main()
