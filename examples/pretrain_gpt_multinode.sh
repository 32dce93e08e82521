#!/usr/bin/env bash
# GPT-1.3B on several nodes: TP=4 inside a node, PP=2 (interleaved), DP over the rest. Run the same
# command on every node. Two ways to meet:
#   c10d rendezvous (default; nodes may start in any order, restarts re-rendezvous):
#     NNODES=4 MASTER_ADDR=node0 DATA_PATH=... VOCAB_FILE=... MERGE_FILE=... bash examples/pretrain_gpt_multinode.sh
#   static ranks (RDZV=static, NODE_RANK=0..NNODES-1 on each node):
#     RDZV=static NODE_RANK=1 NNODES=4 MASTER_ADDR=node0 ... bash examples/pretrain_gpt_multinode.sh
# Under Slurm use examples/pretrain_gpt_slurm.sh, which runs this script once per node.
# --save and --load name the same directory: a (re)started job resumes from the latest complete
# checkpoint by itself; torchrun --max-restarts restarts the whole group after a worker dies;
# --exit-signal-handler saves and exits 0 on SIGTERM (preemption).
# DRY_RUN=1 validates the flags (with WORLD_SIZE = NNODES x GPUS_PER_NODE) without starting training.
set -euo pipefail
: "${DATA_PATH:?set DATA_PATH to a preprocessed prefix (without .bin/.idx)}"
: "${VOCAB_FILE:?set VOCAB_FILE}" "${MERGE_FILE:?set MERGE_FILE}"
NNODES="${NNODES:-${SLURM_NNODES:-2}}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
MASTER_ADDR="${MASTER_ADDR:?set MASTER_ADDR to the first node (the rendezvous host)}"
MASTER_PORT="${MASTER_PORT:-29500}"
RDZV="${RDZV:-c10d}"
MAX_RESTARTS="${MAX_RESTARTS:-3}"
CHECKPOINT_PATH="${CHECKPOINT_PATH:-checkpoints/gpt1.3b-multinode}"

ARGS=(
  --tensor-model-parallel-size 4 --pipeline-model-parallel-size 2 --sequence-parallel
  --num-layers-per-virtual-pipeline-stage 6
  --use-distributed-optimizer --overlap-grad-reduce
  --distributed-timeout-minutes 30
  --num-layers 24 --hidden-size 2048 --num-attention-heads 16
  --seq-length 2048 --max-position-embeddings 2048
  --micro-batch-size 2 --global-batch-size 512
  --train-iters 300000 --lr 2.0e-4 --min-lr 2.0e-5 --lr-decay-style cosine --lr-warmup-iters 2000
  --weight-decay 0.1 --adam-beta2 0.95 --clip-grad 1.0 --bf16 --init-method-std 0.014
  --data-path "$DATA_PATH" --split 969,30,1
  --vocab-file "$VOCAB_FILE" --merge-file "$MERGE_FILE"
  --log-interval 10 --save-interval 2000 --eval-interval 1000 --eval-iters 20
  --save "$CHECKPOINT_PATH" --load "$CHECKPOINT_PATH" --exit-signal-handler
  --tensorboard-dir "$CHECKPOINT_PATH/tensorboard" --metrics-jsonl "$CHECKPOINT_PATH/metrics.jsonl"
)
if [ "$RDZV" = static ]; then
  : "${NODE_RANK:?RDZV=static needs NODE_RANK (0 .. NNODES-1) on each node}"
  LAUNCH=(--nnodes "$NNODES" --node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT")
else
  LAUNCH=(--nnodes "$NNODES" --rdzv-id "${SLURM_JOB_ID:-${RDZV_ID:-megatron_lite}}" --rdzv-backend c10d
          --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --max-restarts "$MAX_RESTARTS")
fi
# Check the flags at the real world size first: a bad combination is one "error:" line here,
# not a failure inside every torchrun worker.
WORLD_SIZE=$((NNODES * GPUS_PER_NODE)) "${PYTHON:-python3}" -m megatron_lite.pretrain_gpt "${ARGS[@]}" --dry-run
if [ "${DRY_RUN:-0}" = 1 ]; then
  echo "dry run: would launch: torchrun ${LAUNCH[*]} --nproc-per-node $GPUS_PER_NODE -m megatron_lite.pretrain_gpt ..."
  exit 0
fi
exec "${PYTHON:-python3}" -m torch.distributed.run "${LAUNCH[@]}" --nproc-per-node "$GPUS_PER_NODE" \
  -m megatron_lite.pretrain_gpt "${ARGS[@]}"
