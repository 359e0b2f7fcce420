"""Markdown tables from measured results, for benchmarks/RESULTS.md.

    python benchmarks/report.py RESULT [RESULT ...] [-o report.md]

Each RESULT is a pytest-benchmark JSON (``--benchmark-json``; rows from ``extra_info``), the JSON that
``python -m fusedres`` writes (rows under ``results``) or a FUSEDRES_BENCH_JSONL file (a row a line).
Rows are keyed by (group, provider); a later file wins. Standard library only.
"""
import argparse
import json
import sys
from typing import Dict, List, Tuple

PROVIDERS = ("eager", "fused", "compile", "compile-max", "eager-amp")
BASELINES = PROVIDERS[:1] + PROVIDERS[2:]


def load(paths: List[str]) -> Tuple[Dict[Tuple[str, str], Dict], List[str]]:
    rows, env = {}, []
    for path in paths:
        with open(path) as f:
            text = f.read()
        try:
            data = json.loads(text)
            found = None
        except json.JSONDecodeError:  # JSONL
            data, found = None, [json.loads(line) for line in text.splitlines() if line.strip()]
        if isinstance(data, dict) and "benchmarks" in data:     # pytest-benchmark
            found = [b.get("extra_info", {}) for b in data["benchmarks"]]
            m = data.get("machine_info", {})
            env.append(f"{path}: pytest-benchmark, {m.get('gpu', 'no GPU')}, torch {m.get('torch')}, "
                       f"triton {m.get('triton')}, CUDA {m.get('cuda')}, TF32 conv {m.get('tf32_conv')}, "
                       f"commit {data.get('commit_info', {}).get('id', '?')[:12]}, {data.get('datetime', '')}")
        elif isinstance(data, dict) and "results" in data:      # python -m fusedres
            found = data["results"]
            e = data.get("env", {})
            env.append(f"{path}: python -m fusedres, {e.get('card', 'no GPU')}, torch {e.get('torch')}, "
                       f"triton {e.get('triton')}, CUDA {e.get('cuda')}, TF32 conv {e.get('tf32_conv')}, "
                       f"commit {(e.get('commit') or '?')[:12]}, {e.get('date', '')}")
        elif found is not None:
            env.append(f"{path}: FUSEDRES_BENCH_JSONL, {len(found)} rows")
        else:
            raise SystemExit(f"report.py: {path}: not a pytest-benchmark JSON, a fusedres JSON or a JSONL file")
        for r in found:
            if "group" in r and "provider" in r:
                rows[(r["group"], r["provider"])] = r
    return rows, env


def _ms(r) -> str:
    if r is None:
        return "not measured"
    return f"{r['median_ms']:.3f}" if r.get("status") == "ok" else r.get("status", "?").split(":")[0]


def _speedup(rows, group, base):
    f, b = rows.get((group, "fused")), rows.get((group, base))
    if f and b and f.get("status") == "ok" and b.get("status") == "ok":
        return b["median_ms"] / f["median_ms"]
    return None


def tables(rows: Dict) -> List[str]:
    out = []
    groups = list(dict.fromkeys(g for g, _ in rows))
    for level in ("layer", "block", "model"):
        for mode in ("inference", "training"):
            mine = [g for g in groups if any(r["level"] == level and r["mode"] == mode
                                             for (gg, _), r in rows.items() if gg == g)]
            if not mine:
                continue
            provs = [p for p in PROVIDERS if any((g, p) in rows for g in mine)]
            bases = [p for p in BASELINES if p in provs]
            out += [f"\n### {level}, {mode}\n",
                    "| what | dtype | batch | " + " | ".join(f"{p} ms" for p in provs)
                    + " | fused img/s | fused TFLOP/s | fused % of floor | "
                    + " | ".join(f"fused vs {p}" for p in bases)
                    + " | fused first call s |",
                    "|" + " --- |" * (3 + len(provs) + 3 + len(bases) + 1)]
            for g in mine:
                any_r = next(r for (gg, _), r in rows.items() if gg == g)
                f = rows.get((g, "fused"))
                ok = f is not None and f.get("status") == "ok"
                sp = [_speedup(rows, g, b) for b in bases]
                cells = [any_r["what"], any_r["dtype"], str(any_r["batch"])] + [_ms(rows.get((g, p))) for p in provs]
                cells += [_num(f, "images_per_s", ok), _num(f, "tflops", ok, 1),
                          f"{f['pct_of_floor']:.0f}%" if ok and "pct_of_floor" in f else "-"]
                cells += ["-" if s is None else f"{s:.2f}x" for s in sp] + [_num(f, "first_call_s", ok, 1)]
                out.append("| " + " | ".join(cells) + " |")
    return out


def _num(r, key, ok, digits=0) -> str:
    return f"{r[key]:.{digits}f}" if ok and key in r else "-"


def targets(rows: Dict) -> List[str]:
    """The project's targets (issue #4), from whatever rows are there."""
    def pick(level, model, mode, dtype, batch):
        return [g for (g, p), r in rows.items() if p == "fused" and r["level"] == level and r.get("model") == model
                and r["mode"] == mode and r["dtype"] == dtype and r["batch"] == batch]

    def cell(groups, base, goal):
        s = [_speedup(rows, g, base) for g in groups]
        s = [x for x in s if x is not None]
        if not s:
            return "not measured", "-"
        return f"{s[0]:.2f}x", "met" if s[0] >= goal else "NOT met"

    inf, train = pick("model", "resnet50", "inference", "bf16", 256), pick("model", "resnet50", "training", "bf16", 128)
    lines = ["| target | measured | verdict |", "| --- | --- | --- |"]
    for label, groups, base, goal in (
            ("ResNet-50 bf16 batch 256 inference: fused >= 1.3x eager", inf, "eager", 1.3),
            ("ResNet-50 bf16 batch 256 inference: fused >= 1.1x torch.compile max-autotune", inf, "compile-max", 1.1),
            ("ResNet-50 bf16 batch 128 training step: fused >= 1.3x eager AMP", train, "eager-amp", 1.3)):
        lines.append(f"| {label} | " + " | ".join(cell(groups, base, goal)) + " |")
    layer = [g for (g, p), r in rows.items() if p == "fused" and r["level"] == "layer" and r["mode"] == "inference"]
    sp = [s for s in (_speedup(rows, g, "eager") for g in layer) if s is not None]
    lines.append("| every layer: fused no slower than eager conv+BN(+add)+ReLU (inference) | "
                 + (f"{sum(s >= 1.0 for s in sp)} of {len(sp)} layer cases; slowest {min(sp):.2f}x | "
                    + ("met" if min(sp) >= 1.0 else "NOT met") if sp else "not measured | -") + " |")
    return lines


def problems(rows: Dict) -> List[str]:
    bad = [r for r in rows.values() if r.get("status", "ok") != "ok"]
    return [f"- {r['provider']} {r['level']} {r['what']} {r['mode']} {r['dtype']} b{r['batch']}: {r['status']}"
            for r in bad]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", help="pytest-benchmark JSON, fusedres JSON or JSONL files")
    p.add_argument("-o", "--out", help="write the markdown here (default: stdout)")
    args = p.parse_args(argv)
    rows, env = load(args.results)
    md = ["## Measured", "", "Sources:", ""] + [f"- {e}" for e in env] + ["", "### Targets", ""] + targets(rows)
    md += tables(rows)
    bad = problems(rows)
    if bad:
        md += ["", "### Not measured, skipped or failed", ""] + bad
    text = "\n".join(md) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
