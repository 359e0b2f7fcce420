"""The fused ops as ``torch.library`` custom ops in the ``fusedres::`` namespace.

    fusedres::conv_bn_act            eval-mode conv + folded BN + residual / projection + ReLU
    fusedres::train_chain            a training-mode conv/BN chain (a block or the stem), forward
    fusedres::train_chain_backward   its backward

Each has a fake (meta) implementation, so torch.compile / torch.export trace them without running
them, and a registered autograd formula. They are opaque ``custom_op``s rather than ``triton_op``s:
measured with the Triton interpreter (DESIGN.md section 5), dynamo traced into ``triton_op`` kernels and
touched fake tensors' data, while ``custom_op`` + ``register_fake`` compiled with fullgraph and passed
opcheck; the kernels are already fused, so Inductor would gain little from seeing them. None mutates
its inputs: new running statistics come back as outputs and the modules copy them into their buffers.
"""
from typing import List, Optional

import torch
from torch import Tensor

from . import chain, kernels
from .chain import BNStats, ChainGrads, ChainOutputs, ChainParams, ChainSpec
from .kernels._launch import empty_activation

# ----------------------------------------------------------------------------------------------
# fusedres::conv_bn_act
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("fusedres::conv_bn_act", mutates_args=())
def conv_bn_act(x: Tensor, weight: Tensor, scale: Optional[Tensor], shift: Optional[Tensor], stride: List[int],
                padding: List[int], dilation: List[int], groups: int, residual: Optional[Tensor], relu: bool,
                shortcut_input: Optional[Tensor], shortcut_weight: Optional[Tensor],
                shortcut_scale: Optional[Tensor], shortcut_shift: Optional[Tensor], shortcut_stride: int,
                bn_mean: Optional[Tensor] = None, bn_var: Optional[Tensor] = None, bn_weight: Optional[Tensor] = None,
                bn_bias: Optional[Tensor] = None, conv_bias: Optional[Tensor] = None, eps: float = 0.0,
                shortcut_bn_mean: Optional[Tensor] = None, shortcut_bn_var: Optional[Tensor] = None,
                shortcut_bn_weight: Optional[Tensor] = None, shortcut_bn_bias: Optional[Tensor] = None,
                shortcut_eps: float = 0.0) -> Tensor:
    # bn_var given: the kernel folds that eval BN itself (scale/shift are None); likewise for the shortcut.
    if bn_var is not None:
        scale, shift = kernels.BNFold(bn_mean, bn_var, bn_weight, bn_bias, eps, conv_bias), None
    if shortcut_bn_var is not None:
        shortcut_scale = kernels.BNFold(shortcut_bn_mean, shortcut_bn_var, shortcut_bn_weight, shortcut_bn_bias,
                                        shortcut_eps)
    shortcut = None if shortcut_input is None else \
        (shortcut_input, shortcut_weight, shortcut_scale, shortcut_shift, shortcut_stride)
    return kernels.conv_bn_act(x, weight, scale, shift, tuple(stride), tuple(padding), tuple(dilation), groups,
                               residual, relu, shortcut)


@conv_bn_act.register_fake
def _conv_bn_act_fake(x, weight, scale, shift, stride, padding, dilation, groups, *_):
    return empty_activation(x, chain.conv_out_shape(x.shape, weight.shape, stride, padding, dilation))


def _conv_bn_act_backward(ctx, grad):
    raise NotImplementedError(
        "fusedres: backward through an eval-mode (folded-BN) fused conv is not implemented. Call "
        "model.train() to train with batch statistics, or run inference under torch.no_grad() / "
        "torch.inference_mode().")


conv_bn_act.register_autograd(_conv_bn_act_backward)


# ----------------------------------------------------------------------------------------------
# fusedres::train_chain and fusedres::train_chain_backward
# ----------------------------------------------------------------------------------------------
# Schema (the argument names are those of chain.ChainParams and chain.ChainSpec, in that order):
#   train_chain(x, weights, gammas, betas, running_means, running_vars, num_batches,
#               geometry, momentums, eps, shortcut_kind, shortcut_stride, recompute_last, group)
#     -> ChainOutputs.pack(): [out, yd, *ys, *per-BN (mean, invstd, scale, shift), *per-BN (new running
#        mean, new running var)]
#   train_chain_backward(dout, x, out, yd, ys, weights, gammas, stats, needs, <the ChainSpec fields>)
#     -> ChainGrads.pack(): [dx, *per-layer (dw, dgamma, dbeta)]
# Lists hold one entry per layer (the units' convs, then the projection's); a missing result tensor is
# packed as an empty 1-D tensor (chain.absent).

@torch.library.custom_op("fusedres::train_chain", mutates_args=())
def train_chain(x: Tensor, weights: List[Tensor], gammas: List[Optional[Tensor]], betas: List[Optional[Tensor]],
                running_means: List[Optional[Tensor]], running_vars: List[Optional[Tensor]],
                num_batches: List[Optional[Tensor]], geometry: List[int], momentums: List[float], eps: List[float],
                shortcut_kind: str, shortcut_stride: int, recompute_last: bool, group: int) -> List[Tensor]:
    params = ChainParams(weights, gammas, betas, running_means, running_vars, num_batches)
    spec = ChainSpec(geometry, momentums, eps, shortcut_kind, shortcut_stride, recompute_last, group)
    return chain.chain_forward(x, params, spec).pack()


@train_chain.register_fake
def _train_chain_fake(x, weights, gammas, betas, running_means, running_vars, num_batches, *spec):
    params = ChainParams(weights, gammas, betas, running_means, running_vars, num_batches)
    return chain.chain_forward_shapes(x, params, ChainSpec(*spec)).pack()


def _train_chain_setup(ctx, inputs, output):
    x, weights, gammas, betas, running_means, running_vars, num_batches, *spec = inputs
    spec = ChainSpec(*spec)
    res = ChainOutputs.unpack(output, spec.num_layers)
    ctx.spec = spec
    ctx.num_saved = len(res.ys)
    ctx.needs = [x.requires_grad] + [w.requires_grad for w in weights]
    ctx.has_gamma = [g is not None for g in gammas]
    # The gradient of a list input mirrors its structure: torch.library treats a list holding only
    # None as one leaf (its gradient is None), any other list as a list (a list of gradients).
    ctx.leaf_lists = [all(t is None for t in lst) for lst in (gammas, betas, running_means, running_vars,
                                                                num_batches)]
    ctx.save_for_backward(x, res.out, res.yd, *res.ys, *weights, *[g for g in gammas if g is not None],
                          *BNStats.flatten(res.stats))
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # the outputs other than ``out`` get no gradient: no zeros for them


def _train_chain_backward(ctx, grads):
    spec, n = ctx.spec, ctx.spec.num_layers
    x, out, yd, *rest = ctx.saved_tensors
    ys, weights, rest = rest[:ctx.num_saved], rest[ctx.num_saved:ctx.num_saved + n], rest[ctx.num_saved + n:]
    gamma_iter = iter(rest[:sum(ctx.has_gamma)])
    gammas = [next(gamma_iter) if has else None for has in ctx.has_gamma]
    stats = rest[sum(ctx.has_gamma):]
    dout = grads[0]
    if dout is None:
        g = ChainGrads(None, [None] * n, [None] * n, [None] * n)
    else:
        g = ChainGrads.unpack(torch.ops.fusedres.train_chain_backward(
            dout, x, out, yd, list(ys), list(weights), gammas, list(stats), ctx.needs, *spec))
    lists = [g.dgammas, g.dbetas, [None] * n, [None] * n, [None] * n]
    return (g.dx, g.dweights, *(None if leaf else lst for leaf, lst in zip(ctx.leaf_lists, lists)),
            *(None for _ in spec))


train_chain.register_autograd(_train_chain_backward, setup_context=_train_chain_setup)


@torch.library.custom_op("fusedres::train_chain_backward", mutates_args=())
def train_chain_backward(dout: Tensor, x: Tensor, out: Tensor, yd: Optional[Tensor], ys: List[Tensor],
                         weights: List[Tensor], gammas: List[Optional[Tensor]], stats: List[Tensor],
                         needs: List[bool], geometry: List[int], momentums: List[float], eps: List[float],
                         shortcut_kind: str, shortcut_stride: int, recompute_last: bool, group: int) -> List[Tensor]:
    spec = ChainSpec(geometry, momentums, eps, shortcut_kind, shortcut_stride, recompute_last, group)
    return chain.chain_backward(dout, x, out, yd, ys, weights, gammas, BNStats.unflatten(stats), spec, needs).pack(x)


@train_chain_backward.register_fake
def _train_chain_backward_fake(dout, x, out, yd, ys, weights, gammas, stats, needs, *spec):
    return chain.chain_backward_shapes(dout, x, weights, gammas, needs).pack(x)


def _no_double_backward(ctx, grads):
    raise NotImplementedError("fusedres: double backward through the fused training chain is not supported")


train_chain_backward.register_autograd(_no_double_backward)
