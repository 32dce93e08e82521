"""Micro-batches for this rank, in Megatron-LM's MegatronPretrainingSampler order.

The global batch of iteration i is samples [consumed, consumed + global_batch) of the dataset.
It is cut into micro-batch rounds of micro_batch x DP consecutive samples; in each round data-parallel
rank r takes samples [r * micro, (r + 1) * micro). So one process with DP=1 reads exactly the same
samples, in the same micro-batch grouping per rank, as a DP>1 layout reads together.

Every TP and PP rank of a replica reads the same samples itself (the datasets are deterministic
memory-mapped reads), instead of receiving a broadcast from TP rank 0: no collective per batch and
identical data by construction.
"""
from __future__ import annotations

from typing import Dict, Iterator, List, Optional

import numpy as np
import torch
from megatron_lite.errors import DataExhaustedError


def microbatch_sample_indices(consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                              num_microbatches: int) -> List[List[int]]:
    """Dataset indices of this DP rank's micro-batches for the global batch starting at ``consumed_samples``."""
    round_size = micro_batch_size * dp_size
    out = []
    for m in range(num_microbatches):
        start = consumed_samples + m * round_size + dp_rank * micro_batch_size
        out.append(list(range(start, start + micro_batch_size)))
    return out


def samples_to_batch(texts: torch.Tensor, eod: int, model_cfg, device,
                     sample_loss_mask: Optional[torch.Tensor] = None,
                     sample_labels: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """[b, s+1] token ids -> inputs, shifted labels, loss mask, position ids, attention mask.

    ``sample_loss_mask`` [b, s] (aligned with the labels) is the samples' own mask, when the dataset
    gives one (SFT masks the prompt): it replaces the all-ones default and is combined with the
    EOD mask when --eod-mask-loss is on. ``sample_labels`` [b, s]: targets that are not the next
    token (classification puts the class id at the last text token), replacing the shifted ids.
    """
    from megatron_lite.model.masks import get_ltor_masks_and_position_ids

    tokens = texts[:, :-1].contiguous()
    labels = texts[:, 1:].contiguous() if sample_labels is None else sample_labels.long()
    attention_mask, loss_mask, position_ids = get_ltor_masks_and_position_ids(
        tokens, eod, model_cfg.reset_position_ids, model_cfg.reset_attention_mask, model_cfg.eod_mask_loss)
    if sample_loss_mask is not None:
        if sample_loss_mask.shape != labels.shape:
            raise ValueError(f"a sample's loss_mask has shape {tuple(sample_loss_mask.shape)}, but its labels "
                             f"{tuple(labels.shape)}: the mask covers the seq_length predicted tokens")
        loss_mask = loss_mask * sample_loss_mask.to(loss_mask.dtype)
    batch = {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids,
             "attention_mask": attention_mask}
    return {k: (v.to(device, non_blocking=True) if v is not None else None) for k, v in batch.items()}


class MicroBatchIterator:
    """Yields this rank's micro-batches (dicts of tensors on ``device``) for one global batch."""

    def __init__(self, dataset, indices: List[List[int]], eod: int, model_cfg, device, split: str = "train"):
        self.dataset, self.indices, self.eod = dataset, indices, eod
        self.model_cfg, self.device, self.split = model_cfg, device, split
        self._next = 0

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> Dict[str, torch.Tensor]:
        if self._next >= len(self.indices):
            raise StopIteration
        idx = self.indices[self._next]
        self._next += 1
        if idx[-1] >= len(self.dataset):
            raise DataExhaustedError(
                f"the {self.split} dataset has {len(self.dataset)} samples but sample {idx[-1]} was requested; "
                "raise the sample count the dataset is built for or train fewer iterations")
        samples = [self.dataset[i] for i in idx]
        texts = np.stack([np.asarray(s["text"], dtype=np.int64) for s in samples])
        mask = labels = None
        if "loss_mask" in samples[0]:
            mask = torch.from_numpy(np.stack([np.asarray(s["loss_mask"], dtype=np.float32) for s in samples]))
        if "labels" in samples[0]:
            labels = torch.from_numpy(np.stack([np.asarray(s["labels"], dtype=np.int64) for s in samples]))
        return samples_to_batch(torch.from_numpy(texts), self.eod, self.model_cfg, self.device, mask, labels)


def build_data_iterators(dataset, consumed_samples: int, micro_batch_size: int, num_microbatches: int,
                         pstate, eod: int, model_cfg, num_chunks: int = 1, split: str = "train"):
    """One iterator per model chunk over the same micro-batches (the interleaved schedule runs each
    chunk over every micro-batch); a single iterator when there is one chunk."""
    indices = microbatch_sample_indices(consumed_samples, micro_batch_size, pstate.dp_rank, pstate.dp_size,
                                        num_microbatches)
    its = [MicroBatchIterator(dataset, indices, eod, model_cfg, pstate.device, split) for _ in range(num_chunks)]
    return its[0] if num_chunks == 1 else its
