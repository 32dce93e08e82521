"""Remove evaluation-set text from a training corpus: 13-gram overlaps, as GPT-3 did.

    python tools/decontaminate.py --input corpus.jsonl --output clean.jsonl \\
        --eval-files ../shared/data/lambada/lambada_test.jsonl ../shared/data/wikitext-2/test.jsonl

Every word 13-gram (--ngram; words are lower-cased runs of letters and digits) of the evaluation files
is collected; a training document sharing one is touched. --mode split (GPT-3, Brown et al. 2020,
appendix C): the colliding n-grams and --margin characters on each side are cut out, pieces shorter
than --min-piece characters are dropped, and a document cut into more than --max-pieces pieces is
dropped whole; each kept piece is written as its own document (the other keys copied). --mode remove
drops every touched document. The report counts documents touched, removed and split, the colliding
n-grams (occurrences and distinct), per evaluation file, with examples.
"""

import argparse
import json
import sys

import numpy as np

from megatron_lite.data.curation import common
from megatron_lite.data.curation.ngrams import ngram_hashes, words_with_spans
from megatron_lite.errors import ConfigError

EXAMPLES = 20
_worker = {}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(p)
    p.add_argument("--eval-files", nargs="+", required=True, help="evaluation JSONL files (.gz too)")
    p.add_argument("--eval-json-key", default="text", help="key of the text in the evaluation files")
    p.add_argument("--ngram", type=int, default=13, help="words per n-gram")
    p.add_argument("--mode", choices=["split", "remove"], default="split")
    p.add_argument("--margin", type=int, default=200, help="split: characters cut on each side of a hit")
    p.add_argument("--min-piece", type=int, default=200, help="split: shorter pieces are dropped")
    p.add_argument("--max-pieces", type=int, default=10, help="split: more pieces drop the document")
    return p


def check_args(args) -> None:
    common.check_common_args(args)
    for path in args.eval_files:
        common.check_readable("--eval-files", path)
    if args.ngram < 1 or args.margin < 0 or args.min_piece < 0 or args.max_pieces < 1:
        raise ConfigError("--ngram and --max-pieces must be at least 1, --margin and --min-piece not negative")


def eval_ngrams(args):
    """(sorted unique n-gram hashes, the evaluation file index of each), streamed file by file."""
    hashes, owners = [], []
    for i, path in enumerate(args.eval_files):
        bad = common.BadLines(path, args.strict)
        for batch in common.read_batches(path):
            good, bad_lines = common.parse_batch(batch, args.eval_json_key)
            bad.add(bad_lines)
            for _, _, text in good:
                h = ngram_hashes(words_with_spans(text)[0], args.ngram)
                hashes.append(h)
                owners.append(np.full(len(h), i, dtype=np.int32))
    if not hashes or not sum(map(len, hashes)):
        raise ConfigError(f"--eval-files {' '.join(args.eval_files)}: no text with {args.ngram} words or more")
    h, o = np.concatenate(hashes), np.concatenate(owners)
    h, first = np.unique(h, return_index=True)  # an n-gram in several files counts for the first
    return h, o[first]


def init_worker(key, table, owners, n) -> None:
    _worker.update(key=key, table=table, owners=owners, n=n)


def hits_batch(batch):
    """Per good line: (lineno, raw, text or None, [(start, end) char spans of hits], hashes hit)."""
    good, bad = common.parse_batch(batch, _worker["key"])
    table, n, out = _worker["table"], _worker["n"], []
    for lineno, raw, text in good:
        words, starts, ends = words_with_spans(text)
        grams = ngram_hashes(words, n)
        pos = np.searchsorted(table, grams)
        pos[pos == len(table)] = 0
        hit = np.flatnonzero(table[pos] == grams)
        if not len(hit):
            out.append((lineno, raw, None, [], np.zeros(0, np.int64)))
            continue
        spans = [(int(starts[i]), int(ends[i + n - 1])) for i in hit]
        out.append((lineno, raw, text, spans, pos[hit]))
    return out, bad


def split_around(text, spans, margin, min_piece):
    """The pieces of `text` left when each span plus `margin` characters either side is cut out."""
    pieces, cursor = [], 0
    for start, end in spans:
        cut_from = max(start - margin, 0)
        if cut_from > cursor:
            pieces.append(text[cursor:cut_from])
        cursor = max(cursor, end + margin)
    pieces.append(text[cursor:])
    return [p for p in pieces if len(p) >= min_piece]


def run(args) -> dict:
    check_args(args)
    table, owners = eval_ngrams(args)
    progress = common.Progress(args.input, args.log_interval)
    bad_lines = common.BadLines(args.input, args.strict)
    stats = dict(documents=0, touched=0, removed=0, split=0, pieces_written=0, written=0,
                 ngram_hits=0, distinct_ngrams_hit=0)
    distinct = np.zeros(len(table), dtype=bool)
    per_file = {path: dict(documents_touched=0, ngram_hits=0) for path in args.eval_files}
    examples = []
    with common.jsonl_writer(args.output) as out:
        results = common.ordered_map(hits_batch, common.read_batches(args.input, progress), args.workers,
                                     init_worker, (args.json_key, table, owners, args.ngram))
        for docs, bad in results:
            bad_lines.add(bad)
            for lineno, raw, text, spans, where in docs:
                stats["documents"] += 1
                if text is None:
                    common.write_line(out, raw)
                    stats["written"] += 1
                    continue
                stats["touched"] += 1
                stats["ngram_hits"] += len(spans)
                distinct[where] = True
                files = owners[where]
                for i in np.unique(files):
                    per_file[args.eval_files[i]]["documents_touched"] += 1
                    per_file[args.eval_files[i]]["ngram_hits"] += int((files == i).sum())
                pieces = [] if args.mode == "remove" else split_around(text, spans, args.margin, args.min_piece)
                if len(examples) < EXAMPLES:
                    s, e = spans[0]
                    examples.append(dict(line=lineno, hits=len(spans), pieces_kept=len(pieces),
                                         first_hit=text[s:e][:200]))
                if not pieces or len(pieces) > args.max_pieces:
                    stats["removed"] += 1
                    continue
                stats["split"] += 1
                obj = json.loads(raw)
                for piece in pieces:
                    obj[args.json_key] = piece
                    common.write_line(out, json.dumps(obj, ensure_ascii=False).encode())
                stats["pieces_written"] += len(pieces)
                stats["written"] += len(pieces)
            progress.advance(len(docs))
    stats.update(distinct_ngrams_hit=int(distinct.sum()), skipped=bad_lines.count,
                 docs_per_s=round(progress.docs_per_s, 1))
    common.write_report(args.report, dict(
        input=args.input, output=args.output, eval_files=args.eval_files, eval_ngrams=int(len(table)),
        params=dict(ngram=args.ngram, mode=args.mode, margin=args.margin, min_piece=args.min_piece,
                    max_pieces=args.max_pieces), **stats, per_eval_file=per_file, examples=examples))
    return stats


def main(argv=None) -> int:
    return common.tool_main(build_parser, run, argv, ("documents", "touched", "removed", "split", "written",
                                                      "ngram_hits", "distinct_ngrams_hit", "skipped", "docs_per_s"))


if __name__ == "__main__":
    sys.exit(main())
