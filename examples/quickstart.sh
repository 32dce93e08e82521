#!/usr/bin/env bash
# Quickstart on a CPU-only machine: install, build a demo corpus, train a tokenizer, preprocess,
# train a tiny GPT with tensor parallelism (TP=2, two processes on gloo), evaluate, generate (KV cache).
#
#   bash examples/quickstart.sh                 # demo corpus from the Python standard library's docstrings
#   bash examples/quickstart.sh my_corpus.jsonl # your own JSONL, one {"text": ...} per line
#
# Environment: WORK_DIR (default work_dirs/quickstart), TRAIN_ITERS (default 1000), NPROC (default 2).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
WORK="${WORK_DIR:-$ROOT/work_dirs/quickstart}"
TRAIN_ITERS="${TRAIN_ITERS:-1000}"
NPROC="${NPROC:-2}"
CORPUS="${1:-}"
mkdir -p "$WORK"

echo "== 1/6 install (virtual environment at .venv; torch pinned to 2.13.0)"
VENV="${MEGATRON_LITE_VENV:-$ROOT/.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -e .
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

echo "== 2/6 corpus"
if [ -z "$CORPUS" ]; then
  CORPUS="$WORK/demo.jsonl"
  "$PY" tools/make_demo_corpus.py --output "$CORPUS" --max-mb 4
elif [ ! -f "$CORPUS" ]; then
  echo "error: corpus $CORPUS does not exist (give a JSONL file with one {\"text\": ...} per line)" >&2
  exit 2
fi

echo "== 3/6 tokenizer (byte-level BPE, GPT-2 format vocab.json + merges.txt)"
"$PY" tools/train_tokenizer.py --input "$CORPUS" --json-keys text --vocab-size 4096 --output-dir "$WORK/tokenizer"

echo "== 4/6 preprocess into Megatron-format indexed shards"
"$PY" tools/preprocess_data.py --input "$CORPUS" --output-prefix "$WORK/demo" \
  --tokenizer-type GPT2BPETokenizer --vocab-file "$WORK/tokenizer/vocab.json" \
  --merge-file "$WORK/tokenizer/merges.txt" --append-eod --workers 2

echo "== 5/6 train: 4 layers, hidden 128, TP=2 over $NPROC processes (gloo)"
rm -rf "$WORK/checkpoints"
"$PY" -m torch.distributed.run --nproc_per_node "$NPROC" --master_addr 127.0.0.1 --master_port "${MASTER_PORT:-29517}" \
  -m megatron_lite.pretrain_gpt \
  --tensor-model-parallel-size 2 --distributed-backend gloo \
  --num-layers 4 --hidden-size 128 --num-attention-heads 4 --seq-length 128 --max-position-embeddings 128 \
  --micro-batch-size 8 --global-batch-size 16 --train-iters "$TRAIN_ITERS" \
  --lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine --lr-warmup-iters 20 --weight-decay 0.1 --clip-grad 1.0 \
  --hidden-dropout 0.0 --attention-dropout 0.0 \
  --data-path "$WORK/demo_text_document" --split 949,50,1 \
  --vocab-file "$WORK/tokenizer/vocab.json" --merge-file "$WORK/tokenizer/merges.txt" \
  --log-interval 50 --eval-interval 250 --eval-iters 5 \
  --save "$WORK/checkpoints" --save-interval "$TRAIN_ITERS" \
  --metrics-jsonl "$WORK/metrics.jsonl" --tensorboard-dir "$WORK/tensorboard"

echo "== 6/6 evaluate (validation loss and perplexity) and generate (KV cache, greedy, TP=2)"
LAUNCH=("$PY" -m torch.distributed.run --nproc_per_node "$NPROC" --master_addr 127.0.0.1 --master_port "${MASTER_PORT:-29517}")
"${LAUNCH[@]}" tools/evaluate.py --load "$WORK/checkpoints" \
  --eval-data-path "$WORK/demo_text_document" --eval-iters 10 --json-out "$WORK/evaluation.json"
"${LAUNCH[@]}" tools/generate_text.py --load "$WORK/checkpoints" \
  --prompt "Return the number of" --prompt "def main(" --max-new-tokens 40
echo "== done: metrics in $WORK/metrics.jsonl, evaluation in $WORK/evaluation.json, checkpoint in $WORK/checkpoints"
