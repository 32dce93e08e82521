"""The .bin/.idx format against a hand-written fixture, round trips, merging, corruption, atomicity."""

import os
import struct

import numpy as np
import pytest

from megatron_lite.data.indexed_dataset import (IndexedDataset, IndexedDatasetBuilder, IndexedDatasetError,
                                                best_dtype, data_file_path, dataset_exists, index_file_path)

# Documents as (list of sequences); the second has two sequences, the third is empty.
DOCS = [[[5, 1, 65000]], [[7, 7], [300]], [], [[0, 2, 4, 6]]]


def write_fixture_by_hand(prefix):
    """The format from ARCHITECTURE.md, written field by field with struct (no builder code)."""
    seqs = [s for doc in DOCS for s in doc]
    lengths = [len(s) for s in seqs]
    pointers, pos = [], 0
    for n in lengths:
        pointers.append(pos)
        pos += n * 2  # uint16 tokens
    doc_idx = [0]
    for doc in DOCS:
        doc_idx.append(doc_idx[-1] + len(doc))
    idx = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 8)
    idx += struct.pack("<Q", len(seqs)) + struct.pack("<Q", len(doc_idx))
    idx += b"".join(struct.pack("<i", n) for n in lengths)
    idx += b"".join(struct.pack("<q", p) for p in pointers)
    idx += b"".join(struct.pack("<q", d) for d in doc_idx)
    data = b"".join(struct.pack("<H", t) for s in seqs for t in s)
    with open(prefix + ".idx", "wb") as f:
        f.write(idx)
    with open(prefix + ".bin", "wb") as f:
        f.write(data)
    return idx, data


def build(prefix, docs, dtype):
    with IndexedDatasetBuilder(data_file_path(prefix), dtype) as b:
        for doc in docs:
            for seq in doc:
                b.add_item(seq)
            b.end_document()
        b.finalize(index_file_path(prefix))


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def test_hand_written_fixture_reads_back_and_builder_matches_it_byte_for_byte(tmp_path):
    fixture = str(tmp_path / "fixture")
    idx_bytes, bin_bytes = write_fixture_by_hand(fixture)
    ds = IndexedDataset(fixture)
    assert ds.dtype == np.uint16 and len(ds) == 4 and ds.num_documents == 4 and ds.num_tokens == 10
    assert [ds[i].tolist() for i in range(len(ds))] == [[5, 1, 65000], [7, 7], [300], [0, 2, 4, 6]]
    assert ds.document_indices.tolist() == [0, 1, 3, 3, 4]
    assert ds.sequence_pointers.tolist() == [0, 6, 10, 12]
    assert ds.get(3, offset=1, length=2).tolist() == [2, 4]
    assert [a.tolist() for a in ds[1:3]] == [[7, 7], [300]]
    assert ds.document(1).tolist() == [7, 7, 300] and ds.document(2).tolist() == []

    built = str(tmp_path / "built")
    build(built, DOCS, best_dtype(50257))
    assert read_bytes(built + ".idx") == idx_bytes
    assert read_bytes(built + ".bin") == bin_bytes

    # add_document with explicit sequence lengths is the same file again
    again = str(tmp_path / "again")
    with IndexedDatasetBuilder(again + ".bin", np.uint16) as b:
        for doc in DOCS:
            b.add_document([t for s in doc for t in s], [len(s) for s in doc])
        b.finalize(again + ".idx")
    assert read_bytes(again + ".idx") == idx_bytes and read_bytes(again + ".bin") == bin_bytes


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.uint16, np.int32, np.int64,
                                   np.float32, np.float64])
def test_round_trip_random_documents(tmp_path, dtype):
    rng = np.random.default_rng(0)
    hi = 100 if np.dtype(dtype).itemsize == 1 else 30000
    docs = [[rng.integers(0, hi, rng.integers(0, 50)).astype(dtype) for _ in range(rng.integers(0, 4))]
            for _ in range(60)]
    prefix = str(tmp_path / "rt")
    build(prefix, docs, dtype)
    ds = IndexedDataset(prefix)
    seqs = [s for doc in docs for s in doc]
    assert ds.dtype == np.dtype(dtype) and len(ds) == len(seqs)
    assert ds.num_tokens == sum(len(s) for s in seqs)
    for i, s in enumerate(seqs):
        np.testing.assert_array_equal(ds[i], s)
    np.testing.assert_array_equal(np.concatenate(ds[:] or [np.zeros(0, dtype)]),
                                  np.concatenate(seqs or [np.zeros(0, dtype)]))
    assert np.diff(ds.document_indices).tolist() == [len(doc) for doc in docs]
    assert os.path.getsize(prefix + ".bin") == ds.num_tokens * np.dtype(dtype).itemsize


def test_best_dtype_threshold():
    assert best_dtype(50257) == np.uint16 and best_dtype(65499) == np.uint16
    assert best_dtype(65500) == np.int32 and best_dtype(None) == np.int32
    assert best_dtype(2 ** 31) == np.int32  # ids up to 2**31 - 1 fit int32; one more does not
    with pytest.raises(IndexedDatasetError, match=r"^tokenizer\.json: vocab size 2147483649 .*32 bits"):
        best_dtype(2 ** 31 + 1, source="tokenizer.json")
    with pytest.raises(IndexedDatasetError, match="vocab size 0"):
        best_dtype(0)


def test_merge_equals_building_all_documents_at_once(tmp_path):
    rng = np.random.default_rng(1)
    docs = [[rng.integers(0, 50000, rng.integers(1, 40)) for _ in range(rng.integers(1, 3))]
            for _ in range(30)]
    a, b, merged, whole = (str(tmp_path / n) for n in ("a", "b", "merged", "whole"))
    build(a, docs[:11], np.uint16)
    build(b, docs[11:], np.uint16)
    build(whole, docs, np.uint16)
    with IndexedDatasetBuilder(merged + ".bin", np.uint16) as builder:
        builder.add_index(a)
        builder.add_index(b)
        builder.finalize(merged + ".idx")
    assert read_bytes(merged + ".idx") == read_bytes(whole + ".idx")
    assert read_bytes(merged + ".bin") == read_bytes(whole + ".bin")


def test_merge_rejects_dtype_mismatch(tmp_path):
    a = str(tmp_path / "a")
    build(a, [[[1, 2]]], np.int32)
    with IndexedDatasetBuilder(str(tmp_path / "m.bin"), np.uint16) as builder:
        with pytest.raises(IndexedDatasetError, match=r"a\.idx: dtype int32 does not match.*uint16"):
            builder.add_index(a)
    assert set(os.listdir(tmp_path)) == {"a.bin", "a.idx"}  # the aborted output left nothing behind


def _corrupt(tmp_path, name, edit):
    prefix = str(tmp_path / name)
    build(prefix, DOCS, np.uint16)
    edit(prefix)
    return prefix


def _patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _truncate(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


CORRUPTIONS = {
    "missing_idx": (lambda p: os.remove(p + ".idx"), "idx", "not found"),
    "missing_bin": (lambda p: os.remove(p + ".bin"), "bin", "not found"),
    "wrong_magic": (lambda p: _patch(p + ".idx", 0, b"XXIDIDX"), "idx", "wrong magic"),
    "header_cut": (lambda p: _truncate(p + ".idx", 20), "idx", "truncated"),
    "body_cut": (lambda p: _truncate(p + ".idx", 40), "idx", "disagrees with its counts"),
    "version": (lambda p: _patch(p + ".idx", 9, struct.pack("<Q", 2)), "idx", "version 2"),
    "dtype_code": (lambda p: _patch(p + ".idx", 17, struct.pack("<B", 9)), "idx", "unknown dtype code 9"),
    "bin_short": (lambda p: _truncate(p + ".bin", 6), "bin", "disagrees with"),
    "bin_long": (lambda p: open(p + ".bin", "ab").write(b"\0\0"), "bin", "disagrees with"),
    "seq_count": (lambda p: _patch(p + ".idx", 18, struct.pack("<Q", 3)), "idx", "disagrees with its counts"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corruption_is_reported_with_the_file_named(tmp_path, case):
    edit, which, words = CORRUPTIONS[case]
    prefix = _corrupt(tmp_path, case, edit)
    with pytest.raises(IndexedDatasetError) as err:
        IndexedDataset(prefix)
    assert f"{prefix}.{which}" in str(err.value) and words in str(err.value)
    assert isinstance(err.value, ValueError)


def test_interrupted_build_leaves_no_final_named_files(tmp_path):
    prefix = str(tmp_path / "partial")
    with pytest.raises(RuntimeError):
        with IndexedDatasetBuilder(prefix + ".bin", np.uint16) as b:
            b.add_document([1, 2, 3])
            # a temporary exists while building; the final names do not
            assert not os.path.exists(prefix + ".bin") and len(os.listdir(tmp_path)) == 1
            raise RuntimeError("tokenizer crashed")
    assert os.listdir(tmp_path) == [] and not dataset_exists(prefix)

    # leaving the block without finalize() also discards the temporaries
    with IndexedDatasetBuilder(prefix + ".bin", np.uint16) as b:
        b.add_document([1, 2, 3])
    assert os.listdir(tmp_path) == []

    # a failed rebuild leaves an earlier complete pair untouched
    build(prefix, DOCS, np.uint16)
    before = read_bytes(prefix + ".bin"), read_bytes(prefix + ".idx")
    with pytest.raises(IndexedDatasetError):
        with IndexedDatasetBuilder(prefix + ".bin", np.uint16) as b:
            b.add_document([9, 9])
            b.add_document([-1])
    assert (read_bytes(prefix + ".bin"), read_bytes(prefix + ".idx")) == before
    assert sorted(os.listdir(tmp_path)) == ["partial.bin", "partial.idx"]


def test_token_out_of_dtype_range_is_rejected(tmp_path):
    with IndexedDatasetBuilder(str(tmp_path / "x.bin"), np.uint16) as b:
        with pytest.raises(IndexedDatasetError, match="do not fit dtype uint16"):
            b.add_document([1, 70000])


def test_reader_is_memory_mapped(tmp_path):
    prefix = str(tmp_path / "m")
    build(prefix, DOCS, np.uint16)
    ds = IndexedDataset(prefix)
    base = ds[0]
    while getattr(base, "base", None) is not None and not isinstance(base, np.memmap):
        base = base.base
    assert isinstance(base, np.memmap) or type(base).__name__ == "mmap"
    assert not ds[0].flags.writeable
