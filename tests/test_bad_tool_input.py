"""Damaged and unusual input to the data tools, run as a user runs them (a subprocess on real files):
a .gz with a corrupt deflate stream or cut short, a directory where a file belongs, and a UTF-8
byte-order mark at the start of a JSONL file.

A damaged input gives exactly one ``error:`` line naming the file, no traceback, exit 1, an existing
output left byte-identical and no temporaries; a BOM is dropped and the first document is kept."""

import glob
import gzip
import io
import json
import os
import random
import subprocess
import sys
import zlib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREPROCESS = os.path.join(ROOT, "tools", "preprocess_data.py")
TRAIN_TOKENIZER = os.path.join(ROOT, "tools", "train_tokenizer.py")
TOKENIZER_OUTPUTS = ("vocab.json", "merges.txt", "tokenizer.json")
BOM = b"\xef\xbb\xbf"
N_LINES = 3000  # more than two 1,024-line batches: --workers 2 has several batches in flight

WORDS = ("the of and to in a is that it was he for on are as with his they at be this from have or "
         "by one had not but what all were when we there can an your which their said if do will each "
         "Æsop naïve café 東京 O'Brien don't 1984 3.14").split()


def run(tool, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, tool, *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=120)


def jsonl_bytes(n_lines=N_LINES, seed=0) -> bytes:
    rng = random.Random(seed)
    lines = [json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30)))},
                        ensure_ascii=False) for _ in range(n_lines)]
    return ("\n".join(lines) + "\n").encode("utf-8")


def corrupt_middle(gz: bytes) -> bytes:
    """Flip 64 bytes in the middle of the deflate stream (the 10-byte header stays valid)."""
    mid = len(gz) // 2
    return gz[:mid] + bytes(b ^ 0x5A for b in gz[mid:mid + 64]) + gz[mid + 64:]


def bad_first_block(gz: bytes) -> bytes:
    """A valid header followed by a deflate block of the reserved type 3: zlib.error at once."""
    return gz[:10] + bytes([gz[10] | 0b110]) + gz[11:]


DAMAGES = {
    "corrupt-deflate": corrupt_middle,
    "truncated": lambda gz: gz[:len(gz) // 2],
    "bad-block-type": bad_first_block,
}


def gunzip_error(blob: bytes):
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(blob)) as f:
            for _ in f:
                pass
    except (OSError, EOFError, zlib.error) as e:
        return e
    return None


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    """{damage name: path of a damaged .jsonl.gz}; each is checked to really fail to decompress."""
    d = tmp_path_factory.mktemp("damaged")
    gz = gzip.compress(jsonl_bytes())
    paths = {}
    for name, damage in DAMAGES.items():
        blob = damage(gz)
        assert blob[:2] == b"\x1f\x8b"
        assert gunzip_error(blob) is not None, name
        paths[name] = d / f"{name}.jsonl.gz"
        paths[name].write_bytes(blob)
    assert isinstance(gunzip_error(bad_first_block(gz)), zlib.error)
    assert isinstance(gunzip_error(DAMAGES["truncated"](gz)), EOFError)
    return paths


def tokenizer_args(tokenizer_files):
    vocab, merges, _ = tokenizer_files
    return ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", vocab, "--merge-file", merges]


def snapshot(directory):
    return {p: open(p, "rb").read() for p in sorted(glob.glob(os.path.join(str(directory), "**", "*"),
                                                                  recursive=True)) if os.path.isfile(p)}


def assert_one_error_line(proc, *words):
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr
    # Before the error only progress and per-line warnings: a corrupt deflate stream first inflates
    # to garbage lines (skipped and reported as such) until the CRC check at its end fails.
    assert all(ln.startswith(("warning: ", "reading: ", "processed ")) for ln in lines[:-1]), proc.stderr
    for w in words:
        assert w in errors[0], (w, errors[0])
    return errors[0]


def assert_no_temporaries(directory):
    left = [p for p in glob.glob(os.path.join(str(directory), "**", "*"), recursive=True)
            if ".tmp-" in os.path.basename(p) or os.path.basename(p).startswith(".train_tokenizer-")]
    assert not left, left


# -- preprocess_data.py --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def existing_pair(tmp_path_factory, tokenizer_files):
    """The bytes of a real .bin/.idx pair, made from a small good input."""
    d = tmp_path_factory.mktemp("pair")
    good = d / "good.jsonl"
    good.write_bytes(jsonl_bytes(50, seed=1))
    proc = run(PREPROCESS, "--input", good, "--output-prefix", d / "out", *tokenizer_args(tokenizer_files))
    assert proc.returncode == 0, proc.stderr
    return {ext: (d / f"out_text_document.{ext}").read_bytes() for ext in ("bin", "idx")}


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("damage", list(DAMAGES))
def test_preprocess_damaged_gzip_one_line_and_output_untouched(tmp_path, damaged, existing_pair, tokenizer_files,
                                                                damage, workers, strict):
    out = tmp_path / "out"
    for ext, data in existing_pair.items():
        (tmp_path / f"out_text_document.{ext}").write_bytes(data)
    before = snapshot(tmp_path)
    proc = run(PREPROCESS, "--input", damaged[damage], "--output-prefix", out, "--workers", workers,
               "--log-interval", 10 ** 9, *tokenizer_args(tokenizer_files), *(["--strict"] if strict else []))
    line = assert_one_error_line(proc, str(damaged[damage]), "corrupt or truncated gzip data")
    if damage == "bad-block-type":
        assert "at its start" in line, line
    else:
        assert "after line" in line, line
    assert snapshot(tmp_path) == before  # the old pair byte-identical, nothing added
    assert_no_temporaries(tmp_path)


@pytest.mark.parametrize("flag", ["--input", "--vocab-file"])
def test_preprocess_directory_for_a_file(tmp_path, tokenizer_files, flag):
    good = tmp_path / "good.jsonl"
    good.write_bytes(jsonl_bytes(5))
    folder = tmp_path / "folder.jsonl"
    folder.mkdir()
    vocab, merges, _ = tokenizer_files
    paths = {"--input": good, "--vocab-file": vocab, flag: folder}
    proc = run(PREPROCESS, "--input", paths["--input"], "--output-prefix", tmp_path / "out",
               "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", paths["--vocab-file"], "--merge-file", merges)
    assert_one_error_line(proc, flag, str(folder), "is a directory")
    assert sorted(os.listdir(tmp_path)) == ["folder.jsonl", "good.jsonl"]


@pytest.mark.parametrize("compressed", [False, True])
def test_preprocess_bom_keeps_the_first_document(tmp_path, tokenizer_files, compressed):
    data = jsonl_bytes(40, seed=2)
    plain, with_bom = tmp_path / "plain.jsonl", tmp_path / "bom.jsonl"
    plain.write_bytes(data)
    if compressed:
        with_bom = tmp_path / "bom.jsonl.gz"
        with_bom.write_bytes(gzip.compress(BOM + data))
    else:
        with_bom.write_bytes(BOM + data)
    results = {}
    for name, path in (("plain", plain), ("bom", with_bom)):
        proc = run(PREPROCESS, "--input", path, "--output-prefix", tmp_path / name, "--strict",
                   *tokenizer_args(tokenizer_files))
        assert proc.returncode == 0, proc.stderr
        assert "warning" not in proc.stderr, proc.stderr
        done = [ln for ln in proc.stdout.splitlines() if ln.startswith("done:")][-1]
        fields = dict(f.split("=") for f in done.split()[1:])
        results[name] = (fields["documents"], fields["skipped"], fields["tokens"],
                         (tmp_path / f"{name}_text_document.bin").read_bytes(),
                         (tmp_path / f"{name}_text_document.idx").read_bytes())
    assert results["bom"][0] == "40" and results["bom"][1] == "0"
    assert results["bom"] == results["plain"]


# -- train_tokenizer.py --------------------------------------------------------------------------
@pytest.mark.parametrize("damage", list(DAMAGES))
def test_train_tokenizer_damaged_gzip_one_line_and_output_untouched(tmp_path, damaged, damage):
    out = tmp_path / "tok"
    out.mkdir()
    for name in TOKENIZER_OUTPUTS:
        (out / name).write_bytes(f"existing {name}\n".encode())
    good = tmp_path / "good.txt"
    good.write_text("some good text\n" * 20, encoding="utf-8")
    before = snapshot(tmp_path)
    proc = run(TRAIN_TOKENIZER, "--input", good, damaged[damage], "--vocab-size", 300, "--output-dir", out)
    line = assert_one_error_line(proc, str(damaged[damage]), "corrupt or truncated gzip data")
    assert ("at its start" if damage == "bad-block-type" else "after line") in line, line
    assert snapshot(tmp_path) == before
    assert_no_temporaries(tmp_path)


def test_train_tokenizer_directory_for_a_file(tmp_path):
    folder = tmp_path / "corpus.jsonl"
    folder.mkdir()
    proc = run(TRAIN_TOKENIZER, "--input", folder, "--vocab-size", 300, "--output-dir", tmp_path / "tok")
    assert_one_error_line(proc, "--input", str(folder), "is a directory")
    assert os.listdir(tmp_path) == ["corpus.jsonl"]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".txt"])
def test_train_tokenizer_bom_keeps_the_first_document(tmp_path, suffix):
    data = jsonl_bytes(200, seed=3)
    if suffix == ".txt":
        data = b"".join(json.loads(ln)["text"].encode() + b"\n" for ln in data.splitlines())
    outputs = {}
    for name, blob in (("plain", data), ("bom", BOM + data)):
        path = tmp_path / f"{name}{suffix}"
        path.write_bytes(gzip.compress(blob) if suffix.endswith(".gz") else blob)
        proc = run(TRAIN_TOKENIZER, "--input", path, "--vocab-size", 400, "--output-dir", tmp_path / name)
        assert proc.returncode == 0, proc.stderr
        assert "from 200 documents" in proc.stdout, proc.stdout
        outputs[name] = {n: (tmp_path / name / n).read_bytes() for n in TOKENIZER_OUTPUTS}
    assert outputs["bom"] == outputs["plain"]  # the BOM is neither an error nor learned as text
