"""MinHash signatures over word n-grams and an LSH band index, in vectorised numpy.

Why not datasketch: its MinHash hashes every shingle through a Python call (sha1) and builds one
object per document; here a document's shingles are hashed by crc32 once, and all permutations are
applied as one (num_perm x shingles) array operation, chunked so a whole book stays small.

The permutations are the usual universal hashes h_i(x) = (a_i x + b_i) mod (2^61 - 1), truncated to
32 bits; a and b are drawn from a fixed seed, so signatures agree across processes and runs.
"""
from __future__ import annotations

import re
import unicodedata
import zlib
from typing import Dict, List, Optional, Tuple

import numpy as np

MERSENNE = np.uint64((1 << 61) - 1)
_WORD = re.compile(r"\w+")
_CHUNK = 4096  # shingles per array operation


def normalize(text: str) -> str:
    """Lower case, NFKC, words only: what two copies of one text still share after reformatting."""
    return " ".join(_WORD.findall(unicodedata.normalize("NFKC", text).lower()))


def shingle_hashes(text: str, ngram: int) -> np.ndarray:
    """Distinct crc32s of the text's word n-grams (the whole text when it has fewer words)."""
    words = normalize(text).split(" ")
    if len(words) <= ngram:
        grams = [" ".join(words)]
    else:
        grams = [" ".join(words[i:i + ngram]) for i in range(len(words) - ngram + 1)]
    return np.unique(np.fromiter((zlib.crc32(g.encode()) for g in grams), dtype=np.uint64, count=len(grams)))


class MinHasher:
    def __init__(self, num_perm: int = 128, ngram: int = 5, seed: int = 1):
        rng = np.random.default_rng(seed)
        self.num_perm, self.ngram = num_perm, ngram
        # a < 2^31 and x < 2^32 keep a x + b below 2^64: no wrap-around before the modulus
        self.a = rng.integers(1, 1 << 31, size=(num_perm, 1), dtype=np.uint64)
        self.b = rng.integers(0, 1 << 31, size=(num_perm, 1), dtype=np.uint64)

    def signature(self, text: str) -> np.ndarray:
        x = shingle_hashes(text, self.ngram)
        sig = np.full(self.num_perm, 0xFFFFFFFF, dtype=np.uint64)
        for start in range(0, len(x), _CHUNK):
            h = ((self.a * x[None, start:start + _CHUNK] + self.b) % MERSENNE) & np.uint64(0xFFFFFFFF)
            np.minimum(sig, h.min(axis=1), out=sig)
        return sig.astype(np.uint32)


_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy 2 renamed trapz


def _false_rates(threshold: float, bands: int, rows: int, steps: int = 200) -> Tuple[float, float]:
    s = np.linspace(0.0, 1.0, steps + 1)
    p = 1 - (1 - s ** rows) ** bands  # probability that a pair of similarity s shares a band
    below, above = s <= threshold, s >= threshold
    return float(_trapezoid(p[below], s[below])), float(_trapezoid(1 - p[above], s[above]))


def lsh_params(threshold: float, num_perm: int) -> Tuple[int, int]:
    """(bands, rows) with bands x rows <= num_perm that minimise false positives + false negatives
    around the threshold, as datasketch's MinHashLSH chooses them."""
    best, best_error = (1, num_perm), float("inf")
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            fp, fn = _false_rates(threshold, bands, rows)
            if fp + fn < best_error:
                best, best_error = (bands, rows), fp + fn
    return best


class LSHIndex:
    """Band buckets -> the first document indexed there; candidates are checked by the estimated
    Jaccard similarity of the two signatures, so a bucket collision alone never removes a document."""

    def __init__(self, threshold: float, num_perm: int):
        self.threshold = threshold
        self.bands, self.rows = lsh_params(threshold, num_perm)
        self.buckets: List[Dict[bytes, int]] = [dict() for _ in range(self.bands)]
        self.signatures: Dict[int, np.ndarray] = {}

    def _keys(self, sig: np.ndarray):
        r = self.rows
        return [sig[i * r:(i + 1) * r].tobytes() for i in range(self.bands)]

    def query_or_add(self, doc: int, sig: np.ndarray) -> Optional[Tuple[int, float]]:
        """(earlier document, estimated Jaccard) when `sig` is a near duplicate of an indexed one;
        else index `doc` and return None."""
        keys = self._keys(sig)
        seen = set()
        for band, key in zip(self.buckets, keys):
            other = band.get(key)
            if other is not None and other not in seen:
                seen.add(other)
                similarity = float(np.mean(self.signatures[other] == sig))
                if similarity >= self.threshold:
                    return other, similarity
        for band, key in zip(self.buckets, keys):
            band.setdefault(key, doc)
        self.signatures[doc] = sig
        return None
