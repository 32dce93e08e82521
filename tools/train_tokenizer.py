#!/usr/bin/env python
"""Train a GPT-2 style byte-level BPE tokenizer on JSONL or plain-text files.

    python tools/train_tokenizer.py --input corpus.jsonl more.txt --vocab-size 32000 --output-dir tok/

Writes, in --output-dir, vocab.json + merges.txt in GPT-2 format (for --tokenizer-type GPT2BPETokenizer
--vocab-file/--merge-file) and tokenizer.json (for --tokenizer-type HuggingFaceTokenizer --tokenizer-model).
The vocabulary holds the 256 byte symbols, the special token <|endoftext|> and the learned merges.

Inputs: .jsonl/.json (one JSON object per line; the strings under --json-keys are documents), optionally
gzipped (.jsonl.gz/.json.gz), and .txt/.txt.gz (each line is a document; consecutive lines are fed
together so that runs of newlines are learned as in running text).
"""
import argparse
import gzip
import json
import os
import shutil
import sys
import tempfile
import time
import zlib

from megatron_lite.cli import run_main
from megatron_lite.data.tokenizer import EOD_TOKEN, GPT2BPETokenizer
from megatron_lite.errors import ConfigError, InputError, OutputPathError

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
TEXT_SUFFIXES = (".txt", ".txt.gz")
TEXT_CHUNK_CHARS = 1 << 16  # lines of a .txt are handed to the trainer in runs of about this size
PROGRESS_EVERY_S = 2.0
MIN_VOCAB = 256 + 1  # the byte alphabet plus <|endoftext|>
OUTPUT_FILES = ("vocab.json", "merges.txt", "tokenizer.json")
UTF8_BOM = b"\xef\xbb\xbf"
# What reading a damaged .gz raises: a bad header or CRC (gzip.BadGzipFile, an OSError without a
# file name), a corrupt deflate stream (zlib.error), or a file cut short (EOFError).
GZIP_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="training files: .jsonl/.json[.gz] or .txt[.gz]")
    p.add_argument("--json-keys", nargs="+", default=["text"], metavar="KEY",
                   help="keys of each JSON line whose strings are documents (default: text)")
    p.add_argument("--vocab-size", type=int, required=True,
                   help=f"vocabulary size including the 256 byte symbols and {EOD_TOKEN}")
    p.add_argument("--min-frequency", type=int, default=2,
                   help="a pair must occur at least this often to be merged (default: 2)")
    p.add_argument("--output-dir", required=True, help="where vocab.json, merges.txt, tokenizer.json go")
    return p


def _open_text(path: str):
    # Bytes, not text: a UTF-8 error is then reported with its line number by the readers below.
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _lines(path: str):
    """Yield (1-based line number, raw bytes) of `path`, without a leading UTF-8 byte-order mark.

    A damaged .gz (corrupt deflate stream, bad CRC, cut short) or a failed read is an InputError
    naming the file and the last whole line read."""
    lineno = 0
    try:
        with _open_text(path) as f:
            for lineno, raw in enumerate(f, start=1):
                if lineno == 1 and raw.startswith(UTF8_BOM):
                    raw = raw[len(UTF8_BOM):]
                yield lineno, raw
    except (OSError, *GZIP_ERRORS) as e:
        if isinstance(e, OSError) and not isinstance(e, gzip.BadGzipFile) and e.filename is not None:
            raise  # e.g. permission denied on open: run_main names the file
        where = f"after line {lineno}" if lineno else "at its start"
        if isinstance(e, GZIP_ERRORS):
            raise InputError(f"{path}: corrupt or truncated gzip data {where} ({str(e) or type(e).__name__}); "
                             f"re-download or re-compress the file") from None
        raise InputError(f"{path}: could not read it {where}: {e.strerror or e}") from None


def _decode(raw: bytes, path: str, lineno: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start}); "
                         f"convert the file to UTF-8") from None


def read_jsonl(path: str, keys):
    """Yield (document, n_bytes) for each requested key of each line; errors name file:line."""
    for lineno, raw in _lines(path):
        line = _decode(raw, path, lineno)
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno}); "
                             f"each line must be one JSON object") from None
        if not isinstance(obj, dict):
            raise InputError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        for key in keys:
            if key not in obj:
                raise InputError(f"{path}:{lineno}: no key {key!r} (keys: {', '.join(map(repr, obj))}); "
                                 f"choose the keys with --json-keys")
            if not isinstance(obj[key], str):
                raise InputError(f"{path}:{lineno}: {key!r} holds {type(obj[key]).__name__}, not a string")
            try:
                obj[key].encode("utf-8")
            except UnicodeEncodeError as e:  # valid JSON ("\ud800") but not text; the trainer would crash
                raise InputError(f"{path}:{lineno}: {key!r} is not valid Unicode ({e.reason} at character "
                                 f"{e.start}); remove the lone surrogate escape from that line") from None
            yield obj[key], len(raw), 1


def read_text(path: str):
    """Yield (run of whole lines, n_bytes, n_lines); a line counts as one document in the progress."""
    chunk, size, lines = [], 0, 0
    for lineno, raw in _lines(path):
        chunk.append(_decode(raw, path, lineno))
        size += len(raw)
        lines += 1
        if size >= TEXT_CHUNK_CHARS:
            yield "".join(chunk), size, lines
            chunk, size, lines = [], 0, 0
    if chunk:
        yield "".join(chunk), size, lines


class Progress:
    def __init__(self):
        self.docs, self.bytes, self.start, self.last = 0, 0, time.time(), 0.0

    def add(self, n_bytes: int, n_docs: int):
        self.docs += n_docs
        self.bytes += n_bytes
        now = time.time()
        if now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            self.report("reading")

    def report(self, what: str):
        print(f"{what}: {self.docs:,} documents, {self.bytes / 1e6:.1f} MB, "
              f"{time.time() - self.start:.1f} s elapsed", file=sys.stderr, flush=True)


def gzip_damage(path: str):
    """The InputError that reading all of `path` ends in when it is a damaged .gz, else None."""
    try:
        for _ in _lines(path):
            pass
    except InputError as e:
        return e
    return None


def _blaming_damaged_gzip(path: str, reader):
    # A corrupt deflate stream first inflates to garbage (bad UTF-8, bad JSON) and fails its CRC
    # check only at the end: when a line of a .gz is bad, name the damaged file as the cause.
    try:
        yield from reader
    except InputError:
        damage = gzip_damage(path)
        if damage is not None:
            raise damage from None
        raise


def reader_for(path: str, keys):
    reader = read_jsonl(path, keys) if path.endswith(JSONL_SUFFIXES) else read_text(path)
    return _blaming_damaged_gzip(path, reader) if path.endswith(".gz") else reader


def documents(paths, keys, progress: Progress):
    for path in paths:
        for text, n_bytes, n_docs in reader_for(path, keys):
            progress.add(n_bytes, n_docs)
            yield text
    progress.report("read all input")
    print("learning merges ...", file=sys.stderr, flush=True)


def check_args(args):
    for path in args.input:
        if os.path.isdir(path):
            raise InputError(f"--input: {path} is a directory; give a file path")
        if not os.path.isfile(path):
            raise InputError(f"--input: {path} does not exist or is not a file")
        if not path.endswith(JSONL_SUFFIXES + TEXT_SUFFIXES):
            raise InputError(f"--input: {path} has an unsupported extension; use "
                             f"{', '.join(JSONL_SUFFIXES + TEXT_SUFFIXES)}")
    if args.vocab_size < MIN_VOCAB:
        raise ConfigError(f"--vocab-size {args.vocab_size} is too small: the byte alphabet and "
                         f"{EOD_TOKEN} alone take {MIN_VOCAB}")
    if args.min_frequency < 1:
        raise ConfigError(f"--min-frequency must be >= 1, got {args.min_frequency}")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise OutputPathError(f"--output-dir {args.output_dir} exists and is not a directory")


def train(args):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)  # offsets only; ids unchanged
    trainer = trainers.BpeTrainer(vocab_size=args.vocab_size, min_frequency=args.min_frequency,
                                  special_tokens=[EOD_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    progress = Progress()
    tok.train_from_iterator(documents(args.input, args.json_keys, progress), trainer=trainer)
    if progress.docs == 0:
        raise InputError("the --input files hold no documents")
    return tok, progress


def write_outputs(tok, output_dir: str, sample: str):
    """Write the three files under temporary names, check they load, then rename them into place."""
    os.makedirs(output_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".train_tokenizer-", dir=output_dir)
    try:
        tok.model.save(tmp)  # vocab.json + merges.txt, GPT-2 format with a '#version' header
        tok.save(os.path.join(tmp, "tokenizer.json"))
        # The written files must load, and the two GPT2BPETokenizer paths must agree on real text.
        files = os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt")
        fast, pure = GPT2BPETokenizer(*files, fast=True), GPT2BPETokenizer(*files, fast=False)
        ids = fast.tokenize(sample)
        if ids != pure.tokenize(sample) or fast.detokenize(ids) != sample:
            raise RuntimeError("internal error: the trained files tokenize differently in the two paths")
        for name in OUTPUT_FILES:
            os.replace(os.path.join(tmp, name), os.path.join(output_dir, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return fast.vocab_size


def first_text(paths, keys, limit: int = 1 << 16) -> str:
    """A sample of the training text (from the start of the first file) for the self-check."""
    for text, _, _ in reader_for(paths[0], keys):
        return text[:limit]
    return ""


def run(args) -> int:
    check_args(args)
    tok, progress = train(args)
    vocab_size = write_outputs(tok, args.output_dir, first_text(args.input, args.json_keys))
    merges = vocab_size - MIN_VOCAB
    note = "" if vocab_size == args.vocab_size else \
        f" (asked for {args.vocab_size}: no more pairs reach --min-frequency {args.min_frequency})"
    print(f"trained vocab of {vocab_size} tokens ({merges} merges){note} from {progress.docs:,} documents, "
          f"{progress.bytes / 1e6:.1f} MB in {time.time() - progress.start:.1f} s; "
          f"wrote {', '.join(os.path.join(args.output_dir, name) for name in OUTPUT_FILES)}")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_main(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
