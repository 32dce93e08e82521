#!/usr/bin/env python3
"""Generate text from a checkpoint at the layout it was saved with (TP x PP ranks via torchrun),
with a KV cache: the prompts are prefilled in one forward, then one token per step.

    torchrun --nproc_per_node 2 tools/generate_text.py --load work_dirs/quickstart/checkpoints \
        --prompt "Return the number of" --prompt "def main" --max-new-tokens 40
    echo "Once upon a time" | python tools/generate_text.py --load CKPT --prompt-file - --top-p 0.9 --seed 1

Greedy unless --top-k N (0: the whole vocabulary) or --top-p P asks for sampling; --temperature
scales the logits when sampling; --seed makes sampling reproducible (at any layout). Prompts come
from --prompt (repeatable) and/or --prompt-file (one prompt per line; - reads stdin), and are
decoded together as one batch. --output-json writes tokens, text and per-token log-probabilities.
"""
from __future__ import annotations

import argparse
import sys

from megatron_lite.cli import run_distributed_main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Generate text from a megatron_lite checkpoint (KV-cache decoding).")
    p.add_argument("--load", required=True, help="checkpoint directory (with latest_checkpointed_iteration.txt)")
    p.add_argument("--vocab-file", default=None, help="default: the one the checkpoint was trained with")
    p.add_argument("--merge-file", default=None)
    p.add_argument("--prompt", action="append", default=None, help="may be given several times")
    p.add_argument("--prompt-file", default=None, help="one prompt per line; - reads standard input")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=0.0, help="sample from the nucleus of probability p")
    p.add_argument("--temperature", type=float, default=None, help="logit temperature when sampling (default 1)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: drawn per run)")
    p.add_argument("--no-kv-cache", action="store_true", help="recompute the whole prefix at every step")
    p.add_argument("--output-json", default=None, help="write the results here (a JSON list)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    return p.parse_args(argv)


def sampling_from_args(args):
    """SamplingParams from --top-k/--top-p/--temperature/--seed (greedy when neither k nor p is given)."""
    from megatron_lite.errors import ConfigError
    from megatron_lite.inference.sampling import SamplingParams

    sampling = args.top_k is not None or args.top_p > 0
    if args.temperature is not None and not sampling:
        raise ConfigError("--temperature applies when sampling: add --top-k 0 (whole vocabulary), "
                          "--top-k N or --top-p P")
    try:
        if not sampling:
            return SamplingParams(top_k=1, seed=args.seed)
        return SamplingParams(temperature=1.0 if args.temperature is None else args.temperature,
                              top_k=args.top_k or 0, top_p=args.top_p, seed=args.seed)
    except ValueError as e:
        raise ConfigError(f"--top-k/--top-p/--temperature: {e}") from None


def read_prompts(args) -> list:
    from megatron_lite.errors import InputError

    prompts = list(args.prompt or [])
    if args.prompt_file:
        if args.prompt_file == "-":
            lines = sys.stdin.read().splitlines()
        else:
            try:
                with open(args.prompt_file, encoding="utf-8") as f:
                    lines = f.read().splitlines()
            except UnicodeDecodeError:
                raise InputError(f"--prompt-file {args.prompt_file}: not UTF-8 text") from None
        prompts += [line for line in lines if line.strip()]
        if not prompts:
            raise InputError(f"--prompt-file {args.prompt_file}: no prompts (one per line)")
    return prompts or ["The"]


def run(args) -> int:
    from megatron_lite.errors import ConfigError
    from megatron_lite.inference.generation import generate_text
    from megatron_lite.inference.loading import load_with_tokenizer
    from megatron_lite.io_utils import write_json_atomic

    sampling = sampling_from_args(args)
    prompts = read_prompts(args)
    model, tok = load_with_tokenizer(args.load, args.vocab_file, args.merge_file, args.device)
    ps = model.pstate
    say = print if ps.rank == 0 else (lambda *a, **k: None)
    say(f"loaded iteration {model.iteration} from {args.load} (TP={ps.tp_size} PP={ps.pp_size})")
    try:
        results = generate_text(model, tok, prompts, args.max_new_tokens, sampling, use_cache=not args.no_kv_cache)
    except ValueError as e:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens} / prompts: {e}") from None
    for r in results:
        say(f"--- prompt: {r['prompt']!r}\n{r['prompt']}{r['text']}")
    if args.output_json and ps.rank == 0:
        write_json_atomic(args.output_json, results)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_distributed_main(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
