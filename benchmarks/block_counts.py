"""Per-block work of timm's SE / ECA and stochastic-depth blocks in one training step, in the Triton
interpreter: Triton launches (forward, backward) and the eager aten ops that read or write an activation
(allocations and views aside). Needs timm. The README's table of these blocks comes from this script.

    python benchmarks/block_counts.py
"""
import collections
import os

os.environ["TRITON_INTERPRET"] = "1"  # before fusedres (and so triton's @jit) is imported

import timm  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import fusedres  # noqa: E402
from fusedres.bench.counts import count  # noqa: E402

ALLOWED = ("set_", "empty", "detach", "alias", "view", "expand", "as_strided", "slice", "permute", "fusedres.")


class ActivationOps(TorchDispatchMode):
    """Eager aten ops on an activation-shaped tensor ([2, C, H, W], H * W > 1)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ts = [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        if any(t.dim() == 4 and t.shape[0] == 2 and t.shape[2] * t.shape[3] > 1 for t in ts) and \
                not any(w in str(func) for w in ALLOWED):
            self.ops[str(func)] += 1
        return out


torch.manual_seed(0)
CASES = (("seresnet50", {}, True), ("seresnet50", {}, False), ("ecaresnet50d", {}, False),
         ("resnet50d", {"drop_path_rate": 0.5}, False), ("resnet18d", {"drop_path_rate": 0.5}, False),
         ("resnet18d", {}, False))
for model_name, kw, proj in CASES:  # the last block with (or without) a projection, narrow, batch 2
    model = fusedres.convert(timm.create_model(model_name, num_classes=10, layers=(2, 1, 1, 1),
                                               channels=(16, 32, 64, 128), stem_width=8, **kw)).train()
    block_path, block = [(n, m) for n, m in model.named_modules() if n.count(".") == 1 and n.startswith("layer")
                             and (getattr(m, "downsample", None) is not None) == proj][-1]
    cin = block.conv1.in_channels
    x = torch.randn(2, cin, 8, 8, requires_grad=True)
    with count() as cf, ActivationOps() as af:
        out = block(x)
    g = torch.randn_like(out)
    with count() as cb, ActivationOps() as ab:
        out.backward(g)
    print(f"{model_name} {block_path}: Triton launches forward {cf.triton_launches}, backward {cb.triton_launches}; "
          f"eager activation ops forward {sum(af.ops.values())} {dict(af.ops)}, backward {sum(ab.ops.values())} "
          f"{dict(ab.ops)}")
