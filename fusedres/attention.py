"""The attention tail of a training chain (SE, ECA): ``out = relu(bn(y) * attn[n, k] * row_scale[n] + shortcut)``.

A block with an attention module runs its convs as a chain whose tail is deferred (``ChainSpec.tail ==
"attention"``): the chain returns the per-image mean of the last conv's raw output, the module side turns
it into the pooled BN output, the module's own small layers give the gate (``attention_gate``), and
``fusedres::attention_tail`` (``fusedres.ops``) runs the tail in one kernel, forward and backward; its
backward also reduces the gate's gradient. This file holds the ops' bodies and the gate.

The tail's inputs are the chain's raw outputs and batch statistics, so its gradients are honest partial
derivatives: d/dy at fixed statistics, d mean, d invstd, d gamma, d beta, d attn; the chain's backward
turns the first three into the full BN backward (``chain._attention_dy``).
"""
from typing import List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor, nn

from .kernels import tail as tail_k


class TailInputs(NamedTuple):
    """fusedres::attention_tail's tensor arguments, in its order. y, yd: raw conv outputs of the branch's
    last conv and of the projection (yd None: identity shortcut, then ``residual`` is the block input, and
    ``residual_sink``, when given, an all-zero tensor added too, which takes the shortcut's gradient instead
    of ``residual``: see chain.ChainOutputs.residual_sink);
    mean/invstd: their batch statistics; gamma/beta: their BN's affine parameters (None: affine=False);
    attn: [N, K] gate; row_scale: [N] stochastic depth factor or None."""
    y: Tensor
    mean: Tensor
    invstd: Tensor
    gamma: Optional[Tensor]
    beta: Optional[Tensor]
    attn: Tensor
    row_scale: Optional[Tensor]
    residual: Optional[Tensor]
    residual_sink: Optional[Tensor]
    yd: Optional[Tensor]
    mean_d: Optional[Tensor]
    invstd_d: Optional[Tensor]
    gamma_d: Optional[Tensor]
    beta_d: Optional[Tensor]


def scale_shift(mean: Tensor, invstd: Tensor, gamma: Optional[Tensor], beta: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """A BN with batch statistics as per-channel scale/shift (K-element vector math)."""
    scale = invstd if gamma is None else gamma.to(invstd.dtype) * invstd
    shift = -mean * scale if beta is None else beta.to(invstd.dtype) - mean * scale
    return scale, shift


def pooled_bn(image_mean: Tensor, mean: Tensor, invstd: Tensor, gamma: Optional[Tensor],
              beta: Optional[Tensor]) -> Tensor:
    """The global average pool of bn(y) from the per-image mean of y ([N, K]: BN is affine per channel)."""
    scale, shift = scale_shift(mean, invstd, gamma, beta)
    return image_mean * scale + shift


def _projection(t: TailInputs) -> Optional[tail_k.Projection]:
    return None if t.yd is None else tail_k.Projection(t.yd, *scale_shift(t.mean_d, t.invstd_d, t.gamma_d, t.beta_d))


def tail_forward(t: TailInputs, relu: bool) -> Tensor:
    return tail_k.bn_act(t.y, *scale_shift(t.mean, t.invstd, t.gamma, t.beta), shortcut=_projection(t),
                         residual=t.residual, relu=relu, row_scale=t.row_scale, attn=t.attn)


# fusedres::attention_tail_backward's result: a gradient per TailInputs field (None: not needed or none).
TailGrads = NamedTuple("TailGrads", [(f, Optional[Tensor]) for f in TailInputs._fields])


def _bn_param_grads(sum_gz, sum_gzx, mean, invstd, gamma, scale):
    """(d mean, d invstd, d gamma, d beta) of z = gamma * (y - mean) * invstd + beta from sum(dz) and
    sum(dz * xhat): dz/dmean = -scale, dz/dinvstd = gamma * xhat / invstd."""
    g = 1.0 if gamma is None else gamma.to(invstd.dtype)
    grads = (-scale * sum_gz, g * sum_gzx / invstd)
    if gamma is None:
        return (*grads, None, None)
    return (*grads, sum_gzx.to(gamma.dtype, copy=True), sum_gz.to(gamma.dtype, copy=True))


def tail_backward(dout: Tensor, out: Tensor, t: TailInputs, relu: bool) -> TailGrads:
    """The tail's gradients in one image-major kernel pass plus K-element vector math."""
    scale, shift = scale_shift(t.mean, t.invstd, t.gamma, t.beta)
    proj = _projection(t)
    r = tail_k.attention_tail_bwd(dout, out, t.y, scale, shift, t.mean, t.invstd, t.attn, t.row_scale, proj,
                                  t.mean_d, t.invstd_d, relu)
    branch = _bn_param_grads(r.sums.sum_g, r.sums.sum_gx, t.mean, t.invstd, t.gamma, scale)
    short: List[Optional[Tensor]] = [None] * 5
    if proj is not None:
        short = [r.dres, *_bn_param_grads(r.sums.sum_g_d, r.sums.sum_gx_d, t.mean_d, t.invstd_d, t.gamma_d,
                                          proj.scale)]
    shortcut = [None, None] if proj is not None else ([None, r.dres] if t.residual_sink is not None else [r.dres, None])
    return TailGrads(r.dy, *branch, r.dattn, None, *shortcut, *short)


def tail_backward_shapes(t: TailInputs) -> TailGrads:
    like = {f: None if v is None else torch.empty_like(v) for f, v in t._asdict().items()}
    like["row_scale"] = None
    if t.residual_sink is not None:
        like["residual"], like["residual_sink"] = None, torch.empty_like(t.y)
    return TailGrads(**like)


# ----------------------------------------------------------------------------------------------
# The gate: the attention module's own layers on the pooled input
# ----------------------------------------------------------------------------------------------

def gate_reason(module: nn.Module) -> Optional[str]:
    """Why the tail cannot take this attention module's gate (None when it can): timm's SEModule and
    EcaModule shapes, ``x * gate(f(mean(x)))``; anything else runs as its own module would."""
    if is_se(module) or is_eca(module):
        return None
    return f"its attention module {type(module).__name__} is not an SE or ECA module (x * gate(mean(x)))"


def is_se(m: nn.Module) -> bool:
    return all(hasattr(m, a) for a in ("fc1", "act", "fc2")) and not getattr(m, "add_maxpool", False) and \
        isinstance(m.fc1, nn.Conv2d) and isinstance(m.fc2, nn.Conv2d)


def is_eca(m: nn.Module) -> bool:
    return isinstance(getattr(m, "conv", None), nn.Conv1d) and not hasattr(m, "fc1")


def attention_gate(module: nn.Module, pooled: Tensor) -> Tensor:
    """[N, K] gate of an SE / ECA module for the pooled branch [N, K], through the module's own layers
    (their parameters get their gradients as in eager)."""
    n, k = pooled.shape
    gate = getattr(module, "gate", torch.sigmoid)
    if is_se(module):
        s = module.fc1(pooled.view(n, k, 1, 1))
        s = module.act(getattr(module, "bn", nn.Identity())(s))
        return gate(module.fc2(s)).view(n, k)
    s = module.conv(pooled.view(n, 1, k))
    if getattr(module, "conv2", None) is not None:  # timm's ECA with an MLP
        s = module.conv2(module.act(s))
    return gate(s).view(n, k)
