"""Several datasets mixed by weight into one stream of a fixed size (Megatron-LM's blending).

Position i of the stream takes the next unused sample of the dataset furthest behind its
share: argmax_k weight_k * (i + 1) - count_k, ties to the lower index. Every prefix of the
stream then holds each dataset's share to within one sample for two datasets (provably:
count_0(n) = floor(w_0 n + 1/2)) and, as tested, for three; with four or more tiny weights
the greedy can overshoot by a fraction of a sample, as Megatron-LM's helpers.cpp does.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

from megatron_lite.data.gpt_dataset import FORMAT_VERSION, GPTDatasetError, load_or_build_cached


# Errors equal in exact arithmetic differ by float rounding (~t * 2e-16); treat such
# near-ties as ties, won by the lower index, so the two code paths agree on rational weights.
_TIE = 1e-13


def _greedy_choices(weights: Sequence[float], size: int) -> np.ndarray:
    """The dataset chosen at each position, by the greedy rule above.

    The rule is sequential (each choice depends on all earlier ones), so this is one tight
    loop over plain Python floats into a bytearray: about 0.3 us per position for two or
    three datasets, 1e6 positions in well under a second. The result is cached on disk.
    """
    w = [float(x) for x in weights]
    counts = [0] * len(w)
    others = range(1, len(w))
    out = bytearray(size)
    for i in range(size):
        t = i + 1
        tol = t * _TIE
        best, best_err = 0, w[0] * t - counts[0]
        for k in others:
            err = w[k] * t - counts[k]
            if err > best_err + tol:
                best, best_err = k, err
        out[i] = best
        counts[best] += 1
    return np.frombuffer(bytes(out), dtype=np.uint8)


def _two_way_choices(weight0: float, size: int) -> np.ndarray:
    """The greedy rule for two datasets in closed form, vectorised.

    Before position t = i + 1 the counts sum to i, so dataset 0 leads iff
    w0*t - c0 >= (1-w0)*t - (i - c0), i.e. c0 <= w0*t - 1/2; by induction
    c0(t) = floor(w0*t + 1/2) and position i goes to dataset 0 iff c0 steps up there.
    """
    t = np.arange(size + 1, dtype=np.float64)
    count0 = np.floor(weight0 * t + 0.5 + t * _TIE).astype(np.int64)
    return (np.diff(count0) == 0).astype(np.uint8)


def build_blending_indices(weights: Sequence[float], size: int) -> Tuple[np.ndarray, np.ndarray]:
    """(dataset_index int16 [size], dataset_sample_index int64 [size]) for normalised weights."""
    if not 1 <= len(weights) <= 255:
        raise GPTDatasetError(f"blending needs 1 to 255 datasets, got {len(weights)}")
    choices = _two_way_choices(weights[0], size) if len(weights) == 2 else _greedy_choices(weights, size)
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
                            "weights": self.weights, "size": self.size}
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
