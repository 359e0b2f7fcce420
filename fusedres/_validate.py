"""Argument checks for the fused ops. Every message names the argument, what was expected and what
was received, in PyTorch's wording style, so nothing reaches a kernel that would be silently wrong."""
from typing import Optional, Sequence, Tuple, Union

import torch

from ._autocast import cast_for_autocast
from .kernels.conv import out_size

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

IntPair = Union[int, Sequence[int]]


def pair(op: str, name: str, value: IntPair, minimum: int) -> Tuple[int, int]:
    """An int or a sequence of two ints, each >= minimum, as a tuple of two."""
    if type(value) is tuple and len(value) == 2 and type(value[0]) is int and type(value[1]) is int:
        vals = value  # a module's stride / padding (per launch): two ints, not bools, without the generator below
    else:
        vals = (value, value) if isinstance(value, int) else tuple(value)
        if len(vals) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
            raise TypeError(f"{op}: expected {name} to be an int or a pair of ints, but got {value!r}")
    if min(vals) < minimum:
        raise ValueError(f"{op}: expected {name} to be >= {minimum}, but got {value!r}")
    return vals


def tensor(op: str, name: str, t, ndim: int, device: Optional[torch.device] = None,
           dtype: Optional[torch.dtype] = None, dtype_of: str = "input") -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: expected {name} to be a Tensor, but got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{op}: expected {name} to be a {ndim}-D tensor, but got a {t.dim()}-D tensor "
                         f"of size {list(t.shape)}")
    if device is not None and t.device != device:
        raise RuntimeError(f"{op}: expected {name} to be on the same device as input ({device}), "
                           f"but got {name} on {t.device}")
    if dtype is not None and t.dtype != dtype:
        raise RuntimeError(f"{op}: expected {name} to have the same dtype as {dtype_of} ({dtype}), "
                           f"but got {name} of dtype {t.dtype}")
    return t


def floating_input(op: str, x) -> torch.Tensor:
    tensor(op, "input", x, 4)
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{op}: expected input to have a floating dtype (float16, bfloat16, float32 or float64), "
                        f"but got input of dtype {x.dtype}")
    return x


def chain_input(op: str, x, weights: Sequence[torch.Tensor], groups: int):
    """A conv chain's input (a block, a stem) against its convs' weights, in the dtype torch.autocast gives
    both: a 4-D floating tensor with the first conv's channels, each weight on its device in its dtype.
    Returns (x, weights) as the chain computes with them (autocast's casts)."""
    floating_input(op, x)
    x, *weights = cast_for_autocast(x, *weights)
    conv_weight(op, "weight", weights[0], x, groups)
    for w in weights[1:]:
        tensor(op, "weight", w, 4, x.device, x.dtype)
    return x, weights


def per_channel(op: str, name: str, t, channels: int, device: torch.device) -> torch.Tensor:
    tensor(op, name, t, 1, device)
    if t.shape[0] != channels:
        raise ValueError(f"{op}: expected {name} to have {channels} elements (one per output channel), "
                         f"but got {t.shape[0]}")
    if not t.is_floating_point():
        raise TypeError(f"{op}: expected {name} to have a floating dtype, but got {t.dtype}")
    return t


def conv_weight(op: str, name: str, w, x: torch.Tensor, groups: int, input_name: str = "input") -> None:
    tensor(op, name, w, 4, x.device, x.dtype)
    k, cg = w.shape[0], w.shape[1]
    if k % groups != 0:
        raise ValueError(f"{op}: expected {name}'s output channels ({k}) to be divisible by groups={groups}, "
                         f"but got {name} of size {list(w.shape)}")
    if cg * groups != x.shape[1]:
        raise RuntimeError(f"{op}: given groups={groups}, {name} of size {list(w.shape)}, expected {input_name}"
                           f"{list(x.shape)} to have {cg * groups} channels, but got {x.shape[1]} channels instead")


def output_size(op: str, x: torch.Tensor, w: torch.Tensor, stride, padding, dilation) -> Tuple[int, int]:
    xs, ws = x.shape, w.shape
    if len(xs) == len(ws) == len(stride) + 2 == len(padding) + 2 == len(dilation) + 2 == 4:  # per launch: unrolled
        sizes = [out_size(xs[2], ws[2], stride[0], padding[0], dilation[0]),
                 out_size(xs[3], ws[3], stride[1], padding[1], dilation[1])]
    else:
        sizes = [out_size(size, k, s, p, d)
                 for size, k, s, p, d in zip(x.shape[2:], w.shape[2:], stride, padding, dilation)]
    if min(sizes) <= 0:
        padded = [size + 2 * p for size, p in zip(x.shape[2:], padding)]
        kernel = [d * (k - 1) + 1 for k, d in zip(w.shape[2:], dilation)]
        raise RuntimeError(f"{op}: expected input's padded spatial size {padded} to be at least the dilated kernel "
                           f"size {kernel}, but got input of size {list(x.shape)} (calculated output size "
                           f"{sizes} is too small)")
    return sizes[0], sizes[1]


def residual(op: str, r, x: torch.Tensor, out_shape: Sequence[int]) -> None:
    tensor(op, "residual", r, 4, x.device, x.dtype)
    n, k, p, q = out_shape
    if r.shape[0] != n or r.shape[2:] != (p, q) or r.shape[1] > k:
        raise RuntimeError(f"{op}: expected residual of size [{n}, <= {k}, {p}, {q}] (the output's size; fewer "
                           f"channels are zero-padded), but got residual of size {list(r.shape)}")


def identity_channels(op: str, x: torch.Tensor, out_channels: int) -> None:
    """An identity shortcut adds the block input itself: it must have the output's channels (eager's
    ``out += identity`` raises otherwise; only the option-A shortcut zero-pads)."""
    if x.shape[1] != out_channels:
        raise RuntimeError(f"{op}: expected input to have {out_channels} channels for the identity shortcut (the "
                           f"block's output channels; a block that changes channels needs a downsample), but got "
                           f"input with {x.shape[1]} channels")
