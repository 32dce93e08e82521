"""Tokenizers: hand-checked BPE on a handmade vocab, fast == pure-Python on real corpora and on generated
Unicode, both == an independent transcription of Megatron-LM's GPT-2 encoder, HuggingFace tokenizer.json
parity, Null tokenizer, errors that name the file.

The fast path (tiktoken) and the pure-Python path split text with regex engines of different Unicode
versions (16 and the `regex` package's 18): where ids differ, the text must hold a code point that
Python's own (older) Unicode tables call unassigned. tests/test_tokenizer_tiktoken.py proves the fast
path against HuggingFace's GPT2TokenizerFast on exactly such text.
"""
import json
import os
import pickle
import random
import unicodedata
import warnings

import numpy as np
import pytest
import regex
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron_lite.config import DataConfig
from megatron_lite.data.tokenizer import (EOD_TOKEN, GPT2_SPLIT_PATTERN, GPT2BPETokenizer, HuggingFaceTokenizer,
                                          NullTokenizer, TokenizerError, TokenizerWarning, build_tokenizer,
                                          build_tokenizer_from_config, bytes_to_unicode,
                                          load_gpt2_merges)


def has_recent_code_point(text):
    """True when `text` holds a code point unassigned in this Python's Unicode tables (14.0 for 3.11):
    the only place where the fast path's Unicode 16 split may differ from the `regex` package's."""
    return any(unicodedata.category(c) == "Cn" for c in text)


def assert_same_or_recent(fast_ids, pure_ids, text):
    assert fast_ids == pure_ids or has_recent_code_point(text), repr(text)

# ---------------------------------------------------------------------------------------------
# A handmade vocabulary: byte b has id b (in GPT-2's symbol spelling), then six merges in rank order.
MERGES = [("l", "o"), ("lo", "w"), ("e", "r"), ("Ġ", "low"), ("low", "er"), ("Ġlow", "er"), ("o", "o")]
LO, LOW, ER, SP_LOW, LOWER, SP_LOWER, OO = range(256, 263)
EOD_ID = 263


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_bpe")
    vocab = {sym: b for b, sym in bytes_to_unicode().items()}
    for i, (a, b) in enumerate(MERGES):
        vocab[a + b] = 256 + i
    vocab[EOD_TOKEN] = EOD_ID
    (d / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (d / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES), encoding="utf-8")
    return str(d / "vocab.json"), str(d / "merges.txt")


@pytest.fixture(scope="module", params=[True, False], ids=["fast", "pure"])
def tiny(request, tiny_files):
    return GPT2BPETokenizer(*tiny_files, fast=request.param)


@pytest.mark.parametrize("text, expected", [
    # l o w e r -> lo w e r -> low e r -> low er -> lower (the e-r merge waits for rank 2)
    ("lower", [LOWER]),
    # Ġ l o w e r: lo, low, then er (rank 2) before Ġ+low (rank 3), then Ġlow, then Ġlow+er
    (" lower", [SP_LOWER]),
    ("lowest", [LOW, ord("e"), ord("s"), ord("t")]),
    # one merge rank is applied to all non-overlapping occurrences, left to right
    ("ooo", [OO, ord("o")]),
    ("oooo", [OO, OO]),
    # the regex split stops merges across pieces: "low" and " lower" are separate words
    ("low lower", [LOW, SP_LOWER]),
    # bytes without merges are their own ids; a space is the symbol Ġ (byte 32)
    (" ", [32]),
    ("é", [0xC3, 0xA9]),
    ("😀", [0xF0, 0x9F, 0x98, 0x80]),
    # raw <|endoftext|> is plain text in Megatron-LM's GPT2BPETokenizer, never the eod id
    (EOD_TOKEN, list(EOD_TOKEN.encode())),
])
def test_handmade_merges(tiny, text, expected):
    assert tiny.tokenize(text) == expected
    assert tiny.detokenize(expected) == text


def test_handmade_interface(tiny):
    assert tiny.vocab_size == 264 and tiny.eod == EOD_ID
    assert tiny.detokenize([EOD_ID]) == EOD_TOKEN
    assert tiny.inv_vocab[LOWER] == "lower" and tiny.vocab["Ġlower"] == SP_LOWER
    assert tiny.tokenize_batch(["lower", "", " lower ooo"]) == [[LOWER], [], [SP_LOWER, 32, OO, ord("o")]]
    assert tiny.tokenize_batch([]) == []
    # numpy ids decode; half an emoji decodes to U+FFFD as Megatron-LM's errors="replace" does
    assert tiny.detokenize(np.array([LOW, ER], dtype=np.int64)) == "lower"
    assert tiny.detokenize([0xF0, 0x9F]) == "\ufffd"
    with pytest.raises(ValueError, match="token id 9999"):
        tiny.detokenize([1, 9999])


def test_bytes_to_unicode_is_gpt2_table():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert table[ord("A")] == "A" and table[32] == "Ġ" and table[10] == "Ċ" and table[0] == "Ā"
    assert table[0xA0] == "ł" and table[0xAD] == "Ń" and table[0xFF] == "ÿ"
    assert not any(c.isspace() for c in table.values())


@pytest.mark.parametrize("text, pieces", [
    ("I'll  go!", ["I", "'ll", " ", " go", "!"]),
    ("Hello world\n\n", ["Hello", " world", "\n\n"]),
    ("a 123 4.5", ["a", " 123", " 4", ".", "5"]),
    ("it's they're we've I'm he'd", ["it", "'s", " they", "'re", " we", "'ve", " I", "'m", " he", "'d"]),
    ("x   y", ["x", "  ", " y"]),
    ("end.   ", ["end", ".", "   "]),
    ("<|endoftext|>", ["<|", "endoftext", "|>"]),
    ("日本語 text", ["日本語", " text"]),
])
def test_gpt2_regex_split(text, pieces):
    assert regex.findall(GPT2_SPLIT_PATTERN, text) == pieces


# ---------------------------------------------------------------------------------------------
# Fast (tokenizers) and pure-Python paths on the committed fixture.
@pytest.fixture(scope="module")
def both(request):
    vocab, merges, _ = request.getfixturevalue("tokenizer_files")
    return GPT2BPETokenizer(vocab, merges, fast=True), GPT2BPETokenizer(vocab, merges, fast=False)


def _corpus_texts(root):
    """Whole tinyshakespeare, and about 300 KB of every other corpus (bounded to keep the test quick)."""
    with open(os.path.join(root, "tinyshakespeare", "input.txt"), encoding="utf-8") as f:
        texts = {"tinyshakespeare": f.read()}
    for rel in ("wikitext-2/valid.jsonl", "wikitext-2/test.jsonl", "lambada/lambada_test.jsonl",
                "gutenberg/gutenberg.jsonl"):
        docs, size = [], 0
        with open(os.path.join(root, rel), encoding="utf-8") as f:
            for line in f:
                docs.append(json.loads(line)["text"][:300_000 - size])
                size += len(docs[-1])
                if size >= 300_000:
                    break
        texts[rel] = docs
    return texts


def test_fast_equals_pure_on_corpora(both, shared_data):
    fast, pure = both
    for name, text in _corpus_texts(shared_data).items():
        docs = [text] if isinstance(text, str) else text
        ids_fast = fast.tokenize_batch(docs)
        assert ids_fast == [pure.tokenize(d) for d in docs], name
        assert [fast.detokenize(i) for i in ids_fast] == docs, name
        n_tokens, n_chars = sum(map(len, ids_fast)), sum(map(len, docs))
        assert n_chars / 6 < n_tokens < n_chars / 2, name  # a trained BPE compresses English 2-6x


def test_hf_tokenizer_json_matches_gpt2_files(both, tokenizer_files, shared_data):
    fast, _ = both
    hf = HuggingFaceTokenizer(tokenizer_files[2])
    assert (hf.vocab_size, hf.eod) == (fast.vocab_size, fast.eod) == (2048, 0)
    assert hf.vocab == fast.vocab
    for name, text in _corpus_texts(shared_data).items():
        docs = [text[:300_000]] if isinstance(text, str) else text[:20]
        assert hf.tokenize_batch(docs) == fast.tokenize_batch(docs), name
        assert hf.detokenize(hf.tokenize(docs[0])) == docs[0]


def test_fixture_files(both, tokenizer_files):
    fast, pure = both
    assert sum(os.path.getsize(p) for p in tokenizer_files) < 300_000
    assert fast.vocab_size == 2048 and fast.eod == 0
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n"
    assert fast.tokenize(text) == pure.tokenize(text)
    assert len(fast.tokenize(text)) < len(text) / 2.5
    hf = HuggingFaceTokenizer(tokenizer_files[2])
    assert hf.tokenize(text) == fast.tokenize(text)
    # HuggingFace semantics: a special token written in text is recognised (GPT2BPETokenizer: plain text)
    assert hf.tokenize("a" + EOD_TOKEN) == hf.tokenize("a") + [hf.eod]
    assert fast.eod not in fast.tokenize("a" + EOD_TOKEN)


EDGE_PIECES = [EOD_TOKEN, "<|", "|>", "😀", "👩\u200d👩\u200d👧", "🇺🇸", "日本語", "中文字符", "한국어",
               "e\u0301", "a\u0308\u0323", "\u0301", "  ", "\t\n", "\n\n\n", " \u00a0\u3000", "\x00",
               "\x1c\x1f", "\x7f\x85", "\u2028", "\ufeff", "'s", "'ll", " 'll", "I'm",
               "123", "٣٤", "½", "\r\n", "ﬁ", "\U0001f9ea"]
TEXTS = st.lists(st.one_of(st.text(max_size=12), st.sampled_from(EDGE_PIECES)), max_size=16).map("".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXTS)
def test_fast_equals_pure_on_unicode(both, text):
    fast, pure = both
    ids = fast.tokenize(text)
    assert_same_or_recent(ids, pure.tokenize(text), text)
    assert fast.detokenize(ids) == text and pure.detokenize(pure.tokenize(text)) == text


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(TEXTS, max_size=6))
def test_tokenize_batch_equals_tokenize(both, texts):
    fast, pure = both
    assert fast.tokenize_batch(texts) == [fast.tokenize(t) for t in texts]
    assert pure.tokenize_batch(texts) == [pure.tokenize(t) for t in texts]


def test_pickle_round_trip(both, tokenizer_files):
    text = "Now is the winter of our discontent 😀"
    for tok in (*both, HuggingFaceTokenizer(tokenizer_files[2]), NullTokenizer(10)):
        sample = "1 2 9" if isinstance(tok, NullTokenizer) else text
        clone = pickle.loads(pickle.dumps(tok))
        assert type(clone) is type(tok) and clone.tokenize(sample) == tok.tokenize(sample)
        assert (clone.vocab_size, clone.eod) == (tok.vocab_size, tok.eod)


# ---------------------------------------------------------------------------------------------
# An independent reference: Megatron-LM's GPT2Tokenizer (megatron/training/tokenizer/gpt2_tokenization.py,
# reached through its GPT2BPETokenizer) transcribed step by step. It shares no code with megatron_lite:
# its own byte table, its own copy of the split pattern, the `while True` min-rank loop with a cache,
# unknown symbols mapped to id 0, and the merges file read exactly as Megatron reads it (files are
# opened as UTF-8 here; Megatron opens vocab.json with the locale's encoding, UTF-8 on Linux).
#
# merges.txt is read as Megatron reads it, `read().split('\n')[1:-1]`: the first and the last line are
# dropped unconditionally; megatron_lite warns where that loses a merge (no header, no final newline).
def _ref_bytes_to_unicode():
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    bs, cs, n = printable[:], printable[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _ref_get_pairs(word):
    return {(a, b) for a, b in zip(word, word[1:])}


class MegatronGPT2Reference:
    PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

    def __init__(self, vocab_file, merges_file):
        with open(vocab_file, encoding="utf-8") as f:
            self.encoder = json.load(f)
        with open(merges_file, encoding="utf-8") as f:
            bpe_data = f.read().split("\n")[1:-1]
        bpe_merges = [tuple(merge.split()) for merge in bpe_data]
        self.bpe_ranks = dict(zip(bpe_merges, range(len(bpe_merges))))
        self.byte_encoder = _ref_bytes_to_unicode()
        self.pat = regex.compile(self.PATTERN)
        self.cache = {}

    def bpe(self, token):
        if token in self.cache:
            return self.cache[token]
        word = tuple(token)
        pairs = _ref_get_pairs(word)
        if not pairs:
            return token
        while True:
            bigram = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            new_word, i = [], 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    new_word.extend(word[i:])
                    break
                new_word.extend(word[i:j])
                i = j
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    new_word.append(first + second)
                    i += 2
                else:
                    new_word.append(word[i])
                    i += 1
            word = tuple(new_word)
            if len(word) == 1:
                break
            pairs = _ref_get_pairs(word)
        word = " ".join(word)
        self.cache[token] = word
        return word

    def encode(self, text):
        tokens = []
        for token in regex.findall(self.pat, text):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            tokens.extend(self.bpe(token).split(" "))
        return [self.encoder.get(t, 0) for t in tokens]


@pytest.fixture(scope="module")
def megatron_ref(request):
    vocab, merges, _ = request.getfixturevalue("tokenizer_files")
    return MegatronGPT2Reference(vocab, merges)


def test_reference_reproduces_hand_checked_merges(tiny_files):
    """The transcription itself against the hand-worked table above (tiny_files has the header and the
    final newline, so Megatron's way of reading keeps every merge)."""
    ref = MegatronGPT2Reference(*tiny_files)
    assert ref.bpe_ranks == {pair: rank for rank, pair in enumerate(MERGES)}
    assert ref.byte_encoder == bytes_to_unicode()
    assert ref.encode("lower") == [LOWER] and ref.encode(" lower") == [SP_LOWER]
    assert ref.encode("ooo lowest") == [OO, ord("o"), SP_LOW, ord("e"), ord("s"), ord("t")]
    assert ref.encode("😀") == [0xF0, 0x9F, 0x98, 0x80] and ref.encode(EOD_TOKEN) == list(EOD_TOKEN.encode())


def test_fixture_merges_read_the_same_as_megatron(megatron_ref, tokenizer_files):
    """The known difference in reading merges.txt cannot bite the fixture: header first, one final newline."""
    with open(tokenizer_files[1], encoding="utf-8") as f:
        raw = f.read()
    assert raw.startswith("#version") and raw.endswith("\n") and not raw.endswith("\n\n")
    ours = load_gpt2_merges(tokenizer_files[1])
    assert len(ours) == 2048 - 257  # every id past the 256 bytes and <|endoftext|> is one merge
    assert megatron_ref.bpe_ranks == {pair: rank for rank, pair in enumerate(ours)}


@pytest.mark.parametrize("fast", [True, False])
def test_merges_read_as_megatron_with_a_warning_where_a_merge_is_lost(tmp_path, tiny_files, fast):
    """Without a header Megatron drops the first merge, without the final newline the last one: so do
    we (same ids), and a TokenizerWarning names the lost line."""
    vocab, _ = tiny_files
    bare = tmp_path / "merges.txt"
    bare.write_text("".join(f"{a} {b}\n" for a, b in MERGES), encoding="utf-8")
    with pytest.warns(TokenizerWarning, match="first line 'l o' is not a '#version' header"):
        ours = GPT2BPETokenizer(vocab, str(bare), fast=fast)
    ref = MegatronGPT2Reference(vocab, str(bare))
    assert ("l", "o") not in ref.bpe_ranks and ("l", "o") not in ours.bpe_ranks
    assert ours.tokenize("lower ooo") == ref.encode("lower ooo")
    unended = tmp_path / "unended.txt"
    unended.write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in MERGES), encoding="utf-8")
    with pytest.warns(TokenizerWarning, match="does not end with a newline: its last line 'o o' is dropped"):
        ours = GPT2BPETokenizer(vocab, str(unended), fast=fast)
    ref = MegatronGPT2Reference(vocab, str(unended))
    assert ours.tokenize("ooo lower") == ref.encode("ooo lower") == [ord("o")] * 3 + [SP_LOWER]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a well-formed file says nothing
        GPT2BPETokenizer(*tiny_files, fast=fast)


CORPORA = ("tinyshakespeare/input.jsonl", "wikitext-2/valid.jsonl", "wikitext-2/test.jsonl",
           "lambada/lambada_test.jsonl", "gutenberg/gutenberg.jsonl")


def _corpus_slices(root, chars=300_000):
    """The first `chars` characters of every JSONL corpus (whole documents, the last one cut)."""
    slices = {}
    for rel in CORPORA:
        docs, size = [], 0
        with open(os.path.join(root, rel), encoding="utf-8") as f:
            for line in f:
                docs.append(json.loads(line)["text"][:chars - size])
                size += len(docs[-1])
                if size >= chars:
                    break
        slices[rel] = docs
    return slices


def test_ids_equal_megatron_reference_on_corpora(both, megatron_ref, shared_data):
    fast, pure = both
    for name, docs in _corpus_slices(shared_data).items():
        expected = [megatron_ref.encode(d) for d in docs]
        assert sum(map(len, expected)) > 300_000 / 6, name
        assert 0 not in {i for ids in expected for i in ids}, name  # Megatron's id for an unknown symbol
        assert fast.tokenize_batch(docs) == expected, name
        assert [pure.tokenize(d) for d in docs] == expected, name


# Strings at the edges of the split pattern and of the byte table: contractions (lower case only: the
# pattern has no IGNORECASE), whitespace runs before words and at the end, Unicode spaces, controls,
# combining marks, emoji sequences, digits of other scripts, letters assigned in Unicode 14 and 15.
EDGE_STRINGS = ["", " ", "  ", "   x", "x   ", "a  b", "\t\tx", " \t x", "\n", "\n\n\n", "\r\n", "a\r\nb",
                "it's", "IT'S", "I'LL", "'''", "can't've", "'s'", " 's", "don''t", "x 'll",
                "12345", " 2024", "3.14159", "1,000,000", "٣٤٥", "½¾", "²³", "Ⅻ",
                "\u00a0x", "x\u00a0", " \u3000 x", "\u2028\u2029", "\u200b", "\u200d", "\ufeffx",
                "\x00\x01\x7f", "\x85x", "e\u0301", "\u0301\u0301", "a\u0308\u0323b", "😀😀",
                "👩\u200d👩\u200d👧", "🇺🇸🇬🇧", "日本語のテキスト", "한국어 텍스트", "Ελληνικά", "עברית",
                "العربية", "हिन्दी", "\U00010570\U00010571", " \U0001e4d0\U0001e4d1", "\U00011f04\U00011f05",
                "\U0001fae8", "\ue000\U000f0000", EOD_TOKEN, f" {EOD_TOKEN}\n", "ÿþ\xad\xa0",
                "First Citizen:\nBefore we proceed any further, hear me speak.\n",
                "the the the the", " the\n\nthe  the   the"]


def _generated_edge_strings(n=300, seed=1234):
    """EDGE_STRINGS, pairwise joins of them, seeded random mixes with common words, and random code
    points across the planes (surrogates excluded: they are not text)."""
    rng = random.Random(seed)
    pool = EDGE_STRINGS + ["the", " the", "Citizen", " and", "ing", " you", "'d", "!", "?\n", "  ", "\n"]
    out = list(EDGE_STRINGS) + [a + b for a in EDGE_STRINGS[:24] for b in EDGE_STRINGS[24:48]]
    out += ["".join(rng.choice(pool) for _ in range(rng.randint(1, 10))) for _ in range(n)]
    out += ["".join(chr(rng.choice([rng.randrange(0x20, 0x800), rng.randrange(0xE000, 0x30000)]))
                    for _ in range(rng.randint(1, 12))) for _ in range(n)]
    return out


def test_ids_equal_megatron_reference_on_edge_cases(both, megatron_ref):
    fast, pure = both
    texts = _generated_edge_strings()
    expected = [megatron_ref.encode(t) for t in texts]
    for text, ids, fast_ids in zip(texts, expected, fast.tokenize_batch(texts)):
        assert pure.tokenize(text) == ids, repr(text)
        assert_same_or_recent(fast_ids, ids, text)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXTS)
def test_ids_equal_megatron_reference_on_unicode(both, megatron_ref, text):
    fast, pure = both
    expected = megatron_ref.encode(text)
    assert pure.tokenize(text) == expected
    assert_same_or_recent(fast.tokenize(text), expected, text)


# ---------------------------------------------------------------------------------------------
def test_null_tokenizer():
    tok = NullTokenizer(100)
    assert (tok.vocab_size, tok.eod) == (100, 99)
    assert tok.tokenize(" 3 14\t15\n92 ") == [3, 14, 15, 92] and tok.tokenize("") == []
    assert tok.detokenize([3, 14]) == "3 14" and tok.tokenize_batch(["1", "2 3"]) == [[1], [2, 3]]
    assert tok.vocab["99"] == 99 and tok.inv_vocab[5] == "5"
    with pytest.raises(ValueError, match="outside"):
        tok.tokenize("100")
    with pytest.raises(ValueError, match="integers"):
        tok.tokenize("a b")


def test_build_tokenizer(tokenizer_files):
    vocab, merges, tj = tokenizer_files
    assert isinstance(build_tokenizer("GPT2BPETokenizer", vocab_file=vocab, merge_file=merges), GPT2BPETokenizer)
    assert not build_tokenizer("GPT2BPETokenizer", vocab_file=vocab, merge_file=merges, fast=False).fast
    assert build_tokenizer("HuggingFaceTokenizer", tokenizer_model=tj).eod == 0
    assert build_tokenizer("NullTokenizer", vocab_size=7).eod == 6
    cfg = DataConfig(tokenizer_type="GPT2BPETokenizer", vocab_file=vocab, merge_file=merges)
    assert build_tokenizer_from_config(cfg).vocab_size == 2048
    assert build_tokenizer_from_config(DataConfig(tokenizer_type="NullTokenizer"), vocab_size=5).vocab_size == 5
    for kwargs, flag in ((dict(vocab_file=vocab), "--merge-file"), (dict(merge_file=merges), "--vocab-file")):
        with pytest.raises(TokenizerError, match=flag):
            build_tokenizer("GPT2BPETokenizer", **kwargs)
    with pytest.raises(TokenizerError, match="--tokenizer-model"):
        build_tokenizer("HuggingFaceTokenizer")
    with pytest.raises(TokenizerError, match="--vocab-size"):
        build_tokenizer("NullTokenizer")
    with pytest.raises(TokenizerError, match="SentencePiece"):
        build_tokenizer("SentencePiece")


def test_errors_name_the_file(tmp_path, tiny_files):
    vocab, merges = tiny_files
    missing = str(tmp_path / "nope.json")
    with pytest.raises(TokenizerError, match="nope.json does not exist"):
        GPT2BPETokenizer(missing, merges)
    bad = tmp_path / "bad_vocab.json"
    bad.write_text('{"a": 0,', encoding="utf-8")
    with pytest.raises(TokenizerError, match="bad_vocab.json is not valid JSON"):
        GPT2BPETokenizer(str(bad), merges)
    bad.write_text('["a", "b"]', encoding="utf-8")
    with pytest.raises(TokenizerError, match="bad_vocab.json must hold"):
        GPT2BPETokenizer(str(bad), merges)
    bad.write_text('{"a": 0, "b": 0}', encoding="utf-8")
    with pytest.raises(TokenizerError, match="share id 0"):
        GPT2BPETokenizer(str(bad), merges)
    bad.write_text('{"a": 0, "<|endoftext|>": 1}', encoding="utf-8")
    with pytest.raises(TokenizerError, match="lacks 255 of the 256 byte symbols"):
        GPT2BPETokenizer(str(bad), merges)
    with pytest.raises(TokenizerError, match="nope.txt does not exist"):
        GPT2BPETokenizer(vocab, str(tmp_path / "nope.txt"))
    bad_merges = tmp_path / "bad_merges.txt"
    bad_merges.write_text("#version: 0.2\nl o\nlow\n", encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"bad_merges.txt:3: expected two"):
        GPT2BPETokenizer(vocab, str(bad_merges))
    bad_merges.write_text("#version: 0.2\nl o\nq z\n", encoding="utf-8")
    with pytest.raises(TokenizerError, match="merge 2 .* uses 'qz'"):
        GPT2BPETokenizer(vocab, str(bad_merges))
    no_eod = tmp_path / "no_eod.json"
    no_eod.write_text(json.dumps({s: b for b, s in bytes_to_unicode().items()}), encoding="utf-8")
    (tmp_path / "empty_merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    with pytest.raises(TokenizerError, match="no <\\|endoftext\\|> token"):
        GPT2BPETokenizer(str(no_eod), str(tmp_path / "empty_merges.txt"))


def test_hf_tokenizer_errors_and_eos(tmp_path, tokenizer_files):
    with pytest.raises(TokenizerError, match="missing.json does not exist"):
        HuggingFaceTokenizer(str(tmp_path / "missing.json"))
    (tmp_path / "broken.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(TokenizerError, match="broken.json cannot be loaded"):
        HuggingFaceTokenizer(str(tmp_path / "broken.json"))
    # Without <|endoftext|>: eos from tokenizer_config.json, else a conventional special token, else an error.
    spec = json.loads(open(tokenizer_files[2], encoding="utf-8").read())
    spec["added_tokens"] = []
    spec["model"]["vocab"]["</s>"] = spec["model"]["vocab"].pop(EOD_TOKEN)
    d = tmp_path / "no_eod"
    d.mkdir()
    (d / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    with pytest.raises(TokenizerError, match="no <\\|endoftext\\|> token and no end-of-sequence"):
        HuggingFaceTokenizer(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "</s>"}}), encoding="utf-8")
    assert HuggingFaceTokenizer(str(d / "tokenizer.json")).eod == 0
    (d / "tokenizer_config.json").unlink()
    spec["added_tokens"] = [{"id": 0, "content": "</s>", "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": True}]
    (d / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    assert HuggingFaceTokenizer(str(d / "tokenizer.json")).eod == 0


@pytest.mark.parametrize("fast", [True, False])
def test_lone_surrogate_is_a_clear_value_error(tokenizer_files, fast):
    """'\\ud800' is valid JSON but not text: every path says so with a ValueError, on first sight and
    after the rest of the text has been cached."""
    vocab, merges, tokenizer_json = tokenizer_files
    for tok in (GPT2BPETokenizer(vocab, merges, fast=fast), HuggingFaceTokenizer(tokenizer_json)):
        tok.tokenize("a plain sentence")
        for call in (lambda: tok.tokenize("a plain \ud800 sentence"), lambda: tok.tokenize_batch(["ok", "x\ud800"])):
            with pytest.raises(ValueError):
                call()
        assert tok.tokenize("a plain sentence") == tok.tokenize_batch(["a plain sentence"])[0]
