"""The on-disk cache of sample indices, keyed by the md5 of a JSON description of what defines them.

Rank 0 builds and saves (atomically, so a crash leaves no half-written array that looks
complete); the other ranks wait at a barrier and load, or build themselves when their cache
directory is not shared. torch is never imported here.
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


def load_or_build_cached(cache_dir: Optional[str], kind: str, description: dict,
                         names: Sequence[str], build: Callable[[], Tuple[np.ndarray, ...]]
                         ) -> Dict[str, np.ndarray]:
    """Arrays named `names` from `cache_dir`, building and saving them when absent.

    With torch.distributed initialised, global rank 0 builds first; the others wait at a
    barrier, then load, or build themselves if their cache directory is not shared.
    Without a cache_dir the arrays are built in memory.
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
        for name, array in zip(names, build()):
            with atomic_open(paths[name], "wb") as f:
                np.save(f, array, allow_pickle=False)
        atomic_write_text(os.path.join(cache_dir, f"{digest}-{kind}-description.json"),
                          json.dumps(description, indent=2, sort_keys=True))

    def cached() -> bool:
        return all(os.path.isfile(p) for p in paths.values())

    dist = _distributed()
    if (dist is None or dist.get_rank() == 0) and not cached():
        build_and_save()
    if dist is not None:
        dist.barrier()
        if not cached():
            build_and_save()
    return {n: np.load(p, mmap_mode="r", allow_pickle=False) for n, p in paths.items()}


def file_stamp(path: str) -> dict:
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def array_md5(array: np.ndarray) -> str:
    return hashlib.md5(np.ascontiguousarray(array).tobytes()).hexdigest()
