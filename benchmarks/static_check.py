"""Static GPU check (no GPU needed): compile every kernel variant the fused paths launch for sm_90 / sm_80 / sm_100.

    python benchmarks/static_check.py                      # ResNet-18 + ResNet-50 layer classes, bf16, eval + train
    python benchmarks/static_check.py --dtypes bf16,fp16,fp32 --nets resnet18,resnet50   # the full matrix
    python benchmarks/static_check.py --budget             # CI subset; exit 1 and list the rows that break a budget
    python benchmarks/static_check.py --layers layer1.0 --archs 90 --enforce --extra-config 256,128,64,4,3

One row per (layer class, kernel, config, arch, triton version): registers, spill bytes, shared memory,
CTAs/SM, wgmma vs mma.sync and its N, cp.async/TMA operand loads, scf.for loops around the dot, waits that
drain the pipeline inside a loop, 64-bit div/rem, calls and 2-byte scalar global loads inside loops, SASS
instructions per MFLOP of the main loop, programs per launch (and which pass of a BN reduction it is).
Written to <out>/static.json and <out>/static.md. Compiled evidence only: nothing here is timed.
"""
import argparse
import json
import os
import resource
import sys
import time
import warnings

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("static_check: unset TRITON_INTERPRET (the check compiles real GPU code, the interpreter compiles none)")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
warnings.filterwarnings("ignore", message=".*FP_FUSION.*")

import triton  # noqa: E402
from static import anchor, anchor_budgets, layers, report  # noqa: E402
from static.driver import Launch, compile_only  # noqa: E402

from fusedres.bench.measure import DTYPE_OF  # noqa: E402

# The CI subset, every config: bf16 on both archs: the stem (7x7, 3 channels) and a projection block (1x1 and 3x3
# convs, the shortcut GEMM) in eval and training, and a stride-2 projection block in eval (its training pass
# would double the CI time). On sm_90 also a layer-3 identity block in training: issue 17's budgets compare
# at the anchor's 128x128x64 tile, which the 64-channel layer1.0 never runs (3x3 training forward, dgrad, wgrad).
# fp32 (TF32, PyTorch's default for convs: issue 17 item 5) on sm_90: the stem and layer1.0, eval and training,
# and layer3.0 in eval. sm_100 (issue 17 item 6: every variant compiles, no spills, tcgen05 dots), bf16: the stem,
# layer1.0 and layer3.1 (the 3x3 descriptor path) in training, layer3.0 in eval (the projection, 1x1 descriptor
# tiles); ~45 CPU-s per triton on a cold Triton cache (fp32 and fp16 on sm_100: the documented run, RESULTS.md).
# A skip entry is (layer, mode[, dtype[, arch]]).
BUDGET = dict(nets=["resnet50"], layers=["stem", "layer1.0", "layer3.0", "layer3.1"], dtypes=["bf16", "fp32"],
              modes=["eval", "train"], archs=[90, 80, 100],
              skip=[("layer3.0", "train"), ("layer3.1", "eval"), ("layer3.1", "train", "fp32"),
                    ("layer3.1", "train", "bf16", 80),
                    *((lay, m, "fp32", arch) for lay in ("stem", "layer1.0", "layer3.0") for m in ("eval", "train")
                      for arch in (80, 100)),
                    ("stem", "eval", "bf16", 100), ("layer1.0", "eval", "bf16", 100)])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nets", default="resnet18,resnet50")
    p.add_argument("--layers", default="", help="comma-separated layer names (stem, layer2.0, ...); default all")
    p.add_argument("--dtypes", default="bf16", help="comma-separated from bf16,fp16,fp32")
    p.add_argument("--modes", default="eval,train")
    p.add_argument("--archs", default="90,80")
    p.add_argument("--batch-eval", type=int, default=256)
    p.add_argument("--batch-train", type=int, default=128)
    p.add_argument("--nchw", action="store_true", help="contiguous (NCHW) activations instead of channels_last")
    p.add_argument("--extra-config", action="append", default=[], metavar="BM,BN,BK,WARPS,STAGES",
                   help="also compile this config for every autotuned launch whose configs are exactly "
                   "BLOCK_M/N/K (the forward conv), bypassing its pruning (e.g. to see a budget fail)")
    p.add_argument("--limit", action="append", default=[], metavar="NAME=VALUE",
                   help="override an issue-17 budget's limit (benchmarks/static/anchor_budgets.py), e.g. to see it "
                   "fail, or a pending one met")
    p.add_argument("--rejudge", metavar="JSON", help="judge the rows of an earlier run's JSON against today's budgets "
                   "(with --limit: see a budget fail, or a pending one met) instead of compiling")
    p.add_argument("--budget", action="store_true", help="the CI subset, with --enforce")
    p.add_argument("--enforce", action="store_true", help="exit 1 when a compiled row breaks a budget")
    p.add_argument("--no-sass", action="store_true", help="skip the disassembly (faster; no main-loop columns) "
                   "except for the kernels a budget needs it for (wgrad)")
    p.add_argument("--report-only", action="store_true", help="with --budget: list broken budgets, exit 0")
    p.add_argument("--out", default="static-results")
    p.add_argument("--name", default="", help="file name stem of the outputs (default static or budget)")
    a = p.parse_args(argv)
    split = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    if a.budget:
        a.nets, a.layers, a.dtypes, a.modes, a.archs, a.skip = (BUDGET[k] for k in ("nets", "layers", "dtypes", "modes",
                                                                                    "archs", "skip"))
    else:
        a.nets, a.layers, a.dtypes, a.modes = split(a.nets), split(a.layers), split(a.dtypes), split(a.modes)
        a.archs, a.skip = [int(x) for x in split(a.archs)], []
    for item in a.limit:
        name, value = item.split("=")
        anchor_budgets.set_limit(name, float(value))
    a.extra = []
    for cfg in a.extra_config:
        bm, bn, bk, w, s = (int(v) for v in cfg.split(","))
        a.extra.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s))
    return a


def _run_one(a, lc, mode: str, dt: str, records: list, tags: dict) -> None:
    t0, n0 = time.time(), len(records)
    tags.update(layer=lc.key, mode=mode, dtype=dt, phase="fwd")
    batch = a.batch_eval if mode == "eval" else a.batch_train
    try:
        layers.run_layer(lc, mode, DTYPE_OF[dt], batch, channels_last=not a.nchw,
                         on_phase=lambda ph: tags.update(phase=ph))
    except Exception as exc:  # noqa: BLE001 - a host-side failure is a row, not a crash
        records.append(Launch("(host)", {}, {}, {}, error=f"{type(exc).__name__}: {exc}", tags=dict(tags)))
    if len(records) == n0:  # the fused path ran nothing: a check that compiled nothing must not pass
        records.append(Launch("(host)", {}, {}, {}, error="no Triton launch recorded", tags=dict(tags)))
    print(f"sm_{tags.get('arch')} {lc.key:18s} {mode:5s} {dt}: {len(records) - n0} launches compiled "
          f"in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)


def _compile_anchors(records: list, tags: dict, every_tile: bool) -> None:
    """The anchor GEMM per dtype the conv kernels compiled at (TF32 issues twice the MMAs per FLOP of bf16), at
    the budgets' tiles (the issue's 128x128x64; wgrad's descriptor tile, 128x128x128, 16-bit only) and, every_tile,
    at every tile they compiled at: each row is compared with the anchor at its own tile (CI compiles the budget
    tiles only)."""
    t0, n0 = time.time(), len(records)
    blocks = ("BLOCK_M", "BLOCK_N", "BLOCK_K")

    def tile(label):
        return tuple(int(b) for b in label.split("x"))

    dtypes = {r.tags.get("dtype") for r in records if r.tags.get("dtype") in DTYPE_OF}
    want = {(dt, tile(anchor_budgets.ANCHOR_TILE)) for dt in dtypes}
    want |= {(dt, tile(anchor_budgets.WGRAD_ANCHOR_TILE)) for dt in dtypes if dt != "fp32"}
    if every_tile:
        want |= {(r.tags["dtype"], tuple(r.constexprs[k] for k in blocks)) for r in records
                 if r.kernel in report.CONV_KERNELS and r.tags.get("dtype") in DTYPE_OF
                 and all(k in r.constexprs for k in blocks)}
    for dt, blocks in sorted(want):
        tags.update(layer=anchor_budgets.ANCHOR_LAYER, mode="eval", phase="fwd", dtype=dt)
        anchor.compile_anchor(DTYPE_OF[dt], blocks)
    print(f"sm_{tags.get('arch')} anchor: {len(records) - n0} tiles compiled in {time.time() - t0:.0f} s",
          file=sys.stderr, flush=True)


def _skipped(a, layer: str, mode: str, dtype: str, arch: int) -> bool:
    """A skip entry (layer, mode[, dtype[, arch]]) matches on the fields it gives."""
    return any(s == (layer, mode, dtype, arch)[:len(s)] for s in a.skip)


def collect(a) -> list:
    rows = []
    for arch in a.archs:
        with compile_only(arch, extra_configs=a.extra) as (records, tags):
            tags["arch"] = arch
            for net in a.nets:
                for lc in layers.layer_classes(net, a.layers):
                    for dt in a.dtypes:
                        for mode in (m for m in a.modes if not _skipped(a, lc.name, m, dt, arch)):
                            _run_one(a, lc, mode, dt, records, tags)
            if arch == anchor_budgets.BUDGET_ARCH:
                _compile_anchors(records, tags, every_tile=not a.budget)
        t0 = time.time()
        rows += report.make_rows(records, arch, sass=not a.no_sass)
        print(f"sm_{arch}: {len(records)} launches analysed in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    return rows


def main(argv=None) -> int:
    a = parse_args(argv)
    t0 = time.time()
    if a.rejudge:
        with open(a.rejudge) as f:
            rows = json.load(f)
        a.enforce, paths = True, [a.rejudge]
    else:
        rows = collect(a)
        anchor_budgets.annotate(rows)
        paths = report.write(rows, a.out, a.name or ("budget" if a.budget else "static"))
    bad = report.budget_failures(rows) + (report.coverage_failures(rows) if a.budget else [])
    pending = []
    if a.budget or a.enforce:  # issue 17's budgets in anchor terms (sm_90 rows; pending ones listed)
        more, pending = anchor_budgets.evaluate(rows)
        bad += more
    cpu = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for f in ("ru_utime", "ru_stime"))
    print(f"static check (triton {triton.__version__}): {len(rows)} rows in {time.time() - t0:.0f} s "
          f"({cpu:.0f} CPU-s) -> {', '.join(paths)}")
    if a.budget or a.enforce or bad:
        print(f"{len(bad)} broken budget(s)" + (":" if bad else ""))
        for line in bad:
            print("  BUDGET " + line)
        for line in pending:
            print("  " + line)
    return 1 if ((a.budget or a.enforce) and bad and not a.report_only) else 0


if __name__ == "__main__":
    sys.exit(main())
