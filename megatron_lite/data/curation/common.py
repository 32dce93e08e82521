"""What the curation tools (dedup_corpus, filter_corpus, decontaminate) share: streaming JSONL in (.gz
too) with preprocess_data.py's bad-input rules, JSONL out under a temporary name, an ordered and
bounded worker pool, progress lines with docs/s and ETA, and the JSON report.

Bad input, as tools/preprocess_data.py: a malformed line is reported as ``FILE:LINE: reason``,
skipped and counted (``--strict``: the run stops with exit 1 and writes nothing); a corrupt or
truncated .gz is one error naming the file; an existing output is replaced only by a complete one.
Kept documents are written as their input lines, byte for byte (other keys survive).
"""
from __future__ import annotations

import argparse
import gzip
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
import zlib
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, List, Optional, Tuple

from megatron_lite.errors import ConfigError, InputError, OutputPathError
from megatron_lite.io_utils import atomic_path, write_json_atomic

BATCH_BYTES = 1 << 20
BATCH_LINES = 2048
MAX_SHOWN_BAD_LINES = 100
UTF8_BOM = b"\xef\xbb\xbf"
GZIP_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile)


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help="JSONL file (optionally gzip-compressed, .jsonl.gz)")
    p.add_argument("--output", required=True, help="JSONL of the kept documents (.gz: compressed)")
    p.add_argument("--report", default=None, help="JSON report (default: OUTPUT's name + .report.json)")
    p.add_argument("--json-key", default="text", help="key of the text in each JSON object")
    p.add_argument("--workers", type=int, default=1, help="worker processes")
    p.add_argument("--log-interval", type=int, default=10000, help="report progress every N documents")
    p.add_argument("--strict", action="store_true", help="stop with exit code 1 at the first bad line")


def check_common_args(args) -> None:
    if args.workers < 1:
        raise ConfigError(f"--workers {args.workers}: must be at least 1")
    if args.log_interval < 1:
        raise ConfigError(f"--log-interval {args.log_interval}: must be at least 1")
    check_readable("--input", args.input)
    if args.report is None:
        args.report = report_path(args.output)
    for flag, path in (("--output", args.output), ("--report", args.report)):
        out_dir = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(out_dir):
            raise OutputPathError(f"{flag} {path}: directory {out_dir} does not exist (create it first)")
        if not os.access(out_dir, os.W_OK):
            raise OutputPathError(f"{flag} {path}: directory {out_dir} is not writable")
    if os.path.abspath(args.output) == os.path.abspath(args.input):
        raise ConfigError(f"--output {args.output} is the --input file; write to another file")


def report_path(output: str) -> str:
    for ext in (".jsonl.gz", ".jsonl", ".gz"):
        if output.endswith(ext):
            return output[:-len(ext)] + ".report.json"
    return output + ".report.json"


def check_readable(flag: str, path: str) -> None:
    if os.path.isdir(path):
        raise InputError(f"{flag} {path}: is a directory; give a file path")
    if not os.path.isfile(path):
        raise InputError(f"{flag} {path}: no such file")
    if not os.access(path, os.R_OK):
        raise InputError(f"{flag} {path}: file is not readable (check its permissions)")


def read_error(path: str, e: BaseException, lines_read=None) -> InputError:
    where = "" if lines_read is None else f" after line {lines_read}" if lines_read else " at its start"
    if isinstance(e, GZIP_ERRORS):
        return InputError(f"--input {path}: could not read it: corrupt or truncated gzip data{where} "
                          f"({str(e) or type(e).__name__}); re-download or re-compress the file")
    reason = (e.strerror if isinstance(e, OSError) else None) or str(e) or type(e).__name__
    return InputError(f"--input {path}: could not read it{where}: {reason}")


def read_batches(path: str, progress: Optional["Progress"] = None) -> Iterator[List[Tuple[int, bytes]]]:
    """Lists of (1-based line number, raw line), about BATCH_BYTES each; the BOM is dropped."""
    lineno = 0
    try:
        with open(path, "rb") as raw:
            compressed = raw.read(2) == b"\x1f\x8b"
            raw.seek(0)
            f = gzip.GzipFile(fileobj=raw) if compressed else raw
            batch, size = [], 0
            for lineno, line in enumerate(f, start=1):
                if lineno == 1 and line.startswith(UTF8_BOM):
                    line = line[len(UTF8_BOM):]
                batch.append((lineno, line))
                size += len(line)
                if size >= BATCH_BYTES or len(batch) >= BATCH_LINES:
                    if progress is not None:
                        progress.position = raw.tell()
                    yield batch
                    batch, size = [], 0
            if batch:
                if progress is not None:
                    progress.position = raw.tell()
                yield batch
    except (OSError, *GZIP_ERRORS) as e:
        raise read_error(path, e, lineno) from None


def parse_line(raw: bytes, key: str):
    """(text, None) or (None, reason) for one input line."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"not valid UTF-8 ({e.reason} at byte {e.start})"
    if not line.strip():
        return None, "empty line"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return None, f"malformed JSON ({e.msg} at column {e.colno})"
    if not isinstance(obj, dict):
        return None, f"not a JSON object (got {type(obj).__name__})"
    if key not in obj:
        return None, f"missing key {key!r}"
    text = obj[key]
    if not isinstance(text, str):
        return None, f"value of key {key!r} is not a string (got {type(text).__name__})"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return None, f"value of key {key!r} is not valid Unicode ({e.reason} at character {e.start})"
    return text, None


def parse_batch(batch, key: str):
    """([(lineno, raw, text)], [(lineno, reason)]) for one batch."""
    good, bad = [], []
    for lineno, raw in batch:
        text, reason = parse_line(raw, key)
        if reason is None:
            good.append((lineno, raw, text))
        else:
            bad.append((lineno, reason))
    return good, bad


class BadLines:
    """Counts skipped lines, shows the first MAX_SHOWN_BAD_LINES; --strict stops at the first."""

    def __init__(self, source: str, strict: bool):
        self.source, self.strict, self.count = source, strict, 0

    def add(self, bad: Iterable[Tuple[int, str]]) -> None:
        for lineno, reason in bad:
            message = f"{self.source}:{lineno}: {reason}"
            if self.strict:
                raise InputError(f"{message} (--strict: stopping; no output written)")
            if self.count < MAX_SHOWN_BAD_LINES:
                print(f"warning: skipped {message}", file=sys.stderr)
            elif self.count == MAX_SHOWN_BAD_LINES:
                print("warning: further bad lines are counted but not shown", file=sys.stderr)
            self.count += 1


class Progress:
    """'processed N documents (X docs/s, P% of the input), elapsed E s, ETA T s' every N documents."""

    def __init__(self, path: str, interval: int):
        self.size, self.interval, self.position = max(os.path.getsize(path), 1), interval, 0
        self.start, self.documents, self._next = time.time(), 0, interval

    def advance(self, n: int) -> None:
        self.documents += n
        if self.documents < self._next:
            return
        self._next = (self.documents // self.interval + 1) * self.interval
        elapsed = max(time.time() - self.start, 1e-9)
        done = min(self.position / self.size, 1.0)
        eta = elapsed * (1 - done) / done if done > 0 else float("nan")
        print(f"processed {self.documents} documents ({self.documents / elapsed:.1f} docs/s, "
              f"{100 * done:.0f}% of the input), elapsed {elapsed:.1f} s, ETA {eta:.1f} s",
              file=sys.stderr, flush=True)

    @property
    def docs_per_s(self) -> float:
        return self.documents / max(time.time() - self.start, 1e-9)


@contextmanager
def jsonl_writer(path: str):
    """A binary file to write kept lines to; compressed when PATH ends in .gz; renamed into place
    only when the block completes."""
    try:
        with atomic_path(path) as tmp:
            with (gzip.open(tmp, "wb") if path.endswith(".gz") else open(tmp, "wb")) as f:
                yield f
    except OSError as e:
        if isinstance(e, GZIP_ERRORS) or e.filename is None or e.filename == path:
            raise OutputPathError(f"--output {path}: could not write it: {e.strerror or e}") from None
        raise


def write_line(f, raw: bytes) -> None:
    f.write(raw if raw.endswith(b"\n") else raw + b"\n")


def write_report(path: str, report: dict) -> None:
    write_json_atomic(path, report, indent=1)


def _bounded(iterable, slots: threading.Semaphore, stop: threading.Event):
    for item in iterable:
        slots.acquire()
        if stop.is_set():
            return
        yield item


def _init_pool_worker(initializer, initargs) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent alone handles Ctrl-C and stops the pool
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if initializer is not None:
        initializer(*initargs)


def ordered_map(func: Callable, batches: Iterable, workers: int, initializer=None, initargs=()):
    """func over batches, results in input order, with at most 4 x workers batches in flight (memory
    stays bounded for any input); workers == 1 runs in this process."""
    if workers == 1:
        if initializer is not None:
            initializer(*initargs)
        yield from map(func, batches)
        return
    in_flight = 4 * workers
    slots, stop = threading.Semaphore(in_flight), threading.Event()
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
    pool = ctx.Pool(workers, initializer=_init_pool_worker, initargs=(initializer, initargs))
    try:
        for result in pool.imap(func, _bounded(batches, slots, stop)):
            slots.release()
            yield result
    finally:
        stop.set()
        slots.release(in_flight + 1)
        pool.terminate()
        pool.join()


def raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def install_signal_handlers() -> None:
    # Ctrl-C and `kill` unwind through the tool, which deletes its temporaries.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, raise_interrupt)
