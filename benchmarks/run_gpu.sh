#!/usr/bin/env bash
# One device call: the newest transformers (carried as wheels in .whl), the GPU tests, the experts
# benchmark beside transformers' grouped_mm and ScatterMoE (carried in .peers), and the
# end-to-end model benchmark. Everything it writes goes to $OUT (at most 8 files come back).
# Usage (device tool, carry .whl and .peers): MOEKIT_COMMIT=<sha> bash benchmarks/run_gpu.sh
# (write the sha out here: the device's copy of the tree has a stale git HEAD)
# Knobs (environment): SKIP_TESTS, TEST_K (pytest -k), TEST_TIMEOUT, SHAPES, SWEEP (settings for
# --sweep), SWEEP_SHAPES, PROFILE (shapes to profile), REP_MS, ROUNDS (timing rounds, impls in turn), BENCH_TIMEOUT, SKIP_MODEL, MODEL_TIMEOUT.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=src:/tmp/site:.peers
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch,triton,transformers;print('torch',torch.__version__,'triton',triton.__version__,'transformers',transformers.__version__)"
  if [ -z "$SKIP_TESTS" ]; then
    timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider -m gpu ${TEST_K:+-k "$TEST_K"} \
      tests/test_triton_gpu.py tests/test_bad_ops.py 2>&1
    echo "pytest exit code $? (124: cut by TEST_TIMEOUT)"
  fi
} > "$OUT/gpu_tests.log"
tail -3 "$OUT/gpu_tests.log"
timeout "${BENCH_TIMEOUT:-240}" python3 benchmarks/bench_experts.py --out "$OUT" --peers .peers \
  --rep-ms "${REP_MS:-20}" --rounds "${ROUNDS:-5}" --impls moekit-triton hf-grouped_mm scattermoe \
  --shapes ${SHAPES:-qwen3-30b-a3b olmoe gpt-oss-20b mixtral-8x7b deepseek-v3-64e qwen3-decode-T1 qwen3-decode-T8 qwen3-decode-T64} \
  ${SWEEP:+--sweep-shapes ${SWEEP_SHAPES:-qwen3-30b-a3b olmoe} --sweep $SWEEP} \
  ${PROFILE:+--profile $PROFILE} > "$OUT/bench.log" 2>&1
grep -E "fwd\+bwd|decode|^#" "$OUT/bench.log" | tail -40
if [ -z "$SKIP_MODEL" ]; then
  timeout "${MODEL_TIMEOUT:-230}" python3 benchmarks/bench_model.py --out "$OUT" 2>&1 | tail -16
fi
