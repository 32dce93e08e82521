"""tools/preprocess_data.py run as a user runs it: a subprocess on real files in tmp_path."""

import gzip
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from megatron_lite.data.indexed_dataset import IndexedDataset
from megatron_lite.data.tokenizer import build_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "preprocess_data.py")
SUMMARY_KEYS = ("documents", "skipped", "tokens")

WORDS = ("the of and to in a is that it was he for on are as with his they at be this from have or "
         "by one had not but what all were when we there can an your which their said if do will each "
         "Æsop naïve café 東京 🙂 O'Brien don't 1984 3.14 -- ... \t").split(" ")


def run_tool(*args, check=True, **popen):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, TOOL, *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=120, **popen)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def summary(proc):
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("done:")][-1]
    fields = dict(f.split("=") for f in line.split()[1:])
    return {k: int(fields[k]) for k in SUMMARY_KEYS}


def tokenizer_args(tokenizer_files):
    vocab, merges, _ = tokenizer_files
    return ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", vocab, "--merge-file", merges]


def reference_tokenizer(tokenizer_files):
    vocab, merges, _ = tokenizer_files
    return build_tokenizer("GPT2BPETokenizer", vocab_file=vocab, merge_file=merges)


def random_text(rng, n_words):
    sep = rng.choice([" ", " ", " ", "\n", "  ", "\n\n"])
    return sep.join(rng.choice(WORDS) for _ in range(n_words))


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """2,500 short documents (more than one 1,024-line batch, so workers interleave), one empty."""
    rng = random.Random(0)
    texts = [random_text(rng, rng.randint(1, 40)) for _ in range(2500)]
    texts[17] = ""
    path = tmp_path_factory.mktemp("gen") / "gen.jsonl"
    write_jsonl(path, [{"text": t, "id": i} for i, t in enumerate(texts)])
    return str(path), texts


def read_documents(prefix):
    ds = IndexedDataset(prefix)
    return ds, [ds.document(d).tolist() for d in range(ds.num_documents)]


def expected_documents(tok, texts, append_eod):
    out = []
    for t in texts:
        ids = tok.tokenize(t)
        out.append(ids + [tok.eod] if append_eod and ids else ids)
    return out


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def test_generated_corpus_matches_tokenizer_for_any_worker_count(tmp_path, generated, tokenizer_files):
    path, texts = generated
    tok = reference_tokenizer(tokenizer_files)
    expected = expected_documents(tok, texts, append_eod=True)
    outputs = {}
    for workers, impl in ((1, "fast"), (2, "fast"), (2, "python")):
        prefix = tmp_path / f"w{workers}{impl}"
        proc = run_tool("--input", path, "--output-prefix", prefix, *tokenizer_args(tokenizer_files),
                        "--append-eod", "--workers", workers, "--tokenizer-impl", impl)
        assert summary(proc) == dict(documents=2500, skipped=0, tokens=sum(map(len, expected)))
        ds, docs = read_documents(f"{prefix}_text_document")
        assert ds.dtype == np.uint16  # 2048-token vocabulary
        assert docs == expected  # same ids, same order; the empty text is an empty document
        assert ds.document_indices[18] == ds.document_indices[17]
        outputs[(workers, impl)] = [read_bytes(f"{prefix}_text_document{e}") for e in (".bin", ".idx")]
    assert outputs[(1, "fast")] == outputs[(2, "fast")] == outputs[(2, "python")]
    assert sorted(os.listdir(tmp_path)) == sorted(f"w{w}{i}_text_document{e}" for w, i in outputs
                                                  for e in (".bin", ".idx"))


def test_tinyshakespeare_two_workers(tmp_path, shared_data, tokenizer_files):
    path = os.path.join(shared_data, "tinyshakespeare", "input.jsonl")
    with open(path, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    prefix = tmp_path / "shakespeare"
    proc = run_tool("--input", path, "--output-prefix", prefix, *tokenizer_args(tokenizer_files),
                    "--workers", 2, "--log-interval", 200)
    tok = reference_tokenizer(tokenizer_files)
    expected = expected_documents(tok, texts, append_eod=False)
    assert summary(proc)["documents"] == len(texts) == 498
    _, docs = read_documents(f"{prefix}_text_document")
    assert docs == expected
    # progress at least every 200 documents (checked after each batch of lines)
    progress = re.findall(r"processed (\d+) documents \([\d.]+ docs/s, [\d.]+ MB/s, \d+ tokens/s\), "
                          r"elapsed [\d.]+ s", proc.stderr)
    assert len(progress) >= 2 and int(progress[0]) >= 200


def test_gzip_input_gives_the_same_shards(tmp_path, generated, tokenizer_files):
    path, _ = generated
    gz = tmp_path / "gen.jsonl.gz"
    with open(path, "rb") as src, gzip.open(gz, "wb") as dst:
        dst.write(src.read())
    for name, source in (("plain", path), ("gz", gz)):
        run_tool("--input", source, "--output-prefix", tmp_path / name, *tokenizer_args(tokenizer_files))
    for ext in (".bin", ".idx"):
        assert read_bytes(tmp_path / f"plain_text_document{ext}") == read_bytes(tmp_path / f"gz_text_document{ext}")


def test_two_json_keys_make_two_shard_pairs(tmp_path, tokenizer_files):
    records = [{"text": f"body number {i} " * (i % 5), "title": f"Title {i}"} for i in range(30)]
    path = tmp_path / "two.jsonl"
    write_jsonl(path, records)
    run_tool("--input", path, "--output-prefix", tmp_path / "out", "--json-keys", "text", "title",
             "--append-eod", *tokenizer_args(tokenizer_files))
    tok = reference_tokenizer(tokenizer_files)
    for key in ("text", "title"):
        _, docs = read_documents(str(tmp_path / f"out_{key}_document"))
        assert docs == expected_documents(tok, [r[key] for r in records], append_eod=True)


BAD_LINES = [
    '{"text": "good one"}',
    '{"text": "unterminated',           # line 2: malformed JSON
    '["a", "list"]',                     # line 3: not an object
    '{"body": "no text key"}',           # line 4: missing key
    '{"text": 42}',                      # line 5: not a string
    '{"text": "bad \\ud800 half"}',      # line 6: valid JSON, but a lone surrogate is no text
    '{"text": "good two"}',
]


def test_bad_lines_are_reported_with_file_and_line_and_skipped(tmp_path, tokenizer_files):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(BAD_LINES) + "\n", encoding="utf-8")
    proc = run_tool("--input", path, "--output-prefix", tmp_path / "out", *tokenizer_args(tokenizer_files))
    for lineno, words in ((2, "malformed JSON"), (3, "not a JSON object"), (4, "missing key 'text'"),
                          (5, "value of key 'text' is not a string (got int)"),
                          (6, "value of key 'text' is not valid Unicode (surrogates not allowed")):
        assert f"{path}:{lineno}: {words}" in proc.stderr
    assert f"{path}:1:" not in proc.stderr and f"{path}:7:" not in proc.stderr
    tok = reference_tokenizer(tokenizer_files)
    good_tokens = len(tok.tokenize("good one")) + len(tok.tokenize("good two"))
    assert summary(proc) == dict(documents=2, skipped=5, tokens=good_tokens)
    _, docs = read_documents(str(tmp_path / "out_text_document"))
    assert docs == [tok.tokenize("good one"), tok.tokenize("good two")]

    strict = run_tool("--input", path, "--output-prefix", tmp_path / "strict", "--strict", "--workers", 2,
                      *tokenizer_args(tokenizer_files), check=False)
    assert strict.returncode == 1
    assert f"{path}:2: malformed JSON" in strict.stderr and "Traceback" not in strict.stderr
    assert not any(n.startswith("strict") for n in os.listdir(tmp_path))  # not even temporaries


def test_bad_setup_gives_one_clear_message(tmp_path, generated, tokenizer_files):
    path, _ = generated
    vocab, merges, _ = tokenizer_files
    broken = tmp_path / "broken_vocab.json"
    broken.write_text("{not json", encoding="utf-8")
    truncated = tmp_path / "cut.jsonl.gz"
    with open(path, "rb") as src:
        truncated.write_bytes(gzip.compress(src.read())[:20000])
    cases = {
        "missing vocab": (["--vocab-file", tmp_path / "nope.json", "--merge-file", merges, "--input", path,
                           "--output-prefix", tmp_path / "o"], ["--vocab-file", "nope.json", "no such file"]),
        "malformed vocab": (["--vocab-file", broken, "--merge-file", merges, "--input", path,
                             "--output-prefix", tmp_path / "o"], ["broken_vocab.json"]),
        "missing input": (["--vocab-file", vocab, "--merge-file", merges, "--input", tmp_path / "none.jsonl",
                           "--output-prefix", tmp_path / "o"], ["--input", "none.jsonl", "no such file"]),
        "no output dir": (["--vocab-file", vocab, "--merge-file", merges, "--input", path,
                           "--output-prefix", tmp_path / "missing" / "o"], ["--output-prefix", "does not exist"]),
        "truncated gzip": (["--vocab-file", vocab, "--merge-file", merges, "--input", truncated, "--workers", 2,
                            "--output-prefix", tmp_path / "o"], ["--input", "cut.jsonl.gz", "could not read it"]),
    }
    for name, (args, words) in cases.items():
        proc = run_tool("--tokenizer-type", "GPT2BPETokenizer", *args, check=False)
        assert proc.returncode != 0, name
        assert "Traceback" not in proc.stderr, (name, proc.stderr)
        assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, (name, proc.stderr)
        for w in words:
            assert w in proc.stderr, (name, proc.stderr)
    assert sorted(os.listdir(tmp_path)) == ["broken_vocab.json", "cut.jsonl.gz"]  # no output, no temporaries


@pytest.fixture(scope="module")
def large_input(tmp_path_factory):
    """About 6 MB of text: several seconds of pure-Python tokenization, so a signal lands mid-run."""
    rng = random.Random(1)
    path = tmp_path_factory.mktemp("large") / "large.jsonl"
    write_jsonl(path, [{"text": random_text(rng, 400)} for _ in range(3000)])
    return str(path)


def start_and_signal(tmp_path, large_input, tokenizer_files, workers, sig):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, TOOL, "--input", large_input, "--output-prefix",
                             str(tmp_path / "big"), *tokenizer_args(tokenizer_files), "--workers", str(workers),
                             "--tokenizer-impl", "python", "--log-interval", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    first = proc.stderr.readline()  # the first progress line: tokens are being written now
    assert first.startswith("processed"), first
    assert any(".tmp-" in n for n in os.listdir(tmp_path))
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out, err


@pytest.mark.timeout(120)
def test_ctrl_c_removes_everything(tmp_path, large_input, tokenizer_files):
    rc, out, err = start_and_signal(tmp_path, large_input, tokenizer_files, workers=2, sig=signal.SIGINT)
    assert rc == 130 and "done:" not in out, (rc, err[-2000:])
    assert "interrupted" in err and "Traceback" not in err
    time.sleep(0.2)
    assert os.listdir(tmp_path) == []


@pytest.mark.timeout(120)
def test_sigkill_leaves_no_complete_looking_pair(tmp_path, large_input, tokenizer_files):
    rc, out, _ = start_and_signal(tmp_path, large_input, tokenizer_files, workers=1, sig=signal.SIGKILL)
    assert rc == -signal.SIGKILL and "done:" not in out
    names = os.listdir(tmp_path)
    assert not any(n.endswith((".bin", ".idx")) for n in names), names
    assert names and all(".tmp-" in n for n in names)  # only temporaries, which nothing reads


def test_null_tokenizer_and_a_text_it_rejects(tmp_path):
    path = tmp_path / "ints.jsonl"
    write_jsonl(path, [{"text": "1 2 3"}, {"text": "one two"}, {"text": "7"}])
    proc = run_tool("--input", path, "--output-prefix", tmp_path / "ints", "--tokenizer-type", "NullTokenizer",
                    "--vocab-size", 100, "--append-eod")
    assert f"{path}:2: key 'text' could not be tokenized" in proc.stderr
    assert summary(proc) == dict(documents=2, skipped=1, tokens=6)
    ds, docs = read_documents(str(tmp_path / "ints_text_document"))
    eod = build_tokenizer("NullTokenizer", vocab_size=100).eod
    assert docs == [[1, 2, 3, eod], [7, eod]] and ds.dtype == np.uint16


# -- the tiktoken default path: Megatron-LM's shards, start-up ------------------------------------
def megatron_shards(prefix, docs_ids, eod, dtype):
    """The .bin/.idx Megatron-LM's preprocess_data.py writes for these ids with --append-eod: each
    non-empty document one sequence ending in eod, an empty one a document of no sequence."""
    from megatron_lite.data.indexed_dataset import IndexedDatasetBuilder, data_file_path, index_file_path
    builder = IndexedDatasetBuilder(data_file_path(prefix), dtype)
    for ids in docs_ids:
        ids = list(ids) + [eod] if ids else []
        builder.add_document(np.asarray(ids, dtype=dtype), [len(ids)] if ids else [])
    builder.finalize(index_file_path(prefix))
    return [read_bytes(f"{prefix}{e}") for e in (".bin", ".idx")]


def test_gpt2_shards_byte_identical_to_megatron_for_both_implementations(tmp_path, shared_data):
    """Default path: ids of HuggingFace's GPT2TokenizerFast (today's Megatron-LM); --tokenizer-impl
    python: ids of the legacy gpt2_tokenization.py (transcribed in test_tokenizer.py). Real GPT-2 files,
    real documents plus text with a Unicode 18 letter, an empty document, two workers."""
    from test_tokenizer import MegatronGPT2Reference
    from test_tokenizer_tiktoken import hf_fast
    vocab = os.path.join(shared_data, "gpt2", "gpt2-vocab.json")
    merges = os.path.join(shared_data, "gpt2", "gpt2-merges.txt")
    with open(os.path.join(shared_data, "lambada", "lambada_test.jsonl"), encoding="utf-8") as f:
        texts = [json.loads(next(f))["text"] for _ in range(1500)]
    texts[3:3] = ["", "\U00010940's and \U00010940'll", "plain <|endoftext|> text"]
    path = tmp_path / "docs.jsonl"
    write_jsonl(path, [{"text": t} for t in texts])
    legacy = MegatronGPT2Reference(vocab, merges)
    expected = {"fast": hf_fast(tmp_path, vocab, merges)(texts), "python": [legacy.encode(t) for t in texts]}
    assert expected["fast"] != expected["python"]  # the Unicode 18 letter splits differently
    for impl, ids in expected.items():
        reference = megatron_shards(str(tmp_path / f"megatron_{impl}"), ids, 50256, np.uint16)
        run_tool("--input", path, "--output-prefix", tmp_path / impl, "--tokenizer-type", "GPT2BPETokenizer",
                 "--vocab-file", vocab, "--merge-file", merges, "--append-eod", "--workers", 2,
                 "--tokenizer-impl", impl)
        ours = [read_bytes(tmp_path / f"{impl}_text_document{e}") for e in (".bin", ".idx")]
        assert ours == reference, impl


def test_start_up_is_light_and_a_lost_merge_is_said_once(tmp_path, tokenizer_files):
    """No torch; under a second of CPU for a one-line input (load-independent, unlike wall time); a
    merges.txt without its final newline is one warning line even with two workers."""
    import resource
    vocab, merges, _ = tokenizer_files
    unended = tmp_path / "merges.txt"
    unended.write_text(open(merges, encoding="utf-8").read().rstrip("\n"), encoding="utf-8")
    path = tmp_path / "one.jsonl"
    write_jsonl(path, [{"text": "Once upon a time."}])
    # The tool as __main__ (its pool pickles functions by that name), then a look at what it imported.
    probe = ("import atexit, runpy, sys; sys.argv = sys.argv[1:]; "
             "atexit.register(lambda: print('torch imported:', 'torch' in sys.modules)); "
             "runpy.run_path(sys.argv[0], run_name='__main__')")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, "-c", probe, TOOL, "--input", str(path), "--output-prefix",
                           str(tmp_path / "one"), "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", vocab,
                           "--merge-file", str(unended), "--workers", "2"], capture_output=True, text=True,
                          timeout=120)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert proc.returncode == 0, proc.stderr
    assert "torch imported: False" in proc.stdout
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert cpu < 1.0, cpu
    warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "does not end with a newline" in warnings[0], proc.stderr
    assert "Traceback" not in proc.stderr and "TokenizerWarning" not in proc.stderr


def _peak_rss_mb(tmp_path, input_path, tokenizer_files, workers):
    """Peak resident memory (MB) of the tool and its workers, measured by a wrapper process of its own."""
    wrapper = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)")
    out = subprocess.run([sys.executable, "-c", wrapper, sys.executable, TOOL, "--input", str(input_path),
                          "--output-prefix", str(tmp_path / f"rss_{os.path.basename(str(input_path))}_{workers}"),
                          *tokenizer_args(tokenizer_files), "--append-eod", "--workers", str(workers)],
                         capture_output=True, text=True, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return float(out.stdout.strip())


def test_memory_stays_bounded_as_the_input_grows(tmp_path, tokenizer_files):
    """Streamed: eight times the input (12 MB) costs no more than a few MB of extra peak memory."""
    line = json.dumps({"text": random_text(random.Random(5), 500)}) + "\n"
    small, big = tmp_path / "small.jsonl", tmp_path / "big.jsonl"
    small.write_text(line * (1_500_000 // len(line)))
    big.write_text(line * (12_000_000 // len(line)))
    for workers in (1, 2):
        grown = _peak_rss_mb(tmp_path, big, tokenizer_files, workers) - _peak_rss_mb(tmp_path, small, tokenizer_files, workers)
        assert grown < 6, (workers, grown)  # the input alone grew by 10.5 MB
