"""Shard content against the vocabulary, and damaged sample-index caches.

A token id at or beyond the vocabulary (or a negative one) is refused before training with one
line naming the .bin and the first bad entry; the scan for it runs once per .bin (its result is
cached, keyed by the file's stamp). A truncated, unreadable or misshapen cached .npy is rebuilt
with identical samples, never a traceback.
"""
import os

import numpy as np
import pytest

from dist_helpers import run_entry_point
from megatron_lite.data import builder
from megatron_lite.data import gpt_dataset as gd
from megatron_lite.data.builder import build_train_valid_test_datasets, check_token_ids
from megatron_lite.data.index_cache import load_or_build_cached
from megatron_lite.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder, index_file_path
from megatron_lite.errors import DatasetError

VOCAB = 256


def write_shard(prefix, docs, dtype=np.uint16):
    with IndexedDatasetBuilder(prefix + ".bin", dtype) as b:
        for d in docs:
            b.add_document(np.asarray(d))
        b.finalize(index_file_path(prefix))
    return prefix


def good_docs(n=20, length=30):
    rng = np.random.default_rng(0)
    return [rng.integers(0, VOCAB, size=length) for _ in range(n)]


def bad_shard(tmp_path, value=70000, seq=12, tok=5, dtype=np.int32, name="bad"):
    docs = good_docs()
    docs[seq][tok] = value
    docs[seq + 2][1] = value  # a later bad entry: only the first is named
    return write_shard(str(tmp_path / name), docs, dtype)


def expected_line(prefix, value, seq, tok, source=f"--vocab-size {VOCAB}"):
    return (f"{prefix}.bin: token id {value} at sequence {seq} (token {tok} of it) is outside the vocabulary "
            f"of {VOCAB} ({source}); the shard was made with another tokenizer: re-run tools/preprocess_data.py")


def build(prefix, cache, vocab_size=VOCAB, vocab_from=None):
    return build_train_valid_test_datasets(prefix, "100,0,0", 16, 1234, [10, 0, 0], cache_path=str(cache),
                                           vocab_size=vocab_size, vocab_from=vocab_from)


# ---- token ids --------------------------------------------------------------------------------
@pytest.mark.parametrize("value,dtype", [(70000, np.int32), (VOCAB, np.uint16), (-3, np.int32), (-1, np.int16)])
def test_out_of_vocabulary_id_is_one_line_naming_bin_and_first_entry(tmp_path, value, dtype):
    prefix = bad_shard(tmp_path, value=value, dtype=dtype)
    with pytest.raises(DatasetError) as e:
        build(prefix, tmp_path / "cache", vocab_from="--vocab-file /v/vocab.json")
    assert str(e.value) == expected_line(prefix, value, 12, 5, "--vocab-file /v/vocab.json")
    assert "\n" not in str(e.value)


def test_first_bad_entry_found_across_scan_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(builder, "SCAN_CHUNK_TOKENS", 7)  # many chunks, boundaries inside sequences
    docs = good_docs()
    docs[3] = docs[3][:0]  # an empty document (no sequence): later sequence numbers shift
    docs[17][29] = VOCAB + 1
    prefix = write_shard(str(tmp_path / "chunks"), docs)
    with pytest.raises(DatasetError) as e:
        build(prefix, tmp_path / "cache")
    assert str(e.value) == expected_line(prefix, VOCAB + 1, 16, 29)


def test_good_shard_builds_and_no_vocab_means_no_scan(tmp_path, monkeypatch):
    prefix = write_shard(str(tmp_path / "good"), good_docs())
    calls = []
    real = builder.scan_token_range
    monkeypatch.setattr(builder, "scan_token_range", lambda *a: calls.append(a) or real(*a))
    train, _, _ = build(prefix, tmp_path / "cache")
    assert len(train) >= 10 and len(calls) == 1
    build(prefix, tmp_path / "cache", vocab_size=None)
    assert len(calls) == 1
    lo, hi = builder.shard_token_range(IndexedDataset(prefix), str(tmp_path / "cache"))
    assert len(calls) == 1 and 0 <= lo and hi == max(int(d.max()) for d in good_docs())


def test_scan_runs_once_per_shard_and_again_when_the_bin_changes(tmp_path, monkeypatch):
    prefix = bad_shard(tmp_path)
    calls = []
    real = builder.scan_token_range
    monkeypatch.setattr(builder, "scan_token_range", lambda *a: calls.append(a) or real(*a))
    for _ in range(2):
        with pytest.raises(DatasetError, match="token id 70000 at sequence 12"):
            build(prefix, tmp_path / "cache")
    assert len(calls) == 1  # the second build read the cached range
    # The cached range serves any vocabulary: a larger one passes without a rescan.
    train, _, _ = build(prefix, tmp_path / "cache", vocab_size=70001)
    assert len(train) >= 10 and len(calls) == 1
    # A rewritten shard (new stamp) is scanned afresh.
    write_shard(prefix, good_docs())
    build(prefix, tmp_path / "cache")
    assert len(calls) == 2
    # A damaged cached range is rescanned, not a traceback.
    for f in os.listdir(tmp_path / "cache"):
        if f.endswith("-ShardTokenRange-token_range.npy"):
            (tmp_path / "cache" / f).write_bytes(b"\x93NUMPY garbage")
    build(prefix, tmp_path / "cache")
    assert len(calls) == 3


def test_check_token_ids_default_cache_beside_the_shard(tmp_path):
    prefix = bad_shard(tmp_path, value=VOCAB)
    with pytest.raises(DatasetError, match=f"token id {VOCAB} at sequence 12 .token 5 of it."):
        check_token_ids(IndexedDataset(prefix), VOCAB, f"--vocab-size {VOCAB}")
    assert any(f.endswith("token_range.npy") for f in os.listdir(tmp_path / "cache" / "ShardTokenRange"))


@pytest.mark.timeout(120)
def test_entry_point_refuses_foreign_shard_in_one_line(tmp_path):
    prefix = bad_shard(tmp_path, value=70000)
    out = run_entry_point(
        ["--data-path", prefix, "--split", "100,0,0", "--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB),
         "--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
         "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "1", "--eval-iters", "0",
         "--distributed-backend", "gloo", "--log-interval", "1"], tmp_path)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: " + expected_line(prefix, 70000, 12, 5)], out.stderr


# ---- damaged sample-index caches ---------------------------------------------------------------
def samples(ds):
    return [ds[i]["text"].tolist() for i in range(len(ds))]


def index_files(cache):
    return sorted(os.path.join(cache, f) for f in os.listdir(cache) if "GPTDataset-train" in f and f.endswith(".npy"))


def _halve(path):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2])


def _empty(path):
    open(path, "wb").close()


def _wrong_shape(path):
    np.save(path, np.zeros((3, 3), dtype=np.float32))


def _garbage(path):
    with open(path, "wb") as f:
        f.write(b"not a numpy file at all" * 10)


@pytest.mark.parametrize("damage", [_halve, _empty, _wrong_shape, _garbage])
@pytest.mark.parametrize("which", [0, 1, 2])
def test_damaged_cached_index_is_rebuilt_with_identical_samples(tmp_path, monkeypatch, damage, which):
    prefix = write_shard(str(tmp_path / "good"), good_docs())
    cache = tmp_path / "cache"
    builds = []
    real = gd.build_sample_indices
    monkeypatch.setattr(gd, "build_sample_indices", lambda *a: builds.append(1) or real(*a))
    first = samples(build(prefix, cache)[0])
    files = index_files(cache)
    assert len(files) == 3 and len(builds) == 1
    damage(files[which])
    again = build(prefix, cache)[0]
    assert len(builds) == 2  # the damaged file was noticed and the indices rebuilt
    assert samples(again) == first
    assert isinstance(again.doc_idx, np.memmap)  # served from the rebuilt files
    assert not [f for f in os.listdir(cache) if ".tmp" in f]
    assert samples(build(prefix, cache)[0]) == first and len(builds) == 2  # the rebuilt cache loads as is


def test_unrebuildable_cache_is_one_line_naming_the_file(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    calls = []

    def build_arrays():
        calls.append(1)
        return (np.arange(5),)
    arrays = load_or_build_cached(str(cache), "K", {"x": 1}, ("a",), build_arrays)
    assert arrays["a"].tolist() == [0, 1, 2, 3, 4] and calls == [1]
    [path] = [os.path.join(cache, f) for f in os.listdir(cache) if f.endswith(".npy")]
    _halve(path)

    def refuse(_arrays):
        return ("a", "has the wrong shape")
    with pytest.raises(DatasetError) as e:  # rebuilt, but still refused: one line naming the file
        load_or_build_cached(str(cache), "K", {"x": 1}, ("a",), build_arrays, validate=refuse)
    assert str(e.value).startswith(f"{path}: has the wrong shape, even after rebuilding") and "\n" not in str(e.value)

    import megatron_lite.data.index_cache as ic

    def failing_save(*a, **k):
        raise OSError(28, "No space left on device")
    _halve(path)
    monkeypatch.setattr(ic.np, "save", failing_save)
    with pytest.raises(DatasetError) as e:
        load_or_build_cached(str(cache), "K", {"x": 1}, ("a",), build_arrays)
    assert str(e.value).startswith(f"{path}: cannot write the index cache (No space left on device)")
