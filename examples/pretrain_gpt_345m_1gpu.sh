#!/usr/bin/env bash
# GPT-345M (24 layers, hidden 1024, 16 heads) on one GPU, bf16, as Megatron-LM's examples/pretrain_gpt.sh.
#   DATA_PATH=/data/my-gpt2_text_document VOCAB_FILE=gpt2-vocab.json MERGE_FILE=gpt2-merges.txt \
#   CHECKPOINT_PATH=ckpt/gpt345m bash examples/pretrain_gpt_345m_1gpu.sh
# DRY_RUN=1 validates the flags without starting training.
set -euo pipefail
: "${DATA_PATH:?set DATA_PATH to a preprocessed prefix (without .bin/.idx)}"
: "${VOCAB_FILE:?set VOCAB_FILE}" "${MERGE_FILE:?set MERGE_FILE}"
CHECKPOINT_PATH="${CHECKPOINT_PATH:-checkpoints/gpt345m}"

ARGS=(
  --num-layers 24 --hidden-size 1024 --num-attention-heads 16
  --seq-length 1024 --max-position-embeddings 1024
  --micro-batch-size 8 --global-batch-size 64
  --train-iters 500000 --lr 0.00015 --min-lr 1.0e-5 --lr-decay-style cosine --lr-decay-iters 320000
  --lr-warmup-fraction 0.01 --weight-decay 1e-2 --clip-grad 1.0 --bf16
  --attention-backend auto
  --data-path "$DATA_PATH" --split 949,50,1
  --vocab-file "$VOCAB_FILE" --merge-file "$MERGE_FILE" --tokenizer-type GPT2BPETokenizer
  --log-interval 100 --save-interval 10000 --eval-interval 1000 --eval-iters 10
  --save "$CHECKPOINT_PATH" --load "$CHECKPOINT_PATH"
  --tensorboard-dir "$CHECKPOINT_PATH/tensorboard" --metrics-jsonl "$CHECKPOINT_PATH/metrics.jsonl"
)
# Check the flags at the real world size first: a bad combination is one "error:" line here,
# not a failure inside every torchrun worker.
WORLD_SIZE=1 "${PYTHON:-python3}" -m megatron_lite.pretrain_gpt "${ARGS[@]}" --dry-run
[ "${DRY_RUN:-0}" = 1 ] && exit 0
exec torchrun --nproc_per_node 1 --nnodes 1 -m megatron_lite.pretrain_gpt "${ARGS[@]}"
