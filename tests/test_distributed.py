"""Synchronized batch statistics and DistributedDataParallel: 2 processes on gloo, CPU, interpreter.

Each rank's output, the summed gradients and the running statistics must equal eager BatchNorm over
the whole batch, which is what nn.SyncBatchNorm computes (nn.SyncBatchNorm itself refuses CPU tensors
under a process group, so it cannot be the reference here)."""
import os
import socket
import subprocess
import sys

import pytest
import torch.distributed as dist

WORKER = os.path.join(os.path.dirname(__file__), "_dist_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("mode", ["syncbn_convert", "block_process_group", "ddp",
                                  pytest.param("syncbn_attention", marks=pytest.mark.slow)])  # SE: ~20 s
def test_two_ranks_match_whole_batch_batchnorm(mode):
    port, world = free_port(), 2
    env = dict(os.environ, TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "1"), FUSEDRES_STRICT="1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, WORKER, str(rank), str(world), str(port), mode], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(world)]
    results = [p.communicate(timeout=300) for p in procs]
    for rank, (p, (out, err)) in enumerate(zip(procs, results)):
        assert p.returncode == 0, f"rank {rank} failed:\n{out}\n{err[-3000:]}"
        assert f"rank {rank} OK" in out
