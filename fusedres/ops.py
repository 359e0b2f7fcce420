"""The fused ops as ``torch.library`` custom ops in the ``fusedres::`` namespace.

    fusedres::conv_bn_act            eval-mode conv + folded BN + residual / projection + ReLU
    fusedres::train_chain            a training-mode conv/BN chain (a block or the stem), forward
    fusedres::train_chain_backward   its backward
    fusedres::attention_tail         an attention block's tail (SE / ECA gate, stochastic depth, shortcut, ReLU)
    fusedres::attention_tail_backward  its backward

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

from . import attention, chain, kernels
from .attention import TailInputs
from .chain import BNStats, ChainGrads, ChainOutputs, ChainParams, ChainSpec, SavedChain
from .kernels import tail as tail_k
from .kernels._launch import empty_activation

# ----------------------------------------------------------------------------------------------
# fusedres::conv_bn_act
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("fusedres::conv_bn_act", mutates_args=())
def conv_bn_act(x: Tensor, weight: Tensor, scale: Optional[Tensor], shift: Optional[Tensor], stride: List[int],
                padding: List[int], dilation: List[int], groups: int, residual: Optional[Tensor], relu: bool,
                shortcut_input: Optional[Tensor], shortcut_weight: Optional[Tensor],
                shortcut_scale: Optional[Tensor], shortcut_shift: Optional[Tensor], shortcut_stride: int,
                shortcut_fold: Optional[Tensor] = None) -> Tensor:
    # An eval BN arrives folded into scale/shift (fusedres._fold). shortcut_fold: the projection epilogue's
    # [4, K] (kernels.conv.projection_fold), given instead of scale/shift and shortcut_scale/shortcut_shift.
    shortcut = None if shortcut_input is None else \
        kernels.ProjectionShortcut(shortcut_input, shortcut_weight, shortcut_scale, shortcut_shift, shortcut_stride,
                                   shortcut_fold)
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
# fusedres::image_mean and fusedres::gated_tail: an attention block's eval tail
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("fusedres::image_mean", mutates_args=())
def image_mean(y: Tensor) -> Tensor:
    """[N, K]: the global average pool of y [N, K, P, Q]."""
    return tail_k.image_mean(y)


@image_mean.register_fake
def _image_mean_fake(y):
    return y.new_empty(y.shape[:2])


@torch.library.custom_op("fusedres::gated_tail", mutates_args=())
def gated_tail(branch: Tensor, gate: Tensor, shortcut: Tensor, relu: bool) -> Tensor:
    """relu(branch * gate[n, k] + shortcut) in one pass."""
    return tail_k.bn_act(branch, None, None, residual=shortcut, relu=relu, attn=gate.contiguous())


@gated_tail.register_fake
def _gated_tail_fake(branch, *args):
    return empty_activation(branch, branch.shape)


def _eval_only(ctx, *grads):
    raise NotImplementedError(
        "fusedres: backward through an eval-mode fused attention tail is not implemented. Call model.train() to "
        "train with batch statistics, or run inference under torch.no_grad() / torch.inference_mode().")


image_mean.register_autograd(_eval_only)
gated_tail.register_autograd(_eval_only)


# ----------------------------------------------------------------------------------------------
# fusedres::train_chain and fusedres::train_chain_backward
# ----------------------------------------------------------------------------------------------
# Schema (the argument names are those of chain.ChainParams and chain.ChainSpec, in that order):
#   train_chain(x, weights, gammas, betas, running_means, running_vars, num_batches, row_scale,
#               geometry, momentums, eps, shortcut_kind, shortcut_stride, recompute_last, group, tail)
#     -> ChainOutputs.pack(): [out, yd, residual_sink, *ys, *per-BN (mean, invstd, scale, shift), *per-BN (new
#        running mean, new running var)]
#   train_chain_backward(dout, attention_grads, saved (chain.SavedChain's fields), needs, <ChainSpec>)
#     -> ChainGrads.pack(): [dx, *per-layer (dw, dgamma, dbeta)]
# Lists hold one entry per layer (the units' convs, then the projection's); a missing result tensor is
# packed as an empty 1-D tensor (chain.absent).

@torch.library.custom_op("fusedres::train_chain", mutates_args=())
def train_chain(x: Tensor, weights: List[Tensor], gammas: List[Optional[Tensor]], betas: List[Optional[Tensor]],
                running_means: List[Optional[Tensor]], running_vars: List[Optional[Tensor]],
                num_batches: List[Optional[Tensor]], row_scale: Optional[Tensor], geometry: List[int],
                momentums: List[float], eps: List[float], shortcut_kind: str, shortcut_stride: int,
                recompute_last: bool, group: int, tail: str) -> List[Tensor]:
    params = ChainParams(weights, gammas, betas, running_means, running_vars, num_batches, row_scale)
    spec = ChainSpec(geometry, momentums, eps, shortcut_kind, shortcut_stride, recompute_last, group, tail)
    return chain.chain_forward(x, params, spec).pack()


_NUM_PARAMS = len(ChainParams._fields)


@train_chain.register_fake
def _train_chain_fake(x, *args):
    params, spec = ChainParams(*args[:_NUM_PARAMS]), ChainSpec(*args[_NUM_PARAMS:])
    return chain.chain_forward_shapes(x, params, spec).pack()


def _train_chain_setup(ctx, inputs, output):
    x, *args = inputs
    params, spec = ChainParams(*args[:_NUM_PARAMS]), ChainSpec(*args[_NUM_PARAMS:])
    res = ChainOutputs.unpack(output, spec.num_layers)
    ctx.spec, ctx.lists = spec, ChainGrads.lists_of(params)
    ctx.needs = [x.requires_grad] + [w.requires_grad for w in params.weights]
    saved = SavedChain(x, res.out, res.yd, res.ys, params.weights, params.gammas, res.stats, params.row_scale)
    leaves, ctx.structure = saved.flatten()
    ctx.save_for_backward(*leaves)
    keep = {id(t) for t in res.differentiable(spec)}
    ctx.mark_non_differentiable(*(t for t in output if id(t) not in keep))
    ctx.set_materialize_grads(False)  # the outputs other than ``out`` get no gradient: no zeros for them


def _train_chain_backward(ctx, grads):
    spec = ctx.spec
    grads = ChainOutputs.unpack(list(grads), spec.num_layers)
    no_tail = chain.AttentionGrads(*[None] * len(chain.AttentionGrads._fields))
    tail = chain.AttentionGrads.of(grads, spec) if spec.tail == "attention" else no_tail
    if grads.out is None and all(t is None for t in tail):
        g = ChainGrads(None, *[[None] * spec.num_layers] * len(chain.TRAINED))
    else:
        saved = SavedChain.unflatten(ctx.saved_tensors, ctx.structure)
        g = ChainGrads.unpack(torch.ops.fusedres.train_chain_backward(
            grads.out, list(tail), *saved[:-2], BNStats.flatten(saved.stats), saved.row_scale, ctx.needs, *spec))
    return (g.dx, *g.params(ctx.lists), *(None for _ in spec))


train_chain.register_autograd(_train_chain_backward, setup_context=_train_chain_setup)


@torch.library.custom_op("fusedres::train_chain_backward", mutates_args=())
def train_chain_backward(dout: Optional[Tensor], attention_grads: List[Optional[Tensor]], x: Tensor, out: Tensor,
                         yd: Optional[Tensor], ys: List[Tensor], weights: List[Tensor], gammas: List[Optional[Tensor]],
                         stats: List[Tensor], row_scale: Optional[Tensor], needs: List[bool], geometry: List[int],
                         momentums: List[float], eps: List[float], shortcut_kind: str, shortcut_stride: int,
                         recompute_last: bool, group: int, tail: str) -> List[Tensor]:
    spec = ChainSpec(geometry, momentums, eps, shortcut_kind, shortcut_stride, recompute_last, group, tail)
    saved = SavedChain(x, out, yd, ys, weights, gammas, BNStats.unflatten(stats), row_scale)
    tail_grads = chain.AttentionGrads(*attention_grads) if tail == "attention" else None
    return chain.chain_backward(dout, tail_grads, saved, spec, needs).pack(x)


@train_chain_backward.register_fake
def _train_chain_backward_fake(dout, attention_grads, x, out, yd, ys, weights, gammas, stats, row_scale, needs,
                               *spec):
    return chain.chain_backward_shapes(x, weights, gammas, needs, ChainSpec(*spec)).pack(x)


def _no_double_backward(ctx, grads):
    raise NotImplementedError("fusedres: double backward through the fused training chain is not supported")


train_chain_backward.register_autograd(_no_double_backward)


# ----------------------------------------------------------------------------------------------
# fusedres::attention_tail and fusedres::attention_tail_backward
# ----------------------------------------------------------------------------------------------
# attention_tail(<attention.TailInputs fields>, relu) -> out
# attention_tail_backward(dout, out, <TailInputs fields>, relu) -> a gradient per TailInputs field (absent
# where there is none)

@torch.library.custom_op("fusedres::attention_tail", mutates_args=())
def attention_tail(y: Tensor, mean: Tensor, invstd: Tensor, gamma: Optional[Tensor], beta: Optional[Tensor],
                   attn: Tensor, row_scale: Optional[Tensor], residual: Optional[Tensor],
                   residual_sink: Optional[Tensor], yd: Optional[Tensor],
                   mean_d: Optional[Tensor], invstd_d: Optional[Tensor], gamma_d: Optional[Tensor],
                   beta_d: Optional[Tensor], relu: bool) -> Tensor:
    return attention.tail_forward(TailInputs(y, mean, invstd, gamma, beta, attn, row_scale, residual, residual_sink,
                                             yd, mean_d, invstd_d, gamma_d, beta_d), relu)


@attention_tail.register_fake
def _attention_tail_fake(y, *args):
    return empty_activation(y, y.shape)


def _attention_tail_setup(ctx, inputs, output):
    *tensors, ctx.relu = inputs
    ctx.save_for_backward(output, *tensors)


def _attention_tail_backward(ctx, dout):
    out, *tensors = ctx.saved_tensors
    grads = torch.ops.fusedres.attention_tail_backward(dout, out, *tensors, ctx.relu)
    return (*(chain.present(g) for g in grads), None)


attention_tail.register_autograd(_attention_tail_backward, setup_context=_attention_tail_setup)


@torch.library.custom_op("fusedres::attention_tail_backward", mutates_args=())
def attention_tail_backward(dout: Tensor, out: Tensor, y: Tensor, mean: Tensor, invstd: Tensor,
                            gamma: Optional[Tensor], beta: Optional[Tensor], attn: Tensor, row_scale: Optional[Tensor],
                            residual: Optional[Tensor], residual_sink: Optional[Tensor], yd: Optional[Tensor],
                            mean_d: Optional[Tensor],
                            invstd_d: Optional[Tensor], gamma_d: Optional[Tensor], beta_d: Optional[Tensor],
                            relu: bool) -> List[Tensor]:
    t = TailInputs(y, mean, invstd, gamma, beta, attn, row_scale, residual, residual_sink, yd, mean_d, invstd_d,
                   gamma_d, beta_d)
    return [chain.absent(y) if g is None else g for g in attention.tail_backward(dout, out, t, relu)]


@attention_tail_backward.register_fake
def _attention_tail_backward_fake(dout, out, *args):
    t = TailInputs(*args[:-1])
    return [chain.absent(t.y) if g is None else g for g in attention.tail_backward_shapes(t)]


attention_tail_backward.register_autograd(_no_double_backward)
