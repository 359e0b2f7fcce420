"""Running statistics and num_batches_tracked written once per model call, not once per BN.

The training op returns each BN's new running mean and variance (it mutates nothing); copying them into the
buffers, and ``num_batches_tracked += 1``, is one small launch per tensor in eager PyTorch (159 for a
ResNet-50 step). Here the chain hands them to ``update``: inside a model call that ``install`` hooked
(``convert`` and fusedres's builders do), they are kept until that call returns and then written by two
``torch._foreach_*`` ops; anywhere else (a block called on its own, or under torch.compile, which fuses the
copies itself) one chain's are written at once by the same two ops. Either way the buffers hold the new
values when the call returns, as nn.BatchNorm2d's do.
"""
from typing import List, Sequence

import torch
from torch import Tensor, nn


class _Pending:
    def __init__(self):
        self.depth = 0
        self.counters: List[Tensor] = []
        self.buffers: List[Tensor] = []
        self.values: List[Tensor] = []


_PENDING = _Pending()


def _write(counters: Sequence[Tensor], buffers: Sequence[Tensor], values: Sequence[Tensor]) -> None:
    with torch.no_grad():
        if counters:
            torch._foreach_add_(list(counters), 1)
        if buffers:
            torch._foreach_copy_(list(buffers), list(values))


def update(counters: Sequence[Tensor], buffers: Sequence[Tensor], values: Sequence[Tensor]) -> None:
    """num_batches_tracked += 1 for ``counters``, and ``buffers`` := ``values``: now, or when the hooked model
    call returns."""
    if _PENDING.depth == 0 or torch.compiler.is_compiling():
        _write(counters, buffers, values)
        return
    _PENDING.counters += counters
    _PENDING.buffers += buffers
    _PENDING.values += values


def settle(tensors: Sequence[Tensor]) -> None:
    """Write what is pending now if any of ``tensors`` (BN buffers a chain is about to read) is in it: a BN
    called twice in one model call reads its first update, as in eager."""
    pending = {id(t) for t in _PENDING.buffers + _PENDING.counters}
    if pending and any(id(t) in pending for t in tensors):
        _flush()


def _flush() -> None:
    pending = (_PENDING.counters, _PENDING.buffers, _PENDING.values)
    _PENDING.counters, _PENDING.buffers, _PENDING.values = [], [], []
    _write(*pending)


def _open(module, args) -> None:
    if torch.compiler.is_compiling():
        return
    _PENDING.depth += 1


def _close(module, args, output) -> None:
    """Runs when the hooked call returns or raises (always_call): what ran of it is written either way."""
    if torch.compiler.is_compiling() or _PENDING.depth == 0:
        return
    _PENDING.depth -= 1
    if _PENDING.depth == 0:
        _flush()


def install(model: nn.Module) -> None:
    """Batch the running-statistics writes of every call of ``model`` (idempotent)."""
    if _open in model._forward_pre_hooks.values():
        return
    model.register_forward_pre_hook(_open)
    model.register_forward_hook(_close, always_call=True)
