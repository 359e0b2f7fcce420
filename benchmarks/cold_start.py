"""Cold start of a fused ResNet, without a GPU: how many Triton kernel variants its first step compiles, and how long
``fusedres.precompile`` takes to compile them for a GPU target (sm_90 by default) from an empty Triton cache.

    python benchmarks/cold_start.py                     # the table: ResNet-50 train and eval, 1 and 2 compile processes
    python benchmarks/cold_start.py --budget            # CI: exit 1 if a training step compiles > 90 variants (~10 s)
    python benchmarks/cold_start.py --budget --seconds  # and if precompile (all CPUs) of training takes > 60 s
    python benchmarks/cold_start.py --one train --workers 2   # one timing (what the table runs per cell)

Each timing runs in a fresh process with a new, empty TRITON_CACHE_DIR, so nothing is cached in memory or on disk.
Compiles only: nothing is launched or timed on a GPU. The count needs no compile (Triton's compile keys only).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

COMPILE_BUDGET = 90      # variants of a ResNet-50 training step (issue 17 item 8; 186 before do_not_specialize)
SECONDS_BUDGET = 60.0    # precompile of that step on the 2-core CI machine (issue 17 item 8; ~100 s serial before)
DTYPES = ("bf16", "fp16", "fp32")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--net", default="resnet50")
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--dtype", default="bf16", choices=DTYPES)
    p.add_argument("--batch-train", type=int, default=128)
    p.add_argument("--batch-eval", type=int, default=256)
    p.add_argument("--image", type=int, default=224)
    p.add_argument("--workers", default="1,2", help="compile processes per timing, comma-separated (table)")
    p.add_argument("--one", choices=["train", "eval"], help="one timing in this process; prints JSON")
    p.add_argument("--count", action="store_true", help="with --one: count the variants, compile none")
    p.add_argument("--budget", action="store_true", help=f"exit 1 if a training step compiles > {COMPILE_BUDGET}")
    p.add_argument("--seconds", action="store_true",
                   help=f"with --budget: also time precompile (<= {SECONDS_BUDGET} s)")
    return p.parse_args(argv)


def measure(a, mode: str, workers: int, count: bool) -> dict:
    """One measurement in this process (its Triton cache must be new): variants, seconds."""
    import torch

    import fusedres
    from fusedres._precompile import count_variants, precompile

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype]
    model = getattr(fusedres, a.net)().to(dtype=dtype, memory_format=torch.channels_last)
    batch = a.batch_train if mode == "train" else a.batch_eval
    x = torch.empty(batch, 3, a.image, a.image, dtype=dtype).to(memory_format=torch.channels_last)
    t0, cpu0 = time.perf_counter(), _cpu()
    if count:
        n = count_variants(model, x, mode == "train", arch=a.arch)
        return dict(mode=mode, variants=n, seconds=time.perf_counter() - t0, workers=0)
    rep = precompile(model, x, mode == "train", workers=workers, arch=a.arch)
    cpu = [b - a for a, b in zip(cpu0, _cpu())]
    return dict(mode=mode, variants=rep.compiled, launches=rep.launches, seconds=rep.seconds, workers=workers,
                cpu_self=cpu[0], cpu_children=cpu[1])


def _cpu():
    """CPU seconds (user + system) of this process and of its finished child processes (compile workers, ptxas)."""
    return [sum(getattr(resource.getrusage(who), f) for f in ("ru_utime", "ru_stime"))
            for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]


def fresh(a, mode: str, workers: int, count: bool = False) -> dict:
    """measure() in a new process with an empty Triton cache."""
    with tempfile.TemporaryDirectory(prefix="fusedres-cold-") as cache:
        env = dict(os.environ, TRITON_CACHE_DIR=cache)
        env.pop("TRITON_INTERPRET", None)
        cmd = [sys.executable, os.path.abspath(__file__), "--one", mode, "--workers", str(workers), "--net", a.net,
               "--arch", str(a.arch), "--dtype", a.dtype, "--batch-train", str(a.batch_train),
               "--batch-eval", str(a.batch_eval), "--image", str(a.image)] + (["--count"] if count else [])
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.one:
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            sys.exit("cold_start: unset TRITON_INTERPRET (it compiles GPU code)")
        print(json.dumps(measure(a, a.one, int(a.workers.split(",")[0]), a.count)))
        return 0
    where = f"{a.net} {a.dtype} sm_{a.arch}, batch {a.batch_train} train / {a.batch_eval} eval, {a.image}px"
    if a.budget:
        bad = []
        r = fresh(a, "train", 1, count=True)
        print(f"cold start ({where}): a training step compiles {r['variants']} variants (budget {COMPILE_BUDGET})")
        if r["variants"] > COMPILE_BUDGET:
            bad.append(f"{r['variants']} variants > {COMPILE_BUDGET}")
        if a.seconds:
            r = fresh(a, "train", os.cpu_count() or 1)
            print(f"precompile of the training step: {r['seconds']:.1f} s with {r['workers']} processes "
                  f"(budget {SECONDS_BUDGET:.0f} s)")
            if r["seconds"] > SECONDS_BUDGET:
                bad.append(f"precompile {r['seconds']:.1f} s > {SECONDS_BUDGET:.0f} s")
        for line in bad:
            print("  BUDGET " + line)
        return 1 if bad else 0
    print(f"cold start, {where}; each cell a fresh process and an empty Triton cache")
    print("| step | variants | compile processes | precompile s (wall) | CPU s in process "
          "| CPU s in children (workers, ptxas) |")
    print("|---|---|---|---|---|---|")
    for mode in ("train", "eval"):
        for w in (int(v) for v in a.workers.split(",")):
            r = fresh(a, mode, w)
            print(f"| {mode} | {r['variants']} | {w} | {r['seconds']:.1f} | {r['cpu_self']:.1f} | "
                  f"{r['cpu_children']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
