"""One rank of tests/test_convert_stems.py's SyncBatchNorm test: a whole torchvision-shaped ResNet (stem
included) made nn.SyncBatchNorm and converted, trained one step over gloo, checked against eager
BatchNorm over the whole global batch in float64 (what nn.SyncBatchNorm computes)."""
import os
import sys

import torch
import torch.distributed as dist
from _dist_worker import check
from torch import nn
from torchvision_like import torchvision_resnet

import fusedres


def main(rank: int, world: int, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    ref = torchvision_resnet(bottleneck=False, widths=(8, 8, 16, 16))
    model = torchvision_resnet(bottleneck=False, widths=(8, 8, 16, 16))
    model.load_state_dict(ref.state_dict())
    model = fusedres.convert(nn.SyncBatchNorm.convert_sync_batchnorm(model)).train()
    assert type(model).__name__ == "FusedStemResNet", type(model).__name__
    ref.double().train()
    x_full = torch.randn(2 * world, 3, 64, 64)  # 2x2 pixels at the last stage: a well-conditioned BN
    x = x_full[2 * rank:2 * (rank + 1)].contiguous()
    out = model(x)
    out.square().sum().backward()
    ref_out = ref(x_full.double())
    ref_out.square().sum().backward()
    check("output", out, ref_out[2 * rank:2 * (rank + 1)])
    grads = [p.grad.clone() for p in model.parameters()]
    for grad in grads:
        dist.all_reduce(grad)  # parameter gradients are local, as in nn.SyncBatchNorm
    got = dict(zip([f"grad {n}" for n, _ in model.named_parameters()], grads), **dict(model.named_buffers()))
    want = [q.grad for q in ref.parameters()] + list(ref.buffers())
    for (name, a), b in zip(got.items(), want):
        _ = check(name, a, b) if a.dtype.is_floating_point else torch.equal(a, b) or check(name, a.double(), b)
    dist.barrier()  # neither rank tears gloo down while the other still talks to it
    dist.destroy_process_group()
    print(f"rank {rank} OK", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
    # Skip the interpreter's teardown: gloo's threads have aborted it ("terminate called without an
    # active exception") after a passing run, once in a loaded full-suite run.
    os._exit(0)
