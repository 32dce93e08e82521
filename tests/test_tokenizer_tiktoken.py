"""The tiktoken fast path: ids identical to HuggingFace's GPT2TokenizerFast (today's Megatron-LM) on the real
GPT-2 files and on a trained vocab, on real corpora and on generated Unicode including the code points
assigned in Unicode 17-18; the four exactness conditions, each failing one on its own, fall back to exact
merges with one warning; the rank table; the cached check."""
import json
import os
import random
import shutil
import unicodedata
import warnings

import numpy as np
import pytest
import regex

from megatron_lite.data import tiktoken_bpe
from megatron_lite.data.tokenizer import EOD_TOKEN, GPT2BPETokenizer, TokenizerWarning, bytes_to_unicode

from test_tokenizer import CORPORA, _corpus_slices


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg_cache"))


def vocab_pairs(shared_root, tokenizer_files):
    pairs = {"trained-2048": tokenizer_files[:2]}
    gpt2 = os.path.join(shared_root, "gpt2")
    if os.path.isdir(gpt2):
        pairs["gpt2"] = (os.path.join(gpt2, "gpt2-vocab.json"), os.path.join(gpt2, "gpt2-merges.txt"))
    return pairs


def hf_fast(tmp_path, vocab, merges):
    """HuggingFace's GPT2TokenizerFast on these files, as Megatron-LM builds GPT2BPETokenizer today."""
    from transformers import GPT2TokenizerFast
    d = tmp_path / f"hf_{os.path.basename(vocab)}"
    d.mkdir(exist_ok=True)
    shutil.copy(vocab, d / "vocab.json")
    shutil.copy(merges, d / "merges.txt")
    tok = GPT2TokenizerFast.from_pretrained(str(d))
    # split_special_tokens: raw <|endoftext|> is plain text, as in Megatron-LM's GPT2BPETokenizer
    return lambda texts: tok(texts, split_special_tokens=True)["input_ids"]


def recent_code_points():
    """Letters and digits the `regex` package (Unicode 18) knows and Python's tables (14.0) call
    unassigned: the code points added in Unicode 15-18, among them the ~17.5k of 17-18 that split
    differently under tiktoken's and `tokenizers`' Unicode 16 tables (e.g. U+10940)."""
    letter_or_digit = regex.compile(r"[\p{L}\p{N}]")
    return [chr(c) for c in range(0x300, 0x40000)
            if unicodedata.category(chr(c)) == "Cn" and letter_or_digit.match(chr(c))]


def generated_texts(n=400, seed=7):
    rng = random.Random(seed)
    recent = recent_code_points()
    assert "\U00010940" in recent and len(recent) > 17_480
    pool = ["'s", "'ll", " ", "  ", "\n", "\t", "the", " the", "1984", " 42", "!", "...", "é", "東京", "😀",
            "\u00a0", "\u3000", EOD_TOKEN, "e\u0301", "\U00010940", "\U00010940's"]
    out = ["\U00010940's", " \U00010940's", "x\U00010940'll 12"]
    for _ in range(n):
        parts = [rng.choice(recent) if rng.random() < 0.4 else rng.choice(pool) for _ in range(rng.randint(1, 12))]
        out.append("".join(parts))
    out += ["".join(chr(rng.choice([rng.randrange(0x20, 0x800), rng.randrange(0xE000, 0x40000)]))
                    for _ in range(rng.randint(1, 12))) for _ in range(n)]
    return out


def corpus_sample(root, chars):
    """The first `chars` characters of every corpus, as one list of documents."""
    return [d for docs in _corpus_slices(root, chars).values() for d in docs]


def test_ids_equal_gpt2_tokenizer_fast_on_sample_and_recent_unicode(tmp_path, shared_data, tokenizer_files):
    texts = generated_texts()
    docs = corpus_sample(shared_data, 60_000)
    pairs = vocab_pairs(shared_data, tokenizer_files)
    assert set(pairs) == {"gpt2", "trained-2048"}
    for name, (vocab, merges) in pairs.items():
        ours, reference = GPT2BPETokenizer(vocab, merges), hf_fast(tmp_path, vocab, merges)
        assert ours.backend == "tiktoken", name
        assert [ours.tokenize(t) for t in texts] == reference(texts), name
        assert [ours.tokenize(d) for d in docs] == reference(docs), name
        assert [ours.detokenize(ours.tokenize(t)) for t in texts] == texts
    # The legacy path really does split these texts differently (U+10940 is a letter in Unicode 18).
    vocab, merges = pairs["gpt2"]
    fast, legacy = GPT2BPETokenizer(vocab, merges), GPT2BPETokenizer(vocab, merges, fast=False)
    assert fast.tokenize("\U00010940's") != legacy.tokenize("\U00010940's")
    assert legacy.tokenize("\U00010940's")[-1] == legacy.vocab["'s"]


@pytest.mark.slow
def test_ids_equal_gpt2_tokenizer_fast_on_every_document(tmp_path, shared_data, tokenizer_files):
    """Every document of every ../shared/data corpus, both vocabularies (about a minute)."""
    docs = []
    for rel in CORPORA:
        with open(os.path.join(shared_data, rel), encoding="utf-8") as f:
            docs += [json.loads(line)["text"] for line in f]
    for name, (vocab, merges) in vocab_pairs(shared_data, tokenizer_files).items():
        ours, reference = GPT2BPETokenizer(vocab, merges), hf_fast(tmp_path, vocab, merges)
        for start in range(0, len(docs), 500):
            chunk = docs[start:start + 500]
            assert [ours.tokenize(d) for d in chunk] == reference(chunk), (name, start)


def test_rank_table(shared_data, tokenizer_files):
    pairs = vocab_pairs(shared_data, tokenizer_files)
    gpt2 = GPT2BPETokenizer(*pairs["gpt2"])
    assert gpt2._fast._rank_to_id is None  # OpenAI's ids are the ranks: no translation
    trained = GPT2BPETokenizer(*pairs["trained-2048"])
    rank_to_id = trained._fast._rank_to_id
    assert rank_to_id is not None and sorted(rank_to_id.tolist()) == sorted(set(range(2048)) - {trained.eod})
    table = bytes_to_unicode()
    order = tiktoken_bpe.gpt2_byte_order(table)
    assert order[:3] == [ord("!"), ord('"'), ord("#")] and order[-1] == 0xAD and sorted(order) == list(range(256))
    assert gpt2.vocab[table[order[5]]] == 5  # GPT-2's byte ids follow this order


def write_files(d, merges, extra_tokens=()):
    """A byte-level vocab (byte b has id b) plus the merges' results, <|endoftext|> last."""
    vocab = {sym: b for b, sym in bytes_to_unicode().items()}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    for t in extra_tokens:
        vocab.setdefault(t, len(vocab))
    vocab[EOD_TOKEN] = len(vocab)
    d.mkdir()
    (d / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (d / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return str(d / "vocab.json"), str(d / "merges.txt")


# Each fails exactly one condition; tiktoken would give other ids on the texts below.
FAILING = {
    # 2: 'abc' is made twice; tiktoken would rank it by one of the two merges only
    "made by merge": [("a", "b"), ("b", "c"), ("ab", "c"), ("a", "bc")],
    # 3: merge 1 uses 'bc' before merge 2 makes it
    "before a merge makes it": [("a", "bc"), ("b", "c")],
    # 4: merge-list BPE of 'abc' is ['ab', 'c'] ('ab' comes first and nothing merges 'ab c'), yet tiktoken
    # returns a pre-token found whole in its table as that token
    "not the token itself": [("a", "b"), ("b", "c"), ("a", "bc")],
}


@pytest.mark.parametrize("condition", list(FAILING))
def test_failed_condition_falls_back_to_exact_merges_with_one_warning(tmp_path, condition):
    vocab, merges = write_files(tmp_path / "tok", FAILING[condition])
    with pytest.warns(TokenizerWarning, match=condition) as caught:
        fast = GPT2BPETokenizer(vocab, merges)
    assert len(caught) == 1 and fast.backend == "exact-merges"
    pure = GPT2BPETokenizer(vocab, merges, fast=False)
    texts = ["abc", " abc abcabc", "babc cab", "aabbcc", "abcd\U00010940's"]
    reference = hf_fast(tmp_path, vocab, merges)
    for text, expected in zip(texts, reference(texts)):
        assert fast.tokenize(text) == expected == pure.tokenize(text) or "\U00010940" in text, text
        assert fast.tokenize(text) == expected
    with pytest.raises(ValueError, match="not valid Unicode"):
        fast.tokenize("abc\ud800")


def test_exact_files_take_tiktoken_silently_and_the_check_is_cached(tmp_path, tokenizer_files):
    vocab, merges = write_files(tmp_path / "tok", [("a", "b"), ("b", "c"), ("ab", "c")])
    cache = os.path.join(os.environ["XDG_CACHE_HOME"], "megatron_lite", "gpt2_bpe_checks")
    digest = tiktoken_bpe.files_digest(vocab, merges)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok = GPT2BPETokenizer(vocab, merges)
    assert tok.backend == "tiktoken" and tok.tokenize("abc abcc") == [tok.vocab["abc"], 32, tok.vocab["abc"], 99]
    assert json.load(open(os.path.join(cache, digest + ".json"))) == {"problems": []}
    # The cached verdict is what the next build reads (here: a planted one is obeyed).
    with open(os.path.join(cache, digest + ".json"), "w") as f:
        json.dump({"problems": ["planted"]}, f)
    with pytest.warns(TokenizerWarning, match="planted"):
        assert GPT2BPETokenizer(vocab, merges).backend == "exact-merges"


def test_numpy_ids_and_lone_surrogate(shared_data, tokenizer_files):
    for vocab, merges in vocab_pairs(shared_data, tokenizer_files).values():
        tok = GPT2BPETokenizer(vocab, merges)
        ids = tok.tokenize_to_numpy("Hello world, 東京 😀")
        assert ids.dtype == np.int64 and ids.tolist() == tok.tokenize("Hello world, 東京 😀")
        with pytest.raises(ValueError, match="not valid Unicode"):  # tiktoken itself would write U+FFFD
            tok.tokenize_to_numpy("a \ud800 b")


def test_second_build_comes_from_the_state_cache_with_the_same_ids_and_warnings(tmp_path):
    vocab, merges = write_files(tmp_path / "tok", [("a", "b"), ("b", "c"), ("ab", "c")])
    with open(merges, "a", encoding="utf-8") as f:
        f.write("a c")  # no final newline: Megatron-LM drops this merge, and we say so
    with pytest.warns(TokenizerWarning, match="does not end with a newline"):
        first = GPT2BPETokenizer(vocab, merges)
    with pytest.warns(TokenizerWarning, match="does not end with a newline"):  # said again from the cache
        second = GPT2BPETokenizer(vocab, merges)
    assert first._files is not None and second._files is None  # the files were not read
    text = "abc abcc ca"
    assert second.tokenize(text) == first.tokenize(text) and second.detokenize(second.tokenize(text)) == text
    assert second.vocab == first.vocab and second.eod == first.eod and second.vocab_size == first.vocab_size
