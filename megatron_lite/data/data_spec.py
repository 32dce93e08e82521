"""--data-path and --split as data: which prefixes with which weights, and which share of each
shard's sequences each of train/valid/test gets. No imports from ``config`` (the config calls
these to check its flags, so both accept exactly the same strings)."""
from __future__ import annotations

import math
import os
import re
from typing import List, Optional, Sequence, Tuple

from megatron_lite.errors import ConfigError, DatasetError


def parse_data_path(data_path: Optional[Sequence[str]], flag: str = "--data-path"):
    """'PREFIX' or 'W1 P1 W2 P2 ...' -> (weights or None, prefixes)."""
    if not data_path:
        return None, []
    if isinstance(data_path, str):
        data_path = data_path.split()
    if len(data_path) == 1:
        return None, list(data_path)
    if len(data_path) % 2 != 0:
        raise ConfigError(f"{flag}: a weighted list must alternate WEIGHT PREFIX, got {list(data_path)}")
    try:
        weights = [float(w) for w in data_path[0::2]]
    except ValueError:
        raise ConfigError(f"{flag}: expected 'W1 PREFIX1 W2 PREFIX2 ...', got {list(data_path)}") from None
    if any(w < 0 or not math.isfinite(w) for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"{flag}: weights must be >= 0 and not all zero, got {weights}")
    return weights, list(data_path[1::2])


def check_prefix_files(prefix: str, flag: str = "--data-path") -> None:
    """The shard pair of ``prefix`` exists: names the file that is missing (or a directory in its place)."""
    for ext in (".bin", ".idx"):
        path = prefix + ext
        if os.path.isdir(path):
            raise DatasetError(f"{flag}: {path} is a directory, not a shard file; give the shard prefix "
                               "(the path without .bin/.idx)")
        if not os.path.isfile(path):
            raise DatasetError(f"{flag}: {path} does not exist; preprocess the corpus with "
                               "tools/preprocess_data.py or fix the prefix (no .bin/.idx suffix)")


def parse_split(split: str) -> List[float]:
    """'969,30,1' (or '969/30/1', fewer than three parts) -> three weights summing to 1.

    Every part must be a number, as in Megatron-LM: '80,,20' is an error, not '80,20'.
    """
    try:
        values = [float(p) for p in re.split(r"[,/]", str(split).strip())]
    except ValueError:
        raise DatasetError(f"--split must be up to three numbers like 969,30,1, got {split!r}") from None
    if not 1 <= len(values) <= 3 or any(v < 0 or not math.isfinite(v) for v in values) or sum(values) <= 0:
        raise DatasetError(f"--split must be up to three non-negative numbers, not all zero "
                              f"(like 969,30,1), got {split!r}")
    values += [0.0] * (3 - len(values))
    return [v / sum(values) for v in values]


def split_document_ranges(split: str, num_documents: int) -> List[Tuple[int, int]]:
    """[start, end) ranges of n = len(indexed dataset), i.e. of its sequences, for --split.

    Megatron-LM's rounding: cumulative round(fraction * n), then shifted so the last ends at n.
    """
    bounds = [0]
    for fraction in parse_split(split):
        bounds.append(bounds[-1] + int(round(fraction * float(num_documents))))
    excess = bounds[-1] - num_documents
    bounds[1:] = [b - excess for b in bounds[1:]]
    return [(bounds[i], bounds[i + 1]) for i in range(3)]
