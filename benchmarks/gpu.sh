#!/usr/bin/env bash
# GPU run: the CUDA tests, the GPU targets and the flexpos-vs-dense table; 5-7 minutes on one
# H200 (2026-11-29: tests 190-270 s, targets at L=8192 46 s, table 22 s; at most 10: the step
# limits below). Run from anywhere in the checkout:
#
#     PYTHONPATH=. bash benchmarks/gpu.sh [STEP ...]
#
# STEPs (default: tests targets table): tests, targets, targets-8k (the targets without
# L=32768), variants (benchmarks/gpu_variants.py: where the score_mods' and Rotary's time goes,
# over 3 minutes for every row (2026-11-30: compiling fifteen score_mod rows took 2); fewer rows with
# VARIANTS_ARGS), tiles (benchmarks/flex_tiles.py: ALiBi and DPB under
# other flex tiles, about 3-4 minutes estimated; fewer with TILES_ARGS), table.
#
# Needs torch with CUDA (+ triton), einops, pytest; bio-attention is not needed (the dense
# baseline is flexpos.bench's own dense formulas, `--dense formula`). Everything printed goes
# to gpu-<UTC date>.txt (-b, -c, ... where that exists), the table also to the .json of that
# name: in $OUT when that is set (written as
# the run goes, so a run cut short still leaves its log), else in benchmarks/results/. Each
# step has its own time limit, so a slow step cannot starve the others; a step that fails or
# times out is reported and the script goes on; GPU_DEADLINE=SECONDS caps every step's limit so
# that the whole run ends within that many seconds of its start (a call's own time limit then
# never cuts a step mid-way, and later steps are skipped, said so). FLEXPOS_COMMIT names the commit where the
# checkout has no .git; PYTHON picks the interpreter (default: the first of python3, python
# that imports torch).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:-.}"
export PYTHONUNBUFFERED=1  # a step killed at its limit still leaves what it printed
if [ -z "${PYTHON:-}" ]; then
    for candidate in python3 python; do
        if "$candidate" -c "import torch" >/dev/null 2>&1; then PYTHON="$candidate"; break; fi
    done
fi
PY="${PYTHON:-python3}"
stamp="$(date -u +%Y-%m-%d)"
dest="${OUT:-benchmarks/results}"
mkdir -p "$dest"
# A log of the same day is kept: the first free name of gpu-<date>, gpu-<date>-b, ... -z.
for letter in "" {b..z}; do
    name="gpu-$stamp${letter:+-$letter}"
    [ -e "$dest/$name.txt" ] || [ -e "$dest/$name.json" ] || break
done
log="$dest/$name.txt"
json="$dest/$name.json"
commit="${FLEXPOS_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"

preamble() {  # machine facts; fails (and the run stops) without a GPU that compiles
    echo "# flexpos GPU run, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "# command: GPU_DEADLINE=${GPU_DEADLINE:-} VARIANTS_ARGS='${VARIANTS_ARGS:-}' TILES_ARGS='${TILES_ARGS:-}' PYTHONPATH=$PYTHONPATH bash benchmarks/gpu.sh $* (cwd $(pwd), commit $commit, python $PY)"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.memory --format=csv 2>/dev/null \
        || echo "nvidia-smi: not available"
    local cc_path
    cc_path="$(command -v cc gcc 2>/dev/null | head -1)"
    echo "C compiler (Triton builds its launcher with it): ${cc_path:-none found}"
    "$PY" - <<'EOF'
import platform, sys, time
import torch
print(f"python {platform.python_version()}; torch {torch.__version__}; CUDA {torch.version.cuda}; "
      f"cuda available {torch.cuda.is_available()}")
try:
    import triton
    print(f"triton {triton.__version__}")
except ImportError:
    print("triton: not installed")
if not torch.cuda.is_available():
    sys.exit("no CUDA device: nothing to run")
p = torch.cuda.get_device_properties(0)
print(f"device: {p.name}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs, cc {p.major}.{p.minor}")
start = time.perf_counter()
try:  # a broken Triton toolchain fails every later step: find out in seconds, not minutes
    torch.compile(lambda x: x.sin() + 1)(torch.ones(8, device="cuda"))
except Exception as err:
    sys.exit(f"torch.compile on CUDA failed: {type(err).__name__}: {err}")
print(f"torch.compile smoke test on CUDA: {time.perf_counter() - start:.1f} s")
EOF
}

step() {  # step NAME LIMIT_SECONDS COMMAND...
    local name="$1" limit="$2"
    shift 2
    echo
    if [ -n "${GPU_DEADLINE:-}" ]; then  # the whole run ends by then: cap the step's limit
        local left=$((GPU_DEADLINE - SECONDS - 15))  # timeout's --kill-after grace included
        if [ "$left" -lt 30 ]; then
            echo "## $name: SKIPPED, ${left}s left before GPU_DEADLINE=${GPU_DEADLINE}s"
            return
        fi
        [ "$left" -lt "$limit" ] && limit="$left"
    fi
    echo "## $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout --signal=INT --kill-after=15 "$limit" "$@"
    local rc=$?
    local note="exit $rc"
    { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && note="TIMED OUT after ${limit}s"
    echo "## $name: $note, $((SECONDS - t0)) s"
}

run_step() {
    case "$1" in
        # correctness on the GPU: compiled flex forward/backward against float64 references, and
        # Rotary's Triton kernel against the float64 and the compiled rotation
        tests) step "CUDA tests" 300 "$PY" -m pytest -q -p no:cacheprovider -p no:logging -rs --durations=0 tests/test_cuda.py tests/test_rotary_triton.py ;;
        # Rotary bandwidth; ALiBi/DPB vs flex with no score_mod and vs dense at L=8192; L=32768.
        # Each verdict is printed as it is reached; an interrupted run still prints its summary.
        targets) step "GPU targets" 200 "$PY" benchmarks/targets.py --gpu-only --repeat 5 ;;
        targets-8k) step "GPU targets, L=8192" 130 "$PY" benchmarks/targets.py --gpu-only --skip-32k --repeat 5 ;;
        # VARIANTS_ARGS: more options, shell-quoted, e.g. '--score-rows "DPB frozen" --skip-rotary'
        variants)
            local extra=()
            eval "extra=(${VARIANTS_ARGS:-})"
            step "GPU variants" 300 "$PY" benchmarks/gpu_variants.py --repeat 5 "${extra[@]}" ;;
        # flex tile configurations for DPB and ALiBi (kernel_options), a worker process per failure
        # TILES_ARGS: more options, shell-quoted, e.g. '--schemes alibi'
        tiles)
            local extra=()
            eval "extra=(${TILES_ARGS:-})"
            step "flex tiles" 300 "$PY" benchmarks/flex_tiles.py --repeat 3 "${extra[@]}" ;;
        # the side-by-side table at L=8192; its kernels are in Inductor's cache by now
        table) step "bench table" 80 "$PY" -m flexpos.bench --device cuda --dtype bfloat16 --mode fwdbwd \
            --batch 4 --heads 16 --head-dim 64 --schemes alibi dpb --lengths 8192 \
            --dense formula --repeat 3 --json "$json" ;;
        *) echo "unknown step '$1' (tests, targets, targets-8k, variants, tiles, table)" ;;
    esac
}

main() {
    local start_all=$SECONDS
    if [ -n "${GPU_DEADLINE:-}" ] && ! [[ "$GPU_DEADLINE" =~ ^[0-9]+$ ]]; then
        echo "GPU_DEADLINE must be a whole number of seconds, got '$GPU_DEADLINE'"
        return
    fi
    preamble "$@" || { echo "# stopped: see above"; return; }
    local steps=("$@") name
    [ "${#steps[@]}" -gt 0 ] || steps=(tests targets table)
    for name in "${steps[@]}"; do run_step "$name"; done
    echo
    echo "# total $((SECONDS - start_all)) s; log: $log"
}

main "$@" 2>&1 | tee "$log"
exit 0
