#!/usr/bin/env bash
# The GPU tier and the kernel benchmarks, for the lent GPU (TESTS=0 or BENCH=0 skips a part):
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
# in JOBS processes sharing the GPU (default: one per 28 GiB of it, 5 on an H200 (about 3
# minutes), 2 on an 80 GB H100: more run out of memory). On the H100 the tests alone took
# 6.6 minutes in one call and more than 9.5 in another: with a 10-minute limit per device
# call, run the tests (BENCH=0) and the benchmarks (TESTS=0) in separate calls there. The
# slowest tests are listed at the end.
par=()
jobs=${JOBS:-$(python3 -c "import torch; print(max(1, torch.cuda.get_device_properties(0).total_memory // (28 << 30)))")}
python3 -c "import xdist" 2>/dev/null && par=(-n "$jobs")
tests=0
if [ "${TESTS:-1}" != 0 ]; then
  python3 -m pytest -m "gpu or not gpu" -q -rfEs -p no:cacheprovider --durations=25 \
    "${par[@]}" "$@" 2>&1 | tee "$out/gpu_tests.log"
  tests=${PIPESTATUS[0]}
fi
bench=0
if [ "${BENCH:-1}" != 0 ]; then
  python3 -m tritonformer.bench --csv "$out/results.csv" 2>&1 | tee "$out/bench.log"
  bench=${PIPESTATUS[0]}
fi
echo "tests exit $tests, bench exit $bench"
exit $(( tests || bench ))
