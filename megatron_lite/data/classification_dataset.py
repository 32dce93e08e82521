"""Text classification data: tokens with one label each, served as right-padded samples.

On disk (``tools/preprocess_classification.py``), each split is two Megatron-format shards with one
sequence per example: ``PREFIX_text_document`` (token ids) and ``PREFIX_label_document`` (one int32
class id), plus ``OUT_labels.json`` beside them (the class names, in id order). A sample is the text
cut to seq_length tokens and padded with EOD; the class id is the label of its last text token,
the only position with loss (the classifier reads the last non-padding token). torch-free.
"""
from __future__ import annotations

import json
from typing import List, Optional

import numpy as np

from megatron_lite.data.indexed_dataset import IndexedDataset
from megatron_lite.errors import DatasetError

TEXT_SUFFIX, LABEL_SUFFIX = "_text_document", "_label_document"


def labels_file(output_prefix: str) -> str:
    return output_prefix + "_labels.json"


def read_label_names(path: str) -> List[str]:
    try:
        with open(path, encoding="utf-8") as f:
            names = json.load(f)["labels"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DatasetError(f"{path}: cannot read the class names ({e}); write it with "
                           "tools/preprocess_classification.py") from None
    if not isinstance(names, list) or len(names) < 2:
        raise DatasetError(f"{path}: needs a list of at least 2 class names under 'labels'")
    return [str(n) for n in names]


class ClassificationDataset:
    """Samples {"text": seq+1 ids, "labels": seq ids, "loss_mask": seq values} for ``num_samples``
    samples (epochs repeat, each in its own order from ``seed`` with ``shuffle``)."""

    def __init__(self, prefix: str, seq_length: int, eod: int, num_classes: int, *,
                 num_samples: Optional[int] = None, shuffle: bool = False, seed: int = 1234):
        self.texts = IndexedDataset(prefix + TEXT_SUFFIX)
        labels = IndexedDataset(prefix + LABEL_SUFFIX)
        if len(labels) != len(self.texts) or np.any(labels.sequence_lengths != 1):
            raise DatasetError(f"{prefix}{LABEL_SUFFIX}: needs one label per example of {prefix}{TEXT_SUFFIX}; "
                               "write both with tools/preprocess_classification.py")
        if len(self.texts) == 0:
            raise DatasetError(f"{prefix}{TEXT_SUFFIX}: the split has no examples")
        self.labels = np.asarray(labels[0:len(labels)], dtype=np.int64).reshape(-1)
        if self.labels.min() < 0 or self.labels.max() >= num_classes:
            raise DatasetError(f"{prefix}{LABEL_SUFFIX}: class ids must lie in [0, {num_classes}) "
                               f"(the labels file names {num_classes} classes)")
        self.seq_length, self.eod = seq_length, eod
        n = len(self.texts)
        total = n if num_samples is None else num_samples
        orders = []
        for epoch in range((total + n - 1) // n):
            orders.append(np.random.RandomState(seed + epoch).permutation(n) if shuffle else np.arange(n))
        self.order = np.concatenate(orders)[:total]

    @property
    def num_examples(self) -> int:
        return len(self.texts)

    def __len__(self) -> int:
        return len(self.order)

    def example_index(self, idx: int) -> int:
        return int(self.order[idx])

    def __getitem__(self, idx: int) -> dict:
        ex = self.example_index(idx)
        tokens = self.texts[ex][:self.seq_length]
        text = np.full(self.seq_length + 1, self.eod, dtype=np.int64)
        text[:len(tokens)] = tokens
        last = len(tokens) - 1
        labels = np.zeros(self.seq_length, dtype=np.int64)
        labels[last] = self.labels[ex]
        mask = np.zeros(self.seq_length, dtype=np.float32)
        mask[last] = 1.0
        return {"text": text, "labels": labels, "loss_mask": mask}
