"""tools/merge_datasets.py as a subprocess: directory and prefix-list forms, and its errors."""

import os
import subprocess
import sys

import numpy as np

from megatron_lite.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "merge_datasets.py")


def run_merge(*args):
    return subprocess.run([sys.executable, TOOL, *map(str, args)], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))


def random_docs(seed, n):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 2048, rng.integers(0, 60)) for _ in range(n)]


def build(prefix, docs, dtype=np.uint16):
    with IndexedDatasetBuilder(f"{prefix}.bin", dtype) as b:
        for doc in docs:
            b.add_document(doc)
        b.finalize(f"{prefix}.idx")


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def assert_same_pair(a, b):
    for ext in (".bin", ".idx"):
        assert read_bytes(f"{a}{ext}") == read_bytes(f"{b}{ext}"), ext


def test_directory_form_merges_in_sorted_name_order(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    parts = {"b_part": random_docs(1, 7), "a_part": random_docs(2, 5), "c_part": random_docs(3, 9)}
    for name, docs in parts.items():
        build(shards / name, docs)
    (shards / "notes.txt").write_text("not a shard")
    proc = run_merge("--input", shards, "--output-prefix", tmp_path / "merged")
    assert proc.returncode == 0, proc.stderr
    assert "merged 3 shards" in proc.stdout and "documents=21" in proc.stdout
    build(tmp_path / "whole", parts["a_part"] + parts["b_part"] + parts["c_part"])
    assert_same_pair(tmp_path / "merged", tmp_path / "whole")
    ds = IndexedDataset(str(tmp_path / "merged"))
    assert ds.num_documents == 21 and ds.document(5).tolist() == parts["b_part"][0].tolist()


def test_prefix_list_form_keeps_the_given_order(tmp_path):
    first, second = random_docs(4, 6), random_docs(5, 4)
    build(tmp_path / "one", first)
    build(tmp_path / "two", second)
    # a .bin/.idx suffix on a prefix is accepted
    proc = run_merge("--input", tmp_path / "two", tmp_path / "one.idx", "--output-prefix", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    build(tmp_path / "expect", second + first)
    assert_same_pair(tmp_path / "out", tmp_path / "expect")


def test_errors_are_one_line_and_leave_no_output(tmp_path):
    build(tmp_path / "u16", random_docs(6, 3), np.uint16)
    build(tmp_path / "i32", random_docs(7, 3), np.int32)
    stray = tmp_path / "stray"
    stray.mkdir()
    build(stray / "ok", random_docs(8, 2))
    (stray / "half.bin").write_bytes(b"\0\0")
    cases = [
        (["--input", tmp_path / "u16", tmp_path / "i32"], ["i32.idx", "dtype int32", "uint16"]),
        (["--input", stray], ["half.idx is missing"]),
        (["--input", tmp_path / "u16", tmp_path / "absent"], ["absent.idx", "not found"]),
        (["--input", tmp_path / "empty_dir_does_not_exist_either"], ["not found"]),
    ]
    (tmp_path / "empty").mkdir()
    cases.append((["--input", tmp_path / "empty"], ["no .bin/.idx shard pairs"]))
    for args, words in cases:
        proc = run_merge(*args, "--output-prefix", tmp_path / "out")
        assert proc.returncode == 1, (args, proc.stdout)
        assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
        assert "Traceback" not in proc.stderr
        for w in words:
            assert w in proc.stderr, (w, proc.stderr)
    assert not any(n.startswith("out") for n in os.listdir(tmp_path))
    proc = run_merge("--input", tmp_path / "u16", "--output-prefix", tmp_path / "no" / "out")
    assert proc.returncode == 1 and "does not exist" in proc.stderr
