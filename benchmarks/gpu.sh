#!/usr/bin/env bash
# GPU run, estimated at 5-6 minutes on one H100/H200 (not yet run on one; at most 8: the step
# limits below): the CUDA tests, the GPU targets and the flexpos-vs-dense table. Run from
# anywhere in the checkout:
#
#     PYTHONPATH=. bash benchmarks/gpu.sh
#
# Needs torch with CUDA (+ triton), einops, pytest; bio-attention is not needed (the dense
# baseline is flexpos.bench's own dense formulas, `--dense formula`). Everything printed goes
# to benchmarks/results/gpu-<UTC date>.txt, the table also to gpu-<date>.json, and both are
# copied into $OUT when that is set. Each step has its own time limit, so a slow step cannot
# starve the others; a step that fails or times out is reported and the script goes on.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:-.}"
PY="${PYTHON:-python}"
stamp="$(date -u +%Y-%m-%d)"
results="benchmarks/results"
mkdir -p "$results"
log="$results/gpu-$stamp.txt"
json="$results/gpu-$stamp.json"
main() {
echo "# flexpos GPU run, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "# command: PYTHONPATH=$PYTHONPATH bash benchmarks/gpu.sh (cwd $(pwd), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown))"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.memory --format=csv 2>/dev/null || echo "nvidia-smi: not available"
"$PY" - <<'EOF'
import platform, torch
print(f"python {platform.python_version()}; torch {torch.__version__}; CUDA {torch.version.cuda}; "
      f"cuda available {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs, cc {p.major}.{p.minor}")
try:
    import triton
    print(f"triton {triton.__version__}")
except ImportError:
    print("triton: not installed")
EOF

start_all=$SECONDS
step() {  # step NAME LIMIT_SECONDS COMMAND...
    local name="$1" limit="$2"
    shift 2
    echo
    echo "## $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout --signal=INT --kill-after=15 "$limit" "$@"
    local rc=$?
    local note="exit $rc"
    { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && note="TIMED OUT after ${limit}s"
    echo "## $name: $note, $((SECONDS - t0)) s"
}

# 1. correctness on the GPU: compiled flex forward/backward against float64 references
step "CUDA tests" 210 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py

# 2. the side-by-side table at the target lengths, forward+backward, bfloat16, B=4 H=16 D=64
step "bench table" 120 "$PY" -m flexpos.bench --device cuda --dtype bfloat16 --mode fwdbwd \
    --batch 4 --heads 16 --head-dim 64 --schemes alibi dpb --lengths 8192 32768 \
    --dense formula --repeat 3 --json "$json"

# 3. targets: Rotary bandwidth; ALiBi/DPB vs flex with no score_mod and vs dense at L=8192;
#    L=32768 (prints each verdict as it goes, so a time-out still leaves the finished ones)
step "GPU targets" 150 "$PY" benchmarks/targets.py --gpu-only --repeat 5

echo
echo "# total $((SECONDS - start_all)) s; log: $log"
}

main 2>&1 | tee "$log"
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    cp "$log" "$OUT/" 2>/dev/null
    if [ -f "$json" ]; then cp "$json" "$OUT/"; fi
fi
exit 0
