#!/usr/bin/env python3
"""Evaluate a checkpoint at the layout it was saved with (TP x PP ranks via torchrun): validation
loss on a preprocessed prefix, WikiText perplexity from raw text, LAMBADA last-word accuracy.

    torchrun --nproc_per_node 2 tools/evaluate.py --load work_dirs/quickstart/checkpoints \
        --eval-data-path work_dirs/quickstart/demo_text_document --eval-iters 10 \
        --wikitext ../shared/data/wikitext-2/test.txt --overlapping-eval 32 \
        --lambada ../shared/data/lambada/lambada_test.jsonl --json-out eval.json

Prints one summary line (and writes every figure to --json-out). The metrics follow Megatron-LM's
tasks/zeroshot_gpt (see megatron_lite/inference/evaluation.py for the exact definitions).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

from megatron_lite.cli import run_distributed_main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Evaluate a megatron_lite checkpoint on validation data and "
                                            "zero-shot benchmarks.")
    p.add_argument("--load", required=True, help="checkpoint directory")
    p.add_argument("--vocab-file", default=None, help="default: the one the checkpoint was trained with")
    p.add_argument("--merge-file", default=None)
    p.add_argument("--eval-data-path", default=None, help="preprocessed prefix: loss and PPL of its validation split")
    p.add_argument("--eval-iters", type=int, default=10, help="validation batches (of the saved micro-batch size)")
    p.add_argument("--wikitext", default=None, help="raw WikiText file (e.g. wikitext-2/test.txt)")
    p.add_argument("--overlapping-eval", type=int, default=0,
                   help="sliding-window stride for --wikitext (Megatron-LM uses 32); 0: the text must fit one window")
    p.add_argument("--lambada", default=None, help="LAMBADA JSONL ({\"text\": ...} per line)")
    p.add_argument("--strict-lambada", action="store_true", help="the target is the whole last word")
    p.add_argument("--max-examples", type=int, default=None, help="score only the first N LAMBADA passages")
    p.add_argument("--micro-batch-size", type=int, default=8, help="windows/passages per forward")
    p.add_argument("--json-out", default=None)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    return p.parse_args(argv)


def _read_text(flag: str, path: str) -> str:
    from megatron_lite.errors import InputError

    if not os.path.isfile(path):
        raise InputError(f"{flag} {path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise InputError(f"{flag} {path}: not UTF-8 text (byte {e.start})") from None
    if not text.strip():
        raise InputError(f"{flag} {path}: the file is empty")
    return text


def read_lambada(path: str, limit=None) -> list:
    """The passages of a LAMBADA JSONL file; a bad line is an InputError naming it."""
    from megatron_lite.errors import InputError

    texts = []
    for n, line in enumerate(_read_text("--lambada", path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise InputError(f"--lambada {path}:{n}: not a JSON object with a \"text\" string") from None
        if not isinstance(text, str) or len(text.split()) < 2:
            raise InputError(f"--lambada {path}:{n}: \"text\" needs a context and a last word")
        texts.append(text)
        if limit is not None and len(texts) >= limit:
            break
    return texts


def check_args(args) -> None:
    from megatron_lite.errors import ConfigError

    if not (args.eval_data_path or args.wikitext or args.lambada):
        raise ConfigError("nothing to evaluate: give --eval-data-path, --wikitext and/or --lambada")
    for flag, value in (("--micro-batch-size", args.micro_batch_size), ("--eval-iters", args.eval_iters)):
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    if args.overlapping_eval < 0:
        raise ConfigError(f"--overlapping-eval must be >= 0, got {args.overlapping_eval}")
    if args.max_examples is not None and args.max_examples < 1:
        raise ConfigError(f"--max-examples must be >= 1, got {args.max_examples}")


def validation_loss(model, tok, args) -> dict:
    from megatron_lite.data.builder import build_train_valid_test_datasets
    from megatron_lite.errors import DatasetError
    from megatron_lite.inference.generation import evaluate_loss

    cfg, m = model.cfg, model.cfg.model
    samples = args.eval_iters * cfg.train.micro_batch_size
    _, valid, _ = build_train_valid_test_datasets(
        [args.eval_data_path], cfg.data.split, m.seq_length, cfg.train.seed, (0, samples, 0),
        cache_path=cfg.data.data_cache_path, flag="--eval-data-path")
    if valid is None:
        raise DatasetError(f"--eval-data-path {args.eval_data_path}: the validation split ({cfg.data.split}) is empty")
    loss = evaluate_loss(model, valid, samples, tok.eod)
    return {"lm_loss": loss, "ppl": math.exp(min(loss, 50.0)), "samples": samples, "seq_length": m.seq_length}


class Progress:
    """'name: done/total, elapsed, ETA' on rank 0's stderr about every 10%, once a run passes 5 s."""

    def __init__(self, name: str, unit: str, enabled: bool):
        self.name, self.unit, self.enabled = name, unit, enabled
        self.start, self.next_share = time.perf_counter(), 0.1

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled or total == 0 or done / total < self.next_share:
            return
        elapsed = time.perf_counter() - self.start
        if elapsed < 5.0:  # quick runs stay quiet
            return
        eta = elapsed * (total - done) / max(done, 1)
        print(f"{self.name}: {done}/{total} {self.unit}, {elapsed:.0f} s elapsed, ETA {eta:.0f} s",
              file=sys.stderr, flush=True)
        self.next_share = done / total + 0.1


def run(args) -> int:
    from dataclasses import asdict

    from megatron_lite.errors import ConfigError, InputError

    # Inputs are checked before torch is imported or the model loaded: a bad file fails in a moment.
    check_args(args)
    wikitext = _read_text("--wikitext", args.wikitext) if args.wikitext else None
    lambada = read_lambada(args.lambada, args.max_examples) if args.lambada else None
    if lambada is not None and not lambada:
        raise InputError(f"--lambada {args.lambada}: no passages")
    from megatron_lite.inference.evaluation import lambada_accuracy, wikitext_perplexity
    from megatron_lite.inference.loading import load_with_tokenizer
    from megatron_lite.io_utils import write_json_atomic
    model, tok = load_with_tokenizer(args.load, args.vocab_file, args.merge_file, args.device)
    ps = model.pstate
    say = print if ps.rank == 0 else (lambda *a, **k: None)
    say(f"loaded iteration {model.iteration} from {args.load} (TP={ps.tp_size} PP={ps.pp_size})")
    results = {"load": args.load, "iteration": model.iteration, "tensor_model_parallel_size": ps.tp_size,
               "pipeline_model_parallel_size": ps.pp_size}
    summary = []
    start = time.perf_counter()
    if args.eval_data_path:
        v = results["validation"] = validation_loss(model, tok, args)
        summary.append(f"validation loss {v['lm_loss']:.4f} PPL {v['ppl']:.2f}")
    if wikitext is not None:
        try:
            w = wikitext_perplexity(model, tok, wikitext, args.overlapping_eval, args.micro_batch_size,
                                    Progress("WikiText", "windows", ps.rank == 0))
        except ValueError as e:
            raise ConfigError(f"--wikitext {args.wikitext}: {e}") from None
        results["wikitext"] = dict(asdict(w), file=args.wikitext, overlapping_eval=args.overlapping_eval)
        summary.append(f"WikiText PPL {w.ppl:.2f} (word-level {w.adjusted_ppl:.2f})")
    if lambada is not None:
        try:
            lam = lambada_accuracy(model, tok, lambada, args.strict_lambada, args.micro_batch_size,
                                   Progress("LAMBADA", "passages", ps.rank == 0))
        except ValueError as e:
            raise InputError(f"--lambada {args.lambada}: {e}") from None
        d = asdict(lam)
        d.pop("correct_filtered")
        results["lambada"] = dict(d, file=args.lambada, strict=args.strict_lambada)
        summary.append(f"LAMBADA accuracy {100 * lam.accuracy:.2f}% "
                       f"(stop-word filter {100 * lam.accuracy_stop_word_filter:.2f}%, {lam.examples} passages)")
    results["seconds"] = time.perf_counter() - start
    if args.json_out and ps.rank == 0:
        write_json_atomic(args.json_out, results)
    say("evaluate: " + " | ".join(summary))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_distributed_main(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
