"""Tokenizers with Megatron-LM's semantics: GPT-2 byte-level BPE, HuggingFace tokenizer.json, Null.

Every tokenizer exposes the same small interface: ``vocab_size`` (unpadded), ``eod`` (end-of-document
id), ``tokenize(text)``, ``tokenize_batch(texts)``, ``detokenize(ids)``, ``vocab`` and ``inv_vocab``;
GPT2BPETokenizer also has ``tokenize_to_numpy(text)`` for the preprocessing tool.

GPT2BPETokenizer has two implementations over the same vocab.json/merges.txt, which differ only in
the Unicode tables of the pre-tokenizer regex:
- ``fast=True`` (default, ``--tokenizer-impl fast``): tiktoken (see tiktoken_bpe.py). Its regex engine
  has the Unicode 16 tables of HuggingFace's `tokenizers`, so the ids are those of today's Megatron-LM,
  which builds GPT2BPETokenizer through HuggingFace's GPT2TokenizerFast. Files on which tiktoken's
  merge order is not exact get `tokenizers`' own merge-list BPE instead (one warning says so).
- ``fast=False`` (``--tokenizer-impl python``): byte-level BPE in pure Python, the algorithm of
  OpenAI's GPT-2 ``encoder.py`` and Megatron-LM's legacy ``gpt2_tokenization.py``, split by the
  installed ``regex`` package (Unicode 17/18 tables). The two paths disagree only where a text holds
  one of the ~17.5k code points assigned since Unicode 16 (e.g. U+10940 followed by ``'s``).
As in Megatron-LM, ``<|endoftext|>`` appearing in raw text is plain text (it splits into ``<|``,
``endoftext``, ``|>``); only the ``eod`` id appended by the data pipeline marks a document end.
"""
import functools
import json
import os
import warnings
from functools import lru_cache
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import regex
from megatron_lite.errors import TokenizerError

EOD_TOKEN = "<|endoftext|>"
GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
TOKENIZER_TYPES = ("GPT2BPETokenizer", "HuggingFaceTokenizer", "NullTokenizer")
# Conventional end-of-sequence spellings, tried (after <|endoftext|> and tokenizer_config.json) to find eod.
_EOS_CANDIDATES = ("</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>", "<|im_end|>")
_BPE_CACHE_LIMIT = 1 << 20  # words; cleared when full so a huge corpus cannot grow it without bound


class TokenizerWarning(UserWarning):
    """Files that load but deserve a word: a merges.txt read the way Megatron-LM reads it loses a
    line, or tiktoken's merge order is not exact for these files."""


@lru_cache(maxsize=None)
def bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's reversible byte -> printable character table.

    Printable Latin-1 bytes map to themselves; the other 68 bytes (controls, space, NBSP, soft hyphen)
    map to U+0100 onwards, so a BPE symbol never contains whitespace and every byte has a symbol.
    """
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    table, shifted = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


@lru_cache(maxsize=None)
def _byte_decoder() -> Dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


@lru_cache(maxsize=None)
def _symbol_to_latin1() -> Dict[int, int]:
    """str.translate table: byte symbol -> the char of its byte; any other char below 256 -> U+FFFF,
    which latin-1 cannot encode (so a string that is not all byte symbols is noticed)."""
    table = {c: 0xFFFF for c in range(256)}
    table.update({ord(c): b for c, b in _byte_decoder().items()})
    return table


def _is_key(table: dict, key) -> bool:
    try:
        return key in table
    except TypeError:  # unhashable
        return False


def _check_encodable(text: str) -> None:
    """A str holding a lone surrogate (valid in JSON as "\\ud800") is not text: one clear ValueError,
    as the pure-Python path raises. Called only once a Rust library has refused the text, so
    well-formed text never pays for the extra UTF-8 encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"text is not valid Unicode: {e.reason} at character {e.start}") from None


def _ids_from_any(ids) -> List[int]:
    # Accept lists, tuples, numpy arrays and torch tensors; tensors hash by identity, so convert.
    return ids.tolist() if hasattr(ids, "tolist") else list(ids)


def load_gpt2_vocab(vocab_file: str) -> Dict[str, int]:
    """Read a GPT-2 vocab.json (token -> id) and check it is a well-formed id mapping."""
    fix = "pass a GPT-2 format vocab.json (e.g. written by tools/train_tokenizer.py) to --vocab-file"
    try:
        with open(vocab_file, encoding="utf-8") as f:
            vocab = json.load(f)
    except FileNotFoundError:
        raise TokenizerError(f"vocab file {vocab_file} does not exist; {fix}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"vocab file {vocab_file} cannot be read ({e}); {fix}") from None
    except json.JSONDecodeError as e:
        raise TokenizerError(f"vocab file {vocab_file} is not valid JSON (line {e.lineno}: {e.msg}); "
                             f"{fix}") from None
    if not isinstance(vocab, dict) or not vocab:
        raise TokenizerError(f"vocab file {vocab_file} must hold a non-empty JSON object token -> id; {fix}")
    seen: Dict[int, str] = {}
    for token, idx in vocab.items():
        if not isinstance(idx, int) or isinstance(idx, bool) or idx < 0:
            raise TokenizerError(f"vocab file {vocab_file}: token {token!r} has id {idx!r}, "
                                 f"expected a non-negative integer; {fix}")
        if idx in seen:
            raise TokenizerError(f"vocab file {vocab_file}: tokens {seen[idx]!r} and {token!r} "
                                 f"share id {idx}; {fix}")
        seen[idx] = token
    return vocab


def load_gpt2_merges(merge_file: str) -> List[Tuple[str, str]]:
    """Read a GPT-2 merges.txt exactly as Megatron-LM does: ``read().split('\\n')[1:-1]``.

    The first line is the '#version' header and the text after the last newline is dropped. Both are
    what every file written by GPT-2 or `tokenizers` holds; where they are not (no header, no final
    newline), a merge would be lost without a word in Megatron-LM: here a TokenizerWarning names it.
    Blank lines are skipped.
    """
    fix = "pass a GPT-2 format merges.txt (e.g. written by tools/train_tokenizer.py) to --merge-file"
    try:
        with open(merge_file, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except FileNotFoundError:
        raise TokenizerError(f"merge file {merge_file} does not exist; {fix}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"merge file {merge_file} cannot be read ({e}); {fix}") from None
    if lines[0].strip() and not lines[0].startswith("#version"):
        warnings.warn(f"merge file {merge_file}: its first line {lines[0]!r} is not a '#version' header "
                      f"but is skipped as one, as Megatron-LM does (add a '#version: 0.2' line to keep "
                      f"that merge)", TokenizerWarning, stacklevel=2)
    if len(lines) > 1 and lines[-1].strip():
        warnings.warn(f"merge file {merge_file} does not end with a newline: its last line {lines[-1]!r} "
                      f"is dropped, as Megatron-LM drops it (end the file with a newline to keep that "
                      f"merge)", TokenizerWarning, stacklevel=2)
    merges = []
    for lineno, line in enumerate(lines[1:-1], start=2):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise TokenizerError(f"{merge_file}:{lineno}: expected two space-separated symbols, "
                                 f"got {line!r}; {fix}")
        merges.append((parts[0], parts[1]))
    return merges


def _check_gpt2_files(vocab: Dict[str, int], merges: Sequence[Tuple[str, str]],
                      vocab_file: str, merge_file: str) -> None:
    # Megatron maps unknown symbols to id 0 silently and `tokenizers` refuses them; rejecting such files
    # up front keeps both paths identical and turns a silent corruption into a message.
    missing = [c for c in bytes_to_unicode().values() if c not in vocab]
    if missing:
        raise TokenizerError(f"vocab file {vocab_file} lacks {len(missing)} of the 256 byte symbols "
                             f"(e.g. {missing[0]!r}); it is not a byte-level BPE vocabulary")
    for lineno, (left, right) in enumerate(merges, start=1):
        for sym in (left, right, left + right):
            if sym not in vocab:
                raise TokenizerError(f"merge {lineno} ({left} {right}) of {merge_file} uses {sym!r}, which is "
                                     f"not in {vocab_file}; the two files do not belong together")
    if EOD_TOKEN not in vocab:
        raise TokenizerError(f"vocab file {vocab_file} has no {EOD_TOKEN} token, needed as end-of-document id")


class GPT2BPETokenizer:
    """GPT-2 byte-level BPE from vocab.json + merges.txt; ids identical to Megatron-LM's GPT2BPETokenizer
    (today's with ``fast=True``, the legacy ``gpt2_tokenization.py`` with ``fast=False``)."""

    def __init__(self, vocab_file: str, merge_file: str, fast: bool = True):
        from megatron_lite.data import tiktoken_bpe

        self.vocab_file, self.merge_file, self.fast = vocab_file, merge_file, bool(fast)
        self._cache: Dict[str, Tuple[str, ...]] = {}  # BPE symbols -> merged symbols (pure path)
        self.pattern = regex.compile(GPT2_SPLIT_PATTERN) if not self.fast else None
        self.backend = None  # "tiktoken" or "exact-merges" on the fast path
        self._files = None  # (vocab, merges) once read
        state = tiktoken_bpe.load_state(vocab_file, merge_file) if self.fast else None
        if state is not None:  # the tiktoken path from the cache: the files are read only if asked for
            for message in state["warnings"]:
                warnings.warn(message, TokenizerWarning, stacklevel=2)
            self.vocab_size, self.eod, self._id_bytes = state["vocab_size"], state["eod"], state["id_bytes"]
            self.backend = "tiktoken"
            self._fast = tiktoken_bpe.TiktokenBPE(state["ranks"], state["rank_to_id"], GPT2_SPLIT_PATTERN)
            return
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            vocab, merges = load_gpt2_vocab(vocab_file), load_gpt2_merges(merge_file)
        for w in said:  # said again from here (and kept in the cache, to be said on every start)
            warnings.warn(w.message, w.category, stacklevel=2)
        _check_gpt2_files(vocab, merges, vocab_file, merge_file)
        self._files = (vocab, merges)
        self.vocab_size = max(self.inv_vocab) + 1  # == len(vocab) for the usual gap-free files
        self.eod = vocab[EOD_TOKEN]
        self._id_bytes = {i: self._token_bytes(t) for t, i in vocab.items()}
        self._fast = self._build_fast(merges) if self.fast else None
        if self.backend == "tiktoken":
            tiktoken_bpe.save_state(vocab_file, merge_file, {
                "vocab_size": self.vocab_size, "eod": self.eod, "id_bytes": self._id_bytes,
                "ranks": self._ranks, "rank_to_id": self._rank_to_id, "warnings": [str(w.message) for w in said]})

    # The files' own tables: read on first use when the tokenizer came from the cache.
    def _read_files(self):
        if self._files is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # said when the tokenizer was built
                self._files = (load_gpt2_vocab(self.vocab_file), load_gpt2_merges(self.merge_file))
        return self._files

    @property
    def vocab(self) -> Dict[str, int]:
        return self._read_files()[0]

    @functools.cached_property
    def inv_vocab(self) -> Dict[int, str]:
        return {i: t for t, i in self.vocab.items()}

    @functools.cached_property
    def bpe_ranks(self) -> Dict[Tuple[str, str], int]:
        # A later duplicate of a pair overrides the earlier rank, as dict(zip(...)) does in Megatron-LM.
        return {pair: rank for rank, pair in enumerate(self._read_files()[1])}

    @functools.cached_property
    def byte_encoder(self) -> Dict[int, str]:
        return bytes_to_unicode()

    @staticmethod
    def _token_bytes(token: str) -> bytes:
        try:  # byte symbols -> chars of the same code point, which latin-1 writes as those bytes
            return token.translate(_symbol_to_latin1()).encode("latin-1")
        except UnicodeEncodeError:
            return token.encode("utf-8")  # not a byte-level symbol string (a hand-added token): keep its text

    def _build_fast(self, merges):
        from megatron_lite.data import tiktoken_bpe
        problems = tiktoken_bpe.cached_exactness_problems(
            self.vocab_file, self.merge_file,
            lambda: tiktoken_bpe.exactness_problems(self.vocab, merges, list(self.byte_encoder.values())))
        if problems:
            warnings.warn(f"{self.vocab_file} + {self.merge_file}: {problems[0]}, so tiktoken's merge order "
                          f"is not exact for these files; using the exact merge-list BPE of `tokenizers` "
                          f"(same ids, slower)", TokenizerWarning, stacklevel=3)
            self.backend = "exact-merges"
            return tiktoken_bpe.ExactBPE(self.vocab, merges)
        self.backend = "tiktoken"
        self._ranks, self._rank_to_id = tiktoken_bpe.mergeable_ranks(self.vocab, merges, self._id_bytes,
                                                                     self.byte_encoder)
        return tiktoken_bpe.TiktokenBPE(self._ranks, self._rank_to_id, GPT2_SPLIT_PATTERN)

    def __reduce__(self):
        # Rebuilt from the files in the receiving process: a few ms, and no Rust object to serialize.
        return (type(self), (os.path.abspath(self.vocab_file), os.path.abspath(self.merge_file), self.fast))

    # -- pure-Python BPE ------------------------------------------------------------------------
    def bpe(self, word: str) -> Tuple[str, ...]:
        """Merge the byte symbols of one pre-token, lowest-ranked adjacent pair first (GPT-2's loop)."""
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        symbols = tuple(word)
        ranks = self.bpe_ranks
        while len(symbols) > 1:
            best, best_rank = None, None
            for pair in zip(symbols, symbols[1:]):
                r = ranks.get(pair)
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = pair, r
            if best is None:
                break
            first, second = best
            merged, i, n = [], 0, len(symbols)
            while i < n:  # replace every non-overlapping occurrence, left to right
                if i < n - 1 and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = tuple(merged)
        if len(self._cache) >= _BPE_CACHE_LIMIT:
            self._cache.clear()
        self._cache[word] = symbols
        return symbols

    def _symbols(self, piece: str) -> str:
        """A pre-token's UTF-8 bytes as BPE symbols (latin-1 turns each byte into one char to translate)."""
        return piece.encode("utf-8").decode("latin-1").translate(self.byte_encoder)

    def _tokenize_pure(self, text: str) -> List[int]:
        vocab, ids = self.vocab, []
        for piece in self.pattern.findall(text):
            ids.extend(vocab[sym] for sym in self.bpe(self._symbols(piece)))
        return ids

    # -- public interface ---------------------------------------------------------------------
    def tokenize_to_numpy(self, text: str) -> np.ndarray:
        """ids of `text` as an int64 array (no Python list on the fast path)."""
        if not isinstance(text, str):
            raise TypeError(f"tokenize expects str, got {type(text).__name__}")
        if self._fast is None:
            return np.asarray(self._tokenize_pure(text), dtype=np.int64)
        try:
            return self._fast.encode(text)
        except (UnicodeEncodeError, TypeError):  # how the Rust libraries refuse a lone surrogate
            _check_encodable(text)
            raise

    def tokenize(self, text: str) -> List[int]:
        if not isinstance(text, str):
            raise TypeError(f"tokenize expects str, got {type(text).__name__}")
        if self._fast is None:
            return self._tokenize_pure(text)
        return self.tokenize_to_numpy(text).tolist()

    def tokenize_batch(self, texts: Iterable[str]) -> List[List[int]]:
        return [self.tokenize(t) for t in texts]

    def detokenize(self, ids) -> str:
        """Bytes of the tokens, decoded as UTF-8 with 'replace' (Megatron-LM's errors='replace')."""
        table = self._id_bytes
        try:
            data = b"".join([table[i] for i in _ids_from_any(ids)])
        except (KeyError, TypeError):
            bad = next(i for i in _ids_from_any(ids) if not _is_key(table, i))
            raise ValueError(f"token id {bad!r} is not in the vocabulary of {self.vocab_file}") from None
        return data.decode("utf-8", errors="replace")


class HuggingFaceTokenizer:
    """A `tokenizers` tokenizer.json (--tokenizer-type HuggingFaceTokenizer --tokenizer-model PATH).

    Special tokens written in raw text are recognised as in HuggingFace (so `<|endoftext|>` in text
    becomes the special id here, unlike GPT2BPETokenizer); no special tokens are added around a text:
    the data pipeline appends `eod` itself.
    """

    def __init__(self, tokenizer_model: str):
        from tokenizers import Tokenizer
        self.tokenizer_model = tokenizer_model
        fix = "pass a HuggingFace tokenizer.json to --tokenizer-model"
        if not os.path.isfile(tokenizer_model):
            raise TokenizerError(f"tokenizer file {tokenizer_model} does not exist; {fix}")
        try:
            self._tok = Tokenizer.from_file(tokenizer_model)
        except Exception as e:  # the Rust loader raises plain Exception with serde's message
            raise TokenizerError(f"tokenizer file {tokenizer_model} cannot be loaded ({e}); {fix}") from None
        self.vocab = self._tok.get_vocab(with_added_tokens=True)
        self.inv_vocab = {i: t for t, i in self.vocab.items()}
        self.vocab_size = max(self._tok.get_vocab_size(with_added_tokens=True), max(self.inv_vocab) + 1)
        self.eod = self._find_eod()

    def _find_eod(self) -> int:
        if EOD_TOKEN in self.vocab:
            return self.vocab[EOD_TOKEN]
        eos = self._configured_eos()
        if eos is not None and eos in self.vocab:
            return self.vocab[eos]
        specials = {t.content for t in self._tok.get_added_tokens_decoder().values() if t.special}
        for name in _EOS_CANDIDATES:
            if name in specials:
                return self.vocab[name]
        raise TokenizerError(
            f"tokenizer file {self.tokenizer_model} has no {EOD_TOKEN} token and no end-of-sequence token "
            f"(looked for eos_token in a tokenizer_config.json beside it and for special tokens "
            f"{', '.join(_EOS_CANDIDATES)}); add an end-of-document special token to the tokenizer")

    def _configured_eos(self) -> Optional[str]:
        # tokenizer.json has no notion of eos; HuggingFace keeps it in tokenizer_config.json beside it.
        path = os.path.join(os.path.dirname(os.path.abspath(self.tokenizer_model)), "tokenizer_config.json")
        try:
            with open(path, encoding="utf-8") as f:
                eos = json.load(f).get("eos_token")
        except (OSError, ValueError, AttributeError):
            return None
        return eos.get("content") if isinstance(eos, dict) else eos if isinstance(eos, str) else None

    def __reduce__(self):
        return (type(self), (os.path.abspath(self.tokenizer_model),))

    def tokenize(self, text: str) -> List[int]:
        if not isinstance(text, str):
            raise TypeError(f"tokenize expects str, got {type(text).__name__}")
        try:
            return self._tok.encode(text, add_special_tokens=False).ids
        except TypeError:
            _check_encodable(text)  # a lone surrogate: say so instead of the library's TypeError
            raise

    def tokenize_batch(self, texts: Iterable[str]) -> List[List[int]]:
        texts = list(texts)
        if not texts:
            return []
        try:
            return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]
        except TypeError:
            for text in texts:
                _check_encodable(text)  # name the lone surrogate instead of the library's TypeError
            raise

    def detokenize(self, ids) -> str:
        return self._tok.decode(_ids_from_any(ids), skip_special_tokens=False)


class NullTokenizer:
    """Ids written as whitespace-separated integers, for mock data and tests; eod is the last id.

    Megatron-LM's _NullTokenizer(n) has vocab_size n + 1 and eod n; here the argument is the whole
    vocabulary (vocab_size == n, eod == n - 1), so `--vocab-size N` means N embeddings before padding.
    """

    def __init__(self, vocab_size: int):
        if int(vocab_size) < 1:
            raise TokenizerError(f"NullTokenizer needs --vocab-size >= 1, got {vocab_size}")
        self.vocab_size = int(vocab_size)
        self.eod = self.vocab_size - 1

    def __reduce__(self):
        return (type(self), (self.vocab_size,))

    @property
    def vocab(self) -> Dict[str, int]:
        return {str(i): i for i in range(self.vocab_size)}

    @property
    def inv_vocab(self) -> Dict[int, str]:
        return {i: str(i) for i in range(self.vocab_size)}

    def tokenize(self, text: str) -> List[int]:
        try:
            ids = [int(x) for x in text.split()]
        except ValueError:
            raise ValueError(f"NullTokenizer reads whitespace-separated integers, got {text[:60]!r}") from None
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"NullTokenizer: id {i} is outside [0, {self.vocab_size})")
        return ids

    def tokenize_batch(self, texts: Iterable[str]) -> List[List[int]]:
        return [self.tokenize(t) for t in texts]

    def detokenize(self, ids) -> str:
        return " ".join(str(int(i)) for i in _ids_from_any(ids))


def required_tokenizer_files(tokenizer_type: str, vocab_file: Optional[str] = None,
                             merge_file: Optional[str] = None, tokenizer_model: Optional[str] = None,
                             vocab_size: Optional[int] = None) -> List[Tuple[str, str]]:
    """(flag, path) of every file --tokenizer-type reads; a flag it needs and lacks is a TokenizerError."""
    if tokenizer_type == "GPT2BPETokenizer":
        for flag, path in (("--vocab-file", vocab_file), ("--merge-file", merge_file)):
            if path is None:
                raise TokenizerError(f"{flag} is required with --tokenizer-type GPT2BPETokenizer")
        return [("--vocab-file", vocab_file), ("--merge-file", merge_file)]
    if tokenizer_type == "HuggingFaceTokenizer":
        if tokenizer_model is None:
            raise TokenizerError("--tokenizer-model PATH (a tokenizer.json) is required with "
                                 "--tokenizer-type HuggingFaceTokenizer")
        return [("--tokenizer-model", tokenizer_model)]
    if tokenizer_type == "NullTokenizer":
        if vocab_size is None:
            raise TokenizerError("--tokenizer-type NullTokenizer needs --vocab-size")
        return []
    raise TokenizerError(f"--tokenizer-type {tokenizer_type!r} is not one of {', '.join(TOKENIZER_TYPES)}")


def build_tokenizer(tokenizer_type: str, vocab_file: Optional[str] = None, merge_file: Optional[str] = None,
                    tokenizer_model: Optional[str] = None, vocab_size: Optional[int] = None, fast: bool = True):
    """Build the tokenizer named by --tokenizer-type from the flags it needs."""
    required_tokenizer_files(tokenizer_type, vocab_file, merge_file, tokenizer_model, vocab_size)
    if tokenizer_type == "GPT2BPETokenizer":
        return GPT2BPETokenizer(vocab_file, merge_file, fast=fast)
    if tokenizer_type == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(tokenizer_model)
    return NullTokenizer(vocab_size)


def effective_tokenizer_type(tokenizer_type: str, vocab_file: Optional[str], mock_data: bool,
                             vocab_size: Optional[int]) -> str:
    """--mock-data with --vocab-size and no tokenizer files reads none: random ids < N need no text."""
    if mock_data and vocab_size and tokenizer_type == "GPT2BPETokenizer" and not vocab_file:
        return "NullTokenizer"
    return tokenizer_type


def tokenizer_args_from_config(data_cfg, vocab_size: Optional[int] = None) -> dict:
    """build_tokenizer's arguments from a DataConfig-like object (duck-typed: data/ never imports config)."""
    vocab_file = getattr(data_cfg, "vocab_file", None)
    return {"tokenizer_type": effective_tokenizer_type(getattr(data_cfg, "tokenizer_type", "GPT2BPETokenizer"),
                                                       vocab_file, getattr(data_cfg, "mock_data", False),
                                                       vocab_size),
            "vocab_file": vocab_file, "merge_file": getattr(data_cfg, "merge_file", None),
            "tokenizer_model": getattr(data_cfg, "tokenizer_model", None), "vocab_size": vocab_size}


def build_tokenizer_from_config(data_cfg, vocab_size: Optional[int] = None, fast: bool = True):
    """The run's tokenizer from a DataConfig-like object (tokenizer_type, vocab_file, merge_file, ...)."""
    return build_tokenizer(**tokenizer_args_from_config(data_cfg, vocab_size), fast=fast)
