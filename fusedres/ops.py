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

from . import kernels
from .kernels._launch import memory_format_of, stats_dtype
from .training import (PROJECTION, STATS_PER_BN, chain_backward, chain_forward, num_saved, num_units,
                       unpack_geometry)


def _empty_like_activation(like: Tensor, shape) -> Tensor:
    return torch.empty(shape, device=like.device, dtype=like.dtype, memory_format=memory_format_of(like))


def _conv_out_shape(x_shape, w_shape, stride, padding, dilation):
    n, _, h, w = x_shape
    k, _, r, s = w_shape
    return (n, k, kernels.conv.out_size(h, r, stride[0], padding[0], dilation[0]),
            kernels.conv.out_size(w, s, stride[1], padding[1], dilation[1]))


# ----------------------------------------------------------------------------------------------
# fusedres::conv_bn_act
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("fusedres::conv_bn_act", mutates_args=())
def conv_bn_act(x: Tensor, weight: Tensor, scale: Tensor, shift: Tensor, stride: List[int], padding: List[int],
                dilation: List[int], groups: int, residual: Optional[Tensor], relu: bool,
                shortcut_input: Optional[Tensor], shortcut_weight: Optional[Tensor],
                shortcut_scale: Optional[Tensor], shortcut_shift: Optional[Tensor], shortcut_stride: int) -> Tensor:
    shortcut = None if shortcut_input is None else \
        (shortcut_input, shortcut_weight, shortcut_scale, shortcut_shift, shortcut_stride)
    return kernels.conv_bn_act(x, weight, scale, shift, tuple(stride), tuple(padding), tuple(dilation), groups,
                               residual, relu, shortcut)


@conv_bn_act.register_fake
def _conv_bn_act_fake(x, weight, scale, shift, stride, padding, dilation, groups, residual, relu,
                      shortcut_input, shortcut_weight, shortcut_scale, shortcut_shift, shortcut_stride):
    return _empty_like_activation(x, _conv_out_shape(x.shape, weight.shape, stride, padding, dilation))


def _conv_bn_act_backward(ctx, grad):
    raise NotImplementedError(
        "fusedres: backward through an eval-mode (folded-BN) fused conv is not implemented. Call "
        "model.train() to train with batch statistics, or run inference under torch.no_grad() / "
        "torch.inference_mode().")


conv_bn_act.register_autograd(_conv_bn_act_backward)


# ----------------------------------------------------------------------------------------------
# fusedres::train_chain and fusedres::train_chain_backward
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("fusedres::train_chain", mutates_args=())
def train_chain(x: Tensor, weights: List[Tensor], gammas: List[Optional[Tensor]], betas: List[Optional[Tensor]],
                running_means: List[Optional[Tensor]], running_vars: List[Optional[Tensor]],
                num_batches: List[Optional[Tensor]], geometry: List[int], momentums: List[float], eps: List[float],
                shortcut_kind: str, shortcut_stride: int, recompute_last: bool, group: int) -> List[Tensor]:
    return chain_forward(x, weights, gammas, betas, running_means, running_vars, num_batches, geometry, momentums,
                         eps, shortcut_kind, shortcut_stride, recompute_last, group)


@train_chain.register_fake
def _train_chain_fake(x, weights, gammas, betas, running_means, running_vars, num_batches, geometry, momentums,
                      eps, shortcut_kind, shortcut_stride, recompute_last, group):
    units = num_units(len(weights), shortcut_kind)
    shapes, shape = [], x.shape
    for i in range(units):
        shape = _conv_out_shape(shape, weights[i].shape, *unpack_geometry(geometry, i)[:3])
        shapes.append(shape)
    ys = [_empty_like_activation(x, s) for s in shapes]
    yd = _empty_like_activation(x, shapes[-1]) if shortcut_kind == PROJECTION else x.new_empty(0)
    sdt = stats_dtype(x)
    stats = []
    for w, rm, rv in zip(weights, running_means, running_vars):
        k = w.shape[0]
        stats += [x.new_empty(k, dtype=sdt) for _ in range(4)]
        stats += [x.new_empty(0) if rm is None else torch.empty_like(rm),
                  x.new_empty(0) if rv is None else torch.empty_like(rv)]
    return [_empty_like_activation(x, shapes[-1]), yd, *ys[:num_saved(units, recompute_last)], *stats]


def _train_chain_setup(ctx, inputs, output):
    (x, weights, gammas, betas, running_means, running_vars, num_batches, geometry, _, _, kind, sc_stride,
     recompute, group) = inputs
    units = num_units(len(weights), kind)
    saved = num_saved(units, recompute)
    stats = output[2 + saved:]
    bn = [t for i in range(len(weights)) for t in stats[STATS_PER_BN * i:STATS_PER_BN * i + 4]]
    ctx.config = (list(geometry), kind, sc_stride, recompute, group)
    ctx.counts = (len(weights), saved)
    ctx.needs = [x.requires_grad] + [w.requires_grad for w in weights]
    ctx.has_gamma = [g is not None for g in gammas]
    # The gradient of a list input mirrors its structure: torch.library treats a list holding only
    # None as one leaf (its gradient is None), any other list as a list (a list of gradients).
    ctx.all_none = [all(t is None for t in lst) for lst in (gammas, betas, running_means, running_vars, num_batches)]
    yd = output[1] if kind == PROJECTION else None
    ctx.save_for_backward(x, output[0], yd, *output[2:2 + saved], *weights, *[g for g in gammas if g is not None],
                          *bn)
    ctx.mark_non_differentiable(*output[1:])


def _train_chain_backward(ctx, grads):
    dout = grads[0]
    n_layers, saved = ctx.counts
    x, out, yd, *rest = ctx.saved_tensors
    ys, rest = rest[:saved], rest[saved:]
    weights, rest = rest[:n_layers], rest[n_layers:]
    n_gamma = sum(ctx.has_gamma)
    gamma_iter = iter(rest[:n_gamma])
    gammas = [next(gamma_iter) if has else None for has in ctx.has_gamma]
    bn = rest[n_gamma:]
    none = [None] * n_layers

    def like(i, grad_list):
        return None if ctx.all_none[i] else grad_list

    if dout is None:
        return (None, none, like(0, none), like(1, none), like(2, none), like(3, none), like(4, none),
                None, None, None, None, None, None, None)
    geometry, kind, sc_stride, recompute, group = ctx.config
    g = torch.ops.fusedres.train_chain_backward(dout, x, out, yd, list(ys), list(weights), gammas, list(bn),
                                                geometry, kind, sc_stride, recompute, ctx.needs, group)

    def real(t):
        return None if t.numel() == 0 and t.dim() == 1 else t

    dws = [real(t) if ctx.needs[1 + i] else None for i, t in enumerate(g[1::3])]
    dgammas = [real(t) if has else None for t, has in zip(g[2::3], ctx.has_gamma)]
    dbetas = [real(t) if has else None for t, has in zip(g[3::3], ctx.has_gamma)]
    dx = real(g[0]) if ctx.needs[0] else None
    return (dx, dws, like(0, dgammas), like(1, dbetas), like(2, none), like(3, none), like(4, none),
            None, None, None, None, None, None, None)


train_chain.register_autograd(_train_chain_backward, setup_context=_train_chain_setup)


@torch.library.custom_op("fusedres::train_chain_backward", mutates_args=())
def train_chain_backward(dout: Tensor, x: Tensor, out: Tensor, yd: Optional[Tensor], ys: List[Tensor],
                         weights: List[Tensor], gammas: List[Optional[Tensor]], stats: List[Tensor],
                         geometry: List[int], shortcut_kind: str, shortcut_stride: int, recompute_last: bool,
                         needs: List[bool], group: int) -> List[Tensor]:
    return chain_backward(dout, x, out, yd, ys, weights, gammas, stats, geometry, shortcut_kind, shortcut_stride,
                          recompute_last, needs, group)


@train_chain_backward.register_fake
def _train_chain_backward_fake(dout, x, out, yd, ys, weights, gammas, stats, geometry, shortcut_kind,
                               shortcut_stride, recompute_last, needs, group):
    grads = [_empty_like_activation(dout, x.shape) if needs[0] else x.new_empty(0)]
    for i, (w, gamma) in enumerate(zip(weights, gammas)):
        grads.append(torch.empty_like(w) if needs[1 + i] else x.new_empty(0))
        grads += [x.new_empty(0), x.new_empty(0)] if gamma is None else [torch.empty_like(gamma) for _ in range(2)]
    return grads


def _no_double_backward(ctx, grads):
    raise NotImplementedError("fusedres: double backward through the fused training chain is not supported")


train_chain_backward.register_autograd(_no_double_backward)
