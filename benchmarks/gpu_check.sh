#!/usr/bin/env bash
# One command for a fresh CUDA machine that has torch and triton but no network (about 9 minutes; the limits below sum to 540 s, under the
# device tool's 600 s per command):
#
#   bash benchmarks/gpu_check.sh                         # results under $OUT, or ./gpu-results when OUT is unset
#   GPU_CHECK_ONLY=tma,tests bash benchmarks/gpu_check.sh   # a rerun of some steps only
#
# Sized for a 15-minute lease (machine start ~30 s) with room for a partial rerun. Order = value per second, as the
# first card run (H200, 2026-12-04) measured it:
# 1. install: pip install -e . (no deps, no build isolation: nothing is downloaded)
# 2. tma: the descriptor (TMA) paths, FUSEDRES_TMA=1, xdist: tests/test_conv_persistent.py (the persistent 1x1 walk and
#    its descriptor epilogue) and test_conv_tma_stride2.py (a 5-D parity view): not run on a card yet;
#    test_conv_tma_3x3.py (negative and past-the-end coordinates: passed on the H200 on 2026-12-04; its full_c cases,
#    the swapped MMA operands W_AS_A of d56f13d, and the prologue's padding mask from tap bits through a load that
#    reads nothing (b9cd794): not run on a card yet), test_conv_tma.py,
#    test_conv_backward_tma.py (its 3x3 wgrad over each tap's 4-D views, 2026-12-05, and the shipped 128-pixel
#    step, 8 x 16 tiles, a952704: not run on a card yet); the stem's padded copy, its 4-warp STATS tile and its
#    wgrad over spatial tiles (7d11f48, 4924d7a) run in step 5's test_conv_modes.py / test_conv_backward.py
#    (~2 min on 6 workers)
# 3. main: the main job, ResNet-50 bf16 models only (--no-layers), inference and training, fused / eager / eager-amp
#    (+ torch.compile when the budget allows: compiles come last) -> resnet50-cuda-bf16.json
# 4. profile: benchmarks/gpu_profile.py: kernel time per step against the timed step and a CUDA-graph replay of it
#    (host-bound or not), every autotuned launch's best descriptor config against its best pointer one, and
#    benchmarks/host_overhead.py --device cuda (host enqueue time per step, real launches), then a 1x1 layer
#    (layer3.1.conv1) persistent and one program per tile (FUSEDRES_PERSISTENT=1 / 0), last the training step of a
#    3x3 layer at 14 px (layer3.1.conv2: its wgrad's tap views against pointers, 2026-12-05) -> profile.md
# 5. tests: the suite on CUDA, bf16 included (-m "": the slow tests too), on GPU_CHECK_WORKERS xdist workers, -v so
#    a cut run still lists what passed and failed; stopped by SIGINT at its limit (pytest then prints its summary).
#    The whole suite does not fit a lease (~1/3 ran in 150 s on 10 workers): kernel parity files go first.
# 6. bench: the layer benchmarks in quick mode (FUSEDRES_BENCH_QUICK=1) -> bench.json + bench.jsonl
# 7. props (GPU_CHECK_PROPS=1) and memcheck (GPU_CHECK_SANITIZER=1, compute-sanitizer): opt-in, each took longer
#    than 30 s to report anything on the card
# 8. report.md: markdown tables from 3 and 6 (benchmarks/report.py), printed last
# Every step runs under `timeout`, so one hang cannot eat the budget; gpu_check.log holds all output, the
# environment (nvidia-smi, versions, commit) first. At most 8 files come back from the device tool: gpu_check.log,
# tma.log, tests.log, profile.md, resnet50-cuda-bf16.json, bench.json, bench.jsonl, report.md.
# Step limits (seconds): GPU_CHECK_TMA_S, GPU_CHECK_MAIN_S (+ GPU_CHECK_MAIN_BUDGET_S), GPU_CHECK_PROFILE_S,
# GPU_CHECK_TESTS_S, GPU_CHECK_BENCH_S (+ GPU_CHECK_BENCH_BUDGET_S), GPU_CHECK_PROPS_S, GPU_CHECK_SANITIZER_S.
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
    if [ -n "${GPU_CHECK_ONLY:-}" ] && [[ ",$GPU_CHECK_ONLY,install,report," != *",$name,"* ]]; then
        SUMMARY+=("$(printf '%-10s %-22s' "$name" "skipped (GPU_CHECK_ONLY)")"); return 0
    fi
    start=$(date +%s)
    echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
    timeout --signal="${STEP_SIGNAL:-TERM}" --kill-after=20 "$limit" "$@" 2>&1 | tee -a "$LOG"
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

step install "${GPU_CHECK_INSTALL_S:-60}" "$PY" -m pip install -q --no-build-isolation --no-deps -e .
W="${GPU_CHECK_WORKERS:-12}"
PYTEST=("$PY" -m pytest -p no:cacheprovider -rfE --tb=short)  # -v per step (not with -q: they cancel)

# the descriptor paths (issue 17 item 3; sm_90), FUSEDRES_TMA=1 so fixed configs take them too; SIGINT at the limit:
# pytest prints the failures it has; tma.log keeps the per-test lines
STEP_SIGNAL=INT step tma "${GPU_CHECK_TMA_S:-100}" bash -c "FUSEDRES_TMA=1 ${PYTEST[*]} -n 6 -v \
    tests/test_conv_persistent.py tests/test_conv_tma_stride2.py tests/test_conv_tma_3x3.py tests/test_conv_tma.py \
    tests/test_conv_backward_tma.py \
    > '$OUT/tma.log' 2>&1; \
    rc=\$?; tail -25 '$OUT/tma.log'; exit \$rc"

step main "${GPU_CHECK_MAIN_S:-150}" "$PY" -m fusedres --out "$OUT" --no-layers \
    --providers "${GPU_CHECK_MAIN_PROVIDERS:-fused,eager,eager-amp,compile}" --budget "${GPU_CHECK_MAIN_BUDGET_S:-115}"

# then the host's enqueue time per step with real launches (benchmarks/host_overhead.py --device cuda; the main step's
# autotune results are on disk for these batches), against the CPU instrument's figures in RESULTS.md
step profile "${GPU_CHECK_PROFILE_S:-130}" bash -c "'$PY' benchmarks/gpu_profile.py layer:layer1.0.conv2:training:256 \
    model:resnet50:inference:256 > '$OUT/profile.md' 2>&1; rc=\$?; \
    '$PY' benchmarks/host_overhead.py --device cuda --mode eval --batch 256 >> '$OUT/profile.md' 2>&1 || rc=1; \
    '$PY' benchmarks/host_overhead.py --device cuda --mode train --batch 128 --sgd >> '$OUT/profile.md' 2>&1 || rc=1; \
    for p in 1 0; do echo \"### FUSEDRES_PERSISTENT=\$p\" >> '$OUT/profile.md'; FUSEDRES_PERSISTENT=\$p '$PY' \
        benchmarks/gpu_profile.py layer:layer3.1.conv1:inference:256 >> '$OUT/profile.md' 2>&1 || rc=1; done; \
    echo '### layer3.1.conv2 training' >> '$OUT/profile.md'; \
    '$PY' benchmarks/gpu_profile.py layer:layer3.1.conv2:training:256 >> '$OUT/profile.md' 2>&1 || rc=1; \
    grep -E '^(###|timed step|fused resnet50|\\| _conv|\\| resnet50|\\| mode)' '$OUT/profile.md' | tail -70; exit \$rc"

# what no card has run yet first (the packed bf16 prologue's and.b32 padding mask and bf16 BN factors, a088f60), then
# kernel parity, then the rest (xdist hands files out in this order)
FIRST=(tests/test_conv_prologue.py tests/test_wgrad_prologue.py tests/test_training.py tests/test_blocks.py
       tests/test_conv_kernel.py tests/test_conv_backward.py)
STEP_SIGNAL=INT step tests "${GPU_CHECK_TESTS_S:-100}" bash -c "${PYTEST[*]} -m '' -n $W -v --dist loadfile \
    ${FIRST[*]} tests --ignore=tests/test_properties.py --durations=15 > '$OUT/tests.log' 2>&1; rc=\$?; \
    grep -E '(FAILED|ERROR) ' '$OUT/tests.log' | sed 's/^.*\(FAILED\|ERROR\) /\1 /' | sort -u | tail -40; \
    tail -2 '$OUT/tests.log'; exit \$rc"

rm -f "$OUT/bench.json" "$OUT/bench.jsonl"
step bench "${GPU_CHECK_BENCH_S:-60}" env FUSEDRES_BENCH_QUICK=1 FUSEDRES_BENCH_BUDGET_S="${GPU_CHECK_BENCH_BUDGET_S:-45}" \
    FUSEDRES_BENCH_JSONL="$OUT/bench.jsonl" "$PY" -m pytest benchmarks/ --benchmark-only -q -p no:cacheprovider \
    --benchmark-json="$OUT/bench.json" --benchmark-columns=median,iqr,rounds,iterations --benchmark-sort=name

if [ "${GPU_CHECK_PROPS:-0}" = 1 ]; then
    step props "${GPU_CHECK_PROPS_S:-90}" env FUSEDRES_HYPOTHESIS_PROFILE=long \
        FUSEDRES_HYPOTHESIS_MAX_EXAMPLES="${GPU_CHECK_PROPS_EXAMPLES:-30}" "$PY" -m pytest tests/test_properties.py -m "" \
        -q -p no:cacheprovider --hypothesis-show-statistics
fi

if [ "${GPU_CHECK_SANITIZER:-0}" = 1 ] && command -v compute-sanitizer >/dev/null 2>&1; then
    step memcheck "${GPU_CHECK_SANITIZER_S:-120}" env FUSEDRES_STRICT=1 compute-sanitizer --tool memcheck \
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
    SUMMARY+=("memcheck   skipped: opt-in (GPU_CHECK_SANITIZER=1; it ran past 35 s on the H200 without a report)")
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
