"""The on-disk cache of sample indices, keyed by the md5 of a JSON description of what defines them.

Rank 0 builds and saves (atomically, so a crash leaves no half-written array that looks
complete); the other ranks wait at a barrier and load, or build themselves when their cache
directory is not shared. A cached array that is truncated, unreadable or of the wrong shape or
dtype is rebuilt in its place, never a traceback. torch is never imported here.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np

from megatron_lite.errors import DatasetError
from megatron_lite.io_utils import atomic_open, atomic_write_text

FORMAT_VERSION = 1


def description_hash(description: dict) -> str:
    return hashlib.md5(json.dumps(description, sort_keys=True).encode()).hexdigest()


def _distributed():
    """torch.distributed when a process group is up, else None (torch is never imported here)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return None
    return torch.distributed


Validator = Callable[[Dict[str, np.ndarray]], Optional[Tuple[str, str]]]


def _load_arrays(paths: Dict[str, str], validate: Optional[Validator]
                 ) -> Tuple[Optional[Dict[str, np.ndarray]], Optional[str]]:
    """(arrays, None) when every cached file loads and passes `validate`, else (None, reason).

    The reason names the file at fault: missing, truncated or unreadable (np.load fails, or the
    memory map is longer than the file), or of the wrong shape/dtype (`validate` says so)."""
    arrays = {}
    for name, path in paths.items():
        if not os.path.isfile(path):
            return None, f"{path}: missing"
        try:
            arrays[name] = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError, TypeError) as e:  # truncated, foreign or unreadable
            return None, f"{path}: unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        if not isinstance(arrays[name], np.ndarray):
            return None, f"{path}: not a single array"
    problem = validate(arrays) if validate is not None else None
    if problem:
        name, what = problem
        return None, f"{paths[name]}: {what}"
    return arrays, None


def load_or_build_cached(cache_dir: Optional[str], kind: str, description: dict,
                         names: Sequence[str], build: Callable[[], Tuple[np.ndarray, ...]],
                         validate: Optional[Validator] = None
                         ) -> Dict[str, np.ndarray]:
    """Arrays named `names` from `cache_dir`, building and saving them when absent.

    With torch.distributed initialised, global rank 0 builds first; the others wait at a
    barrier, then load, or build themselves if their cache directory is not shared.
    Without a cache_dir the arrays are built in memory.

    A cached file that is truncated, unreadable, or that `validate` refuses (wrong shape or
    dtype: it maps the loaded arrays to None, or to (name, problem) for the array at fault) is
    rebuilt and replaced atomically; a rebuild that cannot be written or read back ends in one
    DatasetError line naming the file.
    """
    if cache_dir is None:
        return dict(zip(names, build()))
    digest = description_hash(description)
    paths = {n: os.path.join(cache_dir, f"{digest}-{kind}-{n}.npy") for n in names}

    def build_and_save():
        try:
            os.makedirs(cache_dir, exist_ok=True)
        except OSError as e:
            raise DatasetError(f"cannot create the index cache directory {cache_dir} ({e.strerror}); "
                                  "pass --data-cache-path DIR on a writable disk") from None
        if not os.access(cache_dir, os.W_OK):
            raise DatasetError(f"the index cache directory {cache_dir} is not writable; "
                                  "pass --data-cache-path DIR on a writable disk")
        arrays = build()
        name = None
        try:
            for name, array in zip(names, arrays):
                with atomic_open(paths[name], "wb") as f:
                    np.save(f, array, allow_pickle=False)
            name = "description"
            atomic_write_text(os.path.join(cache_dir, f"{digest}-{kind}-description.json"),
                              json.dumps(description, indent=2, sort_keys=True))
        except OSError as e:
            where = paths.get(name) or os.path.join(cache_dir, f"{digest}-{kind}-description.json")
            raise DatasetError(f"{where}: cannot write the index cache ({e.strerror or e}); free space "
                               "or pass --data-cache-path DIR on a writable disk") from None

    def load_or_rebuild() -> Dict[str, np.ndarray]:
        arrays, _ = _load_arrays(paths, validate)
        if arrays is not None:
            return arrays
        build_and_save()  # absent, truncated, unreadable or of the wrong shape: rebuild atomically
        arrays, reason = _load_arrays(paths, validate)
        if arrays is None:
            raise DatasetError(f"{reason}, even after rebuilding the index cache; delete {cache_dir} "
                               "or pass --data-cache-path DIR")
        return arrays

    dist = _distributed()
    if dist is None:
        return load_or_rebuild()
    if dist.get_rank() == 0:
        arrays = load_or_rebuild()
        dist.barrier()
        return arrays
    dist.barrier()
    return load_or_rebuild()  # rank 0's files when the directory is shared, else this rank's own


def file_stamp(path: str) -> dict:
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def array_md5(array: np.ndarray) -> str:
    return hashlib.md5(np.ascontiguousarray(array).tobytes()).hexdigest()
