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
import os
import sys
import time
from contextlib import contextmanager
from typing import Iterable, Tuple

from megatron_lite.data.jsonl_stream import (  # noqa: F401 - the curation tools use them as common.*
    GZIP_ERRORS, check_output_location, check_pool_args, check_readable, install_signal_handlers, ordered_map,
    parse_json_line, read_batches, read_error)
from megatron_lite.errors import ConfigError, InputError, OutputPathError
from megatron_lite.io_utils import atomic_path, write_json_atomic

MAX_SHOWN_BAD_LINES = 100


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help="JSONL file (optionally gzip-compressed, .jsonl.gz)")
    p.add_argument("--output", required=True, help="JSONL of the kept documents (.gz: compressed)")
    p.add_argument("--report", default=None, help="JSON report (default: OUTPUT's name + .report.json)")
    p.add_argument("--json-key", default="text", help="key of the text in each JSON object")
    p.add_argument("--workers", type=int, default=1, help="worker processes")
    p.add_argument("--log-interval", type=int, default=10000, help="report progress every N documents")
    p.add_argument("--strict", action="store_true", help="stop with exit code 1 at the first bad line")


def check_common_args(args) -> None:
    check_pool_args(args)
    check_readable("--input", args.input)
    if args.report is None:
        args.report = report_path(args.output)
    for flag, path in (("--output", args.output), ("--report", args.report)):
        check_output_location(flag, path)
    if os.path.abspath(args.output) == os.path.abspath(args.input):
        raise ConfigError(f"--output {args.output} is the --input file; write to another file")


def report_path(output: str) -> str:
    for ext in (".jsonl.gz", ".jsonl", ".gz"):
        if output.endswith(ext):
            return output[:-len(ext)] + ".report.json"
    return output + ".report.json"


def parse_line(raw: bytes, key: str):
    """(text, None) or (None, reason) for one input line."""
    texts, reason = parse_json_line(raw, (key,))
    return (None, reason) if texts is None else (texts[key], None)


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




def tool_main(build_parser, run, argv, summary_keys, extra=None) -> int:
    """A curation tool's entry point: parse, let signals unwind through ``run(args)`` (it deletes its
    temporaries), print ``done: key=value ...; report: PATH`` from the stats it returns, report errors
    as the one reporter does. ``extra(stats)`` adds a part before the report path."""
    from megatron_lite.cli import run_main

    args = build_parser().parse_args(argv)
    install_signal_handlers()

    def body() -> int:
        s = run(args)
        parts = [" ".join(f"{k.replace('docs_per_s', 'docs/s')}={s[k]}" for k in summary_keys)]
        if extra is not None:
            parts.append(extra(s))
        print(f"done: {'; '.join(parts)}; report: {args.report}", flush=True)
        return 0

    return run_main(body)
