"""What the fine-tuning data tools share: tokenizer flags, the output-prefix check, and writing a
split as parallel Megatron-format shards (one sequence per example in each, equal order).

torch-free, like the other data tools.
"""
from __future__ import annotations

import os
from contextlib import ExitStack
from typing import Dict, List, Sequence, Tuple

import numpy as np

from megatron_lite.data.indexed_dataset import IndexedDatasetBuilder, data_file_path, index_file_path
from megatron_lite.errors import InputError, OutputPathError, TokenizerError


def add_tokenizer_args(parser) -> None:
    g = parser.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", default="GPT2BPETokenizer",
                   choices=["GPT2BPETokenizer", "HuggingFaceTokenizer", "NullTokenizer"])
    g.add_argument("--vocab-file", default=None, help="GPT-2 vocab.json")
    g.add_argument("--merge-file", default=None, help="GPT-2 merges.txt")
    g.add_argument("--tokenizer-model", default=None, help="HuggingFace tokenizer.json")
    g.add_argument("--vocab-size", type=int, default=None, help="vocabulary size (NullTokenizer)")


def tokenizer_from_args(args):
    from megatron_lite.data.tokenizer import build_tokenizer

    for flag, path in (("--vocab-file", args.vocab_file), ("--merge-file", args.merge_file),
                       ("--tokenizer-model", args.tokenizer_model)):
        if path is not None and not os.path.isfile(path):
            raise InputError(f"{flag} {path}: no such file")
    try:
        return build_tokenizer(args.tokenizer_type, args.vocab_file, args.merge_file, args.tokenizer_model,
                               args.vocab_size)
    except (TokenizerError, OSError) as e:
        raise TokenizerError(f"could not build the {args.tokenizer_type} tokenizer: {e}") from None


def check_input_file(flag: str, path: str) -> None:
    if os.path.isdir(path):
        raise InputError(f"{flag} {path}: is a directory; give a file path")
    if not os.path.isfile(path):
        raise InputError(f"{flag} {path}: no such file")


def check_output_prefix(flag: str, prefix: str) -> None:
    out_dir = os.path.dirname(os.path.abspath(prefix))
    if not os.path.isdir(out_dir):
        raise OutputPathError(f"{flag} {prefix}: directory {out_dir} does not exist (create it first)")
    if not os.access(out_dir, os.W_OK):
        raise OutputPathError(f"{flag} {prefix}: directory {out_dir} is not writable")


def write_shards(prefix: str, columns: Dict[str, Tuple[Sequence[np.ndarray], np.dtype]]) -> List[str]:
    """``{suffix: (sequences, dtype)}`` -> PREFIX+suffix .bin/.idx each; every pair is complete or absent."""
    written = []
    with ExitStack() as stack:
        builders = {}
        for suffix, (seqs, dtype) in columns.items():
            b = stack.enter_context(IndexedDatasetBuilder(data_file_path(prefix + suffix), dtype=dtype))
            for s in seqs:
                b.add_document(np.asarray(s))
            builders[suffix] = b
        for suffix, b in builders.items():
            b.finalize(index_file_path(prefix + suffix))
            written.append(prefix + suffix)
    return written


def split_counts(weights: Sequence[float], n: int) -> List[int]:
    """Examples per split for ``weights`` (e.g. 85,10,5) of ``n``, rounding down except for the first."""
    total = float(sum(weights))
    counts = [int(n * w / total) for w in weights]
    counts[0] = n - sum(counts[1:])
    return counts
