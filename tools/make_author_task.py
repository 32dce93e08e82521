"""An authorship task from the Gutenberg books: paragraphs labelled by author, balanced, split by position.

    python tools/make_author_task.py --input-dir ../shared/data/gutenberg --output-dir data/authors
    # then: tools/preprocess_classification.py --train data/authors/train.jsonl --valid ... --test ...

A paragraph is a blank-line-separated block of at least --min-words words (whitespace normalised);
longer blocks than --max-words are cut into pieces of at most that many words (verse such as
Milton's has few blank lines). The author is the file-name prefix (``austen-emma.txt`` -> austen).
Each book's paragraphs are split by position: the first 80% train, the next 10% valid, the last 10%
test (--split), so no paragraph, and no stretch of text, is in two splits. Authors with fewer than
--min-paragraphs are left out; each split then keeps the same number of paragraphs per author
(the smallest author's, or --max-per-class), chosen evenly across that author's books. No
randomness: the same files give the same task.
"""
import argparse
import glob
import json
import os
import re
import sys
from collections import defaultdict

from megatron_lite.cli import run_main
from megatron_lite.errors import InputError, OutputPathError
from megatron_lite.io_utils import atomic_open

SPLITS = ("train", "valid", "test")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input-dir", required=True, help="folder of AUTHOR-BOOK.txt files")
    p.add_argument("--output-dir", required=True, help="writes train.jsonl, valid.jsonl, test.jsonl")
    p.add_argument("--min-words", type=int, default=20)
    p.add_argument("--max-words", type=int, default=100)
    p.add_argument("--min-paragraphs", type=int, default=500, help="authors with fewer are left out")
    p.add_argument("--max-per-class", type=int, default=None, help="cap on train paragraphs per author "
                                                                   "(valid/test scaled alike)")
    p.add_argument("--split", default="80,10,10", help="train,valid,test shares of each book, in order")
    return p


def paragraphs(text: str, min_words: int, max_words: int):
    for block in re.split(r"\n\s*\n", text.replace("\r\n", "\n")):
        words = block.split()
        if len(words) < min_words:
            continue
        for i in range(0, len(words), max_words):
            piece = words[i:i + max_words]
            if len(piece) >= min_words:
                yield " ".join(piece)


def read_book(path: str) -> str:
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")  # one of NLTK's Gutenberg files is Latin-1 (see shared/data/README.md)


def evenly(items, k: int):
    """k items spread evenly over ``items`` (all of them when k >= len)."""
    if k >= len(items):
        return list(items)
    return [items[(i * len(items)) // k] for i in range(k)]


def process(args) -> int:
    if not os.path.isdir(args.input_dir):
        raise InputError(f"--input-dir {args.input_dir}: no such directory")
    files = sorted(glob.glob(os.path.join(args.input_dir, "*-*.txt")))
    if not files:
        raise InputError(f"--input-dir {args.input_dir}: no AUTHOR-BOOK.txt files")
    try:
        shares = [float(x) for x in args.split.split(",")]
        assert len(shares) == 3 and min(shares) >= 0 and shares[0] > 0
    except (ValueError, AssertionError):
        raise InputError(f"--split {args.split}: give three non-negative train,valid,test shares") from None
    by_author = defaultdict(lambda: {s: [] for s in SPLITS})
    for path in files:
        author = os.path.basename(path).split("-", 1)[0]
        paras = list(paragraphs(read_book(path), args.min_words, args.max_words))
        cuts = [0, round(len(paras) * shares[0] / sum(shares)), round(len(paras) * sum(shares[:2]) / sum(shares)),
                len(paras)]
        for k, split in enumerate(SPLITS):
            by_author[author][split].extend(
                (p, f"{os.path.basename(path)}#{cuts[k] + i}") for i, p in enumerate(paras[cuts[k]:cuts[k + 1]]))
    kept = sorted(a for a, s in by_author.items() if sum(len(v) for v in s.values()) >= args.min_paragraphs)
    dropped = sorted(set(by_author) - set(kept))
    if len(kept) < 2:
        raise InputError(f"--input-dir {args.input_dir}: fewer than 2 authors have {args.min_paragraphs} "
                         "paragraphs; lower --min-paragraphs")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise OutputPathError(f"--output-dir {args.output_dir}: exists and is not a directory")
    os.makedirs(args.output_dir, exist_ok=True)
    counts = {}
    for split in SPLITS:
        per_class = min(len(by_author[a][split]) for a in kept)
        if args.max_per_class is not None:
            per_class = min(per_class, max(1, round(args.max_per_class * shares[SPLITS.index(split)] / shares[0])))
        counts[split] = per_class
        path = os.path.join(args.output_dir, f"{split}.jsonl")
        with atomic_open(path, "w", encoding="utf-8") as f:
            for author in kept:
                for text, source in evenly(by_author[author][split], per_class):
                    f.write(json.dumps({"text": text, "label": author, "source": source}, ensure_ascii=False) + "\n")
    print(f"authors: {', '.join(kept)}" + (f" (left out, too few paragraphs: {', '.join(dropped)})" if dropped else ""))
    print("per author: " + ", ".join(f"{s} {counts[s]}" for s in SPLITS)
          + f"; wrote {', '.join(os.path.join(args.output_dir, s + '.jsonl') for s in SPLITS)}")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_main(lambda: process(args))


if __name__ == "__main__":
    sys.exit(main())
