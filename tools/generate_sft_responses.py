#!/usr/bin/env python3
"""Write a fine-tuned model's responses to the held-out instructions, beside the references.

    torchrun --nproc_per_node 2 tools/generate_sft_responses.py --load CKPT \\
        --input data/sft_test.json --output responses.json --max-new-tokens 64

--input is the ``PREFIX_test.json`` that tools/preprocess_sft.py wrote (each record with its rendered
``prompt`` and its ``reference``). Decoding is greedy with a KV cache at the checkpoint's own TP x PP
layout (launch TP x PP processes), in batches of --batch-size prompts, and stops at the
end-of-document token the fine-tuning taught the model to emit. A prompt longer than the model's
positions minus --max-new-tokens keeps its last tokens (the instruction's end and the response
marker). Writes a JSON list of {instruction, input, reference, response, prompt} and prints the first
--show of them.
"""
from __future__ import annotations

import argparse
import json
import sys

from megatron_lite.cli import run_distributed_main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True, help="fine-tuned checkpoint directory")
    p.add_argument("--input", required=True, help="PREFIX_test.json from tools/preprocess_sft.py")
    p.add_argument("--output", required=True, help="JSON list of responses beside the references")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=int, default=None, help="only the first N records")
    p.add_argument("--show", type=int, default=3, help="print this many responses")
    p.add_argument("--vocab-file", default=None, help="default: the one the checkpoint was trained with")
    p.add_argument("--merge-file", default=None)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    return p.parse_args(argv)


def read_records(path: str, limit=None) -> list:
    from megatron_lite.errors import InputError

    try:
        with open(path, encoding="utf-8") as f:
            records = json.load(f)
    except FileNotFoundError:
        raise InputError(f"--input {path}: no such file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"--input {path}: not a JSON file ({e})") from None
    if not isinstance(records, list) or not records:
        raise InputError(f"--input {path}: expected a non-empty JSON list (PREFIX_test.json of tools/preprocess_sft.py)")
    for k, r in enumerate(records):
        if not isinstance(r, dict) or not isinstance(r.get("prompt"), str):
            line = r.get("source_line", "?") if isinstance(r, dict) else "?"
            raise InputError(f"--input {path}: record {k} (source line {line}) has no 'prompt'; write the file "
                             "with tools/preprocess_sft.py")
    return records[:limit] if limit else records


def respond(model, tokenizer, prompts, max_new_tokens: int) -> list:
    """Greedy responses to ``prompts``: the one call into the inference package."""
    from megatron_lite.inference.generation import generate_text

    return [r["text"] for r in generate_text(model, tokenizer, prompts, max_new_tokens)]


def fit_prompt(tokenizer, prompt: str, room: int) -> str:
    ids = tokenizer.tokenize(prompt)
    return prompt if len(ids) <= room else tokenizer.detokenize(ids[-room:])


def run(args) -> int:
    from megatron_lite.errors import ConfigError
    from megatron_lite.inference.generation import max_sequence_length
    from megatron_lite.inference.loading import load_with_tokenizer
    from megatron_lite.io_utils import write_json_atomic

    if args.max_new_tokens < 1 or args.batch_size < 1:
        raise ConfigError("--max-new-tokens and --batch-size must be >= 1")
    records = read_records(args.input, args.limit)
    model, tok = load_with_tokenizer(args.load, args.vocab_file, args.merge_file, args.device)
    ps = model.pstate
    room = max_sequence_length(model) - args.max_new_tokens
    if room < 8:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens} leaves {room} of the model's "
                          f"{max_sequence_length(model)} positions for the prompt; ask for fewer tokens")
    prompts = [fit_prompt(tok, r["prompt"], room) for r in records]
    responses = []
    for i in range(0, len(prompts), args.batch_size):
        responses += respond(model, tok, prompts[i:i + args.batch_size], args.max_new_tokens)
    out = [{"instruction": r.get("instruction", ""), "input": r.get("input", ""),
            "reference": r.get("reference", r.get("output", "")), "response": resp.strip(), "prompt": r["prompt"]}
           for r, resp in zip(records, responses)]
    if ps.rank == 0:
        write_json_atomic(args.output, out)
        print(f"loaded iteration {model.iteration} from {args.load} (TP={ps.tp_size} PP={ps.pp_size}); "
              f"wrote {len(out)} responses to {args.output}")
        for r in out[:args.show]:
            print(f"--- instruction: {r['instruction']}" + (f"\n    input: {r['input']}" if r["input"] else "")
                  + f"\n    reference: {r['reference']}\n    model:     {r['response']}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_distributed_main(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
