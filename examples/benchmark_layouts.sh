#!/usr/bin/env bash
# Throughput per parallelism layout for GPT-1.3B (seq 2048, bf16) on one node of 8 GPUs: every valid
# TP x PP x DP with micro-batch sizes, recompute, sequence parallelism, ZeRO-1 and virtual stages,
# each in a fresh torchrun through the trainer with mock data. Table, CSV, JSON and PNG in OUTPUT_DIR.
#
#   bash examples/benchmark_layouts.sh                      # one node, NPROC=8
#   NNODES=2 MASTER_ADDR=node0 bash examples/benchmark_layouts.sh   # on every node (shared OUTPUT_DIR)
#   DRY_RUN=1 bash examples/benchmark_layouts.sh            # list the layouts and their memory estimates
# Narrow the sweep with TP=1,2 PP=1 MBS=2,4 RECOMPUTE=none SP=on ZERO=on VP=1 MODEL=350M; extra
# benchmark flags go after the script name (e.g. --time-budget-s 1800), trainer flags after "--".
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
NPROC=${NPROC:-8}
NNODES=${NNODES:-1}
MODEL=${MODEL:-1.3B}
args=(--nproc-per-node "$NPROC" --model "$MODEL" --mbs "${MBS:-1,2,4}" --recompute "${RECOMPUTE:-none,selective,full}"
      --sp "${SP:-off,on}" --zero "${ZERO:-off,on}" --vp "${VP:-1,2}"
      --output-dir "${OUTPUT_DIR:-benchmarks/results/layouts_${MODEL}_$((NPROC * NNODES))ranks}")
[ -n "${TP:-}" ] && args+=(--tp "$TP")
[ -n "${PP:-}" ] && args+=(--pp "$PP")
if [ "$NNODES" -gt 1 ]; then
  args+=(--nnodes "$NNODES" --rdzv-endpoint "${MASTER_ADDR:?set MASTER_ADDR to the first node}:${MASTER_PORT:-29500}"
         --rdzv-id "${RDZV_ID:-layout-sweep}")
fi
[ -n "${DRY_RUN:-}" ] && args+=(--list)
exec "$PYTHON" benchmarks/benchmark_layouts.py "${args[@]}" "$@"
