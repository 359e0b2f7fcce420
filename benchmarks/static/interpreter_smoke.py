"""The fused kernels run in this triton's interpreter: a projection bottleneck's eval forward and training step
(forward and backward: conv, dgrad, wgrad, BN and tail kernels), fp32, against the float64 PyTorch reference.

    TRITON_INTERPRET=1 python benchmarks/static/interpreter_smoke.py    -> "interpreter smoke: ok ..." or exit 1

benchmarks/static_ci.sh runs it under triton 3.6 (the GPU image's), whose interpreter failed every conv kernel
beside numpy >= 2.4 until kernels/_interpreter.py (found on the first GPU run: the CLI's CPU tests there).
"""
import os
import sys

if os.environ.get("TRITON_INTERPRET") != "1":
    sys.exit("interpreter_smoke: set TRITON_INTERPRET=1 (the kernels must be built for the interpreter)")
os.environ["FUSEDRES_STRICT"] = "1"  # a fallback to PyTorch would prove nothing

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
from torch import nn  # noqa: E402

import fusedres  # noqa: E402
from fusedres.reference import TOLERANCE, rel_err  # noqa: E402


def main() -> int:
    torch.manual_seed(0)
    down = nn.Sequential(fusedres.reference.conv1x1(16, 32, 2), nn.BatchNorm2d(32))
    fused = fusedres.FusedBottleneck(16, 8, 2, down)
    ref = fusedres.reference.Bottleneck(16, 8, 2, nn.Sequential(fusedres.reference.conv1x1(16, 32, 2),
                                                                nn.BatchNorm2d(32)))
    ref.load_state_dict(fused.state_dict())
    ref = ref.double()
    x = torch.randn(2, 16, 12, 12).to(memory_format=torch.channels_last)
    errs = {}
    with torch.no_grad():
        errs["eval"] = rel_err(fused.eval()(x), ref.eval()(x.double()))
    xf, xr = x.clone().requires_grad_(), x.double().requires_grad_()
    out_f, out_r = fused.train()(xf), ref.train()(xr)
    g = torch.randn_like(out_f)
    out_f.backward(g)
    out_r.backward(g.double())
    errs["train"] = rel_err(out_f, out_r)
    errs["dx"] = rel_err(xf.grad, xr.grad)
    errs["dw conv2"] = rel_err(fused.conv2.weight.grad, ref.conv2.weight.grad)
    bad = {k: v for k, v in errs.items() if not v <= TOLERANCE[torch.float32]}  # DESIGN.md section 4
    print(f"interpreter smoke (triton {triton.__version__}, numpy {np.__version__}): "
          + ("ok " if not bad else "FAIL ") + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
