"""train / valid / test datasets from the data specs: --mock-data, or --data-path with --split
(one prefix, or several blended by weight).

With the run's vocabulary size known, each shard's token ids are checked against it before any
sample is served (an id outside the vocabulary would otherwise end in an IndexError in the
embedding): one vectorised scan of the .bin for its smallest and largest id, cached per .bin
under its file stamp, so it runs once per shard and not once per run."""
from __future__ import annotations

import math
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np

from megatron_lite.data.blended_dataset import BlendedDataset
from megatron_lite.data.data_spec import check_prefix_files, parse_data_path, split_document_ranges
from megatron_lite.data.gpt_dataset import GPTDataset, MockGPTDataset
from megatron_lite.data.index_cache import FORMAT_VERSION, file_stamp, load_or_build_cached
from megatron_lite.data.indexed_dataset import IndexedDataset, data_file_path
from megatron_lite.errors import DatasetError

# Megatron-LM asks each blended dataset for 0.5% more samples than its share.
BLEND_SURPLUS = 0.005


_SPLIT_NAMES = ("train", "valid", "test")
# Tokens per numpy pass when scanning a .bin for its smallest and largest token id.
SCAN_CHUNK_TOKENS = 1 << 22


# ---- token ids against the vocabulary -----------------------------------------------------------
def _bin_tokens(bin_path: str, dtype, num_tokens: int) -> np.ndarray:
    return np.memmap(bin_path, dtype=dtype, mode="r", shape=(num_tokens,)) if num_tokens else np.zeros(0, dtype)


def scan_token_range(bin_path: str, dtype, num_tokens: int) -> Tuple[int, int]:
    """(smallest, largest) token id of a .bin, a few million tokens per vectorised pass."""
    tokens = _bin_tokens(bin_path, dtype, num_tokens)
    lo, hi = None, None
    for start in range(0, num_tokens, SCAN_CHUNK_TOKENS):
        chunk = tokens[start:start + SCAN_CHUNK_TOKENS]
        c_lo, c_hi = int(chunk.min()), int(chunk.max())
        lo = c_lo if lo is None else min(lo, c_lo)
        hi = c_hi if hi is None else max(hi, c_hi)
    return (0, -1) if lo is None else (lo, hi)


def _first_bad_token(bin_path: str, dtype, num_tokens: int, vocab_size: int) -> Tuple[int, int]:
    """(flat position, id) of the first token outside [0, vocab_size); run only once one is known to exist."""
    tokens = _bin_tokens(bin_path, dtype, num_tokens)
    for start in range(0, num_tokens, SCAN_CHUNK_TOKENS):
        chunk = tokens[start:start + SCAN_CHUNK_TOKENS]
        bad = (chunk >= vocab_size) | (chunk < 0)
        if bad.any():
            i = int(np.argmax(bad))
            return start + i, int(chunk[i])
    raise AssertionError(f"{bin_path}: no token outside the vocabulary, but its range said there was one")


def _check_cached_range(arrays):
    r = arrays["token_range"]
    if r.shape != (2,) or r.dtype != np.int64:
        return "token_range", f"has shape {r.shape} and dtype {r.dtype}, not (2,) int64"
    return None


def shard_token_range(indexed: IndexedDataset, cache_dir: Optional[str]) -> Tuple[int, int]:
    """(smallest, largest) token id of the shard, scanned once per .bin and cached under cache_dir
    (default <dir of prefix>/cache/ShardTokenRange), keyed by the .bin's size, mtime and inode."""
    bin_path = data_file_path(indexed.path_prefix)
    if cache_dir is None:
        cache_dir = os.path.join(os.path.dirname(os.path.abspath(indexed.path_prefix)), "cache", "ShardTokenRange")
    description = {"class": "ShardTokenRange", "format_version": FORMAT_VERSION,
                   "bin": os.path.abspath(bin_path), "stamp": file_stamp(bin_path),
                   "dtype": indexed.dtype.name, "num_tokens": int(indexed.num_tokens)}
    arrays = load_or_build_cached(
        cache_dir, "ShardTokenRange", description, ("token_range",),
        lambda: (np.array(scan_token_range(bin_path, indexed.dtype, indexed.num_tokens), dtype=np.int64),),
        validate=_check_cached_range)
    lo, hi = (int(v) for v in arrays["token_range"])
    return lo, hi


def check_token_ids(indexed: IndexedDataset, vocab_size: int, vocab_source: str,
                    cache_dir: Optional[str] = None) -> None:
    """Every token id of the shard lies in [0, vocab_size), else one line naming the .bin and the
    first bad entry (sequence and token within it)."""
    if not np.issubdtype(indexed.dtype, np.integer) or indexed.num_tokens == 0:
        return
    lo, hi = shard_token_range(indexed, cache_dir)
    if lo >= 0 and hi < vocab_size:
        return
    bin_path = data_file_path(indexed.path_prefix)
    pos, value = _first_bad_token(bin_path, indexed.dtype, indexed.num_tokens, vocab_size)
    byte = pos * indexed.dtype.itemsize
    seq = int(np.searchsorted(indexed.sequence_pointers, byte, side="right")) - 1
    offset = (byte - int(indexed.sequence_pointers[seq])) // indexed.dtype.itemsize
    raise DatasetError(f"{bin_path}: token id {value} at sequence {seq} (token {offset} of it) is outside "
                       f"the vocabulary of {vocab_size} ({vocab_source}); the shard was made with another "
                       "tokenizer: re-run tools/preprocess_data.py")


def vocab_source(data_config, vocab_size: int) -> str:
    """The flag the vocabulary comes from, for messages: --vocab-file, --tokenizer-model or --vocab-size."""
    if getattr(data_config, "vocab_file", None):
        return f"--vocab-file {data_config.vocab_file}"
    if getattr(data_config, "tokenizer_model", None):
        return f"--tokenizer-model {data_config.tokenizer_model}"
    return f"--vocab-size {vocab_size}"


def _split_ranges(prefix: str, split: str, flag: str) -> Tuple[IndexedDataset, List[Tuple[int, int]]]:
    check_prefix_files(prefix, flag)
    indexed = IndexedDataset(prefix)
    ranges = split_document_ranges(split, len(indexed))
    if ranges[0][0] == ranges[0][1]:
        raise DatasetError(f"--split {split} leaves no training documents of the {len(indexed)} "
                              f"in {prefix}; give the first split a larger share")
    return indexed, ranges


def build_train_valid_test_datasets(data_path, split: str, seq_length: int, seed: int,
                                    train_valid_test_num_samples: Sequence[Optional[int]],
                                    cache_path: Optional[str] = None, flag: str = "--data-path",
                                    vocab_size: Optional[int] = None, vocab_from: Optional[str] = None):
    """(train, valid, test) from --data-path PREFIX or 'W1 PREFIX1 W2 PREFIX2 ...'.

    Each prefix is split on its own by sequences (= documents for tools/preprocess_data.py
    shards; see split_document_ranges); with several prefixes each split is a
    BlendedDataset of exactly the requested size over the prefixes that have documents in it
    (weights renormalised; see blended_dataset for the share bound). None for a split with no
    documents or 0 requested samples.
    A sample count of None means one epoch (single prefix only).
    With a vocab_size, every shard's token ids are checked against it (check_token_ids; the scan
    is cached per .bin); vocab_from names where the vocabulary came from in the message.
    """
    if isinstance(data_path, str):
        data_path = data_path.split()
    weights, prefixes = parse_data_path(data_path, flag)
    if not prefixes:
        raise DatasetError(f"{flag} is required (or --mock-data for random tokens)")
    num_samples = list(train_valid_test_num_samples)
    if len(num_samples) != 3:
        raise DatasetError(f"expected sample counts for train, valid and test, got {num_samples}")
    if len(prefixes) > 1 and any(n is None for n in num_samples):
        raise DatasetError(f"blending several {flag} prefixes needs a sample count for every split")
    if weights is None:
        weights = [1.0] * len(prefixes)
    opened = [(w, p) + _split_ranges(p, split, flag) for w, p in zip(weights, prefixes) if w > 0]
    if vocab_size is not None:
        for _, _, indexed, _ in opened:
            check_token_ids(indexed, vocab_size, vocab_from or f"--vocab-size {vocab_size}", cache_path)
    blend_cache = cache_path or os.path.join(os.path.dirname(os.path.abspath(opened[0][1])),
                                             "cache", "BlendedDataset_indices")
    result = []
    for s, (name, wanted) in enumerate(zip(_SPLIT_NAMES, num_samples)):
        present = [(w, p, ds, ranges[s]) for w, p, ds, ranges in opened if ranges[s][0] < ranges[s][1]]
        if wanted == 0 or not present:
            result.append(None)
            continue
        if len(opened) == 1:
            _, _, indexed, (begin, end) = present[0]
            result.append(GPTDataset(indexed, name, np.arange(begin, end), wanted, seq_length, seed, cache_path))
            continue
        total = sum(w for w, *_ in present)
        parts = []
        for w, _, indexed, (begin, end) in present:
            share = int(math.ceil(math.ceil(wanted * w / total) * (1 + BLEND_SURPLUS)))
            parts.append(GPTDataset(indexed, name, np.arange(begin, end), share, seq_length, seed, cache_path))
        result.append(BlendedDataset(parts, [w / total for w, *_ in present], wanted, blend_cache))
    return tuple(result)


def build_pretraining_datasets(data_config, seq_length: int, seed: int,
                               train_valid_test_num_samples: Sequence[Optional[int]],
                               vocab_size: Optional[int] = None):
    """(train, valid, test) from a config.DataConfig: --mock-data or --data-path/--split."""
    if data_config.mock_data:
        if vocab_size is None:
            raise DatasetError("--mock-data needs a vocabulary size (--vocab-size or a tokenizer)")
        return tuple(MockGPTDataset(vocab_size, seq_length, n, seed + s) if n else None
                     for s, n in enumerate(train_valid_test_num_samples))
    return build_train_valid_test_datasets(data_config.data_path, data_config.split, seq_length, seed,
                                           train_valid_test_num_samples, data_config.data_cache_path,
                                           vocab_size=vocab_size,
                                           vocab_from=vocab_source(data_config, vocab_size))
