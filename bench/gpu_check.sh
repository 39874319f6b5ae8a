#!/usr/bin/env bash
# GPU check: what a bare CUDA machine can run from a plain checkout (docs/kernels.md, "GPU check").
#
#   bench/gpu_check.sh               # on a GPU machine: versions, kernel tests on CUDA, pack/unpack benchmark
#   bench/gpu_check.sh --cpu-smoke   # no GPU: the same steps on tiny shapes, CPU + Triton interpreter
#
# Needs only a Python with torch (CUDA build) and triton: no vLLM, NIXL, network or install (the checkout is put
# on PYTHONPATH; pdmesh/ maps kernels/ to pdmesh.kernels). PYTHON picks the interpreter (default python3).
# Steps, each under its own timeout (45 + 135 + 120 s: at most 5 min in all):
#   1. versions: Python, torch, triton, CUDA, GPU; exits 3 with "no CUDA" when torch sees no GPU.
#   2. kernel tests: pytest on tests/kernels (the CUDA tests must run, not skip) when pytest is importable;
#      without pytest the self-contained harness of step 3 (tests/kernels/bitexact.py) stands in for it.
#   3. bench/bench_gpu.py: bit-exactness on every layout x dtype, then pack/unpack GB/s vs device memcpy
#      (and into/from pinned host memory vs D2H/H2D copies). Writes $OUT/gpu.json when OUT is set, else
#      bench/results/gpu.json (--cpu-smoke: gpu-smoke.json there).
# Exit status: 0 all passed (the 0.8x goal is reported in the JSON, not enforced), else the first failing step's
# status (3 no CUDA, 4 no torch or triton, 124 a step timed out, 1 a test or bit-exactness failure, 2 usage);
# steps 2 and 3 both run even when the other fails.
set -euo pipefail

cd "$(dirname "$0")/.."
SMOKE=0
case "${1:-}" in
  "") ;;
  --cpu-smoke) SMOKE=1 ;;
  -h | --help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "usage: $0 [--cpu-smoke]" >&2; exit 2 ;;
esac

PY="${PYTHON:-$(command -v python3 || command -v python || true)}"
if [[ -z "$PY" ]]; then
  echo "gpu_check: no python3 on PATH (set PYTHON)" >&2
  exit 2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
if [[ $SMOKE == 1 ]]; then
  export TRITON_INTERPRET=1
  BENCH_ARGS=(--cpu-smoke)
  RESULT_NAME=gpu-smoke.json
else
  unset TRITON_INTERPRET  # the compiled kernel is what this checks
  BENCH_ARGS=()
  RESULT_NAME=gpu.json
fi
if [[ -n "${OUT:-}" ]]; then
  mkdir -p "$OUT"
  RESULT="$OUT/$RESULT_NAME"
else
  RESULT="bench/results/$RESULT_NAME"
fi
T0=$SECONDS

# step NAME SECONDS CMD...: run CMD under a timeout; on failure say which step and how, and remember the first
# failing status (STATUS). Later steps still run, so one GPU session yields the benchmark even if a test fails.
STATUS=0
FAILED=()
step() {
  local name=$1 limit=$2 rc=0
  shift 2
  echo "== gpu_check: $name (timeout ${limit}s, at +$((SECONDS - T0))s)"
  timeout -k 10 "$limit" "$@" || rc=$?
  if [[ $rc == 124 || $rc == 137 ]]; then
    echo "gpu_check: FAILED: $name timed out after ${limit}s" >&2
    rc=124
  elif [[ $rc != 0 ]]; then
    echo "gpu_check: FAILED: $name (exit $rc)" >&2
  fi
  if [[ $rc != 0 ]]; then
    FAILED+=("$name")
    [[ $STATUS != 0 ]] || STATUS=$rc
  fi
  return 0
}

step "versions" 45 "$PY" - "$SMOKE" <<'PYEOF'
import platform, subprocess, sys
smoke = sys.argv[1] == "1"
try:
    import torch
except ImportError as exc:
    print(f"gpu_check: torch is not importable by {sys.executable} ({exc}); set PYTHON", file=sys.stderr)
    sys.exit(4)
print(f"python {platform.python_version()} ({sys.executable}), torch {torch.__version__} (CUDA build {torch.version.cuda})")
try:
    import triton
    print(f"triton {triton.__version__}")
except ImportError as exc:
    print(f"gpu_check: triton is not importable ({exc})", file=sys.stderr)
    sys.exit(4)
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"cuda:{i} {p.name}, capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB")
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        print(f"nvidia-smi: {smi.stdout.strip()}")
    except (OSError, subprocess.TimeoutExpired):
        print("nvidia-smi: not available")
elif smoke:
    print("no CUDA (--cpu-smoke: running on the CPU with the Triton interpreter)")
else:
    print(f"gpu_check: no CUDA: torch {torch.__version__} sees no GPU (CUDA build {torch.version.cuda}); "
          "run this on a CUDA machine (or pass --cpu-smoke)", file=sys.stderr)
    sys.exit(3)
PYEOF
if [[ $STATUS != 0 ]]; then
  exit "$STATUS"  # no GPU, torch or triton: nothing else can run
fi

if "$PY" -c "import pytest" 2>/dev/null; then
  if [[ $SMOKE == 1 ]]; then
    TESTS=(tests/kernels/test_kernels_cuda.py)  # collection and skip reasons only: no GPU here
  else
    TESTS=(tests/kernels/test_kernels_cuda.py tests/kernels/test_kernels_triton.py tests/kernels/test_kernels_layouts.py)
    if "$PY" -c "import hypothesis" 2>/dev/null; then
      TESTS+=(tests/kernels/test_kernels_torch.py)
    else
      echo "hypothesis not installed: tests/kernels/test_kernels_torch.py left out (CPU path; step 3 covers CUDA)"
    fi
  fi
  LOG=$(mktemp)
  export LOG
  trap 'rm -f "$LOG"' EXIT
  step "kernel tests (pytest)" 135 bash -c '"$0" -m pytest -q -rs -p no:cacheprovider "${@}" 2>&1 | tee "$LOG"; exit "${PIPESTATUS[0]}"' "$PY" "${TESTS[@]}"
  if [[ $SMOKE == 0 ]] && grep -Eq '[0-9]+ skipped' "$LOG"; then
    echo "gpu_check: FAILED: kernel tests skipped on a CUDA machine (see the SKIPPED lines above)" >&2
    FAILED+=("kernel tests skipped")
    [[ $STATUS != 0 ]] || STATUS=1
  fi
else
  echo "== gpu_check: pytest not installed: the bit-exactness harness in the next step stands in for the tests"
fi

step "bench/bench_gpu.py" 120 "$PY" bench/bench_gpu.py ${BENCH_ARGS[@]+"${BENCH_ARGS[@]}"} --out "$RESULT"
if [[ $STATUS != 0 ]]; then
  echo "gpu_check: FAILED in $((SECONDS - T0))s: ${FAILED[*]} (exit $STATUS); results, if any, in $RESULT" >&2
  exit "$STATUS"
fi
echo "== gpu_check: passed in $((SECONDS - T0))s; results in $RESULT"
