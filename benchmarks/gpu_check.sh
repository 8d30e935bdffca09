#!/usr/bin/env bash
# Everything a GPU session has to run, in one call of at most ~8 minutes:
#   1. the CUDA tests (tests/test_gpu_e2e.py, then the Triton kernels compiled for real in
#      tests/test_triton_attention.py), capped at 150 s (each new kernel variant compiles
#      for a few seconds: a cut run still logs every test it finished);
#   2. the GPU suite (benchmarks/gpu_suite.py: kernels vs FlexAttention, GPT-2 rows, N:M rows),
#      budget 300 s, hard stop (SIGTERM: it writes what it has) at 315 s, with fresh
#      Triton/Inductor caches so its first-call (compile) rows are cold-cache figures.
# Results land in $OUT (default out/): logs, junit XML, gpu_suite.json and the rewritten
# BENCHMARKS.md. Needs only python3 with torch, triton, transformers, pytest (hypothesis).
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out}"
mkdir -p "$OUT"
export PYTHONPATH=. TRITON_INTERPRET=0  # compiled Triton (the CPU test runs set 1)
PY="${PYTHON:-python3}"
start=$(date +%s)

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
$PY - <<'EOF' 2>&1 | tee "$OUT/versions.txt"
import torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA")
EOF

echo "== CUDA tests (<= 150 s)"
timeout -k 5 150 $PY -m pytest -v -p no:cacheprovider -rfEs \
    tests/test_gpu_e2e.py tests/test_triton_attention.py \
    --junitxml="$OUT/gpu_tests.xml" > "$OUT/gpu_tests.log" 2>&1
tests_rc=$?
grep -E "^(FAILED|ERROR)|(FAILED|ERROR) +\[|passed|failed" "$OUT/gpu_tests.log" | tail -40
grep -cE " PASSED " "$OUT/gpu_tests.log" | sed 's/^/tests passed: /'
echo "tests rc=$tests_rc ($(( $(date +%s) - start )) s)"

echo "== GPU suite (budget 300 s, stop at 315 s)"
cache=$(mktemp -d)
TRITON_CACHE_DIR="$cache/triton" TORCHINDUCTOR_CACHE_DIR="$cache/inductor" \
    timeout -k 10 315 $PY benchmarks/gpu_suite.py --budget-s 300 > "$OUT/gpu_suite.log" 2>&1
suite_rc=$?
grep -E "^\||needs CUDA|Error|MISMATCH|stopped|results|rewrote" "$OUT/gpu_suite.log" | tail -90
cp BENCHMARKS.md "$OUT/BENCHMARKS.md"
echo "suite rc=$suite_rc; total $(( $(date +%s) - start )) s"
exit $(( tests_rc != 0 || suite_rc != 0 ))
