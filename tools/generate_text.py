#!/usr/bin/env python3
"""Evaluate and sample from a checkpoint with the layout it was saved with (TP x PP ranks via torchrun).

    torchrun --nproc_per_node 2 tools/generate_text.py --load work_dirs/quickstart/checkpoints \
        --vocab-file vocab.json --merge-file merges.txt --prompt "Return the number of" \
        --max-new-tokens 40 [--eval-data-path PREFIX --eval-iters 10]

Greedy decoding recomputes the whole (at most --seq-length) context each step: simple and exact,
meant for checking a trained model, not for serving. The loading, scoring and sampling live in
``megatron_lite.inference``; this is the command line around them.
"""
from __future__ import annotations

import argparse
import math
import sys

from megatron_lite.cli import EXIT_USAGE, run_main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Evaluate and greedily sample from a megatron_lite checkpoint.")
    p.add_argument("--load", required=True, help="checkpoint directory (with latest_checkpointed_iteration.txt)")
    p.add_argument("--vocab-file", default=None, help="default: the one the checkpoint was trained with")
    p.add_argument("--merge-file", default=None)
    p.add_argument("--prompt", action="append", default=None, help="may be given several times")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--eval-data-path", default=None, help="preprocessed prefix: report validation loss / PPL")
    p.add_argument("--eval-iters", type=int, default=10)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    return p.parse_args(argv)


def run(args) -> int:
    from megatron_lite.data.builder import build_train_valid_test_datasets
    from megatron_lite.data.tokenizer import build_tokenizer
    from megatron_lite.errors import DatasetError
    from megatron_lite.inference.generation import evaluate_loss, greedy
    from megatron_lite.inference.loading import load_for_inference, saved_config

    cfg = saved_config(args.load)
    d, m = cfg.data, cfg.model
    tok = build_tokenizer(d.tokenizer_type, args.vocab_file or d.vocab_file, args.merge_file or d.merge_file,
                          d.tokenizer_model, m.vocab_size)
    model = load_for_inference(args.load, device=args.device, vocab_size=tok.vocab_size, cfg=cfg)
    cfg, ps = model.cfg, model.pstate
    say = print if ps.rank == 0 else (lambda *a, **k: None)
    say(f"loaded iteration {model.iteration} from {args.load} (TP={ps.tp_size} PP={ps.pp_size})")
    if args.eval_data_path:
        bs = cfg.train.micro_batch_size
        _, valid, _ = build_train_valid_test_datasets(
            [args.eval_data_path], cfg.data.split, m.seq_length, cfg.train.seed, (0, args.eval_iters * bs, 0),
            cache_path=cfg.data.data_cache_path, flag="--eval-data-path")
        if valid is None:
            raise DatasetError(f"--eval-data-path {args.eval_data_path}: the validation split "
                               f"({cfg.data.split}) is empty")
        loss = evaluate_loss(model, valid, args.eval_iters * bs, tok.eod)
        say(f"validation: lm loss {loss:.4f} | PPL {math.exp(min(loss, 50)):.2f} "
            f"({args.eval_iters} batches of {bs} x {m.seq_length} tokens)")
    for prompt in args.prompt or ["The"]:
        text = greedy(model, tok, prompt, args.max_new_tokens)
        say(f"--- prompt: {prompt!r}\n{prompt}{text}")
    return 0


def main(argv=None) -> int:
    from megatron_lite.parallel.state import destroy_parallel

    args = parse_args(argv)
    try:
        return run_main(lambda: run(args), usage_status=EXIT_USAGE)
    finally:
        destroy_parallel()


if __name__ == "__main__":
    sys.exit(main())
