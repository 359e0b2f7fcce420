"""The command line (``python -m fusedres``) and the benchmark suite's plumbing, on the CPU.

Runs that need the Triton interpreter go through a subprocess with a clean environment: the CLI must
switch the interpreter on by itself. The GPU timing code is exercised on the CPU through
``cli.main(time_on_cpu=True)`` (tiny CIFAR cases, interpreted), so its tables, JSON and report.py are checked here too.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from fusedres.bench import cli
from fusedres.kernels import INTERPRETED

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(**extra):
    """This environment without the switches a user would not have set, nor a pytest-xdist worker's own (with
    PYTEST_XDIST_WORKER set, pytest-benchmark in a child pytest disables itself and rejects --benchmark-only)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "FUSEDRES_STRICT") and not k.startswith(("_FUSEDRES", "PYTEST_XDIST"))}
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


def _run(args, cwd, timeout=120, **env):
    return subprocess.run([sys.executable, *args], cwd=cwd, env=_env(**env), capture_output=True, text=True,
                          timeout=timeout)


def test_help(tmp_path):
    r = _run(["-m", "fusedres", "--help"], tmp_path)
    assert r.returncode == 0, r.stderr
    for flag in ("--model", "--batch", "--dtype", "--mode", "--out", "--device", "--providers", "--budget"):
        assert flag in r.stdout, f"--help does not mention {flag}"
    assert "cifar_resnet20" in r.stdout and "resnet50" in r.stdout


@pytest.mark.parametrize("argv, message", [
    (["--batch", "0"], "expected a positive int, got '0'"),
    (["--batch", "two"], "expected a positive int, got 'two'"),
    (["--model", "resnet9"], "invalid choice: 'resnet9'"),
    (["--dtype", "fp8"], "invalid choice: 'fp8'"),
    (["--mode", "eval"], "invalid choice: 'eval'"),
    (["--device", "tpu"], "invalid choice: 'tpu'"),
    (["--providers", "eager,compile"], "the providers must include 'fused'"),
    (["--providers", "fused,tensorrt"], "expected a comma-separated list of"),
    (["--budget", "-1"], "expected a positive float, got '-1'"),
    (["--model", "resnet18", "--image-size", "16", "--device", "cpu"], "resnet18 needs at least 32 pixels"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
])
def test_bad_flags(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert err.startswith("usage: fusedres")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message when there is no GPU")
def test_cuda_without_gpu(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--device", "cuda"])
    assert exc.value.code == 2
    assert "--device cuda: torch" in capsys.readouterr().err


@pytest.mark.slow  # the main job's whole CPU verification: ~30 s
def test_cpu_verification(tmp_path):
    """The CPU main job, as a user runs it: no TRITON_INTERPRET set, a table, JSON, exit 0."""
    r = _run(["-m", "fusedres", "--device", "cpu", "--model", "cifar_resnet20", "--batch", "1", "--out", "out"],
             tmp_path, timeout=110)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert "Triton interpreter" in out and ("--device cpu" if torch.cuda.is_available() else "no CUDA GPU") in out
    assert "fp32 layer" in out and "fp16 model" in out and "layer3.2" in out
    assert "PASS:" in out and "FAIL" not in out
    assert "benchmarks/gpu_check.sh" in out
    report = json.loads((tmp_path / "out" / "cifar_resnet20-cpu-verify.json").read_text())
    assert report["passed"] is True and report["env"]["torch"] == torch.__version__
    points = [row["point"] for row in report["rows"]]
    assert points[0] == "stem" and points[-1] == "output" and len(points) == 11
    assert all(row["result"] == "PASS" for row in report["rows"] + report["training_rows"])


@pytest.mark.slow  # ~25 s
@pytest.mark.skipif(not INTERPRETED, reason="in-process: this process must run the interpreter (a GPU machine's "
                                            "runs the real one: test_cpu_verification)")
def test_cpu_verification_with_a_gpu_visible(tmp_path, monkeypatch, capsys):
    """``--device cpu`` where torch sees a GPU (simulated: torch.cuda answers as on a GPU machine, a real CUDA tensor
    would still fail here): the verification, training rows and host counts all run on the CPU, interpreted."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "a simulated GPU")
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 0)
    rc = cli.main(["--device", "cpu", "--model", "cifar_resnet20", "--batch", "1", "--mode", "training", "--dtype",
                   "fp32", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out[-3000:]
    assert "--device cpu, so this verifies the fused kernels in the Triton interpreter" in out
    assert "PASS:" in out and "| fused train step |" in out
    report = json.loads((tmp_path / "cifar_resnet20-cpu-verify.json").read_text())
    assert report["passed"] is True and report["env"]["card"] == "a simulated GPU"


@pytest.mark.slow  # ~15 s
def test_timing_path_and_report(tmp_path):
    """The GPU timing code (table, JSON) on the CPU in the interpreter, then report.py on its JSON."""
    argv = ["--device", "cpu", "--model", "cifar_resnet20", "--batch", "1", "--mode", "inference", "--no-layers",
            "--providers", "fused,eager", "--dtype", "fp32", "--out", "out"]
    run_timing = f"from fusedres.bench import cli; raise SystemExit(cli.main({argv!r}, time_on_cpu=True))"
    r = _run(["-c", run_timing], tmp_path, timeout=110, TRITON_INTERPRET="1")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "fused ms" in r.stdout and "vs eager" in r.stdout and "cifar_resnet20" in r.stdout
    path = tmp_path / "out" / "cifar_resnet20-cpu-fp32.json"
    rows = json.loads(path.read_text())["results"]
    assert {(row["provider"], row["status"]) for row in rows} == {("fused", "ok"), ("eager", "ok")}
    fused = next(row for row in rows if row["provider"] == "fused")
    assert fused["median_ms"] > 0 and fused["rel_diff_vs_eager"] < 1e-4 and fused["gflop"] > 0
    md = _run([os.path.join(ROOT, "benchmarks", "report.py"), str(path)], tmp_path)
    assert md.returncode == 0, md.stderr
    assert "### model, inference" in md.stdout and "| cifar_resnet20 | fp32 | 1 |" in md.stdout


def test_benchmarks_collect_on_cpu():
    r = _run(["-m", "pytest", "benchmarks/", "--benchmark-only", "--collect-only", "-q", "-p", "no:cacheprovider"],
             ROOT, timeout=110)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ids = [line for line in r.stdout.splitlines() if line.startswith("benchmarks/bench_resnet.py::")]
    assert len(ids) > 100
    for level in ("test_layer[layer-", "test_block[block-", "test_model[model-"):
        assert any(level in i for i in ids), f"no {level} benchmarks collected"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the skip reason is for machines without a GPU")
def test_benchmarks_skip_without_gpu():
    r = _run(["-m", "pytest", "benchmarks/", "--benchmark-only", "-q", "-p", "no:cacheprovider"], ROOT,
             timeout=110, FUSEDRES_BENCH_QUICK="1")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "benchmarks need a CUDA GPU; on CPU run `python -m fusedres` for kernel verification" in r.stdout
    assert " passed" not in r.stdout and "error" not in r.stdout.lower()


@pytest.mark.slow  # the benchmark suite's cases at every level, interpreted: ~1.5 minutes
def test_benchmark_machinery_on_cpu(tmp_path):
    """The suite's fixture (timing, extra_info, JSONL, pytest-benchmark JSON) on tiny interpreted cases."""
    pytest.importorskip("pytest_benchmark")
    jsonl, js = tmp_path / "bench.jsonl", tmp_path / "bench.json"
    r = _run(["-m", "pytest", "benchmarks/", "--benchmark-only", "-q", "-p", "no:cacheprovider",
              f"--benchmark-json={js}"], ROOT, timeout=150, _FUSEDRES_BENCH_DEVICE="cpu", TRITON_INTERPRET="1",
             FUSEDRES_BENCH_JSONL=str(jsonl))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert {row["level"] for row in rows} == {"layer", "block", "model"}
    ok = [row for row in rows if row["status"] == "ok"]
    assert ok and all(row["median_ms"] > 0 and row["images_per_s"] > 0 for row in ok)
    assert any(row["status"].startswith("skipped: a launch with a shortcut epilogue") for row in rows)
    bench = json.loads(js.read_text())["benchmarks"]
    assert {b["group"] for b in bench} == {row["group"] for row in ok}
    assert all(b["extra_info"]["status"] == "ok" for b in bench)
    md = _run([os.path.join(ROOT, "benchmarks", "report.py"), str(js), str(jsonl)], tmp_path)
    assert md.returncode == 0, md.stderr
    assert "### layer, inference" in md.stdout and "### block, inference" in md.stdout
