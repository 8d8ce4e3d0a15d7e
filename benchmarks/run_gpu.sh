#!/usr/bin/env bash
# One device call: environment, GPU tests, the benchmark (+ a config sweep at the qwen3 shape).
# Usage (device tool, carry .peers): bash benchmarks/run_gpu.sh [bench args...]
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=src TRITON_DEFAULT_FP_FUSION=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/results"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
  python -c "import torch,triton,transformers;print('torch',torch.__version__,'triton',triton.__version__,'transformers',transformers.__version__)"
  python -c "import sys; sys.path.insert(0,'.peers'); import scattermoe; print('scattermoe imports')" 2>&1 | tail -1
} | tee "$OUT/env.txt"
if [ -z "$SKIP_TESTS" ]; then
  timeout ${TEST_TIMEOUT:-240} python -m pytest -q -p no:cacheprovider tests/test_triton_gpu.py -k "${PYTEST_K:-not nothing}" 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
fi
timeout ${BENCH_TIMEOUT:-420} python benchmarks/bench_experts.py --out "$OUT/results" --peers .peers "$@" 2>&1 | tee "$OUT/bench.log" | grep -v "^ \|^Traceback" | tail -60
