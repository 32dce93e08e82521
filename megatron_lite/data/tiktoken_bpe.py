"""GPT-2 byte-level BPE on tiktoken (Rust), from any GPT-2-format vocab.json + merges.txt.

tiktoken knows no merge list: it merges, inside each pre-token, the adjacent pair whose
*concatenation* has the lowest rank. So the rank of a merged token is 256 + the index of the merge
that makes it (not its vocab id), the 256 byte tokens rank below every merge (in GPT-2's
byte-to-unicode order, which makes the ranks equal the ids for OpenAI's own files), and a
rank -> id array translates the result back (skipped when it is the identity).

GPT-2 BPE merges by the rank of the *listed pair*. The two agree on every input when the files
satisfy four conditions (checked by ``exactness_problems``):
  1. every byte symbol and merge result is in the vocab (tokenizer.py refuses files that fail it);
  2. no token is the result of two merges (so a concatenation has one rank);
  3. each merge's operands are bytes or results of earlier merges (so ranks grow along every
     merge chain, as the pair order does);
  4. merge-list BPE of each token's own bytes gives that token back (tiktoken returns a pre-token
     found whole in its table without merging it).
Files that fail 2-4 are served by ``ExactBPE``: the same pre-tokenizer with `tokenizers`' merge-list
BPE, which is what HuggingFace's GPT2TokenizerFast (and so today's Megatron-LM) runs.

Checking condition 4 costs a BPE pass over the whole vocab, so its verdict is cached under
$XDG_CACHE_HOME/megatron_lite (default ~/.cache) keyed by the files' sha256; an unwritable cache
only costs the check again.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from megatron_lite.io_utils import atomic_write_text

CHECK_VERSION = 1  # bump when exactness_problems changes what it checks


def gpt2_byte_order(byte_encoder: Dict[int, str]) -> List[int]:
    """Bytes in GPT-2's id order: the ones that print as themselves first, then the shifted ones."""
    kept = [b for b in range(256) if ord(byte_encoder[b]) == b]
    return kept + [b for b in range(256) if ord(byte_encoder[b]) != b]


def mergeable_ranks(vocab: Dict[str, int], merges: Sequence[Tuple[str, str]], id_bytes: Dict[int, bytes],
                    byte_encoder: Dict[int, str]) -> Tuple[Dict[bytes, int], np.ndarray]:
    """(tiktoken's bytes -> rank table, rank -> vocab id array), given each id's bytes and GPT-2's
    byte -> symbol table. Assumes conditions 1 and 2 hold, so every merge result is in the vocab
    and gets exactly one rank."""
    rank_to_id = [vocab[byte_encoder[b]] for b in gpt2_byte_order(byte_encoder)]
    rank_to_id += [vocab[left + right] for left, right in merges]
    ranks = {id_bytes[i]: rank for rank, i in enumerate(rank_to_id)}
    return ranks, np.asarray(rank_to_id, dtype=np.int64)


def exactness_problems(vocab: Dict[str, int], merges: Sequence[Tuple[str, str]],
                       byte_symbols: Sequence[str]) -> List[str]:
    """Conditions 2-4 of the module docstring that these files fail, as short sentences (empty:
    tiktoken gives exactly the merge-list ids). Condition 1 is the caller's."""
    formed, made_by, problems = set(byte_symbols), {}, []
    for index, (left, right) in enumerate(merges):
        result = left + right
        if result in made_by:
            problems.append(f"token {result!r} is made by merge {made_by[result] + 1} and again by "
                            f"merge {index + 1}")
            break
        made_by[result] = index
        if left not in formed or right not in formed:
            late = left if left not in formed else right
            problems.append(f"merge {index + 1} ({left} {right}) uses {late!r} before a merge makes it")
            break
        formed.add(result)
    if problems:
        return problems
    # Condition 4 with the exact merge-list BPE of `tokenizers`: each merged token's own symbols.
    from tokenizers import Tokenizer, models
    exact = Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))
    results = [left + right for left, right in merges]
    for token, enc in zip(results, exact.encode_batch([[t] for t in results], is_pretokenized=True)):
        if enc.ids != [vocab[token]]:
            shown = [exact.id_to_token(i) for i in enc.ids]
            problems.append(f"merge-list BPE of token {token!r} gives {shown}, not the token itself")
            break
    return problems


def _cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "megatron_lite", "gpt2_bpe_checks")


def files_digest(*paths: str) -> str:
    h = hashlib.sha256(f"v{CHECK_VERSION}".encode())
    for path in paths:
        with open(path, "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()


STATE_VERSION = 1


def _cache_paths(vocab_file: str, merge_file: str) -> Tuple[str, str]:
    """(the exactness verdict's path, the state's path) for these files: one read of each file."""
    base = os.path.join(_cache_dir(), files_digest(vocab_file, merge_file))
    return base + ".json", f"{base}.state{STATE_VERSION}.pkl"


def load_state(vocab_file: str, merge_file: str) -> Optional[dict]:
    """What a tokenizer on the tiktoken path needs from these two files (vocab size, end-of-document id,
    id -> bytes, merge ranks, rank -> id, the warnings reading them gave), as ``save_state`` cached
    it: reading and checking GPT-2's 50k merges costs ~0.2 s, a process start-up's largest part."""
    import pickle

    try:
        verdict_path, state_path = _cache_paths(vocab_file, merge_file)
        # Only while the cached exactness verdict still says tiktoken is exact for these files.
        with open(verdict_path, encoding="utf-8") as f:
            if json.load(f).get("problems") != []:
                return None
        with open(state_path, "rb") as f:
            state = pickle.load(f)
        return state if isinstance(state, dict) and state.get("version") == STATE_VERSION else None
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ValueError, TypeError, KeyError):
        return None  # absent, from another version, or damaged: built from the files again


def save_state(vocab_file: str, merge_file: str, state: dict) -> None:
    import pickle

    from megatron_lite.io_utils import atomic_open

    try:
        path = _cache_paths(vocab_file, merge_file)[1]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with atomic_open(path, "wb") as f:
            pickle.dump(dict(state, version=STATE_VERSION), f, protocol=pickle.HIGHEST_PROTOCOL)
    except OSError:
        pass  # a read-only home: built from the files next time too


def cached_exactness_problems(vocab_file: str, merge_file: str, compute) -> List[str]:
    """``compute()``'s verdict for these two files, from the cache when it has it."""
    path = _cache_paths(vocab_file, merge_file)[0]
    try:
        with open(path, encoding="utf-8") as f:
            return list(json.load(f)["problems"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    problems = compute()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write_text(path, json.dumps({"problems": problems}))
    except OSError:
        pass  # a read-only home: the check simply runs again next time
    return problems


class TiktokenBPE:
    """ids of text through a tiktoken Encoding built from GPT-2 files (see the module docstring)."""

    def __init__(self, ranks: Dict[bytes, int], rank_to_id: np.ndarray, pattern: str):
        import tiktoken
        self._enc = tiktoken.Encoding("megatron_lite_gpt2", pat_str=pattern, mergeable_ranks=ranks,
                                      special_tokens={})
        identity = np.array_equal(rank_to_id, np.arange(len(rank_to_id)))
        self._rank_to_id: Optional[np.ndarray] = None if identity else rank_to_id

    def encode(self, text: str) -> np.ndarray:
        """ids as an int64 array. A lone surrogate raises UnicodeEncodeError (encode_to_numpy,
        unlike encode_ordinary, does not replace it with U+FFFD)."""
        ranks = self._enc.encode_to_numpy(text, disallowed_special=())
        if self._rank_to_id is None:
            return ranks.astype(np.int64)
        return self._rank_to_id[ranks]


class ExactBPE:
    """Merge-list BPE in `tokenizers` behind its own GPT-2 pre-tokenizer: HuggingFace's
    GPT2TokenizerFast, for files on which tiktoken's merge order is not exact."""

    def __init__(self, vocab: Dict[str, int], merges: Sequence[Tuple[str, str]]):
        from tokenizers import Tokenizer, models, pre_tokenizers
        self._tok = Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))
        self._tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)

    def encode(self, text: str) -> np.ndarray:
        """ids as an int64 array; a lone surrogate raises TypeError (the Rust library refuses it)."""
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)
