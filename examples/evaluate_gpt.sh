#!/usr/bin/env bash
# Evaluate a checkpoint on WikiText-2 (perplexity, sliding window), LAMBADA (last-word accuracy) and,
# with DATA_PATH, the validation split of a preprocessed corpus; print a table and write JSON.
#
#   LOAD=work_dirs/quickstart/checkpoints bash examples/evaluate_gpt.sh
#   LOAD=ckpt/gpt345m DATA_PATH=/data/my-gpt2_text_document DEVICE=cuda bash examples/evaluate_gpt.sh
#
# Environment: LOAD (required), DATA_PATH (optional), WIKITEXT (default ../shared/data/wikitext-2/test.txt),
# LAMBADA (default ../shared/data/lambada/lambada_test.jsonl), OVERLAPPING_EVAL (default 32),
# MAX_EXAMPLES (LAMBADA passages; default all), STRICT_LAMBADA=1, DEVICE (cpu|cuda), OUT (JSON path).
# The process count is the checkpoint's TP x PP (read from it).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
: "${LOAD:?set LOAD to a checkpoint directory (with latest_checkpointed_iteration.txt)}"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
SHARED="$(dirname "$ROOT")/shared/data"
WIKITEXT="${WIKITEXT:-$SHARED/wikitext-2/test.txt}"
LAMBADA="${LAMBADA:-$SHARED/lambada/lambada_test.jsonl}"
OUT="${OUT:-$(dirname "$LOAD")/evaluation_zeroshot.json}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

NPROC=$("$PY" -c "
import sys
from megatron_lite.cli import run_main
from megatron_lite.inference.loading import saved_config
def body():
    p = saved_config(sys.argv[1]).parallel
    print(p.tensor_model_parallel_size * p.pipeline_model_parallel_size)
    return 0
sys.exit(run_main(body, usage_status=2))" "$LOAD")

ARGS=(--load "$LOAD" --wikitext "$WIKITEXT" --overlapping-eval "${OVERLAPPING_EVAL:-32}"
      --lambada "$LAMBADA" --json-out "$OUT" --device "${DEVICE:-cpu}")
[ -n "${DATA_PATH:-}" ] && ARGS+=(--eval-data-path "$DATA_PATH")
[ -n "${MAX_EXAMPLES:-}" ] && ARGS+=(--max-examples "$MAX_EXAMPLES")
[ "${STRICT_LAMBADA:-0}" = 1 ] && ARGS+=(--strict-lambada)

"$PY" -m torch.distributed.run --nproc_per_node "$NPROC" --master_addr 127.0.0.1 \
  --master_port "${MASTER_PORT:-29519}" tools/evaluate.py "${ARGS[@]}"

"$PY" - "$OUT" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1]))
rows = []
if "validation" in r:
    v = r["validation"]
    rows.append(("validation (preprocessed split)", f"loss {v['lm_loss']:.4f}", f"PPL {v['ppl']:.2f}"))
w = r["wikitext"]
rows.append((f"WikiText ({w['num_tokenized_tokens']:,} tokens, stride {w['overlapping_eval']})",
             f"token PPL {w['ppl']:.2f}", f"word PPL {w['adjusted_ppl']:.2f}"))
lam = r["lambada"]
rows.append((f"LAMBADA ({lam['examples']:,} passages{', strict' if lam['strict'] else ''})",
             f"accuracy {100 * lam['accuracy']:.2f}%", f"stop-word filter {100 * lam['accuracy_stop_word_filter']:.2f}%"))
print(f"\ncheckpoint {r['load']} (iteration {r['iteration']}, TP={r['tensor_model_parallel_size']} "
      f"PP={r['pipeline_model_parallel_size']})")
for name, a, b in rows:
    print(f"  {name:<44} {a:<22} {b}")
print(f"results: {sys.argv[1]}")
PYEOF
