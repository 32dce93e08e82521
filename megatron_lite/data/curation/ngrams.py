"""Hashed word n-grams with their character spans, for decontamination (GPT-3, Brown et al. 2020,
appendix C: 13-gram overlap between training documents and evaluation sets).

Words are runs of letters or digits, lower-cased, so punctuation, case and spacing (WikiText's ' @-@ ',
LAMBADA's detokenized quotes) do not hide an overlap. Each word is hashed by crc32, each n-gram by a
polynomial over its words' hashes in uint64 (vectorised, one array operation per position).
"""
from __future__ import annotations

import re
import zlib
from typing import Tuple

import numpy as np

_WORD = re.compile(r"[^\W_]+")
_BASE = np.uint64(0x100000001B3)  # the FNV prime: odd, so the polynomial mixes every word


def words_with_spans(text: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(crc32 per word as uint64, start offsets, end offsets)."""
    # Spans of the text itself (lower-casing can change its length: "İ" becomes two characters);
    # each word is lower-cased only for its hash.
    matches = list(_WORD.finditer(text))
    hashes = np.fromiter((zlib.crc32(m.group().lower().encode()) for m in matches), dtype=np.uint64,
                         count=len(matches))
    starts = np.fromiter((m.start() for m in matches), dtype=np.int64, count=len(matches))
    ends = np.fromiter((m.end() for m in matches), dtype=np.int64, count=len(matches))
    return hashes, starts, ends


def ngram_hashes(word_hashes: np.ndarray, n: int) -> np.ndarray:
    """Hash of every n-gram of consecutive words (len(words) - n + 1 of them; none when fewer words)."""
    count = len(word_hashes) - n + 1
    if count <= 0:
        return np.zeros(0, dtype=np.uint64)
    h = np.zeros(count, dtype=np.uint64)
    with np.errstate(over="ignore"):  # wrap-around is the modulus 2^64
        for k in range(n):
            h = h * _BASE + word_hashes[k:k + count]
    return h
