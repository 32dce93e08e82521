"""Tokenize a JSONL corpus into Megatron .bin/.idx shards (Megatron-LM's tools/preprocess_data.py).

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/my \\
        --tokenizer-type GPT2BPETokenizer --vocab-file vocab.json --merge-file merges.txt \\
        --append-eod --workers 4

writes data/my_text_document.{bin,idx} (one pair per --json-keys key). Documents keep the input
order for any --workers. Bad lines are reported as FILE:LINE and skipped (--strict: exit 1).
Outputs are written under temporary names and renamed only when complete.
A UTF-8 byte-order mark at the start of the input is dropped; a corrupt or truncated .gz stops
the run with one error naming the file (an existing output is left as it was).
"""

import argparse
import os
import resource
import sys
import time
import warnings

import numpy as np

from megatron_lite.cli import run_main
from megatron_lite.data.jsonl_stream import (GZIP_ERRORS, check_output_location, check_pool_args, check_readable,
                                             install_signal_handlers, ordered_map, parse_json_line, read_batches,
                                             read_error)
from megatron_lite.data.indexed_dataset import IndexedDatasetBuilder, best_dtype, data_file_path, index_file_path
from megatron_lite.errors import ConfigError, InputError, OutputPathError, TokenizerError

BATCH_BYTES = 256 * 1024  # lines per task are grouped up to this many bytes: big enough to amortize IPC
BATCH_LINES = 1024
MAX_SHOWN_BAD_LINES = 100
INTERRUPTED_MESSAGE = "interrupted: no output written"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_argument_group("input data")
    g.add_argument("--input", required=True, help="JSONL file (optionally gzip-compressed, .jsonl.gz)")
    g.add_argument("--json-keys", nargs="+", default=["text"],
                   help="keys to extract from each JSON object; one output pair per key")
    g.add_argument("--strict", action="store_true", help="stop with exit code 1 at the first bad line")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True,
                   choices=["GPT2BPETokenizer", "HuggingFaceTokenizer", "NullTokenizer"])
    g.add_argument("--vocab-file", default=None, help="GPT-2 vocab.json")
    g.add_argument("--merge-file", default=None, help="GPT-2 merges.txt")
    g.add_argument("--tokenizer-model", default=None, help="HuggingFace tokenizer.json")
    g.add_argument("--vocab-size", type=int, default=None, help="vocabulary size (NullTokenizer)")
    g.add_argument("--append-eod", action="store_true", help="append the end-of-document token")
    g.add_argument("--tokenizer-impl", choices=["fast", "python"], default="fast",
                   help="project flag: 'fast' (BPE merges in the Rust tokenizers library) or 'python' "
                        "(pure-Python BPE); "
                        "GPT2BPETokenizer only, the other types have a single implementation")
    g = p.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True, help="writes PREFIX_KEY_document.bin/.idx")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    g.add_argument("--log-interval", type=int, default=1000, help="report progress every N documents")
    return p


def _tokenizer_kwargs(args) -> dict:
    return dict(tokenizer_type=args.tokenizer_type, vocab_file=args.vocab_file, merge_file=args.merge_file,
                tokenizer_model=args.tokenizer_model, vocab_size=args.vocab_size,
                fast=args.tokenizer_impl == "fast")


def check_args(args) -> None:
    check_pool_args(args)
    check_readable("--input", args.input)
    for flag, path in (("--vocab-file", args.vocab_file), ("--merge-file", args.merge_file),
                       ("--tokenizer-model", args.tokenizer_model)):
        if path is not None:
            check_readable(flag, path)
    check_output_location("--output-prefix", args.output_prefix)
    if len(set(args.json_keys)) != len(args.json_keys):
        raise ConfigError(f"--json-keys {' '.join(args.json_keys)}: a key is repeated")


def load_tokenizer(args):
    # Imported here so that `--help` and argument errors do not pay for the tokenizer import.
    from megatron_lite.data.tokenizer import build_tokenizer
    try:
        return build_tokenizer(**_tokenizer_kwargs(args))
    except (TokenizerError, OSError) as e:
        raise TokenizerError(f"could not build the {args.tokenizer_type} tokenizer: {e}") from None


# -- workers -------------------------------------------------------------------------------------
_worker = {}


def init_worker(tokenizer_kwargs, json_keys, append_eod, dtype, source_name, tokenizer=None) -> None:
    """Sets up this process's tokenizer once: the parent passes its own, already built, and forked
    workers inherit it; only a worker started afresh (spawn) builds one from the files."""
    tokenizer = tokenizer or _worker.get("tokenizer")
    if tokenizer is None:
        from megatron_lite.data.tokenizer import build_tokenizer
        tokenizer = build_tokenizer(**tokenizer_kwargs)
    _worker.update(tokenizer=tokenizer, keys=json_keys, eod=append_eod, dtype=np.dtype(dtype),
                   source=source_name)


def quiet_init_worker(*init_args) -> None:
    """A pool worker's initializer (the pool itself leaves Ctrl-C and kill to the parent)."""
    warnings.simplefilter("ignore")  # the parent has said whatever building the tokenizer had to say
    init_worker(*init_args)


def _tokenize_one(tok, text):
    to_numpy = getattr(tok, "tokenize_to_numpy", None)  # GPT2BPETokenizer: no Python list per text
    return to_numpy(text) if to_numpy is not None else np.asarray(tok.tokenize(text), dtype=np.int64)


def _tokenize_texts(tok, texts):
    """Id arrays per text, or None where the tokenizer rejects a text (e.g. NullTokenizer on words)."""
    ids, errors = [], {}
    for i, text in enumerate(texts):
        try:
            ids.append(_tokenize_one(tok, text))
        except ValueError as e:
            ids.append(None)
            errors[i] = str(e)
    return ids, errors


def encode_batch(batch):
    """Tokenize one batch of (line number, raw bytes); returns per-key token runs and bad lines."""
    tok, keys, dtype, source = _worker["tokenizer"], _worker["keys"], _worker["dtype"], _worker["source"]
    good, bad, nbytes = [], {}, 0
    for lineno, raw in batch:
        nbytes += len(raw)
        texts, reason = parse_json_line(raw, keys)
        if reason is None:
            good.append((lineno, texts))
        else:
            bad[lineno] = reason
    ids_per_key = {}
    for key in keys:
        ids, errors = _tokenize_texts(tok, [texts[key] for _, texts in good]) if good else ([], {})
        for i, message in errors.items():
            bad.setdefault(good[i][0], f"key {key!r} could not be tokenized: {message}")
        ids_per_key[key] = ids
    keep = [i for i, (lineno, _) in enumerate(good) if lineno not in bad]
    out = {}
    for key, ids in ids_per_key.items():
        ids = [ids[i] for i in keep] if len(keep) < len(ids) else ids
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        flat = np.concatenate(ids).astype(dtype, copy=False) if ids else np.zeros(0, dtype)
        if _worker["eod"]:
            # After each document's last token; as in Megatron, an empty text stays an empty
            # document (no lone end-of-document token).
            nonempty = lengths > 0
            flat = np.insert(flat, np.cumsum(lengths)[nonempty], tok.eod)
            lengths = lengths + nonempty
        out[key] = (flat, lengths)
    return out, [f"{source}:{lineno}: {reason}" for lineno, reason in sorted(bad.items())], nbytes


def gzip_damage(path: str):
    """The InputError that reading all of `path` ends in when it is a damaged .gz, else None."""
    with open(path, "rb") as f:
        if f.read(2) != b"\x1f\x8b":
            return None
    try:
        for _ in read_batches(path):
            pass
    except InputError as e:
        return e
    return None


def output_prefix(args, key: str) -> str:
    return f"{args.output_prefix}_{key}_document"


def run(args) -> dict:
    check_args(args)
    tokenizer = load_tokenizer(args)
    dtype = best_dtype(tokenizer.vocab_size, source=args.tokenizer_model or args.vocab_file or
                       f"--vocab-size {args.vocab_size}")
    init_args = (_tokenizer_kwargs(args), list(args.json_keys), args.append_eod, np.dtype(dtype).str,
                 args.input)
    builders = {key: IndexedDatasetBuilder(data_file_path(output_prefix(args, key)), dtype)
                for key in args.json_keys}
    stats = dict(documents=0, skipped=0, tokens=0, bytes=0)
    start, cpu_start = time.time(), _cpu_seconds()
    next_log = args.log_interval
    results = None
    try:
        init_worker(*init_args, tokenizer=tokenizer)  # before the pool: forked workers inherit it
        results = ordered_map(encode_batch, read_batches(args.input, batch_bytes=BATCH_BYTES, batch_lines=BATCH_LINES),
                              args.workers, initializer=quiet_init_worker if args.workers > 1 else None,
                              initargs=init_args)
        for out, bad, nbytes in results:
            for message in bad:
                if args.strict:
                    # A corrupt .gz inflates to garbage lines before its CRC check fails: name the cause.
                    raise (gzip_damage(args.input)
                           or InputError(f"{message} (--strict: stopping; no output written)"))
                if stats["skipped"] < MAX_SHOWN_BAD_LINES:
                    print(f"warning: skipped {message}", file=sys.stderr)
                elif stats["skipped"] == MAX_SHOWN_BAD_LINES:
                    print("warning: further bad lines are counted but not shown", file=sys.stderr)
                stats["skipped"] += 1
            for key, (flat, lengths) in out.items():
                builders[key].add_documents(flat, lengths)
                stats["tokens"] += int(flat.size)
            stats["documents"] += len(out[args.json_keys[0]][1])
            stats["bytes"] += nbytes
            if stats["documents"] >= next_log:
                next_log = (stats["documents"] // args.log_interval + 1) * args.log_interval
                _log_progress(stats, time.time() - start)
        for key, builder in builders.items():
            builder.finalize(index_file_path(output_prefix(args, key)))
    except GZIP_ERRORS as e:  # a reading error that escaped read_batches (e.g. through a worker)
        raise read_error(args.input, e) from None
    except OSError as e:
        raise OutputPathError(f"--output-prefix {args.output_prefix}: could not write the output: {e}") from None
    finally:
        if results is not None:
            results.close()  # stops the pool (its workers are joined before the CPU time is read)
        for builder in builders.values():
            builder.abort()  # no-op for finalized builders; removes temporaries otherwise
    stats["seconds"] = time.time() - start
    stats["cpu_seconds"] = _cpu_seconds() - cpu_start  # pool workers are joined by now
    return stats


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the pool workers)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _log_progress(stats, elapsed) -> None:
    elapsed = max(elapsed, 1e-9)
    print(f"processed {stats['documents']} documents ({stats['documents'] / elapsed:.1f} docs/s, "
          f"{stats['bytes'] / elapsed / 1e6:.2f} MB/s, {stats['tokens'] / elapsed:.0f} tokens/s), "
          f"elapsed {elapsed:.1f} s", file=sys.stderr, flush=True)


def format_summary(stats) -> str:
    return (f"done: documents={stats['documents']} skipped={stats['skipped']} tokens={stats['tokens']} "
            f"MB={stats['bytes'] / 1e6:.3f} seconds={stats['seconds']:.3f} cpu_seconds={stats['cpu_seconds']:.3f} "
            f"tokens/s={stats['tokens'] / max(stats['seconds'], 1e-9):.0f}")


def _format_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # --workers is the parallelism: keep the Rust tokenizer to one thread per process.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    warnings.formatwarning = _format_warning
    # Ctrl-C and `kill` both unwind through run(), which deletes the temporaries (a shell may
    # have started us with SIGINT ignored, so install the handler explicitly).
    install_signal_handlers()

    def body() -> int:
        print(format_summary(run(args)), flush=True)
        return 0

    return run_main(body, interrupted_message=INTERRUPTED_MESSAGE)


if __name__ == "__main__":
    sys.exit(main())
