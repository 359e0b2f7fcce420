"""CPU behaviour without the interpreter: the reference runs, announced once; strict mode refuses.

These run in a subprocess, because TRITON_INTERPRET is read when fusedres is first imported.
"""
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import warnings, torch, fusedres
    from fusedres.reference import conv_bn_act_reference
    x, w = torch.randn(2, 8, 6, 6), torch.randn(16, 8, 3, 3)
    s, b = torch.rand(16), torch.randn(16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fusedres.functional.conv_bn_act(x, w, s, b, padding=1, relu=True)
        out2 = fusedres.functional.conv_bn_act(x, w, s, b, padding=1, relu=True)
        block = fusedres.FusedBasicBlock(8, 8).eval()
        block(x)
    fallback = [c for c in caught if issubclass(c.category, fusedres.FusedResFallbackWarning)]
    ref = conv_bn_act_reference(x, w, s, b, padding=1, relu=True)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    print("WARNINGS", len(fallback), "ERR", err)
    print(fallback[0].message)
""")


def run(env_update):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FUSEDRES_STRICT")}
    env.update(env_update)
    return subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120)


def test_cpu_without_interpreter_falls_back_once_with_reason():
    proc = run({})
    assert proc.returncode == 0, proc.stderr
    words = proc.stdout.split()
    # One warning for the reason, shared by the functional op and the block (same reason).
    assert words[1] == "1", proc.stdout
    assert float(words[3]) < 1e-5
    assert "TRITON_INTERPRET=1" in proc.stdout


def test_cpu_without_interpreter_strict_raises():
    proc = run({"FUSEDRES_STRICT": "1"})
    assert proc.returncode != 0
    assert "FusedResFallbackError" in proc.stderr and "FUSEDRES_STRICT=1" in proc.stderr
