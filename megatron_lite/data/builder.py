"""train / valid / test datasets from the data specs: --mock-data, or --data-path with --split
(one prefix, or several blended by weight)."""
from __future__ import annotations

import math
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np

from megatron_lite.data.blended_dataset import BlendedDataset
from megatron_lite.data.data_spec import check_prefix_files, parse_data_path, split_document_ranges
from megatron_lite.data.gpt_dataset import GPTDataset, MockGPTDataset
from megatron_lite.data.indexed_dataset import IndexedDataset
from megatron_lite.errors import DatasetError

# Megatron-LM asks each blended dataset for 0.5% more samples than its share.
BLEND_SURPLUS = 0.005


_SPLIT_NAMES = ("train", "valid", "test")


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
                                    cache_path: Optional[str] = None, flag: str = "--data-path"):
    """(train, valid, test) from --data-path PREFIX or 'W1 PREFIX1 W2 PREFIX2 ...'.

    Each prefix is split on its own by sequences (= documents for tools/preprocess_data.py
    shards; see split_document_ranges); with several prefixes each split is a
    BlendedDataset of exactly the requested size over the prefixes that have documents in it
    (weights renormalised; see blended_dataset for the share bound). None for a split with no
    documents or 0 requested samples.
    A sample count of None means one epoch (single prefix only).
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
                                           train_valid_test_num_samples, data_config.data_cache_path)
