#!/usr/bin/env bash
# One command for a fresh CUDA machine that has torch and triton but no network (about 9 minutes):
#
#   bash benchmarks/gpu_check.sh          # results under $OUT, or ./gpu-results when OUT is unset
#
# 1. pip install -e . (no deps, no build isolation: nothing is downloaded)
# 1b. the descriptor (TMA) paths, FUSEDRES_TMA=1 (sm_90): first tests/test_conv_tma_3x3.py (FIRST TO VERIFY: taps
#    load at negative and past-the-end row coordinates, never run on a GPU before), then tests/test_conv_tma.py and
#    tests/test_conv_backward_tma.py
# 2. the whole test suite on CUDA (bf16 included; -m "": the slow tests too); the benchmarks run even if it fails
# 2b. the property tests (tests/test_properties.py) with hypothesis' "long" profile: fresh random
#    examples each run, GPU_CHECK_PROPS_EXAMPLES per test (step 2 leaves them out: every new shape
#    autotunes the inference conv, ~1 s each on a GPU)
# 3. the benchmarks in quick mode (FUSEDRES_BENCH_QUICK=1) -> bench.json (pytest-benchmark) + bench.jsonl
# 4. the main job, python -m fusedres (ResNet-50 bf16 vs eager / torch.compile) -> resnet50-cuda-bf16.{json,png}
# 5. compute-sanitizer memcheck on a tiny fused model, when compute-sanitizer is on the PATH
# 6. report.md: markdown tables from 3 and 4 (benchmarks/report.py), printed last
# Every step runs under `timeout`, so one hang cannot eat the budget; gpu_check.log holds all output,
# the environment (nvidia-smi, versions, commit) first. Six files in all (the device tool brings back 8).
# Step limits (seconds) can be changed: GPU_CHECK_TESTS_S, GPU_CHECK_PROPS_S, GPU_CHECK_BENCH_S, GPU_CHECK_MAIN_S, ...
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-results}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
LOG="$OUT/gpu_check.log"
export PYTHONUNBUFFERED=1
SUMMARY=()
T0=$(date +%s)

step() {  # step NAME SECONDS CMD...: run with a time limit, output to the console and the log
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
    timeout --signal=TERM --kill-after=20 "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    local took=$(( $(date +%s) - start )) what="exit $rc"
    [ "$rc" = 124 ] && what="TIMED OUT (exit 124)"
    echo "=== $name: $what after ${took}s" | tee -a "$LOG"
    SUMMARY+=("$(printf '%-10s %-22s %4ss' "$name" "$what" "$took")")
    return 0
}

{
    echo "=== environment ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
    if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo "nvidia-smi: not on the PATH"; fi
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown) $(git status --short 2>/dev/null | grep -q . && echo '(with uncommitted changes)')"
    "$PY" -c "import sys, platform, torch, triton; print('python', platform.python_version(), sys.executable); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version()); print('triton', triton.__version__); print('gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else 'NONE'); print('tf32 conv', torch.backends.cudnn.allow_tf32, 'tf32 matmul', torch.backends.cuda.matmul.allow_tf32)"
    "$PY" -m pip list 2>/dev/null | grep -iE '^(pytest|pytest-benchmark|hypothesis|matplotlib|numpy) '
} 2>&1 | tee "$LOG"

step install "${GPU_CHECK_INSTALL_S:-90}" "$PY" -m pip install -q --no-build-isolation --no-deps -e .

# the conv, dgrad and wgrad descriptor paths (issue 17 item 3; sm_90): every descriptor config and the TMA parity
# tests, on the card, first (the whole suite's run stops at its first failure), FUSEDRES_TMA=1 so fixed configs take it too.
# FIRST TO VERIFY: tests/test_conv_tma_3x3.py, the forward with taps: its descriptor loads start at negative row
# coordinates (and past the end), which TMA zero-fills per the PTX ISA but no GPU has run yet (interpreter only).
step tma "${GPU_CHECK_TMA_S:-120}" env FUSEDRES_TMA=1 "$PY" -m pytest tests/test_conv_tma_3x3.py tests/test_conv_tma.py \
    tests/test_conv_backward_tma.py -q -p no:cacheprovider

step tests "${GPU_CHECK_TESTS_S:-120}" "$PY" -m pytest tests -m "" -x -q -p no:cacheprovider --ignore=tests/test_properties.py

step props "${GPU_CHECK_PROPS_S:-60}" env FUSEDRES_HYPOTHESIS_PROFILE=long \
    FUSEDRES_HYPOTHESIS_MAX_EXAMPLES="${GPU_CHECK_PROPS_EXAMPLES:-30}" "$PY" -m pytest tests/test_properties.py -m "" -q \
    -p no:cacheprovider --hypothesis-show-statistics

rm -f "$OUT/bench.json" "$OUT/bench.jsonl"
step bench "${GPU_CHECK_BENCH_S:-120}" env FUSEDRES_BENCH_QUICK=1 FUSEDRES_BENCH_BUDGET_S="${GPU_CHECK_BENCH_BUDGET_S:-80}" \
    FUSEDRES_BENCH_JSONL="$OUT/bench.jsonl" "$PY" -m pytest benchmarks/ --benchmark-only -q -p no:cacheprovider \
    --benchmark-json="$OUT/bench.json" --benchmark-columns=median,iqr,rounds,iterations --benchmark-sort=name

step main "${GPU_CHECK_MAIN_S:-120}" "$PY" -m fusedres --out "$OUT" --budget "${GPU_CHECK_MAIN_BUDGET_S:-80}"

if command -v compute-sanitizer >/dev/null 2>&1; then
    step memcheck "${GPU_CHECK_SANITIZER_S:-45}" env FUSEDRES_STRICT=1 compute-sanitizer --tool memcheck \
        --error-exitcode 99 "$PY" -c "
import torch, fusedres
m = fusedres.cifar_resnet(20).cuda().half().to(memory_format=torch.channels_last).eval()
x = torch.randn(2, 3, 32, 32, device='cuda').half().contiguous(memory_format=torch.channels_last)
with torch.no_grad():
    y = m(x)
m.train()
m(x).float().square().mean().backward()
torch.cuda.synchronize()
print('memcheck run: eval forward and one training step of cifar_resnet20, fp16, batch 2:', tuple(y.shape))
"
else
    SUMMARY+=("memcheck   skipped: compute-sanitizer is not on the PATH")
fi

SOURCES=()
for f in "$OUT/bench.json" "$OUT/bench.jsonl" "$OUT"/*-cuda-*.json; do [ -s "$f" ] && SOURCES+=("$f"); done
if [ ${#SOURCES[@]} -gt 0 ]; then
    step report 30 "$PY" benchmarks/report.py "${SOURCES[@]}" -o "$OUT/report.md"
    cat "$OUT/report.md" | tee -a "$LOG"
else
    SUMMARY+=("report     skipped: nothing was measured")
fi

{
    echo
    echo "=== gpu_check.sh: $(( $(date +%s) - T0 ))s in all; files in $OUT:"
    ls -la "$OUT"
    printf '%s\n' "${SUMMARY[@]}"
} 2>&1 | tee -a "$LOG"
