"""Document-level quality rules of Gopher (Rae et al. 2021, "Scaling Language Models: Methods, Analysis &
Insights from Training Gopher", arXiv:2112.11446, appendix A.1.1 "quality filtering" and table A1
"repetition removal"); the thresholds below are theirs, as also used by datatrove's GopherQualityFilter
and GopherRepetitionFilter:

- word count between 50 and 100,000 words; mean word length between 3 and 10 characters;
- symbol-to-word ratio below 0.1 for the hash symbol and for the ellipsis;
- at most 90% of lines starting with a bullet point, at most 30% ending with an ellipsis;
- at least 80% of words with an alphabetic character;
- at least 2 of the stop words the, be, to, of, and, that, have, with;
- duplicate lines at most 30% of lines and 20% of characters; the most frequent 2-, 3-, 4-gram at most
  20%, 18%, 16% of the characters; duplicated 5- to 10-grams at most 15% down to 10% of characters.

``check(text, thresholds)`` names every rule a document fails; a rule whose threshold is None is off.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field, fields
from typing import Dict, List, Optional

STOP_WORDS = frozenset(("the", "be", "to", "of", "and", "that", "have", "with"))
BULLETS = ("\u2022", "\u2023", "\u25b6", "\u25cf", "\u25e6", "\u25aa", "\u25ab", "\u2013 ", "- ", "* ")
ELLIPSES = ("...", "\u2026")
_WORD = re.compile(r"\S+")
_PUNCT = re.compile(r"^[^\w]+|[^\w]+$")


@dataclass
class Thresholds:
    min_words: Optional[int] = 50
    max_words: Optional[int] = 100_000
    min_mean_word_length: Optional[float] = 3.0
    max_mean_word_length: Optional[float] = 10.0
    max_symbol_word_ratio: Optional[float] = 0.1
    max_bullet_lines: Optional[float] = 0.9
    max_ellipsis_lines: Optional[float] = 0.3
    min_alpha_words: Optional[float] = 0.8
    min_stop_words: Optional[int] = 2
    max_duplicate_lines: Optional[float] = 0.3
    max_duplicate_line_chars: Optional[float] = 0.2
    max_top_ngram_chars: Dict[int, float] = field(default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16})
    max_duplicate_ngram_chars: Dict[int, float] = field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10})


RULES = [f.name for f in fields(Thresholds)]


def _top_ngram_chars(words: List[str], n: int) -> float:
    grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    if not grams:
        return 0.0
    gram, count = grams.most_common(1)[0]
    return sum(map(len, gram)) * count / max(sum(map(len, words)), 1)


def _duplicate_ngram_chars(words: List[str], n: int) -> float:
    """Fraction of characters in repeats of an earlier n-gram (the first occurrence is not a
    repeat; a repeat's words are not counted again), as Gopher's rule and datatrove count it."""
    seen, repeated, i = set(), 0, 0
    while i + n <= len(words):
        gram = tuple(words[i:i + n])
        if gram in seen:
            repeated += sum(map(len, gram))
            i += n
        else:
            seen.add(gram)
            i += 1
    return repeated / max(sum(map(len, words)), 1)


def check(text: str, t: Thresholds) -> List[str]:
    """Names of the rules `text` fails."""
    failed = []
    words = _WORD.findall(text)
    n = len(words)
    if t.min_words is not None and n < t.min_words:
        failed.append("min_words")
    if t.max_words is not None and n > t.max_words:
        failed.append("max_words")
    if n == 0:
        return failed
    stripped = [w for w in (_PUNCT.sub("", w) for w in words) if w]
    mean = sum(map(len, stripped)) / max(len(stripped), 1)
    if t.min_mean_word_length is not None and mean < t.min_mean_word_length:
        failed.append("min_mean_word_length")
    if t.max_mean_word_length is not None and mean > t.max_mean_word_length:
        failed.append("max_mean_word_length")
    if t.max_symbol_word_ratio is not None:
        symbols = max(text.count("#"), sum(text.count(e) for e in ELLIPSES))
        if symbols / n > t.max_symbol_word_ratio:
            failed.append("max_symbol_word_ratio")
    lines = [ln for ln in text.split("\n") if ln.strip()]
    if lines:
        if t.max_bullet_lines is not None and \
                sum(ln.lstrip().startswith(BULLETS) for ln in lines) / len(lines) > t.max_bullet_lines:
            failed.append("max_bullet_lines")
        if t.max_ellipsis_lines is not None and \
                sum(ln.rstrip().endswith(ELLIPSES) for ln in lines) / len(lines) > t.max_ellipsis_lines:
            failed.append("max_ellipsis_lines")
        seen, dup = set(), []  # repeats of an earlier line (its first occurrence is not one)
        for ln in lines:
            (dup.append if ln in seen else seen.add)(ln)
        if t.max_duplicate_lines is not None and len(dup) / len(lines) > t.max_duplicate_lines:
            failed.append("max_duplicate_lines")
        if t.max_duplicate_line_chars is not None and \
                sum(map(len, dup)) / max(sum(map(len, lines)), 1) > t.max_duplicate_line_chars:
            failed.append("max_duplicate_line_chars")
    if t.min_alpha_words is not None and \
            sum(any(c.isalpha() for c in w) for w in words) / n < t.min_alpha_words:
        failed.append("min_alpha_words")
    lower = [w.lower() for w in stripped]
    if t.min_stop_words is not None and len(STOP_WORDS.intersection(lower)) < t.min_stop_words:
        failed.append("min_stop_words")
    for size, limit in sorted((t.max_top_ngram_chars or {}).items()):
        if _top_ngram_chars(lower, size) > limit:
            failed.append("max_top_ngram_chars")
            break
    for size, limit in sorted((t.max_duplicate_ngram_chars or {}).items()):
        if _duplicate_ngram_chars(lower, size) > limit:
            failed.append("max_duplicate_ngram_chars")
            break
    return failed
