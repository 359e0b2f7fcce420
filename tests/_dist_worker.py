"""One rank of tests/test_distributed.py: fused training over a gloo process group, checked against
eager BatchNorm over the whole global batch in float64 (what nn.SyncBatchNorm computes)."""
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

import fusedres

TOL = 1e-5


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def check(what, a, b):
    err = rel_err(a, b)
    assert err <= TOL, f"rank {dist.get_rank()}: {what}: relative error {err:.2e}"


def main(rank: int, world: int, port: int, mode: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    if mode == "block_process_group":  # plain BatchNorm2d layers, synchronized through the block option
        ds = nn.Sequential(fusedres.reference.conv1x1(8, 16, 2), nn.BatchNorm2d(16))
        model = fusedres.FusedBasicBlock(8, 16, 2, ds, process_group=dist.group.WORLD)
        ref = fusedres.reference.BasicBlock(8, 16, 2, nn.Sequential(fusedres.reference.conv1x1(8, 16, 2),
                                                                     nn.BatchNorm2d(16)))
        x_full = torch.randn(4 * world, 8, 8, 8)
    elif mode == "syncbn_convert":  # a whole model whose BNs are nn.SyncBatchNorm, through fusedres.convert
        model = fusedres.convert(nn.SyncBatchNorm.convert_sync_batchnorm(fusedres.cifar_resnet(8, "B", fused=False)))
        ref = fusedres.cifar_resnet(8, "B", fused=False)
        x_full = torch.randn(4 * world, 3, 16, 16)
    else:  # ddp: plain BatchNorm2d (DDP refuses SyncBatchNorm on CPU modules): per-rank statistics
        model = fusedres.cifar_resnet(8, "B")
        ref = fusedres.cifar_resnet(8, "B", fused=False)
        x_full = torch.randn(4 * world, 3, 16, 16)
    ref.load_state_dict(model.state_dict())
    ref.double().train()
    model.train()
    trained = nn.parallel.DistributedDataParallel(model) if mode == "ddp" else model
    x = x_full[4 * rank:4 * (rank + 1)].contiguous()
    out = trained(x)
    out.square().sum().backward()
    ref_x = x if mode == "ddp" else x_full  # DDP alone: each rank normalizes its own batch
    ref_out = ref(ref_x.double())
    ref_out.square().sum().backward()
    check("output", out, ref_out if mode == "ddp" else ref_out[4 * rank:4 * (rank + 1)])
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        grad, want = p.grad.clone(), q.grad.clone()
        if mode == "ddp":
            dist.all_reduce(want)  # DDP averages the ranks' gradients
            want /= world
        else:
            dist.all_reduce(grad)  # parameter gradients are local, as in nn.SyncBatchNorm
        check(f"grad {name}", grad, want)
    for (name, b), c in zip(model.named_buffers(), ref.buffers()):
        if b.dtype.is_floating_point:
            check(name, b, c)
        else:
            assert torch.equal(b, c), name
    dist.barrier()  # neither rank tears gloo down while the other still talks to it
    dist.destroy_process_group()
    print(f"rank {rank} OK", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    # Skip the interpreter's teardown: gloo's threads have aborted it ("terminate called without an
    # active exception") after a passing run, once in a loaded full-suite run.
    os._exit(0)
