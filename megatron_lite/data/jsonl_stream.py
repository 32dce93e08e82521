"""Streaming a JSONL corpus in, for the tools that read one (preprocess_data and the curation tools):
input checks, batches of (line number, raw line) from plain or gzip files with one clear error for an
unreadable or damaged file, an ordered worker pool with a bounded number of batches in flight (memory
stays bounded for any input size), and the signal handlers that let Ctrl-C or `kill` unwind through
the tool so it deletes its temporaries.
"""
from __future__ import annotations

import gzip
import json
import multiprocessing
import os
import signal
import threading
import zlib
from typing import Callable, Iterable, Iterator, List, Tuple

from megatron_lite.errors import ConfigError, InputError, OutputPathError

BATCH_BYTES = 1 << 20
BATCH_LINES = 2048
UTF8_BOM = b"\xef\xbb\xbf"
# What reading a damaged .gz raises: a bad header or CRC (gzip.BadGzipFile, an OSError without a
# file name), a corrupt deflate stream (zlib.error), or a file cut short (EOFError).
GZIP_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile)


def check_readable(flag: str, path: str) -> None:
    if os.path.isdir(path):
        raise InputError(f"{flag} {path}: is a directory; give a file path")
    if not os.path.isfile(path):
        raise InputError(f"{flag} {path}: no such file")
    if not os.access(path, os.R_OK):
        raise InputError(f"{flag} {path}: file is not readable (check its permissions)")


def check_pool_args(args) -> None:
    """--workers and --log-interval, as every streaming tool takes them."""
    if args.workers < 1:
        raise ConfigError(f"--workers {args.workers}: must be at least 1")
    if args.log_interval < 1:
        raise ConfigError(f"--log-interval {args.log_interval}: must be at least 1")


def check_output_location(flag: str, path: str) -> None:
    """The directory an output goes to exists and is writable (checked before any work)."""
    out_dir = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(out_dir):
        raise OutputPathError(f"{flag} {path}: directory {out_dir} does not exist (create it first)")
    if not os.access(out_dir, os.W_OK):
        raise OutputPathError(f"{flag} {path}: directory {out_dir} is not writable")


def read_error(path: str, e: BaseException, lines_read=None) -> InputError:
    where = "" if lines_read is None else f" after line {lines_read}" if lines_read else " at its start"
    if isinstance(e, GZIP_ERRORS):
        return InputError(f"--input {path}: could not read it: corrupt or truncated gzip data{where} "
                          f"({str(e) or type(e).__name__}); re-download or re-compress the file")
    reason = (e.strerror if isinstance(e, OSError) else None) or str(e) or type(e).__name__
    return InputError(f"--input {path}: could not read it{where}: {reason}")


def read_batches(path: str, progress=None, batch_bytes: int = BATCH_BYTES,
                 batch_lines: int = BATCH_LINES) -> Iterator[List[Tuple[int, bytes]]]:
    """Lists of (1-based line number, raw line), about ``batch_bytes`` each; the BOM is dropped.
    ``progress.position`` (when given) follows the bytes read. A read error is an InputError naming
    the file and the last whole line read."""
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
                if size >= batch_bytes or len(batch) >= batch_lines:
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


def parse_json_line(raw: bytes, keys):
    """Return ({key: text}, None) or (None, reason) for one input line."""
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
    texts = {}
    for key in keys:
        if key not in obj:
            return None, f"missing key {key!r}"
        if not isinstance(obj[key], str):
            return None, f"value of key {key!r} is not a string (got {type(obj[key]).__name__})"
        try:
            obj[key].encode("utf-8")
        except UnicodeEncodeError as e:  # valid JSON ("\ud800"), but no text: a lone surrogate
            return None, f"value of key {key!r} is not valid Unicode ({e.reason} at character {e.start})"
        texts[key] = obj[key]
    return texts, None


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
        slots.release(in_flight + 1)  # the feeder thread stops at its next batch
        # close() + join(), not terminate(): an idle worker waits for a task holding the task queue's
        # lock, which terminate() must take first, so an early stop (Ctrl-C, an error) could hang there.
        # Closed, the pool finishes the few batches in flight and its workers exit.
        pool.close()
        pool.join()


def raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def install_signal_handlers() -> None:
    # Ctrl-C and `kill` unwind through the tool, which deletes its temporaries.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, raise_interrupt)
