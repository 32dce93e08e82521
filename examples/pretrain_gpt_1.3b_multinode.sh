#!/usr/bin/env bash
# GPT-1.3B on several nodes through torchrun's c10d rendezvous: TP=4 inside a node, PP=2 across
# stages, DP over the rest. Run the same command on every node:
#   NNODES=4 MASTER_ADDR=node0 DATA_PATH=... VOCAB_FILE=... MERGE_FILE=... bash examples/pretrain_gpt_1.3b_multinode.sh
# Under Slurm: srun --nodes=$NNODES --ntasks-per-node=1 bash examples/pretrain_gpt_1.3b_multinode.sh
# DRY_RUN=1 validates the flags (with WORLD_SIZE = NNODES x GPUS_PER_NODE) without starting training.
set -euo pipefail
: "${DATA_PATH:?set DATA_PATH to a preprocessed prefix (without .bin/.idx)}"
: "${VOCAB_FILE:?set VOCAB_FILE}" "${MERGE_FILE:?set MERGE_FILE}"
NNODES="${NNODES:-${SLURM_NNODES:-2}}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
MASTER_ADDR="${MASTER_ADDR:-$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" 2>/dev/null | head -n1 || echo localhost)}"
MASTER_PORT="${MASTER_PORT:-29500}"
CHECKPOINT_PATH="${CHECKPOINT_PATH:-checkpoints/gpt1.3b-multinode}"

ARGS=(
  --tensor-model-parallel-size 4 --pipeline-model-parallel-size 2 --sequence-parallel
  --num-layers-per-virtual-pipeline-stage 6
  --distributed-timeout-minutes 30
  --num-layers 24 --hidden-size 2048 --num-attention-heads 16
  --seq-length 2048 --max-position-embeddings 2048
  --micro-batch-size 2 --global-batch-size 512
  --train-iters 300000 --lr 2.0e-4 --min-lr 2.0e-5 --lr-decay-style cosine --lr-warmup-iters 2000
  --weight-decay 0.1 --adam-beta2 0.95 --clip-grad 1.0 --bf16 --init-method-std 0.014
  --data-path "$DATA_PATH" --split 969,30,1
  --vocab-file "$VOCAB_FILE" --merge-file "$MERGE_FILE"
  --log-interval 10 --save-interval 2000 --eval-interval 1000 --eval-iters 20
  --save "$CHECKPOINT_PATH" --load "$CHECKPOINT_PATH"
  --tensorboard-dir "$CHECKPOINT_PATH/tensorboard" --metrics-jsonl "$CHECKPOINT_PATH/metrics.jsonl"
)
# Check the flags at the real world size first: a bad combination is one "error:" line here,
# not a failure inside every torchrun worker.
WORLD_SIZE=$((NNODES * GPUS_PER_NODE)) "${PYTHON:-python3}" -m megatron_lite.pretrain_gpt "${ARGS[@]}" --dry-run
[ "${DRY_RUN:-0}" = 1 ] && exit 0
exec torchrun --nnodes "$NNODES" --nproc_per_node "$GPUS_PER_NODE" \
  --rdzv_id "${SLURM_JOB_ID:-megatron_lite}" --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" \
  -m megatron_lite.pretrain_gpt "${ARGS[@]}"
