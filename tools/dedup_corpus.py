"""Remove exact and near-duplicate documents from a JSONL corpus, keeping the first of each cluster.

    python tools/dedup_corpus.py --input corpus.jsonl --output deduped.jsonl --workers 2

Exact duplicates: equal text after normalisation (NFKC, lower case, words only), by a 128-bit hash.
Near duplicates: MinHash over word n-grams (--ngram 5, --num-perm 128) with LSH banding chosen for
--threshold (estimated Jaccard similarity, default 0.8, as in Megatron-LM's tools/openwebtext and
GPT-3's fuzzy deduplication); a candidate counts only when its signature agreement reaches the
threshold. One pass, in input order: a document is compared with the documents kept before it.
The report (JSON) lists the clusters: the kept line, the removed lines, their kind and similarity,
and the start of each text. Memory: the band index and one 512-byte signature per kept document.
"""

import argparse
import hashlib
import sys

from megatron_lite.data.curation import common
from megatron_lite.data.curation.minhash import LSHIndex, MinHasher, normalize
from megatron_lite.errors import ConfigError

EXAMPLE_CHARS = 120
_worker = {}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(p)
    p.add_argument("--threshold", type=float, default=0.8, help="Jaccard similarity of a near duplicate")
    p.add_argument("--ngram", type=int, default=5, help="words per shingle")
    p.add_argument("--num-perm", type=int, default=128, help="MinHash permutations")
    p.add_argument("--no-near", action="store_true", help="exact duplicates only")
    p.add_argument("--max-report-clusters", type=int, default=1000, help="clusters listed in the report")
    return p


def check_args(args) -> None:
    common.check_common_args(args)
    if not 0.0 < args.threshold <= 1.0:
        raise ConfigError(f"--threshold {args.threshold}: must be in (0, 1]")
    if args.ngram < 1 or args.num_perm < 2:
        raise ConfigError(f"--ngram {args.ngram} / --num-perm {args.num_perm}: need --ngram >= 1 and "
                          f"--num-perm >= 2")


def init_worker(key, num_perm, ngram, near) -> None:
    _worker.update(key=key, hasher=MinHasher(num_perm, ngram) if near else None)


def hash_batch(batch):
    """Parse a batch; per good line (lineno, raw, exact hash, signature or None, example)."""
    good, bad = common.parse_batch(batch, _worker["key"])
    hasher, out = _worker["hasher"], []
    for lineno, raw, text in good:
        exact = hashlib.blake2b(normalize(text).encode(), digest_size=16).digest()
        sig = hasher.signature(text) if hasher is not None else None
        out.append((lineno, raw, exact, sig, text[:EXAMPLE_CHARS]))
    return out, bad


def run(args) -> dict:
    check_args(args)
    progress = common.Progress(args.input, args.log_interval)
    bad_lines = common.BadLines(args.input, args.strict)
    index = None if args.no_near else LSHIndex(args.threshold, args.num_perm)
    exact_first, clusters = {}, {}  # exact hash -> kept lineno; kept lineno -> cluster
    stats = dict(documents=0, kept=0, exact_duplicates=0, near_duplicates=0)
    with common.jsonl_writer(args.output) as out:
        results = common.ordered_map(hash_batch, common.read_batches(args.input, progress), args.workers,
                                     init_worker, (args.json_key, args.num_perm, args.ngram, not args.no_near))
        for docs, bad in results:
            bad_lines.add(bad)
            for lineno, raw, exact, sig, example in docs:
                stats["documents"] += 1
                kept_as, kind, similarity = exact_first.get(exact), "exact", 1.0
                if kept_as is None and index is not None:
                    hit = index.query_or_add(lineno, sig)
                    if hit is not None:
                        (kept_as, similarity), kind = hit, "near"
                if kept_as is None:
                    exact_first[exact] = lineno
                    clusters[lineno] = dict(kept_line=lineno, kept_example=example, removed=[])
                    common.write_line(out, raw)
                    stats["kept"] += 1
                    continue
                stats[f"{kind}_duplicates"] += 1
                clusters[kept_as]["removed"].append(dict(line=lineno, kind=kind, similarity=round(similarity, 3),
                                                         example=example))
            progress.advance(len(docs))
    found = [dict(size=1 + len(c["removed"]), **c) for c in clusters.values() if c["removed"]]
    found.sort(key=lambda c: (-c["size"], c["kept_line"]))
    stats.update(skipped=bad_lines.count, clusters=len(found), docs_per_s=round(progress.docs_per_s, 1))
    params = dict(threshold=args.threshold, ngram=args.ngram, num_perm=args.num_perm, near=not args.no_near)
    if index is not None:
        params.update(lsh_bands=index.bands, lsh_rows=index.rows)
    common.write_report(args.report, dict(input=args.input, output=args.output, params=params, **stats,
                                          cluster_list=found[:args.max_report_clusters]))
    return stats


def main(argv=None) -> int:
    return common.tool_main(build_parser, run, argv, ("documents", "kept", "exact_duplicates", "near_duplicates",
                                                      "clusters", "skipped", "docs_per_s"))


if __name__ == "__main__":
    sys.exit(main())
