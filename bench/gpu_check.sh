#!/usr/bin/env bash
# GPU check of the merge engine (issues 13, 20): CUDA tests, then the sliced CUDA path measured.
#
#   bash bench/gpu_check.sh            # from the repository root, on a machine with a GPU
#
# Results go to $OUT (or bench/out/gpu_check): env.txt (python, torch, nvidia-smi),
# tests.log + tests.xml (pytest -m cuda), sliced.log (bench.gpu_sliced: per method max |Δ| vs
# the CPU, bit-identical tensors, throughput of the sliced path, host RSS, pinned H2D
# bandwidth), summary.txt (all of it). Budget: under 5 minutes on an H100 (tests <= 2.5 min,
# bench.gpu_sliced at 100m <= 2.5 min incl. writing the 5 synthetic models); none of it has
# run on a GPU yet.
# The GPU image has torch, safetensors, pyyaml, tqdm, typer and pytest but not pydantic, and no
# network: fetch the wheels beforehand where pip works, into the git-ignored bench/out/wheels:
#   for v in 3.11 3.12 3.13; do python3 -m pip download --no-deps --only-binary=:all: \
#     --python-version $v --implementation cp --platform manylinux_2_17_x86_64 \
#     -d bench/out/wheels pydantic_core==2.50.5; done
#   python3 -m pip download --no-deps --only-binary=:all: -d bench/out/wheels pydantic==2.14.4 \
#     annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0
# and name bench/out/wheels in the device tool's carry.
# Knobs: PYTHON (interpreter to use), GPU_CHECK_SIZE (default 100m; "tiny" for a smoke run),
# GPU_CHECK_SKIP_BENCH=1, GPU_CHECK_TEST_TIMEOUT / GPU_CHECK_BENCH_TIMEOUT / GPU_CHECK_ENGINE_TIMEOUT (seconds);
# GPU_CHECK_ENGINE_BENCH=1 also runs the longer bench.merge_engine --device cuda (GPU_CHECK_SIZES,
# default 270m; about 5 more minutes); GPU_CHECK_ALLOW_CPU=1 runs the plumbing without a GPU
# (CUDA tests skip, the benchmarks merge on the CPU).
# Exit codes: 0 all passed; 1 tests or benchmark failed; 3 no usable Python with CUDA torch;
# 4 a project dependency is missing and could not be installed.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
OUT=${OUT:-$ROOT/bench/out/gpu_check}
mkdir -p "$OUT"
SIZE=${GPU_CHECK_SIZE:-100m}
SIZES=${GPU_CHECK_SIZES:-270m}
TEST_TIMEOUT=${GPU_CHECK_TEST_TIMEOUT:-150}
BENCH_TIMEOUT=${GPU_CHECK_BENCH_TIMEOUT:-150}
ENGINE_TIMEOUT=${GPU_CHECK_ENGINE_TIMEOUT:-300}
WORK=${TMPDIR:-/tmp}/ckreg-gpu-check
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)

log() { echo "[gpu_check $(($(date +%s) - START))s] $*" | tee -a "$OUT/summary.txt"; }

# 1. An interpreter whose torch sees CUDA: $PYTHON, else the project venv, else python3.
cuda_ok() {  # GPU_CHECK_ALLOW_CPU=1 (plumbing test only): any torch will do
    local need='torch.cuda.is_available()'
    [[ "${GPU_CHECK_ALLOW_CPU:-0}" == "1" ]] && need='True'
    "$1" -c "import torch, sys; sys.exit(0 if $need else 1)" 2>/dev/null
}
PY=""
for candidate in ${PYTHON:-} "$ROOT/.venv/bin/python" python3.11 python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 && cuda_ok "$candidate"; then
        PY=$(command -v "$candidate"); break
    fi
done
{
    echo "date: $(date -u)"; echo "host: $(hostname)"; echo "cpus: $(nproc)"
    nvidia-smi 2>&1 || echo "nvidia-smi: not available"
    for candidate in ${PYTHON:-} "$ROOT/.venv/bin/python" python3.11 python3; do
        command -v "$candidate" >/dev/null 2>&1 || continue
        echo "--- $candidate: $("$candidate" --version 2>&1)"
        "$candidate" -c 'import torch; print("torch", torch.__version__, "cuda build", torch.version.cuda, "cuda available", torch.cuda.is_available())' 2>&1 || true
    done
} > "$OUT/env.txt"
if [[ -z "$PY" ]]; then
    log "FAIL: no Python here has a torch that sees CUDA (torch.cuda.is_available() is False everywhere)."
    log "      Checked: ${PYTHON:-} $ROOT/.venv/bin/python python3.11 python3 python; details in $OUT/env.txt:"
    sed 's/^/      /' "$OUT/env.txt" | tee -a "$OUT/summary.txt"
    log "      Fix: PYTHON=/path/to/python-with-cuda-torch bash bench/gpu_check.sh (torch==2.13.0 CUDA build)."
    exit 3
fi
log "python: $PY ($("$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")'))"

# 2. Project dependencies. The GPU image lacks pydantic and has no network: wheels carried in
#    $WHEELS (see the header) are installed into /tmp/site first; pip is the last resort.
WHEELS=${GPU_CHECK_WHEELS:-$ROOT/bench/out/wheels}
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    log "installing carried wheels from $WHEELS into /tmp/site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site --find-links "$WHEELS" pydantic pydantic_core annotated-types \
        typing-inspection typing_extensions >>"$OUT/env.txt" 2>&1 || log "wheel install failed (see env.txt)"
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
missing=$("$PY" - <<'EOF'
import importlib.util
mods = {"safetensors": "safetensors", "pydantic": "pydantic", "tqdm": "tqdm", "yaml": "pyyaml",
        "typer": "typer", "pytest": "pytest"}
print(" ".join(pkg for mod, pkg in mods.items() if importlib.util.find_spec(mod) is None))
EOF
)
if [[ -n "$missing" ]]; then
    log "installing missing packages: $missing"
    if ! "$PY" -m pip install -q --timeout 20 -c constraints.txt $missing >>"$OUT/env.txt" 2>&1; then
        log "FAIL: missing $missing and pip could not install them (offline?); see $OUT/env.txt"
        exit 4
    fi
fi

status=0
# 3. CUDA tests: parity of every method, the pipeline on the device, existing CUDA tests.
log "tests: pytest -m cuda (timeout ${TEST_TIMEOUT}s)"
rc=0
timeout "$TEST_TIMEOUT" "$PY" -m pytest -q -m cuda -p no:cacheprovider -o addopts="" \
    --junitxml="$OUT/tests.xml" tests/mergeops/test_cuda_parity.py tests/mergeops/test_cuda.py \
    tests/mergeops/test_cuda_sliced_output.py tests/mergeops/test_ota.py >"$OUT/tests.log" 2>&1 || rc=$?
if [[ $rc -eq 0 ]]; then
    log "tests: passed ($(tail -n 1 "$OUT/tests.log"))"
else
    status=1
    log "tests: FAILED (rc $rc; 124 = timed out; last lines below, all in $OUT/tests.log)"
    tail -n 30 "$OUT/tests.log" | tee -a "$OUT/summary.txt"
fi
# The CPU-side ordering and sliced-output tests of the same pipeline (quick; they must pass here too).
if ! timeout 120 "$PY" -m pytest -q -p no:cacheprovider -o addopts="" -m "not cuda" \
    tests/mergeops/test_cuda_pipeline.py tests/mergeops/test_cuda_sliced_output.py \
    >>"$OUT/tests.log" 2>&1; then
    status=1; log "pipeline ordering / sliced output tests (CPU): FAILED, see $OUT/tests.log"
fi

# run_logged NAME LOGFILE LIMIT CMD...: CMD under a timeout into LOGFILE; its outcome logged,
# the log appended to the summary; a failure sets status=1.
run_logged() {
    local name=$1 logfile=$2 limit=$3 rc=0
    shift 3
    log "$name: $* (timeout ${limit}s)"
    timeout "$limit" "$@" >"$logfile" 2>&1 || rc=$?
    if [[ $rc -eq 0 ]]; then
        log "$name: done"
    else
        status=1; log "$name: FAILED (rc $rc; 124 = timed out), see $logfile"
    fi
    tee -a "$OUT/summary.txt" <"$logfile"
}

# 4. The sliced CUDA path: parity with the CPU (max |Δ|), throughput, host RSS, pinned H2D.
if [[ "${GPU_CHECK_SKIP_BENCH:-0}" != "1" ]]; then
    device=cuda
    [[ "${GPU_CHECK_ALLOW_CPU:-0}" == "1" ]] && ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' && device=cpu
    run_logged "sliced path" "$OUT/sliced.log" "$BENCH_TIMEOUT" \
        "$PY" -m bench.gpu_sliced --size "$SIZE" --device "$device" --work "$WORK-sliced"
    rm -rf "$WORK-sliced"
fi

# 5. Optional, longer: ties / task_arithmetic / ota_ffg / opcm on the GPU vs pinned H2D bandwidth.
if [[ "${GPU_CHECK_ENGINE_BENCH:-0}" == "1" ]]; then
    run_logged "bench" "$OUT/bench.log" "$ENGINE_TIMEOUT" \
        "$PY" -m bench.merge_engine --device cuda --sizes "$SIZES" --work "$WORK"
    cp "$WORK"/*/*-cuda.log "$OUT/" 2>/dev/null || true
    rm -rf "$WORK"
fi
log "finished with status $status"
exit "$status"
