"""Write a file under a temporary name and os.replace() it into place only when complete.

A reader (or a resumed run) then sees either the old file or the whole new one, never a
half-written one. The temporary sits next to the target, so the rename stays on one file
system, and carries the pid plus a random suffix, so ranks or processes writing the same
path do not clobber each other's temporaries. torch is not imported here: data code that
must stay importable without it uses these helpers too.
"""
from __future__ import annotations

import json
import os
import uuid
from contextlib import contextmanager
from typing import Any, IO, Iterator


def temporary_name(path: str) -> str:
    return f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path to write; on success it replaces `path`, on any error it is removed."""
    tmp = temporary_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


@contextmanager
def atomic_open(path: str, mode: str = "w", *, fsync: bool = False, **open_kwargs) -> Iterator[IO]:
    """open() on a temporary name that replaces `path` when the block exits without an error.

    fsync=True flushes the data to disk before the rename, for files whose loss after a crash
    matters more than the write's cost (a checkpoint tracker).
    """
    with atomic_path(path) as tmp:
        with open(tmp, mode, **open_kwargs) as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())


def atomic_write_text(path: str, text: str, *, fsync: bool = False) -> None:
    with atomic_open(path, "w", fsync=fsync, encoding="utf-8") as f:
        f.write(text)


def write_json_atomic(path: str, obj: Any, indent: int = 1) -> None:
    """JSON of `obj` at `path` (parent folders created), ending in a newline."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent)
        f.write("\n")
