"""DESIGN.md section 4's second judge, |fused - ref64| <= 2 |eager - ref64| + atol, made so that no
machine, BLAS or seed can move its verdict (issue 12; tests/RELIABILITY.md has the measurements).

fp32 training is chaotic at ReLU kinks and in ill-conditioned BN: one draw's error, fused or eager,
is luck. The old verdict compared the median of 10 fused errors with the median of 10 eager errors;
on the ill-posed 1-channel families that flips on 4-16% of seed sets per tensor (bootstrap over 200
draws), so a CPU whose conv kernels round differently failed it. Here each draw is *paired* (fused and
eager see the same input, so the draw's conditioning cancels), eager's side of a draw is the geometric
mean of an ensemble of one-ulp-nudged eager steps (its rounding luck averaged out), and the verdict
is on the geometric mean over many draws of (fused + atol) / (eager + atol).
"""
import math
from typing import Dict, List, Sequence, Tuple

import torch

from helpers import TOL

# Errors below this count as equal: the atol of DESIGN.md's rule, a tenth of fp32's tolerance.
ATOL = TOL[torch.float32] / 10
# The rule's factor.
FACTOR = 2.0


def draw_log_ratio(fused_err: float, eager_errs: Sequence[float], atol: float = ATOL) -> float:
    """log((fused + atol) / geometric-mean(eager + atol)) of one draw."""
    eager = sum(math.log(e + atol) for e in eager_errs) / len(eager_errs)
    return math.log(fused_err + atol) - eager


def twice_eager_verdicts(samples: Dict[str, List[Tuple[float, Sequence[float]]]], atol: float = ATOL,
                         factor: float = FACTOR) -> Dict[str, float]:
    """Per tensor, the geometric-mean ratio fused/eager over the draws; a tensor passes at <= factor.

    samples: tensor name -> one (fused error, [eager errors of the ensemble]) pair per draw."""
    return {key: math.exp(sum(draw_log_ratio(f, e, atol) for f, e in draws) / len(draws))
            for key, draws in samples.items()}


def failures(samples, atol: float = ATOL, factor: float = FACTOR) -> Dict[str, float]:
    """The tensors whose fused error is more than ``factor`` x eager's, with their ratio."""
    return {k: r for k, r in twice_eager_verdicts(samples, atol, factor).items() if r > factor}


def inflated(samples, scale: float):
    """The same draws with every fused error times ``scale``: a fused path ``scale`` x less accurate
    (relative error is linear in the deviation: ref + scale * (fused - ref) has scale x the error)."""
    return {k: [(f * scale, e) for f, e in draws] for k, draws in samples.items()}
