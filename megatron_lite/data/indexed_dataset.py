"""Megatron-LM's MMapIndexedDataset (.bin/.idx pair), byte for byte.

.idx layout (all little-endian):
    9 bytes  magic  b"MMIDIDX\\x00\\x00"
    uint64   version (1)
    uint8    dtype code of the tokens in .bin
    uint64   sequence count S
    uint64   document count D (= number of documents + 1; entry 0 is 0)
    int32[S] sequence lengths (in tokens)
    int64[S] sequence pointers (byte offset of each sequence in .bin)
    int64[D] document indices (index of each document's first sequence, then S)
.bin is the raw token array, sequences back to back.

Writers go to temporary names and rename only in finalize(): the .bin first, the .idx last,
so a complete-looking pair never exists before every byte is written.
"""

import os
import shutil
import struct
from array import array
from typing import Optional, Sequence

import numpy as np

from megatron_lite.io_utils import temporary_name
from megatron_lite.errors import IndexedDatasetError

INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
# magic + version + dtype code + sequence count + document count
_HEADER_SIZE = len(INDEX_HEADER) + 8 + 1 + 8 + 8
_COPY_CHUNK = 16 * 1024 * 1024

DTYPE_CODES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}


def code_from_dtype(dtype) -> int:
    dtype = np.dtype(dtype)
    for code, candidate in DTYPE_CODES.items():
        if np.dtype(candidate) == dtype:
            return code
    raise IndexedDatasetError(f"dtype {dtype} has no Megatron indexed-dataset code "
                              f"(supported: {', '.join(np.dtype(d).name for d in DTYPE_CODES.values())})")


_INT32_MAX = int(np.iinfo(np.int32).max)


def best_dtype(vocab_size: Optional[int], source: Optional[str] = None):
    """Megatron's choice: uint16 when every token id fits comfortably, else int32.

    A vocabulary whose ids do not all fit int32 (more than 2**31 entries) is refused rather than
    silently wrapped; `source` (the tokenizer or output file) is named in the message."""
    if vocab_size is not None:
        where = f"{source}: " if source else ""
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)):
            raise IndexedDatasetError(f"{where}vocab size {vocab_size!r} is not an integer")
        if vocab_size < 1 or vocab_size - 1 > _INT32_MAX:
            raise IndexedDatasetError(
                f"{where}vocab size {vocab_size} gives token ids beyond 32 bits (a shard stores ids "
                f"0..{_INT32_MAX} at most); use a tokenizer with at most {_INT32_MAX + 1} entries")
        if vocab_size < 65500:
            return np.uint16
    return np.int32


def data_file_path(prefix: str) -> str:
    return prefix + ".bin"


def index_file_path(prefix: str) -> str:
    return prefix + ".idx"


def dataset_exists(prefix: str) -> bool:
    return os.path.isfile(index_file_path(prefix)) and os.path.isfile(data_file_path(prefix))


def write_index(idx_file, dtype, sequence_lengths, document_indices) -> None:
    """Write a complete .idx to an open binary file; pointers are derived from the lengths."""
    itemsize = np.dtype(dtype).itemsize
    lengths = np.asarray(sequence_lengths, dtype=np.int32)
    pointers = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1].astype(np.int64) * itemsize, out=pointers[1:])
    doc_idx = np.asarray(document_indices, dtype=np.int64)
    idx_file.write(INDEX_HEADER)
    idx_file.write(struct.pack("<Q", INDEX_VERSION))
    idx_file.write(struct.pack("<B", code_from_dtype(dtype)))
    idx_file.write(struct.pack("<Q", len(lengths)))
    idx_file.write(struct.pack("<Q", len(doc_idx)))
    idx_file.write(lengths.tobytes(order="C"))
    idx_file.write(pointers.tobytes(order="C"))
    idx_file.write(doc_idx.tobytes(order="C"))


class IndexedDatasetBuilder:
    """Appends sequences to a .bin (under a temporary name) and writes the .idx in finalize().

    Use as a context manager, or call abort() on failure, so temporaries never linger.
    """

    def __init__(self, bin_path: str, dtype=np.int32):
        self.bin_path = bin_path
        self.dtype = np.dtype(dtype)
        code_from_dtype(self.dtype)  # reject unsupported dtypes before touching the disk
        self._bin_tmp = temporary_name(bin_path)
        self._idx_tmp: Optional[str] = None
        self._bin = open(self._bin_tmp, "wb")
        # array.array keeps millions of entries compact (4/8 bytes each, not a Python int each).
        self.sequence_lengths = array("i")
        self.document_indices = array("q", [0])
        self._done = False

    # -- appending -------------------------------------------------------------------------------
    def _write_tokens(self, tokens) -> int:
        values = np.asarray(tokens).reshape(-1)
        if values.dtype != self.dtype:
            if values.size and np.issubdtype(self.dtype, np.integer):
                info = np.iinfo(self.dtype)
                lo, hi = values.min(), values.max()
                if lo < info.min or hi > info.max:
                    raise IndexedDatasetError(
                        f"{self.bin_path}: token values [{lo}, {hi}] do not fit dtype {self.dtype.name}")
            values = values.astype(self.dtype)
        self._bin.write(values.tobytes(order="C"))
        return values.size

    def add_item(self, tokens) -> None:
        """Append one sequence; call end_document() after the last sequence of a document."""
        self.sequence_lengths.append(self._write_tokens(tokens))

    def end_document(self) -> None:
        self.document_indices.append(len(self.sequence_lengths))

    def add_document(self, tokens, lengths: Optional[Sequence[int]] = None) -> None:
        """Append a whole document; `lengths` splits it into several sequences.

        By default the document is one sequence, or none when it is empty (as Megatron's
        preprocess_data records an empty text: a document with no sequences).
        """
        count = self._write_tokens(tokens)
        if lengths is None:
            lengths = [count] if count else []
        lengths = [int(n) for n in lengths]
        if sum(lengths) != count:
            raise IndexedDatasetError(f"{self.bin_path}: lengths sum to {sum(lengths)}, "
                                      f"but the document has {count} tokens")
        self.sequence_lengths.extend(lengths)
        self.document_indices.append(len(self.sequence_lengths))

    def add_documents(self, tokens, document_lengths) -> None:
        """Append many documents stored back to back in `tokens`, in one write.

        Each document becomes one sequence; an empty one gets none, as in add_document()."""
        doc_lens = np.asarray(document_lengths, dtype=np.int64)
        count = self._write_tokens(tokens)
        if int(doc_lens.sum()) != count:
            raise IndexedDatasetError(f"{self.bin_path}: document lengths sum to {int(doc_lens.sum())}, "
                                      f"but {count} tokens were given")
        nonempty = doc_lens > 0
        base = len(self.sequence_lengths)
        self.sequence_lengths.frombytes(doc_lens[nonempty].astype(np.int32).tobytes())
        self.document_indices.frombytes((base + np.cumsum(nonempty, dtype=np.int64)).tobytes())

    def add_index(self, other_prefix: str) -> None:
        """Append every document of another .bin/.idx pair, streaming its .bin in chunks."""
        other = IndexedDataset(other_prefix)
        if other.dtype != self.dtype:
            raise IndexedDatasetError(
                f"{index_file_path(other_prefix)}: dtype {other.dtype.name} does not match the "
                f"output's dtype {self.dtype.name}; merge only shards made with the same tokenizer")
        offset = len(self.sequence_lengths)
        self.sequence_lengths.frombytes(np.ascontiguousarray(other.sequence_lengths).tobytes())
        self.document_indices.frombytes((other.document_indices[1:] + offset).astype(np.int64).tobytes())
        other.close()
        with open(data_file_path(other_prefix), "rb") as src:
            shutil.copyfileobj(src, self._bin, _COPY_CHUNK)

    # -- completion ------------------------------------------------------------------------------
    def finalize(self, idx_path: str) -> None:
        """Flush the .bin, write the .idx, then rename .bin first and .idx last."""
        if self.document_indices[-1] != len(self.sequence_lengths):
            self.end_document()  # close a document left open by add_item()
        self._bin.close()
        self._idx_tmp = temporary_name(idx_path)
        with open(self._idx_tmp, "wb") as idx_file:
            write_index(idx_file, self.dtype, self.sequence_lengths, self.document_indices)
        if os.path.exists(idx_path):
            os.remove(idx_path)  # an old .idx must never sit beside the new .bin
        os.replace(self._bin_tmp, self.bin_path)
        os.replace(self._idx_tmp, idx_path)
        self._done = True

    def abort(self) -> None:
        """Close and delete the temporaries; the final names are never created."""
        if self._done:
            return
        self._bin.close()
        for path in (self._bin_tmp, self._idx_tmp):
            if path and os.path.exists(path):
                os.remove(path)
        self._done = True

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None or not self._done:
            self.abort()
        return False


# -- entry checks on opening a shard ---------------------------------------------------------------
# Each is a few vectorised passes over the index (no Python loop per entry); the first bad entry is
# located only once a check has failed.
_REBUILD = ("(corrupt index); rebuild the shard with tools/preprocess_data.py "
            "(or re-run tools/merge_datasets.py)")


def _check_document_indices(idx_path: str, doc_idx: np.ndarray, seq_count: int) -> None:
    """Document indices start at 0, never decrease and end at the sequence count."""
    def fail(what):
        raise IndexedDatasetError(f"{idx_path}: {what} {_REBUILD}")

    if len(doc_idx) == 0:
        fail("has no document indices (even an empty shard has the leading 0)")
    if doc_idx[0] != 0:
        fail(f"document index 0 is {int(doc_idx[0])}, but the first document must start at sequence 0")
    if doc_idx[-1] == seq_count and not np.any(doc_idx[1:] < doc_idx[:-1]):
        return  # with the first at 0, the last at S and no decrease, every entry is in [0, S]
    candidates = []
    outside = (doc_idx < 0) | (doc_idx > seq_count)
    if outside.any():
        i = int(np.argmax(outside))
        candidates.append((i, f"document index {i} is {int(doc_idx[i])}, outside [0, {seq_count}] "
                              f"(the shard has {seq_count} sequences)"))
    falls = doc_idx[1:] < doc_idx[:-1]
    if falls.any():
        i = int(np.argmax(falls)) + 1
        candidates.append((i, f"document index {i} is {int(doc_idx[i])}, less than document index "
                              f"{i - 1} ({int(doc_idx[i - 1])}); document indices must not decrease"))
    if candidates:
        fail(min(candidates)[1])
    last = len(doc_idx) - 1
    fail(f"last document index (entry {last}) is {int(doc_idx[last])}, but must equal the sequence "
         f"count {seq_count}")


def _check_lengths(idx_path: str, lengths: np.ndarray) -> None:
    """No negative sequence length (an int32 wrap), even where the total still balances."""
    if len(lengths) and lengths.min() < 0:
        i = int(np.argmax(lengths < 0))
        raise IndexedDatasetError(f"{idx_path}: sequence {i} has length {int(lengths[i])} {_REBUILD}")


def _check_pointers(idx_path: str, bin_path: str, lengths: np.ndarray, pointers: np.ndarray,
                    ends: np.ndarray, itemsize: int, bin_size: int) -> None:
    """Each byte pointer is the running sum of the byte lengths before it (the first is 0).

    With non-negative lengths whose total is the .bin's size, that puts every sequence inside the
    .bin; the first entry that breaks it is reported as running past the .bin when it does."""
    if len(pointers) == 0 or (pointers[0] == 0 and np.array_equal(pointers[1:], ends[:-1])):
        return
    if pointers[0] != 0:
        i = 0
    else:
        i = int(np.argmax(pointers[1:] != ends[:-1])) + 1
    start = int(pointers[i])
    end = start + int(lengths[i]) * itemsize
    expected = int(ends[i - 1]) if i else 0
    if start < 0:
        what = f"sequence {i} starts at byte {start}, before the start of {bin_path}"
    elif end > bin_size:
        what = f"sequence {i} ends at byte {end}, past the end of {bin_path} ({bin_size} bytes)"
    else:
        what = (f"byte pointer of sequence {i} is {start} but the lengths before it add up to "
                f"{expected} bytes")
    raise IndexedDatasetError(f"{idx_path}: {what} {_REBUILD}")


class IndexedDataset:
    """Memory-mapped reader of a .bin/.idx pair; tokens are never read whole into memory."""

    def __init__(self, path_prefix: str):
        self.path_prefix = path_prefix
        idx_path, bin_path = index_file_path(path_prefix), data_file_path(path_prefix)
        self._read_index(idx_path)
        self._open_data(bin_path)

    def _read_index(self, idx_path: str) -> None:
        def fail(what):
            raise IndexedDatasetError(f"{idx_path}: {what}")

        if not os.path.isfile(idx_path):
            fail("index file not found (expected PREFIX.idx next to PREFIX.bin)")
        size = os.path.getsize(idx_path)
        with open(idx_path, "rb") as f:
            header = f.read(_HEADER_SIZE)
        if len(header) < len(INDEX_HEADER) or header[:len(INDEX_HEADER)] != INDEX_HEADER:
            fail("not a Megatron indexed-dataset index (wrong magic bytes)")
        if len(header) < _HEADER_SIZE:
            fail(f"truncated: {size} bytes, shorter than the {_HEADER_SIZE}-byte header")
        pos = len(INDEX_HEADER)
        (version,) = struct.unpack_from("<Q", header, pos)
        if version != INDEX_VERSION:
            fail(f"unsupported index version {version} (only {INDEX_VERSION} is known)")
        (code,) = struct.unpack_from("<B", header, pos + 8)
        if code not in DTYPE_CODES:
            fail(f"unknown dtype code {code} (known: {sorted(DTYPE_CODES)})")
        seq_count, doc_count = struct.unpack_from("<QQ", header, pos + 9)
        expected = _HEADER_SIZE + seq_count * (4 + 8) + doc_count * 8
        if size != expected:
            fail(f"size {size} bytes disagrees with its counts ({seq_count} sequences, "
                 f"{doc_count} document indices need {expected} bytes); the file is truncated or corrupt")
        self.dtype = np.dtype(DTYPE_CODES[code])
        self._idx_map = np.memmap(idx_path, mode="r", order="C")
        buf = self._idx_map
        self.sequence_lengths = np.frombuffer(buf, np.int32, seq_count, _HEADER_SIZE)
        offset = _HEADER_SIZE + seq_count * 4
        self.sequence_pointers = np.frombuffer(buf, np.int64, seq_count, offset)
        offset += seq_count * 8
        self.document_indices = np.frombuffer(buf, np.int64, doc_count, offset)
        _check_document_indices(idx_path, self.document_indices, seq_count)
        _check_lengths(idx_path, self.sequence_lengths)

    def _open_data(self, bin_path: str) -> None:
        if not os.path.isfile(bin_path):
            raise IndexedDatasetError(f"{bin_path}: data file not found (the .idx has no .bin beside it)")
        size = os.path.getsize(bin_path)
        itemsize = self.dtype.itemsize
        # ends[i]: byte offset of the end of sequence i (lengths are known non-negative by now).
        # Widen then sum in place: np.cumsum(int32, dtype=int64) casts in a slow buffered loop.
        ends = np.multiply(self.sequence_lengths, itemsize, dtype=np.int64)
        np.cumsum(ends, out=ends)
        expected = int(ends[-1]) if len(ends) else 0
        self.num_tokens = expected // itemsize
        if size != expected:
            raise IndexedDatasetError(
                f"{bin_path}: size {size} bytes disagrees with {index_file_path(self.path_prefix)}, "
                f"which describes {self.num_tokens} tokens of {self.dtype.name} ({expected} bytes)")
        _check_pointers(index_file_path(self.path_prefix), bin_path, self.sequence_lengths,
                        self.sequence_pointers, ends, self.dtype.itemsize, size)
        # mmap of an empty file is an error; an empty dataset simply has no tokens.
        self._bin_map = np.memmap(bin_path, mode="r", order="C") if size else np.zeros(0, np.uint8)

    # -- access ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def get(self, idx: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens [offset, offset+length) of sequence idx, as a read-only view of the mmap."""
        if idx < 0:
            idx += len(self)
        if not 0 <= idx < len(self):
            raise IndexError(f"sequence {idx} out of range for {len(self)} sequences")
        seq_len = int(self.sequence_lengths[idx])
        if length is None:
            length = seq_len - offset
        if offset < 0 or length < 0 or offset + length > seq_len:
            raise IndexError(f"tokens [{offset}, {offset + length}) outside sequence {idx} of length {seq_len}")
        start = int(self.sequence_pointers[idx]) + offset * self.dtype.itemsize
        return np.frombuffer(self._bin_map, self.dtype, length, start)

    def __getitem__(self, idx):
        if isinstance(idx, (int, np.integer)):
            return self.get(int(idx))
        if isinstance(idx, slice):
            start, stop, step = idx.indices(len(self))
            if step != 1:
                return [self.get(i) for i in range(start, stop, step)]
            if start >= stop:
                return []
            # One contiguous read split back into sequences, as Megatron does.
            lengths = self.sequence_lengths[start:stop]
            total = int(lengths.sum(dtype=np.int64))
            flat = np.frombuffer(self._bin_map, self.dtype, total, int(self.sequence_pointers[start]))
            return np.split(flat, np.cumsum(lengths[:-1], dtype=np.int64))
        raise TypeError(f"indices must be int or slice, not {type(idx).__name__}")

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    def document(self, doc: int) -> np.ndarray:
        """All tokens of document `doc` (its sequences concatenated)."""
        first, last = int(self.document_indices[doc]), int(self.document_indices[doc + 1])
        if first == last:
            return np.zeros(0, self.dtype)
        total = int(self.sequence_lengths[first:last].sum(dtype=np.int64))
        return np.frombuffer(self._bin_map, self.dtype, total, int(self.sequence_pointers[first]))

    def close(self) -> None:
        """Drop this reader's references to the memory maps (views already handed out stay valid)."""
        self._bin_map = None
        self._idx_map = None
