#!/usr/bin/env bash
# Loss parity on a GPU: the same ~124M GPT-2 (byte vocabulary, stdlib corpus), same seed and
# data, trained with the Triton backend and with the torch backend in bf16; then the curves.
#   bash scripts/loss_parity.sh [steps] [batch]     (writes $OUT or ./out/parity)
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-1000}
batch=${2:-8}
out=${OUT:-out/parity}
runs=${RUNS:-/tmp/parity_runs}
mkdir -p "$out" "$runs"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
for backend in triton torch; do
  python3 -m tritonformer.cli train --preset gpt2 --backend "$backend" --steps "$steps" \
    --batch-size "$batch" --eval-interval 250 --ckpt-interval "$steps" --keep-checkpoints 1 \
    --sample-tokens 0 --no-progress --out-dir "$runs/$backend"
  cp "$runs/$backend/metrics.jsonl" "$out/metrics_$backend.jsonl"
done
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
last = {}
for b in ("triton", "torch"):
    rows = [json.loads(l) for l in open(f"{out}/metrics_{b}.jsonl")]
    tail = rows[-50:]
    last[b] = sum(r["loss"] for r in tail) / len(tail)
    print(b, "final loss (mean of last 50 steps) %.4f" % last[b],
          "val %.4f" % rows[-1]["val_loss"], "tok/s %.0f" % (sum(r["tokens_per_s"] for r in tail) / len(tail)))
print("difference %.4f" % abs(last["triton"] - last["torch"]))
PY
