"""Labelled text -> shards for megatron_lite.finetune_gpt --task classification.

    python tools/preprocess_classification.py --train train.jsonl --valid valid.jsonl --test test.jsonl \\
        --output-prefix data/authors --vocab-file vocab.json --merge-file merges.txt

Each input line is ``{"text": ..., "label": ...}`` (a string or an integer label). The class ids come
from the train file (integers in numeric order, strings sorted; --labels A B C fixes the order);
a valid/test label that training never saw is an error. Writes, per split S,
``PREFIX_S_text_document.{bin,idx}`` (token ids) and ``PREFIX_S_label_document.{bin,idx}`` (one int32
class id per example), and ``PREFIX_labels.json`` (the class names in id order). A bad line stops
the run with one line naming the file and line; nothing is written then.
"""
import argparse
import json
import sys
from collections import Counter

import numpy as np

from megatron_lite.cli import run_main
from megatron_lite.data.classification_dataset import LABEL_SUFFIX, TEXT_SUFFIX, labels_file
from megatron_lite.data.finetune_io import (add_tokenizer_args, check_input_file, check_output_prefix,
                                            tokenizer_from_args, write_shards)
from megatron_lite.data.indexed_dataset import best_dtype
from megatron_lite.errors import InputError
from megatron_lite.io_utils import write_json_atomic


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", required=True, help="JSONL of {text, label}: defines the classes")
    p.add_argument("--valid", default=None, help="JSONL of {text, label}")
    p.add_argument("--test", default=None, help="JSONL of {text, label}")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX_{train,valid,test}_* and PREFIX_labels.json")
    p.add_argument("--labels", nargs="+", default=None, help="the class names in id order (default: from --train)")
    add_tokenizer_args(p)
    return p


def read_labelled(path: str):
    """[(line, text, label name)] of a JSONL file; a bad line is an InputError naming it."""
    out = []
    with open(path, encoding="utf-8-sig") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{n}"
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as e:
                raise InputError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or "text" not in record or "label" not in record:
                raise InputError(f"{where}: a record needs 'text' and 'label'")
            text, label = record["text"], record["label"]
            if not isinstance(text, str):
                raise InputError(f"{where}: 'text' is a {type(text).__name__}, not a string")
            if not text.strip():
                raise InputError(f"{where}: the text is empty; drop the record or give it text")
            if isinstance(label, bool) or not isinstance(label, (str, int)):
                raise InputError(f"{where}: 'label' must be a string or an integer, got {json.dumps(label)}")
            out.append((n, text, str(label), isinstance(label, int)))
    if not out:
        raise InputError(f"{path}: no records")
    return out


def class_names(train, given):
    seen = {r[2] for r in train}
    if given:
        missing = sorted(seen - set(given))
        if missing:
            raise InputError(f"--train: label {missing[0]!r} is not among --labels {' '.join(given)}")
        return list(given)
    if all(r[3] for r in train):
        return sorted(seen, key=int)
    return sorted(seen)


def process(args) -> int:
    files = [("train", "--train", args.train), ("valid", "--valid", args.valid), ("test", "--test", args.test)]
    for _, flag, path in files:
        if path is not None:
            check_input_file(flag, path)
    check_output_prefix("--output-prefix", args.output_prefix)
    tokenizer = tokenizer_from_args(args)
    splits = {name: read_labelled(path) for name, _, path in files if path is not None}
    names = class_names(splits["train"], args.labels)
    if len(names) < 2:
        raise InputError(f"--train {args.train}: every record has the label {names[0]!r}; a classifier needs "
                         "at least 2 classes")
    ids = {name: i for i, name in enumerate(names)}
    dtype = best_dtype(tokenizer.vocab_size)
    encoded = {}
    for split, records in splits.items():
        path = dict((s, p) for s, _, p in files)[split]
        for n, _, label, _ in records:
            if label not in ids:
                raise InputError(f"{path}:{n}: label {label!r} never appears in --train {args.train} "
                                 f"(classes: {', '.join(names)})")
        encoded[split] = ([np.asarray(t, dtype=np.int64) for t in tokenizer.tokenize_batch([r[1] for r in records])],
                          [np.asarray([ids[r[2]]], dtype=np.int32) for r in records])
    for split, (tokens, labels) in encoded.items():
        prefix = f"{args.output_prefix}_{split}"
        write_shards(prefix, {TEXT_SUFFIX: (tokens, dtype), LABEL_SUFFIX: (labels, np.int32)})
        counts = Counter(int(x[0]) for x in labels)
        print(f"{split}: {len(tokens)} examples, {sum(len(t) for t in tokens)} tokens, per class "
              + ", ".join(f"{names[c]} {counts.get(c, 0)}" for c in range(len(names)))
              + f" -> {prefix}{TEXT_SUFFIX}, {prefix}{LABEL_SUFFIX}")
    write_json_atomic(labels_file(args.output_prefix), {"labels": names})
    print(f"classes: {len(names)} -> {labels_file(args.output_prefix)}")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_main(lambda: process(args))


if __name__ == "__main__":
    sys.exit(main())
