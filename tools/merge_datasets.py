"""Merge several .bin/.idx shards into one (Megatron-LM's tools/merge_datasets.py).

    python tools/merge_datasets.py --input shards/ --output-prefix data/all_text_document
    python tools/merge_datasets.py --input a_text_document b_text_document --output-prefix all

With one directory, every complete pair in it is merged in sorted name order; otherwise the
prefixes are merged in the order given. Shards are streamed (never loaded whole), must share a
dtype, and the output appears under its final name only when complete.
"""

import argparse
import os
import sys

from megatron_lite.cli import run_main
from megatron_lite.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder, data_file_path, index_file_path
from megatron_lite.errors import ConfigError, IndexedDatasetError, InputError, OutputPathError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True,
                   help="a directory of shard pairs, or one or more shard prefixes")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    return p


def _strip_suffix(path: str) -> str:
    root, ext = os.path.splitext(path)
    return root if ext in (".bin", ".idx") else path


def prefixes_in_directory(directory: str, exclude: str) -> list:
    """Every PREFIX with both PREFIX.bin and PREFIX.idx in `directory`, sorted by name."""
    names = sorted(os.listdir(directory))
    stems = {os.path.splitext(n)[0] for n in names if os.path.splitext(n)[1] in (".bin", ".idx")}
    prefixes = []
    for stem in sorted(stems):
        prefix = os.path.join(directory, stem)
        if os.path.abspath(prefix) == os.path.abspath(exclude):
            continue  # a previous merge written into the same directory
        for path in (data_file_path(prefix), index_file_path(prefix)):
            if not os.path.isfile(path):
                raise IndexedDatasetError(f"--input {directory}: {path} is missing (incomplete shard pair "
                               f"{stem}); remove the stray file or finish that shard")
        prefixes.append(prefix)
    if not prefixes:
        raise InputError(f"--input {directory}: no .bin/.idx shard pairs in this directory")
    return prefixes


def resolve_inputs(inputs, output_prefix: str) -> list:
    if len(inputs) == 1 and os.path.isdir(inputs[0]):
        return prefixes_in_directory(inputs[0], output_prefix)
    for path in inputs:
        if os.path.isdir(path):
            raise ConfigError(f"--input {path}: give either one directory or a list of shard prefixes")
    return [_strip_suffix(p) for p in inputs]


def merge(prefixes, output_prefix: str) -> dict:
    """Check every shard (so a bad one fails before writing), then stream them into one pair."""
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    if not os.path.isdir(out_dir):
        raise OutputPathError(f"--output-prefix {output_prefix}: directory {out_dir} does not exist (create it first)")
    shards = [IndexedDataset(prefix) for prefix in prefixes]  # an IndexedDatasetError names the shard
    dtype = shards[0].dtype
    for prefix, shard in zip(prefixes, shards):
        if shard.dtype != dtype:
            raise IndexedDatasetError(f"{index_file_path(prefix)}: dtype {shard.dtype.name} differs from "
                           f"{index_file_path(prefixes[0])} ({dtype.name}); merge only shards made "
                           f"with the same tokenizer")
    stats = dict(shards=len(shards), documents=sum(s.num_documents for s in shards),
                 sequences=sum(len(s) for s in shards), tokens=sum(s.num_tokens for s in shards))
    for shard in shards:
        shard.close()
    with IndexedDatasetBuilder(data_file_path(output_prefix), dtype) as builder:
        for prefix in prefixes:
            builder.add_index(prefix)
        builder.finalize(index_file_path(output_prefix))
    return stats


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        stats = merge(resolve_inputs(args.input, args.output_prefix), args.output_prefix)
        print(f"merged {stats['shards']} shards into {args.output_prefix}: documents={stats['documents']} "
              f"sequences={stats['sequences']} tokens={stats['tokens']}")
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
