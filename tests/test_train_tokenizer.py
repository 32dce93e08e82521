"""tools/train_tokenizer.py run as a subprocess on small generated files: outputs load and round-trip;
bad input gives file:line, a non-zero exit and no traceback."""
import gzip
import json
import os
import random
import subprocess
import sys

import pytest

from megatron_lite.data.tokenizer import EOD_TOKEN, GPT2BPETokenizer, HuggingFaceTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "train_tokenizer.py")
OUTPUTS = ("vocab.json", "merges.txt", "tokenizer.json")


def run_tool(*args, cwd=None):
    return subprocess.run([sys.executable, TOOL, *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def fake_documents(n, seed):
    """Pseudo-English documents from a fixed syllable set, with some punctuation and non-ASCII text."""
    rng = random.Random(seed)
    syllables = ["the", "an", "ing", "er", "lo", "ve", "st", "qu", "ar", "ion", "é", "ñ", "日本"]
    docs = []
    for _ in range(n):
        n_words = rng.randint(20, 80)
        words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(n_words)]
        docs.append(" ".join(words).capitalize() + rng.choice([".", "!", "?\n", ".\n\n"]))
    return docs


@pytest.fixture
def inputs(tmp_path):
    jsonl_docs, text_lines = fake_documents(150, 0), fake_documents(150, 1)
    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        for d in jsonl_docs:
            f.write(json.dumps({"text": d, "id": 1}, ensure_ascii=False) + "\n")
    (tmp_path / "b.txt").write_text("\n".join(t.strip() for t in text_lines) + "\n", encoding="utf-8")
    return tmp_path, jsonl_docs, text_lines


def test_trains_loadable_gpt2_files(inputs):
    tmp, jsonl_docs, text_lines = inputs
    out = tmp / "tok"
    r = run_tool("--input", tmp / "a.jsonl.gz", tmp / "b.txt", "--vocab-size", 320, "--min-frequency", 2,
                 "--output-dir", out, cwd=tmp)
    assert r.returncode == 0, r.stderr
    assert "documents" in r.stderr and "MB" in r.stderr and "elapsed" in r.stderr  # progress
    assert "trained vocab of 320 tokens (63 merges) from 300 documents" in r.stdout
    assert sorted(os.listdir(out)) == sorted(OUTPUTS)  # the temporary directory is gone
    assert open(out / "merges.txt", encoding="utf-8").readline() == "#version: 0.2\n"
    fast = GPT2BPETokenizer(str(out / "vocab.json"), str(out / "merges.txt"), fast=True)
    pure = GPT2BPETokenizer(str(out / "vocab.json"), str(out / "merges.txt"), fast=False)
    hf = HuggingFaceTokenizer(str(out / "tokenizer.json"))
    assert fast.vocab_size == hf.vocab_size == 320 and fast.vocab[EOD_TOKEN] == fast.eod == hf.eod
    docs = jsonl_docs + text_lines
    ids = fast.tokenize_batch(docs)
    assert ids == [pure.tokenize(d) for d in docs] == hf.tokenize_batch(docs)
    assert [fast.detokenize(i) for i in ids] == docs
    # The 63 merges were learned from these texts: they must shorten them well below one id per byte.
    assert sum(map(len, ids)) < 0.7 * sum(len(d.encode()) for d in docs)


def test_json_keys_and_too_small_vocab(inputs):
    tmp, _, _ = inputs
    with open(tmp / "c.jsonl", "w", encoding="utf-8") as f:
        f.write(json.dumps({"title": "the lover", "body": "a question of love"}) + "\n")
    r = run_tool("--input", tmp / "c.jsonl", "--json-keys", "title", "body", "--vocab-size", 270,
                 "--output-dir", tmp / "kv")
    assert r.returncode == 0, r.stderr
    assert "from 2 documents" in r.stdout and os.path.isfile(tmp / "kv" / "vocab.json")
    r = run_tool("--input", tmp / "c.jsonl", "--vocab-size", 300, "--output-dir", tmp / "bad")
    assert r.returncode == 1 and "c.jsonl:1: no key 'text'" in r.stderr and "--json-keys" in r.stderr
    r = run_tool("--input", tmp / "b.txt", "--vocab-size", 100, "--output-dir", tmp / "bad")
    assert r.returncode == 1 and "--vocab-size 100 is too small" in r.stderr
    assert not os.path.exists(tmp / "bad") or not os.listdir(tmp / "bad")


def test_bad_input_names_file_and_line(inputs):
    tmp, _, _ = inputs
    bad = tmp / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"text": "also fine"}\n{"text": "broken\n', encoding="utf-8")
    out = tmp / "out"
    r = run_tool("--input", tmp / "b.txt", bad, "--vocab-size", 300, "--output-dir", out)
    assert r.returncode == 1
    assert f"{bad}:4: malformed JSON" in r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert not any(os.path.exists(out / n) for n in OUTPUTS)

    # "\ud800" is valid JSON but no text (a lone surrogate); an escaped pair (line 2) is a real emoji.
    surrogate = tmp / "surrogate.jsonl"
    surrogate.write_text('{"text": "fine"}\n{"text": "\\ud83d\\ude00 ok"}\n{"text": "bad \\ud800 half"}\n',
                         encoding="utf-8")
    r = run_tool("--input", surrogate, "--vocab-size", 300, "--output-dir", out)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"{surrogate}:3: 'text' is not valid Unicode (surrogates not allowed at character 4)" in r.stderr
    assert not any(os.path.exists(out / n) for n in OUTPUTS)

    (tmp / "latin1.txt").write_bytes(b"caf\xe9\n")
    r = run_tool("--input", tmp / "latin1.txt", "--vocab-size", 300, "--output-dir", out)
    assert r.returncode == 1 and "latin1.txt:1: not valid UTF-8" in r.stderr and "Traceback" not in r.stderr

    r = run_tool("--input", tmp / "missing.jsonl", "--vocab-size", 300, "--output-dir", out)
    assert r.returncode == 1 and "missing.jsonl does not exist" in r.stderr and "Traceback" not in r.stderr

    (tmp / "data.csv").write_text("a,b\n", encoding="utf-8")
    r = run_tool("--input", tmp / "data.csv", "--vocab-size", 300, "--output-dir", out)
    assert r.returncode == 1 and "unsupported extension" in r.stderr
