#!/usr/bin/env bash
# The GPU tier and the kernel benchmarks in one call, for the lent H100:
#   bash scripts/gpu_suite.sh [pytest args...]     logs go to $OUT (or ./out)
# Runs the package from the tree (no install needed on the device machine).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-out}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
# Both tiers on the GPU: small odd shapes (all dtypes) and the real sizes; with pytest-xdist,
# in JOBS processes sharing the GPU (about 3 minutes with 5 on an H200).
par=()
python3 -c "import xdist" 2>/dev/null && par=(-n "${JOBS:-5}")
python3 -m pytest -m "gpu or not gpu" -q -rfEs -p no:cacheprovider "${par[@]}" "$@" 2>&1 \
  | tee "$out/gpu_tests.log"
tests=${PIPESTATUS[0]}
python3 -m tritonformer.bench --csv "$out/results.csv" 2>&1 | tee "$out/bench.log"
bench=${PIPESTATUS[0]}
echo "tests exit $tests, bench exit $bench"
exit $(( tests || bench ))
