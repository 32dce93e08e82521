"""GPT pretraining samples from indexed shards, with Megatron-LM's index semantics.

A split (a range of the indexed dataset's sequences, which this module calls documents) is read
as one token stream: epoch after epoch, each epoch the split's documents in a fresh seeded order.
--split, like Megatron-LM's, divides sequences, not the .idx document index: the two coincide for
shards written by tools/preprocess_data.py, which stores each non-empty document as one sequence.
Sample i is stream tokens [i*L, i*L + L] (L = seq_length), so consecutive samples share one
token and samples run across document ends.
Three arrays say where every sample lives; they are built once with vectorised numpy and cached
as .npy files named by the md5 of a JSON description of everything that defines them:

    doc_idx     [epochs * docs] int32     document ids, epoch by epoch, each epoch shuffled
    sample_idx  [num_samples + 1, 2]      (position in doc_idx, token offset) of token i*L
    shuffle_idx [num_samples]             the order samples are served in (seeded)

The index functions take a plain lengths array, so they can be benchmarked without a .bin.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from megatron_lite.data.indexed_dataset import IndexedDataset, dataset_exists
from megatron_lite.io_utils import atomic_open, atomic_write_text

FORMAT_VERSION = 1
# Megatron-LM: a final epoch contributing fewer than 80% of an epoch's samples is shuffled
# separately, so the requested samples come from whole epochs as far as possible.
SEPARATE_FINAL_EPOCH_THRESHOLD = 0.80
# Megatron-LM asks each blended dataset for 0.5% more samples than its share.
BLEND_SURPLUS = 0.005
# Epochs are processed in groups of about this many documents to bound peak memory.
_DOCS_PER_CHUNK = 1 << 23
_INDEX_NAMES = ("doc_idx", "sample_idx", "shuffle_idx")


class GPTDatasetError(ValueError):
    """Bad data input; the message names the flag or file and what to do."""


# ---------------------------------------------------------------------------------------------
# Index math (pure numpy on a lengths array)
# ---------------------------------------------------------------------------------------------
def num_epochs_needed(tokens_per_epoch: int, seq_length: int, num_samples: Optional[int]) -> int:
    """Smallest E with E * tokens_per_epoch - 1 >= num_samples * seq_length (at least 1)."""
    if not num_samples:
        return 1
    return max(1, -(-(num_samples * seq_length + 1) // tokens_per_epoch))


def build_document_index(document_ids: np.ndarray, num_epochs: int,
                         rng: np.random.RandomState) -> np.ndarray:
    """The split's documents repeated num_epochs times, each epoch shuffled on its own.

    Megatron-LM shuffles all epochs together; shuffling per epoch keeps the guarantee that
    every document is seen once before any is seen twice.
    """
    docs = np.asarray(document_ids, dtype=np.int32)
    doc_idx = np.empty(num_epochs * len(docs), dtype=np.int32)
    for epoch in range(num_epochs):  # one shuffle per epoch, not per document
        block = doc_idx[epoch * len(docs):(epoch + 1) * len(docs)]
        block[:] = docs
        rng.shuffle(block)
    return doc_idx


def build_sample_index(sequence_lengths: np.ndarray, doc_idx: np.ndarray, docs_per_epoch: int,
                       tokens_per_epoch: int, seq_length: int, num_samples: int) -> np.ndarray:
    """Row j = (position in doc_idx, offset) of stream token j * seq_length, j = 0..num_samples.

    Same values as Megatron's helpers.cpp build_sample_idx: a boundary that falls on the last
    token of a document stays in that document. Computed per group of epochs with a cumulative
    sum of document lengths and one searchsorted, so memory is bounded by the group size.
    """
    wide = len(doc_idx) >= 2 ** 31
    sample_idx = np.empty((num_samples + 1, 2), dtype=np.int64 if wide else np.int32)
    epochs = len(doc_idx) // docs_per_epoch
    group = max(1, _DOCS_PER_CHUNK // docs_per_epoch)
    for first in range(0, epochs, group):
        last = min(epochs, first + group)
        start_tok, end_tok = first * tokens_per_epoch, last * tokens_per_epoch
        j_lo = -(-start_tok // seq_length)
        j_hi = min(num_samples, (end_tok - 1) // seq_length)
        if j_hi < j_lo:
            continue
        lengths = sequence_lengths[doc_idx[first * docs_per_epoch:last * docs_per_epoch]].astype(np.int64)
        ends = np.cumsum(lengths)
        pos = np.arange(j_lo, j_hi + 1, dtype=np.int64) * seq_length - start_tok
        k = np.searchsorted(ends, pos, side="right")
        sample_idx[j_lo:j_hi + 1, 0] = k + first * docs_per_epoch
        sample_idx[j_lo:j_hi + 1, 1] = pos - (ends[k] - lengths[k])
    return sample_idx


def build_shuffle_index(num_shuffled: int, total: int, rng: np.random.RandomState) -> np.ndarray:
    """A permutation of [0, total): the first num_shuffled and the rest shuffled separately."""
    dtype = np.uint32 if total < 2 ** 32 - 1 else np.int64
    first = np.arange(num_shuffled, dtype=dtype)
    rng.shuffle(first)
    if num_shuffled == total:
        return first
    rest = np.arange(num_shuffled, total, dtype=dtype)
    rng.shuffle(rest)
    return np.concatenate([first, rest])


def build_sample_indices(sequence_lengths: np.ndarray, document_ids: np.ndarray, seq_length: int,
                         num_samples: Optional[int], seed: int
                         ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(doc_idx, sample_idx, shuffle_idx) for the documents `document_ids` of a lengths array.

    The caller checks that the documents hold at least seq_length + 1 tokens.
    """
    document_ids = np.asarray(document_ids)
    tokens_per_epoch = int(sequence_lengths[document_ids].sum(dtype=np.int64))
    num_epochs = num_epochs_needed(tokens_per_epoch, seq_length, num_samples)
    samples_per_epoch = (tokens_per_epoch - 1) // seq_length
    separate_final_epoch = False
    if num_epochs > 1:
        before_final = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length
        separate_final_epoch = (num_samples - before_final
                                < int(SEPARATE_FINAL_EPOCH_THRESHOLD * samples_per_epoch))
    rng = np.random.RandomState(seed)  # one stream for both shuffles, as Megatron-LM
    doc_idx = build_document_index(document_ids, num_epochs, rng)
    total = (num_epochs * tokens_per_epoch - 1) // seq_length
    sample_idx = build_sample_index(sequence_lengths, doc_idx, len(document_ids), tokens_per_epoch,
                                    seq_length, total)
    shuffled = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length if separate_final_epoch else total
    shuffle_idx = build_shuffle_index(shuffled, total, rng)
    return doc_idx, sample_idx, shuffle_idx


# ---------------------------------------------------------------------------------------------
# On-disk cache shared by every rank
# ---------------------------------------------------------------------------------------------
def description_hash(description: dict) -> str:
    return hashlib.md5(json.dumps(description, sort_keys=True).encode()).hexdigest()


def _distributed():
    """torch.distributed when a process group is up, else None (torch is never imported here)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return None
    return torch.distributed


def load_or_build_cached(cache_dir: Optional[str], kind: str, description: dict,
                         names: Sequence[str], build: Callable[[], Tuple[np.ndarray, ...]]
                         ) -> Dict[str, np.ndarray]:
    """Arrays named `names` from `cache_dir`, building and saving them when absent.

    With torch.distributed initialised, global rank 0 builds first; the others wait at a
    barrier, then load, or build themselves if their cache directory is not shared.
    Without a cache_dir the arrays are built in memory.
    """
    if cache_dir is None:
        return dict(zip(names, build()))
    digest = description_hash(description)
    paths = {n: os.path.join(cache_dir, f"{digest}-{kind}-{n}.npy") for n in names}

    def build_and_save():
        try:
            os.makedirs(cache_dir, exist_ok=True)
        except OSError as e:
            raise GPTDatasetError(f"cannot create the index cache directory {cache_dir} ({e.strerror}); "
                                  "pass --data-cache-path DIR on a writable disk") from None
        if not os.access(cache_dir, os.W_OK):
            raise GPTDatasetError(f"the index cache directory {cache_dir} is not writable; "
                                  "pass --data-cache-path DIR on a writable disk")
        for name, array in zip(names, build()):
            with atomic_open(paths[name], "wb") as f:
                np.save(f, array, allow_pickle=False)
        atomic_write_text(os.path.join(cache_dir, f"{digest}-{kind}-description.json"),
                          json.dumps(description, indent=2, sort_keys=True))

    def cached() -> bool:
        return all(os.path.isfile(p) for p in paths.values())

    dist = _distributed()
    if (dist is None or dist.get_rank() == 0) and not cached():
        build_and_save()
    if dist is not None:
        dist.barrier()
        if not cached():
            build_and_save()
    return {n: np.load(p, mmap_mode="r", allow_pickle=False) for n, p in paths.items()}


def _file_stamp(path: str) -> dict:
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def _array_md5(array: np.ndarray) -> str:
    return hashlib.md5(np.ascontiguousarray(array).tobytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------
class GPTDataset:
    """Samples of seq_length + 1 tokens over the documents `document_ids` of one shard.

    A "document" here is one sequence of the indexed dataset (ids index `sequence_lengths`),
    which is one document for shards written by tools/preprocess_data.py.

    indexed_dataset needs `sequence_lengths` and `get(i, offset, length)`; with a
    `path_prefix` (an IndexedDataset) the index is cached under cache_dir, by default
    `<dir of prefix>/cache/GPTDataset_indices`.
    """

    def __init__(self, indexed_dataset, name: str, document_ids, num_samples: Optional[int],
                 seq_length: int, seed: int, cache_dir: Optional[str] = None):
        self.indexed_dataset, self.name, self.seq_length = indexed_dataset, name, seq_length
        prefix = getattr(indexed_dataset, "path_prefix", None)
        where = prefix or "the indexed dataset"
        document_ids = np.asarray(document_ids, dtype=np.int64)
        if seq_length < 1:
            raise GPTDatasetError(f"--seq-length must be >= 1, got {seq_length}")
        if num_samples is not None and num_samples < 0:
            raise GPTDatasetError(f"{name}: the number of samples must be >= 0, got {num_samples}")
        if len(document_ids) == 0:
            raise GPTDatasetError(f"{where}: the {name} split has no documents; adjust --split")
        lengths = np.asarray(indexed_dataset.sequence_lengths)[document_ids]
        tokens = int(lengths.sum(dtype=np.int64))
        if tokens < seq_length + 1:
            raise GPTDatasetError(
                f"{where}: the {name} split holds {tokens} tokens in {len(document_ids)} documents, "
                f"fewer than one sample of --seq-length {seq_length} + 1; give it more documents "
                f"(--split, more data) or lower --seq-length")
        self.description = {
            "class": "GPTDataset", "format_version": FORMAT_VERSION, "name": name,
            "path_prefix": os.path.abspath(prefix) if prefix else None,
            "files": ({ext: _file_stamp(prefix + ext) for ext in (".bin", ".idx")} if prefix else None),
            "document_ids_md5": _array_md5(document_ids), "lengths_md5": _array_md5(lengths),
            "seq_length": seq_length, "seed": seed, "num_samples": num_samples,
        }
        if cache_dir is None and prefix:
            cache_dir = os.path.join(os.path.dirname(os.path.abspath(prefix)), "cache", "GPTDataset_indices")
        self.cache_dir = cache_dir
        arrays = load_or_build_cached(
            cache_dir, f"GPTDataset-{name}", self.description, _INDEX_NAMES,
            lambda: build_sample_indices(indexed_dataset.sequence_lengths, document_ids,
                                         seq_length, num_samples, seed))
        self.doc_idx, self.sample_idx, self.shuffle_idx = (arrays[n] for n in _INDEX_NAMES)

    def __len__(self) -> int:
        return self.sample_idx.shape[0] - 1

    def __getitem__(self, idx: int) -> Dict[str, np.ndarray]:
        if not -len(self) <= idx < len(self):
            raise IndexError(f"sample {idx} out of range for {len(self)} samples of {self.name}")
        i = int(self.shuffle_idx[idx])
        (k0, off0), (k1, off1) = self.sample_idx[i].tolist(), self.sample_idx[i + 1].tolist()
        get = self.indexed_dataset.get
        if k0 == k1:
            parts = [get(int(self.doc_idx[k0]), offset=off0, length=off1 - off0 + 1)]
        else:
            parts = [get(int(self.doc_idx[k0]), offset=off0)]
            parts += [get(int(d)) for d in self.doc_idx[k0 + 1:k1]]
            parts.append(get(int(self.doc_idx[k1]), offset=0, length=off1 + 1))
        # Cast while concatenating: one copy, with astype's semantics for any stored dtype.
        return {"text": np.concatenate(parts, dtype=np.int64, casting="unsafe")}


class MockGPTDataset:
    """--mock-data: sample idx is seeded random tokens, the same for a given (seed, idx)."""

    def __init__(self, vocab_size: int, seq_length: int, num_samples: int, seed: int):
        if vocab_size < 1 or seq_length < 1 or num_samples < 0:
            raise GPTDatasetError(f"mock data needs --vocab-size >= 1, --seq-length >= 1 and samples >= 0, "
                                  f"got {vocab_size}, {seq_length}, {num_samples}")
        self.vocab_size, self.seq_length, self.num_samples, self.seed = vocab_size, seq_length, num_samples, seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int) -> Dict[str, np.ndarray]:
        if not 0 <= idx < self.num_samples:
            raise IndexError(f"sample {idx} out of range for {self.num_samples} mock samples")
        rng = np.random.default_rng([self.seed, idx])
        return {"text": rng.integers(0, self.vocab_size, self.seq_length + 1, dtype=np.int64)}


# ---------------------------------------------------------------------------------------------
# --data-path / --split -> train, valid, test
# ---------------------------------------------------------------------------------------------
def parse_split(split: str) -> List[float]:
    """'969,30,1' (or '969/30/1', fewer than three parts) -> three weights summing to 1.

    Every part must be a number, as in Megatron-LM: '80,,20' is an error, not '80,20'.
    """
    try:
        values = [float(p) for p in re.split(r"[,/]", str(split).strip())]
    except ValueError:
        raise GPTDatasetError(f"--split must be up to three numbers like 969,30,1, got {split!r}") from None
    if not 1 <= len(values) <= 3 or any(v < 0 or not math.isfinite(v) for v in values) or sum(values) <= 0:
        raise GPTDatasetError(f"--split must be up to three non-negative numbers, not all zero "
                              f"(like 969,30,1), got {split!r}")
    values += [0.0] * (3 - len(values))
    return [v / sum(values) for v in values]


def split_document_ranges(split: str, num_documents: int) -> List[Tuple[int, int]]:
    """[start, end) ranges of n = len(indexed dataset), i.e. of its sequences, for --split.

    Megatron-LM's rounding: cumulative round(fraction * n), then shifted so the last ends at n.
    """
    bounds = [0]
    for fraction in parse_split(split):
        bounds.append(bounds[-1] + int(round(fraction * float(num_documents))))
    excess = bounds[-1] - num_documents
    bounds[1:] = [b - excess for b in bounds[1:]]
    return [(bounds[i], bounds[i + 1]) for i in range(3)]


_SPLIT_NAMES = ("train", "valid", "test")


def _open_prefix(prefix: str) -> IndexedDataset:
    if not dataset_exists(prefix):
        raise GPTDatasetError(f"--data-path: {prefix}.bin / {prefix}.idx not found; preprocess the "
                              "corpus with tools/preprocess_data.py or fix the prefix (no .bin/.idx suffix)")
    return IndexedDataset(prefix)


def _split_ranges(prefix: str, split: str) -> Tuple[IndexedDataset, List[Tuple[int, int]]]:
    indexed = _open_prefix(prefix)
    ranges = split_document_ranges(split, len(indexed))
    if ranges[0][0] == ranges[0][1]:
        raise GPTDatasetError(f"--split {split} leaves no training documents of the {len(indexed)} "
                              f"in {prefix}; give the first split a larger share")
    return indexed, ranges


def build_train_valid_test_datasets(data_path, split: str, seq_length: int, seed: int,
                                    train_valid_test_num_samples: Sequence[Optional[int]],
                                    cache_path: Optional[str] = None):
    """(train, valid, test) from --data-path PREFIX or 'W1 PREFIX1 W2 PREFIX2 ...'.

    Each prefix is split on its own by sequences (= documents for tools/preprocess_data.py
    shards; see split_document_ranges); with several prefixes each split is a
    BlendedDataset of exactly the requested size over the prefixes that have documents in it
    (weights renormalised; see blended_dataset for the share bound). None for a split with no
    documents or 0 requested samples.
    A sample count of None means one epoch (single prefix only).
    """
    from megatron_lite.config import parse_data_path
    from megatron_lite.data.blended_dataset import BlendedDataset  # it imports this module

    if isinstance(data_path, str):
        data_path = data_path.split()
    weights, prefixes = parse_data_path(data_path)
    if not prefixes:
        raise GPTDatasetError("--data-path is required (or --mock-data for random tokens)")
    num_samples = list(train_valid_test_num_samples)
    if len(num_samples) != 3:
        raise GPTDatasetError(f"expected sample counts for train, valid and test, got {num_samples}")
    if len(prefixes) > 1 and any(n is None for n in num_samples):
        raise GPTDatasetError("blending several --data-path prefixes needs a sample count for every split")
    if weights is None:
        weights = [1.0] * len(prefixes)
    opened = [(w, p) + _split_ranges(p, split) for w, p in zip(weights, prefixes) if w > 0]
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
            raise GPTDatasetError("--mock-data needs a vocabulary size (--vocab-size or a tokenizer)")
        return tuple(MockGPTDataset(vocab_size, seq_length, n, seed + s) if n else None
                     for s, n in enumerate(train_valid_test_num_samples))
    return build_train_valid_test_datasets(data_config.data_path, data_config.split, seq_length, seed,
                                           train_valid_test_num_samples, data_config.data_cache_path)
