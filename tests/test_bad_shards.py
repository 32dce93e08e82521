"""Damaged .idx entries: the reader names the file and the first bad entry; merge_datasets refuses.

A valid shard is built with the project's builder, then its .idx is edited in place (struct and
numpy) so that the header, the counts and the total size all still agree: only the entries lie.
"""

import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from megatron_lite.data.indexed_dataset import (IndexedDataset, IndexedDatasetBuilder, IndexedDatasetError,
                                                best_dtype)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "merge_datasets.py")
HEADER = 9 + 8 + 1 + 8 + 8

# Six documents, ten sequences (document 2 is empty), uint16 tokens.
DOCS = [[[1, 2, 3]], [[4, 5], [6, 7, 8, 9]], [], [[10] * 5, [11], [12, 13]],
        [[14, 15, 16, 17]], [[18] * 6, [19, 20]], [[21, 22, 23]]]
NUM_SEQS = sum(len(d) for d in DOCS)
LENGTHS = [len(s) for d in DOCS for s in d]
BIN_SIZE = 2 * sum(LENGTHS)


def build(prefix):
    with IndexedDatasetBuilder(f"{prefix}.bin", np.uint16) as b:
        for doc in DOCS:
            for seq in doc:
                b.add_item(seq)
            b.end_document()
        b.finalize(f"{prefix}.idx")


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


class Index:
    """The entries of a built .idx as writable numpy copies; save() writes them back in place."""

    def __init__(self, path):
        self.path = path
        data = read_bytes(path)
        seqs, docs = struct.unpack_from("<QQ", data, 18)
        self.lengths = np.frombuffer(data, np.int32, seqs, HEADER).copy()
        self.pointers = np.frombuffer(data, np.int64, seqs, HEADER + 4 * seqs).copy()
        self.docs = np.frombuffer(data, np.int64, docs, HEADER + 12 * seqs).copy()

    def save(self):
        size = os.path.getsize(self.path)
        with open(self.path, "r+b") as f:
            f.seek(HEADER)
            f.write(self.lengths.tobytes() + self.pointers.tobytes() + self.docs.tobytes())
        assert os.path.getsize(self.path) == size


def negative_lengths_that_balance(ix):
    ix.lengths[3] += ix.lengths[4] + 3   # 5 + 1 + 3 = 9
    ix.lengths[4] = -3                   # the total (and so the .bin size) still matches


def pointer_off_running_sum(ix):
    ix.pointers[5] += 2                  # still inside the .bin: reads would shift by a token


def first_pointer_not_zero(ix):
    ix.pointers[0] = 2


def pointers_swapped(ix):
    ix.pointers[[3, 4]] = ix.pointers[[4, 3]]   # a read would return the other sequence's tokens


def pointer_past_bin(ix):
    ix.pointers[7] = BIN_SIZE + 100


def last_sequence_runs_past_bin(ix):
    ix.pointers[-1] += 2


def negative_pointer(ix):
    ix.pointers[6] = -8


def documents_out_of_order(ix):
    ix.docs[[3, 4]] = ix.docs[[4, 3]]


def document_index_too_large(ix):
    ix.docs[2] = NUM_SEQS + 5


def first_document_index_not_zero(ix):
    ix.docs[0] = 1


def last_document_index_short(ix):
    ix.docs[-1] = NUM_SEQS - 1


# name: (edit, words the one-line message must contain besides the .idx path)
DAMAGES = {
    "negative_lengths_that_balance": (negative_lengths_that_balance, ["sequence 4 has length -3"]),
    "pointer_off_running_sum": (pointer_off_running_sum,
                                [f"byte pointer of sequence 5 is {2 * sum(LENGTHS[:5]) + 2} but the lengths "
                                 f"before it add up to {2 * sum(LENGTHS[:5])} bytes"]),
    "first_pointer_not_zero": (first_pointer_not_zero, ["byte pointer of sequence 0 is 2", "add up to 0 bytes"]),
    "pointers_swapped": (pointers_swapped, ["byte pointer of sequence 3 is"]),
    "pointer_past_bin": (pointer_past_bin,
                         [f"sequence 7 ends at byte {BIN_SIZE + 100 + 2 * LENGTHS[7]}, past the end of",
                          f".bin ({BIN_SIZE} bytes)"]),
    "last_sequence_runs_past_bin": (last_sequence_runs_past_bin,
                                    [f"sequence {NUM_SEQS - 1} ends at byte {BIN_SIZE + 2}, past the end of"]),
    "negative_pointer": (negative_pointer, ["sequence 6 starts at byte -8, before the start of"]),
    "documents_out_of_order": (documents_out_of_order,
                               ["document index 4 is", "less than document index 3", "must not decrease"]),
    "document_index_too_large": (document_index_too_large,
                                 [f"document index 2 is {NUM_SEQS + 5}, outside [0, {NUM_SEQS}]"]),
    "first_document_index_not_zero": (first_document_index_not_zero, ["document index 0 is 1"]),
    "last_document_index_short": (last_document_index_short,
                                  [f"last document index (entry {len(DOCS)}) is {NUM_SEQS - 1}",
                                   f"sequence count {NUM_SEQS}"]),
}


def damaged(directory, name):
    prefix = str(directory / name)
    build(prefix)
    ix = Index(f"{prefix}.idx")
    DAMAGES[name][0](ix)
    ix.save()
    return prefix


def test_the_damages_keep_header_counts_and_total_size_consistent(tmp_path):
    """The old checks (header, counts, .idx size, .bin size) all pass on every damaged shard."""
    for name in DAMAGES:
        prefix = damaged(tmp_path, name)
        ix = Index(f"{prefix}.idx")
        assert len(ix.lengths) == NUM_SEQS and len(ix.docs) == len(DOCS) + 1
        assert os.path.getsize(f"{prefix}.bin") == BIN_SIZE
        assert 2 * int(ix.lengths.sum(dtype=np.int64)) == BIN_SIZE


@pytest.mark.parametrize("name", sorted(DAMAGES))
def test_reader_names_the_file_and_the_first_bad_entry(tmp_path, name):
    prefix = damaged(tmp_path, name)
    with pytest.raises(IndexedDatasetError) as err:
        IndexedDataset(prefix)
    message = str(err.value)
    assert message.startswith(f"{prefix}.idx: ") and "\n" not in message, message
    assert "corrupt index" in message and "rebuild" in message
    for words in DAMAGES[name][1]:
        assert words in message, (words, message)


def test_int32_wrapped_length_is_refused_even_when_total_balances(tmp_path):
    """A length that wrapped past 2**31 reads as a large negative number; the others absorb it."""
    prefix = str(tmp_path / "wrap")
    with IndexedDatasetBuilder(f"{prefix}.bin", np.uint16) as b:
        b.add_document(np.zeros(2, np.uint16))
        b.add_document(np.zeros(2, np.uint16))
        b.finalize(f"{prefix}.idx")
    ix = Index(f"{prefix}.idx")
    # 2 + 2 == (2**31 - 1) + (-(2**31) + 5): in int64 the sum still balances
    ix.lengths[:] = [2 ** 31 - 1, -(2 ** 31) + 5]
    ix.save()
    with pytest.raises(IndexedDatasetError, match=rf"^{prefix}\.idx: sequence 1 has length -2147483643 "):
        IndexedDataset(prefix)


def test_builder_add_index_refuses_a_damaged_shard_and_leaves_nothing(tmp_path):
    (tmp_path / "in").mkdir()
    prefix = damaged(tmp_path / "in", "pointers_swapped")
    out = tmp_path / "out"
    out.mkdir()
    with IndexedDatasetBuilder(str(out / "m.bin"), np.uint16) as builder:
        with pytest.raises(IndexedDatasetError, match="byte pointer of sequence 3"):
            builder.add_index(prefix)
    assert os.listdir(out) == []


def run_merge(*args):
    return subprocess.run([sys.executable, TOOL, *map(str, args)], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.mark.parametrize("name", ["negative_lengths_that_balance", "pointer_off_running_sum",
                                  "pointer_past_bin", "documents_out_of_order"])
def test_merge_tool_refuses_a_damaged_shard_in_one_line_and_writes_nothing(tmp_path, name):
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    outputs.mkdir()
    build(str(inputs / "good"))
    bad = damaged(inputs, name)
    # an earlier merge result sits at the output prefix; a failed merge must leave it as it was
    build(str(outputs / "merged"))
    before = {n: read_bytes(outputs / n) for n in os.listdir(outputs)}
    for args in (["--input", inputs / "good", bad], ["--input", inputs]):
        proc = run_merge(*args, "--output-prefix", outputs / "merged")
        assert proc.returncode != 0, (args, proc.stdout)
        assert "Traceback" not in proc.stderr, proc.stderr
        lines = proc.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
        assert f"{bad}.idx" in lines[0], lines[0]
        for words in DAMAGES[name][1]:
            assert words in lines[0], (words, lines[0])
        assert {n: read_bytes(outputs / n) for n in os.listdir(outputs)} == before
        assert not [n for d in (inputs, outputs) for n in os.listdir(d) if ".tmp-" in n]
        assert sorted(os.listdir(inputs)) == sorted(f"{s}{e}" for s in ("good", name) for e in (".bin", ".idx"))


def test_valid_shard_still_opens_and_merges(tmp_path):
    prefix = str(tmp_path / "good")
    build(prefix)
    ds = IndexedDataset(prefix)
    seqs = [s for d in DOCS for s in d]
    assert len(ds) == NUM_SEQS and ds.num_tokens == sum(LENGTHS) and ds.num_documents == len(DOCS)
    assert [ds[i].tolist() for i in range(len(ds))] == seqs
    assert ds.document(2).tolist() == [] and ds.document(3).tolist() == [10] * 5 + [11, 12, 13]
    ds.close()
    proc = run_merge("--input", prefix, prefix, "--output-prefix", tmp_path / "twice")
    assert proc.returncode == 0, proc.stderr
    merged = IndexedDataset(str(tmp_path / "twice"))
    assert [merged[i].tolist() for i in range(len(merged))] == seqs + seqs
    assert merged.num_documents == 2 * len(DOCS)


def test_empty_shard_is_valid(tmp_path):
    prefix = str(tmp_path / "empty")
    with IndexedDatasetBuilder(f"{prefix}.bin", np.uint16) as b:
        b.finalize(f"{prefix}.idx")
    ds = IndexedDataset(prefix)
    assert len(ds) == 0 and ds.num_tokens == 0


@pytest.mark.parametrize("vocab_size", [2 ** 31 + 1, 2 ** 32, 2 ** 40])
def test_vocab_beyond_32_bits_is_refused_naming_the_file(vocab_size):
    with pytest.raises(IndexedDatasetError) as err:
        best_dtype(vocab_size, source="tok/tokenizer.json")
    message = str(err.value)
    assert message.startswith("tok/tokenizer.json: ") and f"vocab size {vocab_size}" in message
    assert "32 bits" in message and "\n" not in message
    assert best_dtype(2 ** 31) == np.int32  # ids 0 .. 2**31 - 1 still fit


def test_token_id_beyond_32_bits_is_refused_naming_the_file(tmp_path):
    path = str(tmp_path / "x.bin")
    with IndexedDatasetBuilder(path, np.int32) as b:
        with pytest.raises(IndexedDatasetError, match=rf"^{path}: token values .*4294967296.* int32"):
            b.add_document(np.array([1, 2 ** 32], np.int64))
    assert os.listdir(tmp_path) == []
