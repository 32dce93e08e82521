"""Several datasets mixed by weight into one stream of a fixed size (Megatron-LM's blending).

Which dataset serves each position is an apportionment: after every prefix of t positions,
dataset k has served count_k(t) samples with |count_k(t) - w_k * t| <= 1 - 1/(2m - 2), where
m >= 2 is the number of datasets of non-zero weight, so every share is exact to within one
sample at every point of the stream, for any number of datasets. Datasets of weight 0 are
never chosen. Two datasets use the closed form count_0(t) = floor(w_0 t + 1/2) (bound 1/2);
more use Tijdeman's chairman-assignment rule (R. Tijdeman, "The chairman assignment
problem", Discrete Mathematics 32, 1980), which meets the bound above. Megatron-LM's own
rule (helpers.cpp: the dataset furthest behind, argmax_k w_k t - count_k) does not: it
overshoots one sample from four datasets up (about 1.26 at eight with random weights).
"""
from __future__ import annotations

import heapq
from typing import Optional, Sequence, Tuple

import numpy as np

from megatron_lite.data.index_cache import FORMAT_VERSION, load_or_build_cached
from megatron_lite.errors import DatasetError as GPTDatasetError

BLEND_RULE = "tijdeman-1980"  # part of the cache key: indices built by an earlier rule are not reused


# Quantities equal in exact arithmetic differ by float rounding (~t * 2e-16); this slack makes
# a boundary case count on the side the exact rule puts it.
_TIE = 1e-13


def _chairman_choices(weights: Sequence[float], size: int) -> np.ndarray:
    """The dataset chosen at each position by Tijdeman's rule; weights normalised.

    With m datasets of non-zero weight and d = 1 - 1/(2m - 2), dataset k's (c+1)-th sample is a
    unit job that may run at a position t with c + 1 - w_k t <= d (else k would lead its share by
    more than d) and must run by the last t with w_k t - c <= d (else it would trail by more).
    Tijdeman proves that serving, at each t, the released job with the earliest such deadline,
    (c + d) / w_k, never misses one; this is that earliest-deadline-first schedule. Each
    dataset's jobs release and fall due in order, so it has one job in play at a time: it sits
    in `waiting` (keyed by release (c + 1 - d) / w_k) or in `ready` (keyed by deadline), two
    heaps of at most m entries; ties go to the lower index. O(size log m) in plain Python:
    1e6 positions take about 0.3 s for four datasets, 0.4 s for eight; the result is cached.
    """
    w = [float(x) for x in weights]
    active = [k for k, x in enumerate(w) if x > 0]
    if len(active) == 1:
        return np.full(size, active[0], dtype=np.uint8)
    d = 1.0 - 1.0 / (2 * len(active) - 2)
    inverse = [1.0 / x if x > 0 else 0.0 for x in w]
    counts = [0] * len(w)
    waiting = [((1.0 - d) * inverse[k], k) for k in active]
    heapq.heapify(waiting)
    ready: list = []
    push, pop = heapq.heappush, heapq.heappop
    out = bytearray(size)
    for i in range(size):
        t = i + 1
        released_by = t + t * _TIE
        while waiting and waiting[0][0] <= released_by:
            k = pop(waiting)[1]
            push(ready, ((counts[k] + d) * inverse[k], k))
        # `ready` is never empty in exact arithmetic (Tijdeman's theorem); should rounding
        # ever empty it, the job released next is the one that least exceeds the bound.
        k = pop(ready)[1] if ready else pop(waiting)[1]
        out[i] = k
        c = counts[k] + 1
        counts[k] = c
        push(waiting, ((c + 1.0 - d) * inverse[k], k))
    return np.frombuffer(bytes(out), dtype=np.uint8)


def _two_way_choices(weight0: float, size: int) -> np.ndarray:
    """Two datasets in closed form, vectorised: count_0(t) = floor(w0*t + 1/2).

    That is the nearest integer to w0*t (halves rounded up), so both datasets stay within 1/2
    of their shares, the bound 1 - 1/(2m - 2) for m = 2; it is also what "serve the dataset
    furthest behind" gives for two. Position i goes to dataset 0 iff count_0 steps up there.
    """
    t = np.arange(size + 1, dtype=np.float64)
    count0 = np.floor(weight0 * t + 0.5 + t * _TIE).astype(np.int64)
    return (np.diff(count0) == 0).astype(np.uint8)


def build_blending_indices(weights: Sequence[float], size: int) -> Tuple[np.ndarray, np.ndarray]:
    """(dataset_index int16 [size], dataset_sample_index int64 [size]) for normalised weights."""
    if not 1 <= len(weights) <= 255:
        raise GPTDatasetError(f"blending needs 1 to 255 datasets, got {len(weights)}")
    choices = _two_way_choices(weights[0], size) if len(weights) == 2 else _chairman_choices(weights, size)
    dataset_index = choices.astype(np.int16)
    # The j-th time dataset k is chosen it serves its sample j: a per-dataset running count.
    sample_index = np.empty(size, dtype=np.int64)
    for k in range(len(weights)):
        mask = dataset_index == k
        sample_index[mask] = np.arange(int(mask.sum()), dtype=np.int64)
    return dataset_index, sample_index


class BlendedDataset:
    """datasets[k][j] served at the positions the blending index gives them; len == size."""

    def __init__(self, datasets: Sequence, weights: Sequence[float], size: int,
                 cache_dir: Optional[str] = None):
        if len(datasets) != len(weights) or not datasets:
            raise GPTDatasetError(f"blending needs one weight per dataset, got {len(weights)} weights "
                                  f"for {len(datasets)} datasets")
        weights = np.asarray(weights, dtype=np.float64)
        if np.any(weights < 0) or not np.isfinite(weights).all() or weights.sum() <= 0:
            raise GPTDatasetError(f"--data-path weights must be >= 0 and not all zero, got {weights.tolist()}")
        if size < 0:
            raise GPTDatasetError(f"blended dataset size must be >= 0, got {size}")
        self.datasets, self.size = list(datasets), int(size)
        self.weights = (weights / weights.sum()).tolist()
        # The index depends on nothing but the normalised weights and the size.
        self.description = {"class": "BlendedDataset", "format_version": FORMAT_VERSION,
                            "rule": BLEND_RULE, "weights": self.weights, "size": self.size}
        arrays = load_or_build_cached(cache_dir, "BlendedDataset", self.description,
                                      ("dataset_index", "dataset_sample_index"),
                                      lambda: build_blending_indices(self.weights, self.size))
        self.dataset_index = arrays["dataset_index"]
        self.dataset_sample_index = arrays["dataset_sample_index"]
        needed = np.bincount(self.dataset_index, minlength=len(self.datasets))
        for k, (dataset, n) in enumerate(zip(self.datasets, needed)):
            if n > len(dataset):
                raise GPTDatasetError(f"blended dataset {k} (weight {self.weights[k]:.4g}) has {len(dataset)} "
                                      f"samples but the blend of {self.size} needs {int(n)}; build it larger")

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int):
        if not -self.size <= idx < self.size:
            raise IndexError(f"sample {idx} out of range for a blend of {self.size}")
        k = int(self.dataset_index[idx])
        return self.datasets[k][int(self.dataset_sample_index[idx])]
