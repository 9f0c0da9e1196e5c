#!/usr/bin/env bash
# Multi-GPU scaling on one host: the same GPT-2 124M run on 1 GPU and on N GPUs (DDP through
# torchrun, NCCL), per-GPU batch fixed; prints tokens/s of each and the scaling factor.
#   bash scripts/ddp_scaling.sh [gpus] [steps] [batch]     (logs to $OUT or ./out/ddp)
set -euo pipefail
cd "$(dirname "$0")/.."
gpus=${1:-2}
steps=${2:-300}
batch=${3:-8}
out=${OUT:-out/ddp}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# NVLink multicast stays off on shared hosts (see the device notes).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
args=(train --preset gpt2 --steps "$steps" --batch-size "$batch" --eval-interval "$steps"
      --ckpt-interval "$steps" --keep-checkpoints 1 --sample-tokens 0 --no-progress)
python3 -m tritonformer.cli "${args[@]}" --out-dir /tmp/ddp_1 > "$out/one.log" 2>&1
torchrun --standalone --nproc_per_node "$gpus" -m tritonformer.cli "${args[@]}" \
  --out-dir /tmp/ddp_n > "$out/ddp.log" 2>&1
cp /tmp/ddp_1/metrics.jsonl "$out/metrics_1gpu.jsonl"
cp /tmp/ddp_n/metrics.jsonl "$out/metrics_${gpus}gpu.jsonl"
python3 - "$out" "$gpus" <<'PY'
import json, statistics, sys
out, n = sys.argv[1], int(sys.argv[2])
def tps(path):
    rows = [json.loads(l) for l in open(path)]
    return statistics.median(r["tokens_per_s"] for r in rows[len(rows) // 2:]), rows[-1]["loss"]
t1, l1 = tps(f"{out}/metrics_1gpu.jsonl")
tn, ln = tps(f"{out}/metrics_{n}gpu.jsonl")
print(f"1 GPU: {t1:,.0f} tok/s (final loss {l1:.3f}); {n} GPUs: {tn:,.0f} tok/s "
      f"(final loss {ln:.3f}); scaling {tn / t1:.2f}x ({tn / t1 / n:.0%} efficiency)")
PY
