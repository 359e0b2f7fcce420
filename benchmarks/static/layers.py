"""Run the fused ResNet paths on "meta" tensors so that every Triton launch they make is recorded.

The real modules (fused blocks and the stem) run unchanged: on meta tensors host code costs nothing
and allocates no activation memory. Two switches make that possible, both undone on exit:
- fusedres accepts the meta device (its dispatcher otherwise falls back to PyTorch);
- the ``fusedres::`` custom ops run their real implementation on meta tensors instead of their fake
  (shape-only) one, so the Triton launchers run and autograd calls the registered backward.
"""
import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional

import torch
from torch._library.custom_ops import OPDEFS  # every torch.library.custom_op, by qualified name

import fusedres
from fusedres import _autocast, _dispatch, ops  # noqa: F401 - ops registers the fusedres:: custom ops

# The networks, and the ImageNet input size.
_ARCHS = {"resnet18": fusedres.resnet18, "resnet50": fusedres.resnet50}
IMAGE = 224


@dataclass
class LayerClass:
    """One layer class of a network: a stem or a block at its real input shape."""
    net: str
    name: str                     # "stem", "layer2.0", ...
    module: torch.nn.Module
    in_shape: tuple               # (C, H, W)

    @property
    def key(self) -> str:
        return f"{self.net}.{self.name}"


class _Stem(torch.nn.Module):
    """The network's fused stem (conv1 + bn1 + relu) alone."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net._stem(x)


def layer_classes(net: str, only: Optional[List[str]] = None) -> List[LayerClass]:
    """The stem and, per stage, its first block and (when it differs) its second one."""
    model = _ARCHS[net](fused=True)
    out = [LayerClass(net, "stem", _Stem(model), (3, IMAGE, IMAGE))]
    hw, ch = IMAGE // 4, 64
    for s in range(1, 5):
        stage = getattr(model, f"layer{s}")
        picks = [0, 1] if stage[0].downsample is not None else [0]
        for i in picks:
            blk = stage[i]
            out.append(LayerClass(net, f"layer{s}.{i}", blk, (ch, hw, hw)))
            hw //= blk.conv1.stride[0] * (blk.conv2.stride[0] if hasattr(blk, "conv2") else 1)
            ch = (blk.conv3 if hasattr(blk, "conv3") else blk.conv2).out_channels
    if only:
        out = [lc for lc in out if lc.name in only or lc.key in only]
    return out


@contextlib.contextmanager
def meta_fused_path() -> Iterator[None]:
    """fusedres runs its Triton launchers on meta tensors (see the module docstring)."""
    custom = [op for name, op in list(OPDEFS.items()) if name.startswith("fusedres::")]
    saved_fake = [op._abstract_fn for op in custom]
    saved_reason = _dispatch.unsupported_device_reason
    saved_strict = _dispatch.strict
    saved_autocast = _autocast.autocast_dtype

    def reason(device):
        return None if device.type == "meta" else saved_reason(device)

    for op in custom:
        op._abstract_fn = op._init_fn
    _dispatch.unsupported_device_reason = reason
    _dispatch.strict = lambda: True  # a fallback to PyTorch would silently compile nothing: make it an error
    _autocast.autocast_dtype = lambda dev: None if dev == "meta" else saved_autocast(dev)  # no autocast on meta
    try:
        yield
    finally:
        for op, fake in zip(custom, saved_fake):
            op._abstract_fn = fake
        _dispatch.unsupported_device_reason = saved_reason
        _dispatch.strict = saved_strict
        _autocast.autocast_dtype = saved_autocast


def run_layer(lc: LayerClass, mode: str, dtype: torch.dtype, batch: int,
              channels_last: bool = True, on_phase: Callable[[str], None] = lambda _: None) -> None:
    """One forward (eval) or forward + backward (train) of the layer class at its real shape."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    mod = lc.module.to(device="meta", dtype=dtype, memory_format=fmt)  # parameters keep no data on meta
    mod.train(mode == "train")
    x = torch.empty((batch, *lc.in_shape), device="meta", dtype=dtype).to(memory_format=fmt)
    with meta_fused_path():
        if mode == "eval":
            on_phase("fwd")
            with torch.no_grad():
                mod(x)
            return
        x.requires_grad_(lc.name != "stem")
        on_phase("fwd")
        out = mod(x)
        on_phase("bwd")
        out.backward(torch.empty_like(out))
