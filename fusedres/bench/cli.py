"""``python -m fusedres`` (or ``fusedres``): the main job.

With a CUDA GPU: times the fused model and each of its distinct conv launches against eager PyTorch
(cuDNN, same dtype, channels_last) and torch.compile, prints images/s and speedups, and writes JSON
and a per-layer speedup plot. Without one: verifies the fused kernels in the Triton interpreter
against a float64 PyTorch reference, layer by layer, and says that speed needs a GPU.

fusedres is imported lazily here (it is already imported as this module's package, but the kernels
must be built for the interpreter on the CPU: the process re-executes itself with TRITON_INTERPRET=1).
"""
import argparse
import math
import os
import sys
import time
from typing import Dict, List, Optional

# Every provider name, in the tables' order (fusedres.bench.measure.PROVIDERS_BY_MODE: which are timed per mode).
PROVIDERS = ("fused", "eager", "compile", "compile-max", "eager-amp")
GPU_BATCH = {"inference": 256, "training": 128}
_REEXEC = "_FUSEDRES_CLI_REEXEC"  # set by the re-execution itself: the interpreter was asked for once

EPILOG = """\
examples:
  python -m fusedres                                  GPU: ResNet-50 bf16, batch 256; CPU: verify cifar_resnet20
  python -m fusedres --model resnet18 --dtype fp16 --batch 128
  python -m fusedres --providers fused,eager,compile-max --no-layers
  python -m fusedres --device cpu --model resnet18 --batch 1 --image-size 64
  bash benchmarks/gpu_check.sh                        tests + benchmarks + this, on a fresh GPU machine
"""


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return value
    return parse


def _providers(text: str) -> List[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in names if p not in PROVIDERS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(PROVIDERS)}, got {text!r}")
    if "fused" not in names:
        raise argparse.ArgumentTypeError(f"the providers must include 'fused' (what is being measured), got {text!r}")
    return list(dict.fromkeys(names))


def make_parser() -> argparse.ArgumentParser:
    from fusedres.bench.shapes import MODELS  # torch only: the kernels' import is not decided here
    p = argparse.ArgumentParser(
        prog="fusedres", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Fused ResNet conv+BN+ReLU+residual kernels. With a CUDA GPU: time the fused model and "
                    "its layers against eager PyTorch and torch.compile. Without one: verify the kernels in "
                    "the Triton interpreter against a float64 reference.")
    p.add_argument("--model", choices=MODELS, metavar="MODEL",
                   help=f"one of {', '.join(MODELS)} (default: resnet50 on a GPU, cifar_resnet20 on the CPU)")
    p.add_argument("--batch", type=_positive(int),
                   help="batch size (default: GPU 256 inference / 128 training; CPU 2)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"),
                   help="activation dtype (default: bf16 on a GPU; fp32 and fp16 on the CPU)")
    p.add_argument("--mode", choices=("inference", "training", "both"), default="both",
                   help="inference, a training step, or both (default both)")
    p.add_argument("--out", default="fusedres-results", metavar="DIR",
                   help="where the JSON (and the GPU plot) go (default ./fusedres-results)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="auto: the GPU when torch sees one, else the CPU (default auto)")
    p.add_argument("--image-size", type=_positive(int), metavar="PX",
                   help="input height = width (default: 224 ImageNet / 32 CIFAR on a GPU; 64 / 32 on the CPU)")
    p.add_argument("--providers", type=_providers, default=["fused", "eager", "compile", "eager-amp"], metavar="LIST",
                   help=f"GPU: what to time, from {','.join(PROVIDERS)} (default fused,eager,compile,eager-amp; "
                        f"compile-max = max-autotune with freezing, inference only, minutes to compile; "
                        f"eager-amp = autocast over fp32 weights, model training only)")
    p.add_argument("--no-layers", action="store_true", help="GPU: time the whole model only, not each conv launch")
    p.add_argument("--budget", type=_positive(float), metavar="SECONDS",
                   help="GPU: stop starting new measurements after this long; the rest is reported as not measured")
    return p


def main(argv: Optional[List[str]] = None, time_on_cpu: bool = False) -> int:
    """time_on_cpu: run the GPU timing code on the CPU, interpreted (tests only)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser()
    args = parser.parse_args(argv)
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda: torch {torch.__version__} sees no CUDA GPU (torch.cuda.is_available() is False); "
                     f"use --device cpu to verify the kernels in the Triton interpreter")
    args.model = args.model or ("resnet50" if args.device == "cuda" else "cifar_resnet20")
    cifar = args.model.startswith("cifar")
    if args.image_size is None:
        args.image_size = 32 if cifar else (224 if args.device == "cuda" else 64)
    if args.image_size < (8 if cifar else 32):
        parser.error(f"--image-size {args.image_size}: {args.model} needs at least {8 if cifar else 32} pixels "
                     f"(it downsamples by {4 if cifar else 32})")
    if args.device == "cpu":
        _ensure_interpreter(argv)
        if time_on_cpu:
            return bench_gpu(args, "cpu")
        from fusedres.bench.verify import verify_cpu
        return verify_cpu(args)
    return bench_gpu(args)


def _ensure_interpreter(argv: List[str]) -> None:
    """On the CPU the kernels run in the Triton interpreter, which must be on before fusedres is imported."""
    from fusedres import _dispatch
    os.environ["FUSEDRES_STRICT"] = "1"  # a fallback to PyTorch would verify nothing
    if _dispatch.interpreted():
        return
    if _dispatch._IMPORT_ERROR:
        sys.exit(f"fusedres: cannot verify the kernels: {_dispatch._IMPORT_ERROR}")
    if os.environ.get(_REEXEC) == "1":
        sys.exit("fusedres: TRITON_INTERPRET=1 is set but the kernels were not built for the Triton interpreter")
    os.environ.update(TRITON_INTERPRET="1", **{_REEXEC: "1"})
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "fusedres", *argv])


# ------------------------------------------------------------------------------------------------
# GPU: timings
# ------------------------------------------------------------------------------------------------

def bench_gpu(args, device: str = "cuda") -> int:
    import torch

    import fusedres
    from fusedres import _dispatch
    from fusedres.bench import measure as B
    from fusedres.bench.measure import environment, log, write_json

    if _dispatch.interpreted() and device == "cuda":
        sys.exit("fusedres: TRITON_INTERPRET=1 is set, so the kernels would run in the interpreter: unset it to "
                 "time them on the GPU, or pass --device cpu to verify them")
    os.environ["FUSEDRES_STRICT"] = "1"        # a silent fallback to PyTorch would time the wrong thing
    torch.backends.cudnn.benchmark = True      # eager gets cuDNN's best algorithms
    B.interrupt_on_sigterm()  # `timeout` still gets the partial results written
    t0 = time.perf_counter()
    device = torch.device(device)
    env = environment()
    env["cudnn_benchmark"] = True
    name, dt_name, size = args.model, args.dtype or "bf16", args.image_size
    modes = ["inference", "training"] if args.mode == "both" else [args.mode]
    ceil = B.ceilings(device, B.DTYPE_OF[dt_name])
    print(f"fusedres {fusedres.__version__} on {ceil.card}: {name}, {dt_name}, channels_last, {size}x{size}; "
          f"torch {env['torch']}, triton {env['triton']}, CUDA {env.get('cuda')}, TF32 conv "
          f"{'on' if env.get('tf32_conv') else 'off'}, cudnn.benchmark on")
    if ceil.tflops and ceil.tbps:
        print(f"% of floor: floor = max(FLOPs / {ceil.tflops:g} TFLOP/s, fewest bytes / {ceil.tbps:g} TB/s) "
              f"({ceil.source})")

    shapes = B.model_shapes(name, size)
    # Order for --budget: models, then layers, with every torch.compile (minutes) after the rest.
    cases = []
    for compiled in (False, True):
        cases += [B.Case("model", name, name, mode, dt_name, args.batch or GPU_BATCH[mode], p, size=size)
                  for mode in modes for p in args.providers
                  if p in B.providers("model", mode) and p.startswith("compile") == compiled]
        cases += [B.Case("layer", name, layer.shape.label, mode, dt_name, args.batch or GPU_BATCH[mode], p,
                         path=layer.names[0], shape=layer.shape)
                  for mode in modes for layer in ([] if args.no_layers else shapes.layers) for p in args.providers
                  if p in B.providers("layer", mode) and p.startswith("compile") == compiled]
    path = os.path.join(args.out, f"{name}-{device.type}-{dt_name}.json")
    results: List[Dict] = []
    payload = dict(kind="gpu-benchmark", env=env, model=name, dtype=dt_name, image_size=size,
                   ceilings=vars(ceil), args={k: v for k, v in vars(args).items()}, results=results)
    interrupted = False
    try:
        for i, case in enumerate(cases, 1):
            row = dict(case.record(), count=next((lay.count for lay in shapes.layers if lay.shape == case.shape), 1))
            if args.budget and time.perf_counter() - t0 > args.budget:
                row["status"] = f"not measured (--budget {args.budget:g} s spent)"
            else:
                doing = {"fused": "autotuning, timing", "compile": "compiling, timing",
                         "compile-max": "compiling (max-autotune), timing"}.get(case.provider, "timing")
                log(f"[{i}/{len(cases)}] {case.level} {case.what}, {case.mode} b{case.batch}, {case.provider}: "
                     f"{doing} ...")
                row.update(_run_one(case, device, ceil, B))
                done = f": {row['median_ms']:.3f} ms (first call {row['first_call_s']:.1f} s)" \
                    if row["status"] == "ok" else ""
                log(f"[{i}/{len(cases)}]   {row['status']}{done}")
            results.append(row)
            write_json(path, payload)
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: writing what was measured")
    finally:
        torch.cuda.empty_cache()
    payload["wall_s"] = time.perf_counter() - t0
    payload["interrupted"] = interrupted
    write_json(path, payload)
    bad = _print_gpu_table(results)
    print(f"wrote {path}")
    try:
        _plot(results, os.path.join(args.out, f"{name}-{device.type}-{dt_name}-speedup.png"),
              f"{name} {dt_name} on {ceil.card}")
    except Exception as e:  # noqa: BLE001 - the numbers are written; a plotting problem must not hide them
        print(f"plot: failed ({type(e).__name__}: {e}); the JSON has every number")
    print(f"{payload['wall_s']:.0f} s in all.")
    return 130 if interrupted else (1 if bad else 0)


def _run_one(case, device, ceil, B) -> Dict:
    import torch
    try:
        res = B.run_case(case, device, ceil)
    except B.Unsupported as e:
        return {"status": f"skipped: {e}"}
    except Exception as e:  # noqa: BLE001 - one failing case must not lose the others' numbers
        return {"status": f"error: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
    finally:
        torch.cuda.empty_cache()
    return dict(res, status=B.verdict(res))


def _print_gpu_table(results: List[Dict]) -> int:
    """One row per (level, what, mode): each provider's ms, fused images/s, fused's speedup over each
    baseline (baseline ms / fused ms) and fused's % of the floor. Returns the number of fused failures."""
    provs = [p for p in PROVIDERS if any(r["provider"] == p for r in results)]
    bases = [p for p in provs if p != "fused"]
    groups: Dict[str, Dict[str, Dict]] = {}
    for r in results:
        groups.setdefault(r["group"], {})[r["provider"]] = r
    head = (f"{'level':<7}{'what':<30}{'mode':<10}{'n':>5}" + "".join(f"{p + ' ms':>14}" for p in provs)
            + f"{'fused img/s':>12}" + "".join(f"{'vs ' + p:>14}" for p in bases) + f"{'% floor':>9}")
    print("\n" + head)
    print("-" * len(head))
    sums: Dict[tuple, Dict[str, float]] = {}
    for g in groups.values():
        r0 = next(iter(g.values()))
        f = g.get("fused", {})
        ok = f.get("status") == "ok"
        ratios = "".join(f"{g[p]['median_ms'] / f['median_ms']:>13.2f}x" if ok and g.get(p, {}).get("status") == "ok"
                         else f"{'-':>14}" for p in bases)
        what = r0["what"] + (f" x{r0['count']}" if r0["level"] == "layer" and r0["count"] > 1 else "")
        ips = f"{f['images_per_s']:.0f}" if ok else "-"
        floor = f"{f['pct_of_floor']:.0f}%" if ok and "pct_of_floor" in f else "-"
        print(f"{r0['level']:<7}{what[:29]:<30}{r0['mode']:<10}{r0['batch']:>5}"
              + "".join(f"{_fmt_ms(g.get(p)):>14}" for p in provs) + f"{ips:>12}{ratios}{floor:>9}")
        if r0["level"] == "layer":
            s = sums.setdefault((r0["mode"], r0["batch"]), {})
            for p, r in g.items():
                if r["status"] == "ok":
                    s[p] = s.get(p, 0.0) + r["median_ms"] * r0["count"]
                else:
                    s[p] = float("nan")  # a sum with a hole is no sum
    for (mode, n), s in sums.items():
        sp = s.get("eager", math.nan) / s.get("fused", math.nan)
        sp = f"{sp:>13.2f}x" if sp == sp else f"{'-':>14}"
        print(f"{'layers':<7}{'sum, each launch x its count':<30}{mode:<10}{n:>5}"
              + "".join(f"{s[p]:>14.3f}" if s.get(p, math.nan) == s.get(p) else f"{'-':>14}" for p in provs)
              + f"{'':>12}"
              + (sp if bases and bases[0] == "eager" else ""))
    notes = sorted({f"{r['provider']} {r['level']} {r['what']} {r['mode']}: {r['status']}" for r in results
                    if r["status"] != "ok"})
    for note in notes[:20]:
        print("  " + note)
    if len(notes) > 20:
        print(f"  ... and {len(notes) - 20} more (see the JSON)")
    return sum(r["provider"] == "fused" and r["status"].startswith(("error", "wrong")) for r in results)


def _fmt_ms(r: Optional[Dict]) -> str:
    if r is None:
        return "-"
    return f"{r['median_ms']:.3f}" if r["status"] == "ok" else r["status"].split(":")[0].split(" (")[0]


def _plot(results: List[Dict], path: str, title: str) -> None:
    """Per-layer speedup of fused over eager (and compile) as horizontal bars; needs matplotlib."""
    layers: Dict[str, Dict[str, float]] = {}
    for r in results:
        if r["level"] == "layer" and r["mode"] == "inference" and r["status"] == "ok":
            layers.setdefault(f"{r['path']}  {r['what']}", {})[r["provider"]] = r["median_ms"]
    rows = [(k, v) for k, v in layers.items() if "fused" in v and len(v) > 1]
    if not rows:
        print("plot: no per-layer inference pairs were measured, so there is no plot.")
        return
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot: matplotlib is not installed (pip install matplotlib), so the speedup plot is skipped.")
        return
    provs = [p for p in PROVIDERS[1:] if any(p in v for _, v in rows)]
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(rows) * max(1, len(provs) / 2) + 1.5))
    height = 0.8 / len(provs)
    for j, p in enumerate(provs):
        ys = [i + j * height for i in range(len(rows))]
        ax.barh(ys, [v[p] / v["fused"] if p in v else 0 for _, v in rows], height, label=f"fused vs {p}")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(rows))])
    ax.set_yticklabels([k for k, _ in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speedup (baseline time / fused time); > 1 is faster")
    ax.set_title(f"per-layer inference speedup: {title}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")
