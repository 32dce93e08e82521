#!/usr/bin/env bash
# Instruction fine-tuning (SFT) on CPU: the quickstart's checkpoint (or any --load) on the Alpaca-style
# instruction data, TP=2 over two gloo processes; prints the validation loss before and after, and
# a few responses to held-out instructions.
#
#   bash examples/quickstart.sh                      # once: makes work_dirs/quickstart/checkpoints
#   bash examples/finetune_instructions.sh [DATA]    # default ../shared/data/instructions/instruction-data.json
#
# Environment: LOAD (pretrained checkpoint, default work_dirs/quickstart/checkpoints), TOKENIZER_DIR
# (its vocab.json + merges.txt, default work_dirs/quickstart/tokenizer), WORK_DIR (default
# work_dirs/finetune_instructions), TRAIN_ITERS (default 150), NPROC/TP (default 2), MODEL_ARGS (the
# checkpoint's shape flags; default the quickstart's), PYTHON.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DATA="${1:-$ROOT/../shared/data/instructions/instruction-data.json}"
LOAD="${LOAD:-$ROOT/work_dirs/quickstart/checkpoints}"
TOK="${TOKENIZER_DIR:-$(dirname "$LOAD")/tokenizer}"
WORK="${WORK_DIR:-$ROOT/work_dirs/finetune_instructions}"
TRAIN_ITERS="${TRAIN_ITERS:-150}"
NPROC="${NPROC:-2}"
TP="${TP:-2}"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
MODEL_ARGS="${MODEL_ARGS:---num-layers 4 --hidden-size 128 --num-attention-heads 4 --seq-length 128 --max-position-embeddings 128}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

if [ ! -f "$DATA" ]; then
  echo "error: instruction data $DATA not found; pass a JSON/JSONL file of {instruction, input, output} records" >&2
  exit 2
fi
if [ ! -f "$LOAD/latest_checkpointed_iteration.txt" ]; then
  echo "error: no checkpoint at $LOAD; run bash examples/quickstart.sh first or set LOAD=DIR (and TOKENIZER_DIR, MODEL_ARGS)" >&2
  exit 2
fi
mkdir -p "$WORK"
TOKENIZER=(--vocab-file "$TOK/vocab.json" --merge-file "$TOK/merges.txt")
LAUNCH=("$PY" -m torch.distributed.run --nproc_per_node "$NPROC" --master_addr 127.0.0.1
        --master_port "${MASTER_PORT:-29519}")

echo "== 1/3 preprocess: template, tokenize, loss mask on the responses, split 85/10/5 by seed"
"$PY" tools/preprocess_sft.py --input "$DATA" --output-prefix "$WORK/sft" \
  --prompt-template examples/sft_prompt_template.txt "${TOKENIZER[@]}"

# shellcheck disable=SC2206
FT=(-m megatron_lite.finetune_gpt --task sft --train-data "$WORK/sft_train" --valid-data "$WORK/sft_valid"
    --finetune --load "$LOAD" --tensor-model-parallel-size "$TP" --distributed-backend gloo $MODEL_ARGS
    --micro-batch-size 8 --global-batch-size 16 --weight-decay 0.0 --clip-grad 1.0
    --hidden-dropout 0.0 --attention-dropout 0.0 --eval-iters 7 "${TOKENIZER[@]}")

echo "== 2/3 validation loss of the pretrained model on the response tokens (one step at lr 0)"
"${LAUNCH[@]}" "${FT[@]}" --train-iters 1 --lr 0 --eval-interval 1 --log-interval 1 | grep "validation loss"

echo "== 3/3 fine-tune for $TRAIN_ITERS iterations (packed, attention reset per example), then respond"
rm -rf "$WORK/checkpoints"
"${LAUNCH[@]}" "${FT[@]}" --train-iters "$TRAIN_ITERS" --lr-warmup-iters 10 --lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine \
  --log-interval 25 --eval-interval 50 --save "$WORK/checkpoints" --save-interval "$TRAIN_ITERS" \
  --metrics-jsonl "$WORK/metrics.jsonl"
"${LAUNCH[@]}" tools/generate_sft_responses.py --load "$WORK/checkpoints" --input "$WORK/sft_test.json" \
  --output "$WORK/responses.json" --max-new-tokens 48 --show 4
echo "== done: responses for the test split in $WORK/responses.json"
