#!/usr/bin/env bash
# The GEMM work of one device call: tests (both tiers), config sweep, benchmark.
#   bash scripts/gpu_matmul.sh            logs go to $OUT (or ./out)
# Phase 1 compiles in parallel (pytest shards + kernel warm-up sharing one Triton cache);
# phase 2 times alone on the GPU: the sweep, the winners put in the tables, the benchmark.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-out}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton_cache_matmul}
tmp=$(mktemp -d)
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} > "$out/env.txt" 2>&1
t0=$(date +%s)

py="timeout 200 python3 -m pytest tests/test_matmul.py -q -ra -p no:cacheprovider -m"
$py "not gpu" -k "fp32" > "$tmp/t1.log" 2>&1 &
$py "not gpu" -k "fp16 and not bf16" > "$tmp/t2.log" 2>&1 &
$py "not gpu" -k "bf16" > "$tmp/t3.log" 2>&1 &
$py "not gpu" -k "not fp32 and not fp16 and not bf16" > "$tmp/t4.log" 2>&1 &
$py "gpu" > "$tmp/t5.log" 2>&1 &
for i in 0 1 2 3; do
  timeout 200 python3 scripts/tune_matmul.py warm $i 4 > "$tmp/w$i.log" 2>&1 &
done
wait
t1=$(date +%s)
cat "$tmp"/t?.log > "$out/tests.log"
cat "$tmp"/w?.log > "$out/warm.log"

timeout 205 python3 scripts/tune_matmul.py tune "$out/results.csv" > "$out/tune.log" 2>&1
t2=$(date +%s)

{
  cat "$out/env.txt"
  echo "== phase times: compile+tests $((t1 - t0)) s, sweep+bench $((t2 - t1)) s"
  echo "== tests (shards: fp32 / fp16 / bf16 / rest of the CPU tier / GPU tier)"
  grep -hE "^(FAILED|ERROR)|passed|failed" "$tmp"/t?.log | cut -c1-160 | head -40
  echo "== warm-up errors"
  grep -h "warm " "$out/warm.log" | cut -c1-200 | head -10
  echo "== winners"
  sed -n '/^winners/,/^$/p' "$out/tune.log" | grep -- "->"
  echo "== benchmark"
  sed -n '/benchmark took/,/^kernel:/p' "$out/tune.log"
  grep -E "Traceback|Error" "$out/tune.log" | head -5
} > "$out/summary.txt"
cat "$out/summary.txt"
