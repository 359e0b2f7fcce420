"""Host-side launch counts (issue 9): aten ops and Triton launches per ResNet-50 eval forward and per
training step (forward + backward), fused and eager. The main job's CPU verification prints the table;
tests/test_launch_counts.py pins the counts as budgets.

aten ops are seen by a TorchDispatchMode. A mode is switched off while an op runs, so the bodies of our
``fusedres::`` custom ops would be invisible: they are run under the mode instead, and the aten ops
they make count too. Triton launches are counted where every launch enters Triton (``JITFunction.run``;
the interpreter's ``InterpretedFunction.run``). ``launch=False`` makes each launch a no-op: counting
needs no results (every kernel output is a fresh ``torch.empty``), and interpreted kernels are slow.
"""
import collections
import contextlib
from dataclasses import dataclass, field
from typing import Counter, Dict, List, Optional, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from triton.runtime.jit import JITFunction

try:
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # pragma: no cover - every supported triton has it
    InterpretedFunction = None

# aten ops that make a zero-filled tensor (autograd materializing an unused output's gradient, or
# host code zeroing a buffer); fill_ counts when it writes 0.
_ZEROING = ("aten.zeros.", "aten.zeros_like.", "aten.new_zeros.", "aten.zero_.")
# The ones autograd uses to materialize the gradient of an output that got none.
AUTOGRAD_ZEROS = ("aten.zeros.", "aten.zeros_like.")


@dataclass
class Counts:
    """What one call did: aten op overloads, fusedres custom ops, Triton launches (by kernel), and the
    zero-filled tensors it made, as (aten op, shape)."""
    aten: Counter = field(default_factory=collections.Counter)
    custom: Counter = field(default_factory=collections.Counter)
    launches: Counter = field(default_factory=collections.Counter)
    zeros: List[Tuple[str, Tuple[int, ...]]] = field(default_factory=list)

    @property
    def aten_ops(self) -> int:
        return sum(self.aten.values())

    @property
    def triton_launches(self) -> int:
        return sum(self.launches.values())

    @property
    def activation_zeros(self) -> List[Tuple[str, Tuple[int, ...]]]:
        """Zero-filled tensors of 2 or more dimensions: activation-shaped, not per-channel vectors."""
        return [(op, s) for op, s in self.zeros if len(s) >= 2]

    def top(self, counter: str = "aten", n: int = 6) -> str:
        return ", ".join(f"{name} {c}" for name, c in getattr(self, counter).most_common(n))


def _custom_body(func):
    """The Python body of a ``torch.library.custom_op`` (None for other ops)."""
    try:
        from torch._library.custom_ops import OPDEFS
    except ImportError:  # pragma: no cover
        return None
    opdef = OPDEFS.get(func._schema.name) if hasattr(func, "_schema") else None
    return getattr(opdef, "_init_fn", None)


class _Record(TorchDispatchMode):
    def __init__(self, counts: Counts):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        if not name.startswith("aten."):
            body = _custom_body(func)
            if body is not None:
                self.counts.custom[name] += 1
                with self:  # count the aten ops and launches inside the op's body
                    return body(*args, **kwargs)
        self.counts.aten[name] += 1
        out = func(*args, **kwargs)
        zero_fill = name.startswith("aten.fill_.") and len(args) > 1 and not isinstance(args[1], torch.Tensor) \
            and args[1] == 0
        if (name.startswith(_ZEROING) or zero_fill) and isinstance(out, torch.Tensor):
            self.counts.zeros.append((name, tuple(out.shape)))
        return out


@contextlib.contextmanager
def count(launch: bool = True):
    """Within: every aten op and Triton launch is counted into the yielded Counts. launch=False: the
    Triton launches are counted but do nothing."""
    counts = Counts()
    patched = [(cls, cls.run) for cls in (JITFunction, InterpretedFunction) if cls is not None]

    def wrap(orig):
        def run(self, *args, grid, warmup, **kwargs):
            if warmup:
                return orig(self, *args, grid=grid, warmup=warmup, **kwargs)
            counts.launches[self.__name__] += 1
            return orig(self, *args, grid=grid, warmup=warmup, **kwargs) if launch else None
        return run

    for cls, orig in patched:
        cls.run = wrap(orig)
    try:
        with _Record(counts):
            yield counts
    finally:
        for cls, orig in patched:
            cls.run = orig


def _fused_path_runs_kernels(device: torch.device) -> None:
    from ..kernels._launch import INTERPRETED
    if device.type != "cuda" and not INTERPRETED:
        raise RuntimeError("fusedres counts: the fused path needs a GPU, or TRITON_INTERPRET=1 set before "
                           "fusedres is imported (else it falls back to PyTorch and the counts mean nothing)")


def _step(model, x, grad, train: bool):
    if train:
        for p in model.parameters():
            p.grad = None  # as optimizer.zero_grad(set_to_none=True): AccumulateGrad takes the gradient
        model(x).backward(grad)
    else:
        with torch.no_grad():
            model(x)


def resnet50_counts(batch: int = 2, size: int = 32, launch: Optional[bool] = None, device=None) -> Dict[str, Counts]:
    """Counts for one ResNet-50 (channels_last, fp32) eval forward and one training step (forward +
    backward of out.backward(g), gradients set to None before), fused and eager, each after one
    uncounted warm-up call. Keys: "fused eval forward", "fused train step", "eager eval forward",
    "eager train step". launch: run the Triton launches (default: on a GPU only; a no-op launch on a
    GPU would also feed the autotuner meaningless timings)."""
    from .. import models
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    _fused_path_runs_kernels(device)
    launch = device.type == "cuda" if launch is None else launch
    x = torch.randn(batch, 3, size, size, device=device).to(memory_format=torch.channels_last)
    rows = {}
    grad = torch.randn(batch, 1000, device=device)  # d loss / d logits
    for kind, fused in (("fused", True), ("eager", False)):
        model = models.resnet50(fused=fused).to(device).to(memory_format=torch.channels_last)
        for mode, train in (("eval forward", False), ("train step", True)):
            model.train(train)
            with count(launch=launch):
                _step(model, x, grad, train)  # warm-up: autotuning, lazy initialization
            with count(launch=launch) as counts:
                _step(model, x, grad, train)
            rows[f"{kind} {mode}"] = counts
    return rows


def format_table(rows: Dict[str, Counts]) -> str:
    """The counts as a markdown table."""
    lines = ["| ResNet-50 call | aten ops | zero-filled tensors (>= 2-D) | Triton launches | most frequent aten ops |",
             "| --- | ---: | ---: | ---: | --- |"]
    for name, c in rows.items():
        lines.append(f"| {name} | {c.aten_ops} | {len(c.zeros)} ({len(c.activation_zeros)}) | "
                     f"{c.triton_launches} | {c.top()} |")
    lines += ["", "| ResNet-50 call | Triton launches by kernel |", "| --- | --- |"]
    lines += [f"| {name} | {c.top('launches', 12) or '-'} |" for name, c in rows.items()]
    return "\n".join(lines)
