#!/usr/bin/env bash
# Text classification on CPU: who wrote this paragraph? Paragraphs of the Gutenberg books labelled by
# author (balanced; train/valid/test by position in each book), the quickstart's checkpoint (or any
# LOAD) with its LM head replaced by a classification head, TP=2 over two gloo processes; prints
# accuracy against the majority-class baseline and writes the metrics with the confusion matrix.
#
#   bash examples/quickstart.sh                        # once: makes work_dirs/quickstart/checkpoints
#   bash examples/finetune_classification.sh [BOOKS]   # default ../shared/data/gutenberg
#
# Environment: LOAD (default work_dirs/quickstart/checkpoints; LOAD=none trains from scratch),
# TOKENIZER_DIR (default beside LOAD), WORK_DIR (default work_dirs/finetune_classification),
# TRAIN_ITERS (default 300), NPROC/TP (default 2), MODEL_ARGS (the checkpoint's shape flags),
# EXTRA_ARGS (e.g. "--train-last-layers 2"), PYTHON.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BOOKS="${1:-$ROOT/../shared/data/gutenberg}"
LOAD="${LOAD:-$ROOT/work_dirs/quickstart/checkpoints}"
TOK="${TOKENIZER_DIR:-$(dirname "$LOAD")/tokenizer}"
WORK="${WORK_DIR:-$ROOT/work_dirs/finetune_classification}"
TRAIN_ITERS="${TRAIN_ITERS:-300}"
NPROC="${NPROC:-2}"
TP="${TP:-2}"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
MODEL_ARGS="${MODEL_ARGS:---num-layers 4 --hidden-size 128 --num-attention-heads 4 --seq-length 128 --max-position-embeddings 128}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

if [ ! -d "$BOOKS" ]; then
  echo "error: book folder $BOOKS not found; pass a folder of AUTHOR-BOOK.txt files" >&2
  exit 2
fi
FINETUNE=()
if [ "$LOAD" != "none" ]; then
  if [ ! -f "$LOAD/latest_checkpointed_iteration.txt" ]; then
    echo "error: no checkpoint at $LOAD; run bash examples/quickstart.sh first, set LOAD=DIR, or LOAD=none (and TOKENIZER_DIR)" >&2
    exit 2
  fi
  FINETUNE=(--finetune --load "$LOAD")
fi
mkdir -p "$WORK"
TOKENIZER=(--vocab-file "$TOK/vocab.json" --merge-file "$TOK/merges.txt")

echo "== 1/3 the author task: paragraphs by author, balanced, split by book position"
"$PY" tools/make_author_task.py --input-dir "$BOOKS" --output-dir "$WORK/task"
echo "== 2/3 tokenize, labels to ids"
"$PY" tools/preprocess_classification.py --train "$WORK/task/train.jsonl" --valid "$WORK/task/valid.jsonl" \
  --test "$WORK/task/test.jsonl" --output-prefix "$WORK/authors" "${TOKENIZER[@]}"
echo "== 3/3 fine-tune $TRAIN_ITERS iterations (classification head over the last token), then score valid/test"
# shellcheck disable=SC2086
"$PY" -m torch.distributed.run --nproc_per_node "$NPROC" --master_addr 127.0.0.1 --master_port "${MASTER_PORT:-29521}" \
  -m megatron_lite.finetune_gpt --task classification \
  --train-data "$WORK/authors_train" --valid-data "$WORK/authors_valid" --test-data "$WORK/authors_test" \
  "${FINETUNE[@]}" --tensor-model-parallel-size "$TP" --distributed-backend gloo $MODEL_ARGS \
  --micro-batch-size 16 --global-batch-size 32 --train-iters "$TRAIN_ITERS" \
  --lr 5e-4 --min-lr 5e-5 --lr-decay-style cosine --lr-warmup-iters 20 --weight-decay 0.01 --clip-grad 1.0 \
  --hidden-dropout 0.1 --attention-dropout 0.1 --log-interval 50 --eval-interval 100 --eval-iters 5 \
  "${TOKENIZER[@]}" --results-json "$WORK/results.json" --metrics-jsonl "$WORK/metrics.jsonl" ${EXTRA_ARGS:-}
echo "== done: accuracy, per-class precision/recall and the confusion matrix in $WORK/results.json"
