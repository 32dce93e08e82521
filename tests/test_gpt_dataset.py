"""GPT dataset index math, splits, blending, the on-disk cache, multi-rank builds.

Documents hold globally unique token values (document d = offset_d + 0..len_d-1), so every
sample can be traced back to the exact stream positions it came from.
"""
import os

import numpy as np
import pytest

from megatron_lite.data import gpt_dataset as gd
from megatron_lite.data.blended_dataset import (BlendedDataset, _chairman_choices, _two_way_choices,
                                                build_blending_indices)
from megatron_lite.data.builder import build_train_valid_test_datasets
from megatron_lite.data.data_spec import split_document_ranges
from megatron_lite.data.gpt_dataset import GPTDataset, GPTDatasetError, MockGPTDataset
from megatron_lite.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder, index_file_path


class ArrayDocs:
    """In-memory stand-in for IndexedDataset: unique token values per position."""

    def __init__(self, lengths, base=0):
        self.sequence_lengths = np.asarray(lengths, dtype=np.int32)
        self.offsets = base + np.concatenate([[0], np.cumsum(self.sequence_lengths, dtype=np.int64)])

    def get(self, i, offset=0, length=None):
        n = int(self.sequence_lengths[i])
        length = n - offset if length is None else length
        assert 0 <= offset and offset + length <= n
        return np.arange(self.offsets[i] + offset, self.offsets[i] + offset + length, dtype=np.int64)

    def doc(self, i):
        return self.get(i)


def write_shard(prefix, lengths, base=0):
    docs = ArrayDocs(lengths, base)
    with IndexedDatasetBuilder(prefix + ".bin", np.int32) as builder:
        for i in range(len(lengths)):
            builder.add_document(docs.doc(i))
        builder.finalize(index_file_path(prefix))
    return docs


def megatron_sample_idx(lengths, doc_idx, seq_length, num_samples):
    """A literal port of Megatron-LM's helpers.cpp build_sample_idx: the reference."""
    out = [(0, 0)]
    k, offset = 0, 0
    while len(out) <= num_samples:
        remaining = seq_length + 1
        while remaining != 0:
            doc_length = int(lengths[doc_idx[k]]) - offset
            remaining -= doc_length
            if remaining <= 0:
                offset += remaining + doc_length - 1
                remaining = 0
            else:
                k, offset = k + 1, 0
        out.append((k, offset))
    return np.array(out)


def stream_order(ds):
    """Samples in stream order (undoing the shuffle)."""
    inverse = np.argsort(np.asarray(ds.shuffle_idx))
    return [ds[int(i)]["text"] for i in inverse]


# 20: one epoch; 40 and 95: a short final epoch, shuffled on its own; 70: a long one, mixed in
@pytest.mark.parametrize("num_samples", [20, 40, 70, 95])
def test_samples_are_stream_windows_covering_every_token_per_epoch(num_samples):
    rng = np.random.default_rng(0)
    docs = ArrayDocs(rng.integers(1, 30, size=70))
    doc_ids = np.arange(10, 50)  # a split in the middle of the shard
    L = 16
    ds = GPTDataset(docs, "train", doc_ids, num_samples, L, seed=7)
    T = int(docs.sequence_lengths[doc_ids].sum())
    epochs = next(e for e in range(1, 100) if e * T - 1 >= num_samples * L)
    n = (epochs * T - 1) // L
    assert len(ds) == n >= num_samples and len(ds.doc_idx) == epochs * len(doc_ids)
    for e in range(epochs):  # each epoch is one permutation of the split's documents
        assert sorted(ds.doc_idx[e * len(doc_ids):(e + 1) * len(doc_ids)]) == list(doc_ids)
    np.testing.assert_array_equal(ds.sample_idx, megatron_sample_idx(docs.sequence_lengths, ds.doc_idx, L, n))
    assert sorted(ds.shuffle_idx) == list(range(n))
    before_final = ((epochs - 1) * T - 1) // L
    if epochs > 1 and num_samples - before_final < int(0.8 * ((T - 1) // L)):
        assert sorted(ds.shuffle_idx[:before_final]) == list(range(before_final))
    elif epochs > 1:
        assert max(ds.shuffle_idx[:before_final]) >= before_final

    stream = np.concatenate([docs.doc(d) for d in ds.doc_idx])
    samples = stream_order(ds)
    for j, s in enumerate(samples):
        assert s.dtype == np.int64 and len(s) == L + 1
        np.testing.assert_array_equal(s, stream[j * L:j * L + L + 1])
    for a, b in zip(samples, samples[1:]):  # consecutive samples share exactly one token
        assert a[-1] == b[0] and len(np.intersect1d(a, b)) == 1
    # Every token of the split is seen once per epoch; only the tail of the last epoch
    # (fewer than seq_length tokens, after the final sample's end) is seen one time less.
    counts = np.bincount(np.concatenate([s[:-1] for s in samples]), minlength=int(docs.offsets[-1]))
    split_tokens = np.concatenate([docs.doc(d) for d in doc_ids])
    others = np.setdiff1d(np.arange(docs.offsets[-1]), split_tokens)
    assert counts[others].sum() == 0
    short = split_tokens[counts[split_tokens] == epochs - 1]
    assert set(counts[split_tokens]) <= {epochs - 1, epochs}
    assert 1 <= len(short) == epochs * T - n * L <= L
    assert set(short) == set(stream[n * L:])


def test_same_seed_same_order_other_seed_other_order():
    docs = ArrayDocs(np.random.default_rng(1).integers(5, 40, size=50))
    a, b = (GPTDataset(docs, "train", np.arange(50), 60, 32, seed=3) for _ in range(2))
    c = GPTDataset(docs, "train", np.arange(50), 60, 32, seed=4)
    np.testing.assert_array_equal(np.stack([a[i]["text"] for i in range(60)]),
                                  np.stack([b[i]["text"] for i in range(60)]))
    assert not np.array_equal(a.doc_idx, c.doc_idx) and not np.array_equal(a.shuffle_idx, c.shuffle_idx)
    assert not np.array_equal(a[0]["text"], c[0]["text"])


def test_megatron_split_rounding():
    assert split_document_ranges("969,30,1", 1000) == [(0, 969), (969, 999), (999, 1000)]
    assert split_document_ranges("80,15,5", 10) == [(0, 8), (8, 10), (10, 10)]  # 1.5 rounds to 2
    assert split_document_ranges("1", 7) == [(0, 7), (7, 7), (7, 7)]
    # round(4.5) + round(2.25) + round(2.25) = 8: Megatron shifts every bound up by the shortfall
    assert split_document_ranges("2/1/1", 9) == [(0, 5), (5, 7), (7, 9)]
    with pytest.raises(GPTDatasetError, match="--split"):
        split_document_ranges("a,b", 10)
    with pytest.raises(GPTDatasetError, match="--split"):  # not 80,20: that would move 20% to valid
        split_document_ranges("80,,20", 10)


def test_splits_end_to_end_through_real_shards(tmp_path):
    rng = np.random.default_rng(2)
    docs = write_shard(str(tmp_path / "corpus"), rng.integers(3, 60, size=120))
    train, valid, test = build_train_valid_test_datasets(str(tmp_path / "corpus"), "80,15,5", 24, 5,
                                                         [200, 30, 10], cache_path=str(tmp_path / "cache"))
    assert isinstance(train.indexed_dataset, IndexedDataset)
    for ds, (begin, end), wanted in zip((train, valid, test), [(0, 96), (96, 114), (114, 120)], (200, 30, 10)):
        assert len(ds) >= wanted
        allowed = set(np.concatenate([docs.doc(d) for d in range(begin, end)]).tolist())
        stream = np.concatenate([docs.doc(d) for d in ds.doc_idx])
        for i in range(len(ds)):  # the tokens read from the .bin equal the tokens written
            j = int(ds.shuffle_idx[i])
            np.testing.assert_array_equal(ds[i]["text"], stream[j * 24:j * 24 + 25])
            assert set(ds[i]["text"].tolist()) <= allowed
    assert isinstance(train.doc_idx, np.memmap)  # loaded from the cache with mmap_mode='r'
    assert not [f for f in os.listdir(tmp_path / "cache") if ".tmp" in f]


def test_clear_errors(tmp_path):
    with pytest.raises(GPTDatasetError, match=r"--data-path: .*nowhere"):
        build_train_valid_test_datasets(str(tmp_path / "nowhere"), "1", 8, 1, [10, 0, 0])
    write_shard(str(tmp_path / "small"), [3, 4, 2, 5])
    with pytest.raises(GPTDatasetError, match=r"--split 0,50,50 leaves no training documents"):
        build_train_valid_test_datasets(str(tmp_path / "small"), "0,50,50", 4, 1, [10, 2, 2])
    with pytest.raises(GPTDatasetError, match=r"small.*14 tokens.*--seq-length 20"):
        build_train_valid_test_datasets(str(tmp_path / "small"), "1", 20, 1, [10, 0, 0])
    with pytest.raises(GPTDatasetError, match="--data-path weights"):
        BlendedDataset([[0], [1]], [0.0, 0.0], 1)


@pytest.mark.parametrize("weights", [(0.3, 0.7), (0.5, 0.5), (0.013, 0.987), (1, 2),
                                     (0.2, 0.3, 0.5), (0.05, 0.05, 0.9), (1, 1, 1), (0.61, 0.001, 0.389)])
def test_blend_shares_within_one_sample_at_every_prefix(weights):
    size = 20000
    w = np.asarray(weights, dtype=np.float64) / sum(weights)
    tags = [[(k, j) for j in range(int(np.ceil(w[k] * size)) + 1)] for k in range(len(w))]
    blend = BlendedDataset(tags, weights, size)
    choice = np.asarray(blend.dataset_index)
    counts = np.cumsum(np.eye(len(w), dtype=np.int64)[choice], axis=0)
    ideal = np.outer(np.arange(1, size + 1), w)
    assert np.abs(counts - ideal).max() < 1.0
    seen = [0] * len(w)  # each dataset's samples are served in order, none skipped or repeated
    for i in range(size):
        k, j = blend[i]
        assert k == choice[i] and j == seen[k]
        seen[k] += 1
    if len(w) == 2:  # the vectorised two-way form and the general rule agree, ties included
        np.testing.assert_array_equal(_two_way_choices(w[0], size), _chairman_choices(w, size))


def _max_share_error(weights, choice):
    """max over prefixes t and datasets k of |count_k(t) - w_k t|, from the choices alone."""
    w = np.asarray(weights, dtype=np.float64)
    counts = np.cumsum(np.eye(len(w), dtype=np.int64)[choice], axis=0)
    return np.abs(counts - np.outer(np.arange(1, len(choice) + 1), w)).max()


def test_blend_of_many_datasets_holds_tijdemans_bound_at_every_prefix():
    # Megatron-LM's "furthest behind" rule exceeds one sample on such weights from n = 4 up.
    rng = np.random.default_rng(2024)
    size = 4000
    for n in range(4, 9):
        for trial in range(6):
            w = rng.dirichlet(np.full(n, 0.3 if trial % 2 else 1.0))
            if trial >= 2:  # tiny weights, and from trial 4 on a zero one as well
                w[rng.choice(n, 2, replace=False)] *= 10.0 ** -rng.integers(3, 8, 2)
            if trial >= 4:
                w[rng.integers(n)] = 0.0
            w /= w.sum()
            dataset_index, sample_index = build_blending_indices(w.tolist(), size)
            m = int(np.count_nonzero(w))
            error = _max_share_error(w, dataset_index)
            assert error < 1.0 and error <= 1 - 1 / (2 * m - 2) + 1e-9, (n, w.tolist(), error)
            assert not np.isin(dataset_index, np.flatnonzero(w == 0)).any()
            for k in range(n):  # each dataset's samples in order: 0, 1, 2, ...
                mine = sample_index[dataset_index == k]
                np.testing.assert_array_equal(mine, np.arange(len(mine)))


def test_blend_refuses_a_dataset_that_runs_out():
    with pytest.raises(GPTDatasetError, match="has 5 samples but the blend of 100 needs"):
        BlendedDataset([list(range(5)), list(range(100))], [0.5, 0.5], 100)


def test_weighted_data_path_blends_per_split(tmp_path):
    write_shard(str(tmp_path / "a"), np.full(40, 20))
    write_shard(str(tmp_path / "b"), np.full(60, 30), base=10 ** 6)
    cache = str(tmp_path / "cache")
    train, valid, test = build_train_valid_test_datasets(["0.25", str(tmp_path / "a"), "0.75", str(tmp_path / "b")],
                                                         "90,10,0", 16, 9, [300, 40, 0], cache_path=cache)
    assert test is None and len(train) == 300 and len(valid) == 40
    for ds, n in ((train, 300), (valid, 40)):
        from_b = np.array([ds[i]["text"][0] >= 10 ** 6 for i in range(n)])
        assert np.abs(np.cumsum(from_b) - 0.75 * np.arange(1, n + 1)).max() < 1
        np.testing.assert_array_equal(from_b, np.asarray(ds.dataset_index) == 1)
    assert train.datasets[0].indexed_dataset.path_prefix == str(tmp_path / "a")
    assert len(train.datasets[1]) >= int(np.ceil(np.ceil(300 * 0.75) * 1.005))
    assert sum(f.startswith(tuple("0123456789abcdef")) and "Blended" in f for f in os.listdir(cache)) == 2 * 3


def _stamps(cache_dir):
    return {f: os.stat(os.path.join(cache_dir, f)).st_mtime_ns for f in os.listdir(cache_dir) if f.endswith(".npy")}


def test_cache_reused_and_rebuilt_when_a_defining_parameter_changes(tmp_path, monkeypatch):
    prefix, cache = str(tmp_path / "c"), str(tmp_path / "cache")
    lengths = np.random.default_rng(3).integers(2, 50, size=80)
    write_shard(prefix, lengths)
    builds = []
    real = gd.build_sample_indices
    monkeypatch.setattr(gd, "build_sample_indices", lambda *a, **k: builds.append(a[2:]) or real(*a, **k))

    def make(seq_length=32, seed=1, num_samples=50, split="90,10,0", path=prefix):
        train, _, _ = build_train_valid_test_datasets(path, split, seq_length, seed, [num_samples, 0, 0], cache)
        return train

    first = make()
    assert len(builds) == 1 and len(_stamps(cache)) == 3
    stamps = _stamps(cache)
    again = make()
    assert len(builds) == 1 and _stamps(cache) == stamps  # loaded, nothing rewritten
    np.testing.assert_array_equal(again[7]["text"], first[7]["text"])
    for change in (dict(seq_length=31), dict(seed=2), dict(num_samples=51), dict(split="80,20,0")):
        before = len(builds)
        make(**change)
        assert len(builds) == before + 1, change
        make(**change)
        assert len(builds) == before + 1, change
    write_shard(prefix, lengths, base=5)  # same lengths, new tokens: the data file changed
    make()
    assert len(builds) == 6 and len(_stamps(cache)) == 6 * 3
    assert {f: m for f, m in _stamps(cache).items() if f in stamps} == stamps  # old entries untouched


def test_mock_dataset_is_deterministic():
    a, b, c = MockGPTDataset(50, 8, 10, 1), MockGPTDataset(50, 8, 10, 1), MockGPTDataset(50, 8, 10, 2)
    assert len(a) == 10 and a[3]["text"].shape == (9,) and a[3]["text"].dtype == np.int64
    np.testing.assert_array_equal(a[3]["text"], b[3]["text"])
    assert not np.array_equal(a[3]["text"], c[3]["text"]) and not np.array_equal(a[3]["text"], a[4]["text"])
    assert 0 <= np.stack([a[i]["text"] for i in range(10)]).min() and a[9]["text"].max() < 50
    with pytest.raises(IndexError):
        a[10]


def test_blending_index_dtypes():
    index, sample = build_blending_indices([0.5, 0.25, 0.25], 8)
    assert index.dtype == np.int16 and sample.dtype == np.int64
    assert index.tolist() == [0, 1, 2, 0, 0, 1, 2, 0] and sample.tolist() == [0, 0, 0, 1, 2, 1, 1, 3]


def _two_rank_build(rank, world_size, prefix, shared_cache, private_root):
    import torch.distributed as dist
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    builds = []
    real = gd.build_sample_indices
    gd.build_sample_indices = lambda *a, **k: builds.append(1) or real(*a, **k)
    indexed = IndexedDataset(prefix)
    shared = GPTDataset(indexed, "train", np.arange(60), 40, 16, 11, shared_cache)
    built_shared = len(builds)
    private = GPTDataset(indexed, "train", np.arange(60), 40, 16, 11, os.path.join(private_root, f"r{rank}"))
    samples = [np.stack([ds[i]["text"] for i in range(len(ds))]) for ds in (shared, private)]
    dist.barrier()
    dist.destroy_process_group()
    return {"built_shared": built_shared, "built_private": len(builds) - built_shared, "samples": samples}


@pytest.mark.timeout(120)
def test_two_ranks_rank0_builds_rank1_loads(tmp_path):
    from dist_helpers import run_distributed
    prefix = str(tmp_path / "d")
    write_shard(prefix, np.random.default_rng(4).integers(3, 40, size=60))
    r0, r1 = run_distributed(_two_rank_build, 2, args=(prefix, str(tmp_path / "shared"), str(tmp_path / "own")),
                             timeout=110)
    assert (r0["built_shared"], r1["built_shared"]) == (1, 0)
    assert (r0["built_private"], r1["built_private"]) == (1, 1)  # unshared dirs: each rank builds
    for a, b in zip(r0["samples"] + r1["samples"], r1["samples"] + r0["samples"][::-1]):
        np.testing.assert_array_equal(a, b)
    assert len(os.listdir(tmp_path / "shared")) == 4  # three arrays and the description
