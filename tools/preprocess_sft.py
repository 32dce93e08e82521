"""Instruction data -> train/valid/test shards with a loss mask (for megatron_lite.finetune_gpt --task sft).

    python tools/preprocess_sft.py --input instruction-data.json --output-prefix data/sft \\
        --vocab-file vocab.json --merge-file merges.txt [--prompt-template FILE] [--split 85,10,5 --seed 1234]

Reads Alpaca-style records (``instruction``, optional ``input``, ``output``) as a JSON array or JSONL,
or chat JSONL (``messages`` of ``role``/``content``), renders each with the prompt template (Alpaca's
by default; a template file holds ``{instruction}``, optionally ``{input}``, and one ``{response}``
marker), tokenizes, shuffles the records with --seed and cuts them into the --split shares. Writes,
per split S: ``PREFIX_S_text_document.{bin,idx}`` (ids; the response ends in the end-of-document
token), ``PREFIX_S_loss_mask_document.{bin,idx}`` (uint8, 1 on the response tokens) and ``PREFIX_S.json``
(the records with their rendered prompt, the references for tools/generate_sft_responses.py). A bad
record stops the run with one line naming the file and line; nothing is written then.
"""
import argparse
import sys

import numpy as np

from megatron_lite.cli import run_main
from megatron_lite.data.finetune_io import (add_tokenizer_args, check_input_file, check_output_prefix,
                                            split_counts, tokenizer_from_args, write_shards)
from megatron_lite.data.indexed_dataset import best_dtype
from megatron_lite.data.sft_dataset import (MASK_SUFFIX, TEXT_SUFFIX, PromptTemplate, read_records,
                                            record_segments, tokenize_segments)
from megatron_lite.errors import ConfigError, InputError
from megatron_lite.io_utils import write_json_atomic

SPLITS = ("train", "valid", "test")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="JSON array or JSONL of instruction or chat records")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX_{train,valid,test}_*")
    p.add_argument("--prompt-template", default=None, help="template file ({instruction}, {input}, {response})")
    p.add_argument("--split", default="85,10,5", help="train,valid,test shares of the records")
    p.add_argument("--seed", type=int, default=1234, help="shuffles the records before the split")
    add_tokenizer_args(p)
    return p


def parse_split(text: str):
    try:
        weights = [float(x) for x in text.split(",")]
    except ValueError:
        weights = []
    if len(weights) != 3 or any(w < 0 for w in weights) or weights[0] <= 0:
        raise ConfigError(f"--split {text}: give three non-negative train,valid,test shares, train > 0")
    return weights


def process(args) -> int:
    weights = parse_split(args.split)
    check_input_file("--input", args.input)
    if args.prompt_template is not None:
        check_input_file("--prompt-template", args.prompt_template)
    check_output_prefix("--output-prefix", args.output_prefix)
    template = PromptTemplate.from_file(args.prompt_template)
    tokenizer = tokenizer_from_args(args)
    examples = []
    for line, record in read_records(args.input):
        where = f"{args.input}:{line}"
        segments, prompt, reference = record_segments(record, template, where)
        ids, mask = tokenize_segments(segments, tokenizer)
        entry = dict(record) if isinstance(record, dict) else {}
        entry.update(prompt=prompt, reference=reference, source_line=line)
        examples.append((ids, mask, entry))
    if not examples:
        raise InputError(f"{args.input}: no records")
    order = np.random.RandomState(args.seed).permutation(len(examples))
    counts = split_counts(weights, len(examples))
    dtype = best_dtype(tokenizer.vocab_size)
    start = 0
    for split, count in zip(SPLITS, counts):
        chosen = [examples[i] for i in order[start:start + count]]
        start += count
        prefix = f"{args.output_prefix}_{split}"
        if not chosen:
            continue
        write_shards(prefix, {TEXT_SUFFIX: ([c[0] for c in chosen], dtype),
                              MASK_SUFFIX: ([c[1] for c in chosen], np.uint8)})
        write_json_atomic(prefix + ".json", [c[2] for c in chosen])
        tokens = sum(len(c[0]) for c in chosen)
        trained = sum(int(c[1].sum()) for c in chosen)
        longest = max(len(c[0]) for c in chosen)
        print(f"{split}: {len(chosen)} examples, {tokens} tokens ({trained} response tokens), longest {longest} "
              f"-> {prefix}{TEXT_SUFFIX}, {prefix}{MASK_SUFFIX}, {prefix}.json")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_main(lambda: process(args))


if __name__ == "__main__":
    sys.exit(main())
