"""The CPU main job: verify the fused kernels in the Triton interpreter against float64 PyTorch.

Reference and fused twins with the same weights (BN running statistics calibrated, then perturbed) run
one small batch. Per point (the stem, each block, the output) the relative error of the fused result
is taken two ways: ``layer``, the stem or block alone on the reference's own input (DESIGN.md's
tolerance applies), and ``model``, at that point of one whole fused forward (it passes up to
max(tolerance, 2 x PyTorch's own error there in the same dtype), since errors add up through depth).
One SGD step in fp32 is compared too (``--mode training`` / ``both``). Called by ``fusedres.bench.cli`` after it
has made sure TRITON_INTERPRET=1 was set before fusedres was imported.
"""
import copy
import os
import time
from typing import Dict, List


def _capture(model, x) -> Dict[str, object]:
    """Forward ``model(x)``; returns the stem output (first block's input), each block's input and
    output (``path:in`` / ``path``), and ``output``."""
    from fusedres.bench.shapes import is_block
    seen, hooks = {}, []
    blocks = [(n, m) for n, m in model.named_modules() if is_block(m)]
    for i, (name, m) in enumerate(blocks):
        def pre(mod, args, name=name, first=i == 0):
            seen[f"{name}:in"] = args[0].detach().clone()
            if first:
                seen["stem"] = seen[f"{name}:in"]
        hooks += [m.register_forward_pre_hook(pre),
                  m.register_forward_hook(lambda mod, a, out, name=name: seen.__setitem__(name, out.detach().clone()))]
    try:
        seen["output"] = model(x).detach()
    finally:
        for h in hooks:
            h.remove()
    return seen


def _describe(model, name: str, size: int) -> Dict[str, str]:
    from fusedres.bench.shapes import model_shapes
    shapes = model_shapes(name, size)
    what = {"stem": f"stem {shapes.layers[0].shape.label}" + ("" if name.startswith("cifar") else " +maxpool"),
            "output": "avgpool + fc (PyTorch)"}
    for b in shapes.blocks:
        for path in b.names:
            what[path] = b.label
    return what


def verify_cpu(args) -> int:
    import torch

    import fusedres
    from fusedres.bench import measure as B
    from fusedres.bench.counts import format_table, resnet50_counts
    from fusedres.bench.measure import environment, log, write_json
    from fusedres.bench.shapes import twins
    from fusedres.reference import TOLERANCE, rel_err

    t0 = time.perf_counter()
    env = environment()
    dtypes = [args.dtype] if args.dtype else ["fp32", "fp16"]
    n, size = args.batch or 2, args.image_size
    why = "--device cpu" if torch.cuda.is_available() else "no CUDA GPU here"
    print(f"fusedres {fusedres.__version__}: {why}, so this verifies the fused kernels in the Triton "
          f"interpreter on the CPU (torch {env['torch']}, triton {env['triton']}, Python {env['python']}).")
    print(f"{args.model}, eval mode, batch {n}, {size}x{size}, channels_last; FUSEDRES_STRICT=1 (no PyTorch "
          f"fallback); BN running statistics calibrated on random data, then perturbed.")
    if "bf16" in dtypes:
        print("note: bf16 tl.dot is wrong in the interpreter, so the kernels upcast bf16 tiles to fp32 here "
              "(DESIGN.md section 5); bf16 proper is checked on the GPU only.")
    torch.manual_seed(0)
    ref, fused = twins(args.model, torch.device("cpu"), calib_batch=max(8, n), size=size)
    x = torch.randn(n, 3, size, size, dtype=torch.float64)
    ref64 = _capture(copy.deepcopy(ref).double(), x)
    what = _describe(ref, args.model, size)
    points = [p for p in ref64 if not p.endswith(":in")]
    points = ["stem"] + [p for p in points if p not in ("stem", "output")] + ["output"]
    rows = {p: {"point": p, "what": what.get(p, "")} for p in points}
    kernel_s = 0.0
    for name in dtypes:
        dt = B.DTYPE_OF[name]
        cl = lambda t, dt=dt: t.to(dt).contiguous(memory_format=torch.channels_last)  # noqa: E731
        fm = copy.deepcopy(fused).to(dt).to(memory_format=torch.channels_last)
        log(f"[{name}] whole fused forward ...")
        t1 = time.perf_counter()
        with torch.no_grad():
            e2e = _capture(fm, cl(x))
            eager = _capture(copy.deepcopy(ref).to(dt), x.to(dt))
            for p in points:
                row = rows[p]
                row[f"{name}_model"] = rel_err(e2e[p], ref64[p])
                row[f"{name}_torch"] = rel_err(eager[p], ref64[p])
                if p == "stem":
                    row[f"{name}_layer"] = row[f"{name}_model"]
                elif p != "output":
                    log(f"[{name}] {p} alone on the reference's input ...")
                    row[f"{name}_layer"] = rel_err(fm.get_submodule(p)(cl(ref64[f"{p}:in"])), ref64[p])
        kernel_s += time.perf_counter() - t1
    if args.mode == "training":
        rows = {}
    failed = _judge(rows.values(), dtypes)
    train_rows: List[Dict] = []
    if args.mode in ("training", "both"):
        log("[fp32] one training step, fused and reference ...")
        t1 = time.perf_counter()
        train_rows = _verify_training(ref, fused, x)
        kernel_s += time.perf_counter() - t1
        failed += _judge(train_rows, ["fp32"])
    if rows:
        _print_verify_table(list(rows.values()), dtypes, TOLERANCE, "eval-mode forward")
    if train_rows:
        _print_verify_table(train_rows, ["fp32"], TOLERANCE, "training step (batch statistics), fp32")
    log("host work per ResNet-50 call (launches counted, not run) ...")
    counts = resnet50_counts(device="cpu")  # not on a visible GPU: this process runs the interpreter
    print("\nhost work per ResNet-50 call (batch 2, 32x32; aten ops dispatched, Triton launches):\n")
    print(format_table(counts))
    wall = time.perf_counter() - t0
    n_rows = len(rows) + len(train_rows)
    verdict = "PASS" if not failed else f"FAIL ({failed} of {n_rows} rows out of tolerance)"
    print(f"{verdict}: {n_rows} rows; {wall:.1f} s in all, {kernel_s:.1f} s of it running the models.")
    print("Speed needs a CUDA GPU: there, `python -m fusedres` times ResNet-50 against eager PyTorch and "
          "torch.compile, and `bash benchmarks/gpu_check.sh` runs the tests, the benchmarks and the timings.")
    path = os.path.join(args.out, f"{args.model}-cpu-verify.json")
    write_json(path, dict(kind="cpu-verification", env=env, model=args.model, batch=n, image_size=size,
                           dtypes=dtypes, tolerance={k: TOLERANCE[B.DTYPE_OF[k]] for k in dtypes},
                           rows=list(rows.values()), training_rows=train_rows, passed=not failed, wall_s=wall,
                           host_counts={k: dict(aten_ops=c.aten_ops, triton_launches=c.triton_launches,
                                                zero_fills=len(c.zeros)) for k, c in counts.items()},
                           models_s=kernel_s))
    print(f"wrote {path}")
    return 0 if not failed else 1


def _judge(rows, dtypes) -> int:
    """A row passes when its layer error is within DESIGN.md's tolerance and its whole-model error is
    within max(tolerance, 2 x PyTorch's own error at that point in the same dtype)."""
    from fusedres.bench.measure import DTYPE_OF
    from fusedres.reference import TOLERANCE
    failed = 0
    for row in rows:
        ok = True
        for name in dtypes:
            tol = TOLERANCE[DTYPE_OF[name]]
            layer = row.get(f"{name}_layer")
            if layer is not None and not layer <= tol:
                ok = False
            if not row[f"{name}_model"] <= max(tol, 2 * row[f"{name}_torch"]):
                ok = False
        row["result"] = "PASS" if ok else "FAIL"
        failed += not ok
    return failed


def _print_verify_table(rows, dtypes, tolerance, title: str) -> None:
    from fusedres.bench.measure import DTYPE_OF
    cols = [k for k in ("layer", "model", "torch") if any(f"{d}_{k}" in r for r in rows for d in dtypes)]
    print(f"\n{title}: relative error ||fused - ref|| / ||ref|| against float64 PyTorch")
    if "layer" in cols:
        print("  layer = the stem or block alone, fed the reference's input;  model = at that point of one "
              "whole fused forward;")
    else:
        print("  model = the fused model's;", end="")
    print("  torch = PyTorch eager's, same dtype (model passes up to max(tol, 2 x torch))\n")
    width = max(len(r["what"]) for r in rows) + 2
    pw = max(len(r["point"]) for r in rows) + 2
    head = f"{'point':<{pw}}{'what':<{width}}" + "".join(f"{d + ' ' + k:>13}" for d in dtypes for k in cols) \
        + "  result"
    print(head)
    print("-" * len(head))
    for r in rows:
        cells = "".join(f"{_fmt_err(r.get(f'{d}_{k}')):>13}" for d in dtypes for k in cols)
        print(f"{r['point']:<{pw}}{r['what']:<{width}}{cells}  {r['result']}")
    for r in rows:
        if r.get("error"):
            print(f"{r['point']}: {r['error']}")
    print("tolerance: " + ", ".join(f"{d} {tolerance[DTYPE_OF[d]]:.0e}" for d in dtypes) + " (DESIGN.md section 4)")


def _fmt_err(v) -> str:
    return "-" if v is None else f"{v:.2e}"


def _verify_training(ref, fused, x) -> List[Dict]:
    """One SGD step in fp32, fused against the float64 reference: the loss, then per block (and stem +
    fc) its parameters' gradients and its BN running statistics afterwards. PyTorch's own fp32 error
    sets the bar, as for the whole-model rows."""
    import torch
    import torch.nn.functional as F

    from fusedres.bench.shapes import is_block
    from fusedres.reference import rel_err
    labels = torch.arange(x.shape[0]) % 10

    def step(model, inp):
        model.train()
        loss = F.cross_entropy(model(inp), labels % model.fc.out_features)
        loss.backward()
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9).step()
        blocks = [n for n, m in model.named_modules() if is_block(m)]
        owner = lambda name: next((b for b in blocks if name.startswith(b + ".")), "stem+fc")  # noqa: E731
        out = {("loss", "loss"): [loss.detach().reshape(1)]}
        for name, prm in model.named_parameters():
            out.setdefault((owner(name), "grad"), []).append(prm.grad.reshape(-1))
        for name, buf in model.named_buffers():
            if "running" in name:
                out.setdefault((owner(name), "stats"), []).append(buf.reshape(-1))
        return {k: torch.cat([t.double() for t in v]) for k, v in out.items()}

    want = step(copy.deepcopy(ref).double(), x)
    torch_ = step(copy.deepcopy(ref), x.float())
    try:
        got = step(copy.deepcopy(fused).to(memory_format=torch.channels_last),
                   x.float().contiguous(memory_format=torch.channels_last))
    except Exception as e:  # noqa: BLE001 - report it as a failed row, keep the inference table
        return [{"point": "train", "what": "the fused training step raised", "fp32_model": float("nan"),
                 "fp32_torch": 0.0, "error": f"{type(e).__name__}: {e}"}]
    return [{"point": f"train {who}", "what": f"{kind} after one SGD step" if kind != "loss" else "loss",
             "fp32_model": rel_err(got[(who, kind)], w), "fp32_torch": rel_err(torch_[(who, kind)], w)}
            for (who, kind), w in want.items()]
