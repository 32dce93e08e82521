#!/usr/bin/env bash
# GPT-1.3B (24 layers, hidden 2048, 16 heads) on one node of 8 GPUs: TP=4 x DP=2, sequence parallel,
# bf16. TP groups are consecutive ranks, so they stay inside the node.
#   DATA_PATH=... VOCAB_FILE=... MERGE_FILE=... bash examples/pretrain_gpt_1.3b_tp4_8gpu.sh
# DRY_RUN=1 validates the flags (with WORLD_SIZE=8) without starting training.
set -euo pipefail
: "${DATA_PATH:?set DATA_PATH to a preprocessed prefix (without .bin/.idx)}"
: "${VOCAB_FILE:?set VOCAB_FILE}" "${MERGE_FILE:?set MERGE_FILE}"
CHECKPOINT_PATH="${CHECKPOINT_PATH:-checkpoints/gpt1.3b}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"

ARGS=(
  --tensor-model-parallel-size 4 --pipeline-model-parallel-size 1 --sequence-parallel
  --num-layers 24 --hidden-size 2048 --num-attention-heads 16
  --seq-length 2048 --max-position-embeddings 2048
  --micro-batch-size 4 --global-batch-size 256
  --train-iters 300000 --lr 2.0e-4 --min-lr 2.0e-5 --lr-decay-style cosine --lr-warmup-iters 2000
  --weight-decay 0.1 --adam-beta2 0.95 --clip-grad 1.0 --bf16 --init-method-std 0.014
  --attention-backend auto
  --data-path "$DATA_PATH" --split 969,30,1
  --vocab-file "$VOCAB_FILE" --merge-file "$MERGE_FILE"
  --log-interval 10 --save-interval 2000 --eval-interval 1000 --eval-iters 20
  --save "$CHECKPOINT_PATH" --load "$CHECKPOINT_PATH"
  --tensorboard-dir "$CHECKPOINT_PATH/tensorboard" --metrics-jsonl "$CHECKPOINT_PATH/metrics.jsonl"
)
# Check the flags at the real world size first: a bad combination is one "error:" line here,
# not a failure inside every torchrun worker.
WORLD_SIZE="$GPUS_PER_NODE" "${PYTHON:-python3}" -m megatron_lite.pretrain_gpt "${ARGS[@]}" --dry-run
[ "${DRY_RUN:-0}" = 1 ] && exit 0
exec torchrun --nproc_per_node "$GPUS_PER_NODE" --nnodes 1 -m megatron_lite.pretrain_gpt "${ARGS[@]}"
