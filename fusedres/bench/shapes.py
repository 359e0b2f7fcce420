"""Shapes and weights for measuring: every distinct conv launch and block of a model, and weights
that look trained. Shared by the command line and the benchmarks (through ``fusedres.bench.measure``).

The shapes come from a forward with hooks on the meta device (nothing is typed by hand, nothing is
allocated); ``twins`` materializes a reference model (or one block) and its fused twin with the same
weights and BN running statistics calibrated on random data.
"""
import functools
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

IMAGENET_MODELS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "wide_resnet50_2")
CIFAR_DEPTHS = (20, 32, 44, 56, 110)
MODELS = IMAGENET_MODELS + tuple(f"cifar_resnet{d}" for d in CIFAR_DEPTHS)


# ------------------------------------------------------------------------------------------------
# Models and their shapes
# ------------------------------------------------------------------------------------------------

def build_model(name: str, fused: bool) -> nn.Module:
    """A model of ``MODELS`` by name (fused or the reference twin), on the current default device."""
    import fusedres
    if name in IMAGENET_MODELS:
        return getattr(fusedres, name)(fused=fused)
    if name.startswith("cifar_resnet") and name[len("cifar_resnet"):].isdigit():
        return fusedres.cifar_resnet(int(name[len("cifar_resnet"):]), fused=fused)
    raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")


def image_size(name: str) -> int:
    return 32 if name.startswith("cifar") else 224


def is_block(m: nn.Module) -> bool:
    """torchvision-shaped residual block (duck-typed like fusedres.convert)."""
    return all(hasattr(m, a) for a in ("conv1", "bn1", "conv2", "bn2", "downsample"))


@dataclass(frozen=True)
class ConvShape:
    """One conv + folded BN (+ shortcut) (+ ReLU): what one fused launch computes."""
    c: int
    k: int
    r: int
    s: int
    stride: int
    padding: int
    dilation: int
    groups: int
    h: int
    w: int
    relu: bool = True
    tail: str = "none"     # "none" | "residual" (identity or option A) | "projection" (1x1 conv + BN)
    res_c: int = 0         # residual channels (fewer than k: option A, zero-padded)
    res_stride: int = 1    # residual = block input [:, :, ::res_stride, ::res_stride]
    sc_c: int = 0          # projection: input channels, size and stride
    sc_h: int = 0
    sc_w: int = 0
    sc_stride: int = 1

    @property
    def p(self) -> int:
        from ..kernels.conv import out_size  # not at import: the command line imports this before the kernels
        return out_size(self.h, self.r, self.stride, self.padding, self.dilation)

    @property
    def q(self) -> int:
        from ..kernels.conv import out_size
        return out_size(self.w, self.s, self.stride, self.padding, self.dilation)

    @property
    def dgrad(self) -> bool:
        """Does a training step need the input's gradient? Not for the image (the stem)."""
        return self.c > 3

    @property
    def label(self) -> str:
        tail = {"none": "", "projection": " +proj", "residual": " +res" if self.res_c == self.k else " +resA"}
        return (f"{self.r}x{self.s} {self.c}-{self.k}" + (f" s{self.stride}" if self.stride > 1 else "")
                + (f" g{self.groups}" if self.groups > 1 else "") + f" @{self.h}" + tail[self.tail]
                + ("" if self.relu else " norelu"))

    def flops(self, n: int, training: bool = False) -> float:
        """2*N*P*Q*K*C*R*S/groups (+ the projection GEMM); a training step adds dgrad and wgrad."""
        main = 2.0 * n * self.p * self.q * self.k * (self.c // self.groups) * self.r * self.s
        proj = 2.0 * n * self.p * self.q * self.k * self.sc_c if self.tail == "projection" else 0.0
        if not training:
            return main + proj
        return main * (3 if self.dgrad else 2) + proj * 3

    def min_bytes(self, n: int, elsize: int, training: bool = False) -> float:
        """Each tensor the step must touch, read or written once (a strided 1x1 reads 1/stride^2 of x)."""
        x = n * self.c * min(self.h * self.w, self.p * self.q * self.r * self.s)
        w = self.k * (self.c // self.groups) * self.r * self.s
        y = n * self.k * self.p * self.q
        res = n * self.res_c * self.p * self.q if self.tail == "residual" else 0
        xd, wd = (n * self.sc_c * self.p * self.q, self.k * self.sc_c) if self.tail == "projection" else (0, 0)
        fwd = x + w + y + res + xd + wd
        if not training:
            return elsize * fwd + 8.0 * self.k
        # backward: read dy, x, w (+xd, wd); write dx, dw, dres (+dxd, dwd); the forward writes y once.
        bwd = y + x + w + (x if self.dgrad else 0) + w + res + 2 * (xd + wd)
        return elsize * (fwd + bwd) + 24.0 * self.k


@dataclass
class Layer:
    shape: ConvShape
    names: List[str]

    @property
    def count(self) -> int:
        return len(self.names)


@dataclass
class BlockShape:
    """A distinct residual block: its module path in the model, input size and what it holds."""
    path: str
    kind: str               # class name without "Fused"
    c: int
    k: int
    stride: int
    h: int
    w: int
    shortcut: str           # "identity" | "projection" | "A" | "none"
    convs: Tuple[ConvShape, ...]
    names: List[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.kind} {self.c}-{self.k}" + (f" s{self.stride}" if self.stride > 1 else "") \
            + f" @{self.h} {self.shortcut}"


@dataclass
class ModelShapes:
    layers: List[Layer]     # distinct conv launches, in forward order
    blocks: List[BlockShape]  # distinct blocks, in forward order
    fc_flops: float         # per image


@functools.lru_cache(maxsize=16)
def model_shapes(name: str, size: Optional[int] = None) -> ModelShapes:
    """Every distinct conv launch and block of model ``name`` at ``size`` x ``size`` input (meta device)."""
    size = size or image_size(name)
    with torch.device("meta"):
        model = build_model(name, fused=False)
    seen_in: Dict[str, Tuple[int, ...]] = {}
    order: List[str] = []
    hooks = []
    for mname, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d) or is_block(mod):
            def hook(m, args, mname=mname):
                seen_in[mname] = tuple(args[0].shape)
                order.append(mname)
            hooks.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        out = model.eval()(torch.empty(1, 3, size, size, device="meta"))
    for h in hooks:
        h.remove()
    modules = dict(model.named_modules())

    def conv_shape(cname: str, **tail) -> ConvShape:
        m = modules[cname]
        _, c, h, w = seen_in[cname]
        return ConvShape(c, m.out_channels, *m.kernel_size, m.stride[0], m.padding[0], m.dilation[0], m.groups, h,
                         w, **tail)

    tails: Dict[str, dict] = {}      # last conv of each block -> its shortcut epilogue
    skip = set()                     # projection convs: computed inside the last conv's launch
    blocks: Dict[tuple, BlockShape] = {}
    for bname in (n for n in order if is_block(modules[n])):
        blk = modules[bname]
        convs = sorted(n for n, _ in blk.named_children() if n.startswith("conv") and n[4:].isdigit())
        last = f"{bname}.{convs[-1]}"
        _, c, h, w = seen_in[bname]
        ds = blk.downsample
        if not getattr(blk, "residual", True):
            tail, sc = {"relu": True}, "none"
        elif ds is None:
            tail, sc = {"tail": "residual", "res_c": c}, "identity"
        elif isinstance(ds, nn.Sequential) and len(ds) == 2 and isinstance(ds[0], nn.Conv2d):
            d = ds[0]
            skip.add(f"{bname}.downsample.0")
            _, dc, dh, dw = seen_in[f"{bname}.downsample.0"]
            tail = {"tail": "projection", "sc_c": dc, "sc_h": dh, "sc_w": dw, "sc_stride": d.stride[0]}
            sc = "projection"
        else:  # option A (PadChannelsShortcut) or another module: a residual of the block input's channels
            tail, sc = {"tail": "residual", "res_c": getattr(ds, "in_channels", c),
                        "res_stride": getattr(ds, "stride", 1)}, "A"
        tails[last] = tail
        shapes = tuple(conv_shape(f"{bname}.{cv}", **(tail if f"{bname}.{cv}" == last else {})) for cv in convs)
        kind = type(blk).__name__.replace("Fused", "")
        b = BlockShape(bname, kind, c, shapes[-1].k, max(s.stride for s in shapes), h, w, sc, shapes)
        key = (kind, sc, shapes)
        blocks.setdefault(key, b).names.append(bname)

    layers: Dict[ConvShape, Layer] = {}
    for cname in order:
        if isinstance(modules[cname], nn.Conv2d) and cname not in skip:
            shape = conv_shape(cname, **tails.get(cname, {}))
            layers.setdefault(shape, Layer(shape, [])).names.append(cname)
    fc = [m for m in model.modules() if isinstance(m, nn.Linear)]
    fc_flops = sum(2.0 * m.in_features * m.out_features for m in fc)
    assert out.shape[0] == 1
    return ModelShapes(list(layers.values()), list(blocks.values()), fc_flops)


def total_flops_bytes(shapes: ModelShapes, n: int, elsize: int, training: bool) -> Tuple[float, float]:
    """FLOPs and fewest bytes of a whole model step: its conv launches (counted) and the classifier."""
    flops = sum(lay.count * lay.shape.flops(n, training) for lay in shapes.layers)
    flops += shapes.fc_flops * n * (3 if training else 1)
    nbytes = sum(lay.count * lay.shape.min_bytes(n, elsize, training) for lay in shapes.layers)
    return flops, nbytes


# ------------------------------------------------------------------------------------------------
# Weights that look trained
# ------------------------------------------------------------------------------------------------

def init_module(module: nn.Module, example: Sequence, generator: Optional[torch.Generator] = None) -> nn.Module:
    """Fresh weights, non-trivial BN affine, and BN running statistics calibrated on ``module(*example)``.

    One train-mode forward with cumulative averaging sets running mean/var to the batch's statistics
    (so activations stay O(1) through depth, as in a trained net), then they are perturbed.
    """
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu", generator=generator)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, m.in_features ** -0.5, generator=generator)
                nn.init.zeros_(m.bias)
        momenta = [bn.momentum for bn in bns]
        for bn in bns:
            bn.weight.uniform_(0.5, 1.5, generator=generator)
            bn.bias.normal_(0, 0.2, generator=generator)
            bn.reset_running_stats()
            bn.momentum = None
        module.train()
        module(*example)
        for bn, mom in zip(bns, momenta):
            bn.momentum = mom
            bn.running_mean.add_(torch.randn(bn.running_mean.shape, generator=generator, device=bn.running_mean.device,
                                             dtype=bn.running_mean.dtype) * 0.1 * bn.running_var.sqrt())
            bn.running_var.mul_(torch.empty_like(bn.running_var).uniform_(0.8, 1.25, generator=generator))
    return module.eval()


def twins(model: str, device: torch.device, path: str = "", calib_batch: int = 8,
          size: Optional[int] = None, seed: int = 0) -> Tuple[nn.Module, nn.Module]:
    """(reference, fused) twins of ``model`` (or of its submodule ``path``) in fp32 on ``device``, same weights."""
    size = size or image_size(model)
    with torch.device("meta"):
        ref_full, fused_full = build_model(model, fused=False), build_model(model, fused=True)
    ref = ref_full.get_submodule(path) if path else ref_full
    fused = fused_full.get_submodule(path) if path else fused_full
    ref.to_empty(device=device)
    fused.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    if path:  # calibrate the block on its own input size, found on the meta model
        shapes = model_shapes(model, size)
        b = next(b for b in shapes.blocks if path in b.names)
        example = [torch.randn(calib_batch, b.c, b.h, b.w, device=device, generator=gen)]
    else:
        example = [torch.randn(calib_batch, 3, size, size, device=device, generator=gen)]
    init_module(ref, example, gen)
    fused.load_state_dict(ref.state_dict())
    return ref.eval(), fused.eval()
