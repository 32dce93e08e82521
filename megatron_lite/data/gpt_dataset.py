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

import math
import os
from typing import Dict, Optional, Tuple

import numpy as np

from megatron_lite.data.index_cache import FORMAT_VERSION, array_md5, file_stamp, load_or_build_cached
from megatron_lite.errors import DatasetError as GPTDatasetError

# Megatron-LM: a final epoch contributing fewer than 80% of an epoch's samples is shuffled
# separately, so the requested samples come from whole epochs as far as possible.
SEPARATE_FINAL_EPOCH_THRESHOLD = 0.80
# Epochs are processed in groups of about this many documents to bound peak memory.
_DOCS_PER_CHUNK = 1 << 23
_INDEX_NAMES = ("doc_idx", "sample_idx", "shuffle_idx")


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
def check_cached_indices(arrays: Dict[str, np.ndarray]) -> Optional[Tuple[str, str]]:
    """(name, problem) when cached index arrays cannot be the ones build_sample_indices makes.

    A few O(1) checks of shapes and dtypes (the values are not read), so a foreign or damaged
    file of the right name is rebuilt instead of serving wrong samples or failing mid-run."""
    doc_idx, sample_idx, shuffle_idx = (arrays[n] for n in _INDEX_NAMES)
    if doc_idx.ndim != 1 or doc_idx.dtype != np.int32 or len(doc_idx) == 0:
        return "doc_idx", f"has shape {doc_idx.shape} and dtype {doc_idx.dtype}, not a non-empty int32 vector"
    if (sample_idx.ndim != 2 or sample_idx.shape[1] != 2 or sample_idx.shape[0] < 2
            or sample_idx.dtype not in (np.int32, np.int64)):
        return "sample_idx", (f"has shape {sample_idx.shape} and dtype {sample_idx.dtype}, not "
                              "(samples + 1, 2) of int32/int64")
    if (shuffle_idx.ndim != 1 or shuffle_idx.dtype not in (np.uint32, np.int64)
            or len(shuffle_idx) != sample_idx.shape[0] - 1):
        return "shuffle_idx", (f"has shape {shuffle_idx.shape} and dtype {shuffle_idx.dtype}, not "
                               f"({sample_idx.shape[0] - 1},) of uint32/int64")
    return None


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
            "files": ({ext: file_stamp(prefix + ext) for ext in (".bin", ".idx")} if prefix else None),
            "document_ids_md5": array_md5(document_ids), "lengths_md5": array_md5(lengths),
            "seq_length": seq_length, "seed": seed, "num_samples": num_samples,
        }
        if cache_dir is None and prefix:
            cache_dir = os.path.join(os.path.dirname(os.path.abspath(prefix)), "cache", "GPTDataset_indices")
        self.cache_dir = cache_dir
        arrays = load_or_build_cached(
            cache_dir, f"GPTDataset-{name}", self.description, _INDEX_NAMES,
            lambda: build_sample_indices(indexed_dataset.sequence_lengths, document_ids,
                                         seq_length, num_samples, seed),
            validate=check_cached_indices)
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
