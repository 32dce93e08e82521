#!/usr/bin/env bash
# Slurm: one torchrun agent per node (srun --ntasks-per-node=1), meeting through c10d at the first
# node of the allocation. Submit with, e.g.:
#   sbatch --nodes=4 --gpus-per-node=8 --ntasks-per-node=1 --signal=TERM@120 \
#          --export=ALL,DATA_PATH=...,VOCAB_FILE=...,MERGE_FILE=... examples/pretrain_gpt_slurm.sh
# --signal=TERM@120 has Slurm send SIGTERM two minutes before the time limit: with
# --exit-signal-handler the run saves and exits 0, and the next submission resumes from that checkpoint.
# DRY_RUN=1 validates the flags at the job's real world size and prints the srun command.
set -euo pipefail
: "${SLURM_JOB_NODELIST:?run inside a Slurm allocation (sbatch / salloc)}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${PYTHON:-python3}"
# The rendezvous host: the first node of the allocation (scontrol when available, else the nodelist parsed).
first_node() {
  if command -v scontrol >/dev/null 2>&1; then
    scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1
  else
    "$PY" - "$SLURM_JOB_NODELIST" <<'PYEOF'
import re, sys
spec = sys.argv[1]
m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", spec)   # e.g. gpu[07-10,12],login3 -> gpu07
prefix, ranges = m.group(1), m.group(2)
print(prefix + (ranges.split(",")[0].split("-")[0] if ranges else ""))
PYEOF
  fi
}
export MASTER_ADDR="${MASTER_ADDR:-$(first_node)}"
export MASTER_PORT="${MASTER_PORT:-29500}"
export NNODES="${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:-1}}"
export RDZV_ID="${SLURM_JOB_ID:-megatron_lite}"
if [ "${DRY_RUN:-0}" = 1 ]; then
  bash "$HERE/pretrain_gpt_multinode.sh"
  echo "dry run: would run: srun --nodes=$NNODES --ntasks-per-node=1 bash $HERE/pretrain_gpt_multinode.sh (rendezvous $MASTER_ADDR:$MASTER_PORT)"
  exit 0
fi
exec srun --nodes="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 bash "$HERE/pretrain_gpt_multinode.sh"
