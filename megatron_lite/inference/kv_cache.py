"""The key/value cache of incremental decoding (Megatron-LM's ``InferenceParams``).

    cache = KVCache(max_batch_size=4, max_sequence_length=256)
    model(tokens[:, :n], positions[:, :n], kv_cache=cache); cache.advance(n)   # prefill
    model(tokens[:, n:n+1], positions[:, n:n+1], kv_cache=cache); cache.advance(1)

Each attention layer stores the keys and values of THIS rank's heads (they are split over TP as the
heads are), in a buffer preallocated on first use as [max_sequence_length, max_batch_size, heads, head_dim]
in the activations' dtype; layers are keyed by their global number, so one cache serves every
pipeline stage and virtual chunk a rank holds. ``sequence_len_offset`` is how many positions are
already cached; the caller advances it once the whole model has seen the new tokens.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch


class KVCache:
    def __init__(self, max_batch_size: int, max_sequence_length: int):
        if max_batch_size < 1 or max_sequence_length < 1:
            raise ValueError(f"KVCache needs a positive batch and length, got {max_batch_size} x {max_sequence_length}")
        self.max_batch_size = max_batch_size
        self.max_sequence_length = max_sequence_length
        self.sequence_len_offset = 0
        self._layers: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, layer_number: int, key: torch.Tensor, value: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Store the new positions' key/value [n, b, heads, head_dim] after the cached ones and return
        the keys and values of every position so far, [offset + n, b, heads, head_dim]."""
        n, b = key.shape[:2]
        start, end = self.sequence_len_offset, self.sequence_len_offset + n
        if end > self.max_sequence_length or b > self.max_batch_size:
            raise ValueError(f"KVCache holds {self.max_batch_size} x {self.max_sequence_length} positions; "
                             f"asked to store batch {b} at positions {start}..{end - 1}")
        if layer_number not in self._layers:
            shape = (self.max_sequence_length, self.max_batch_size) + tuple(key.shape[2:])
            self._layers[layer_number] = (key.new_empty(shape), value.new_empty(shape))
        k_buf, v_buf = self._layers[layer_number]
        k_buf[start:end, :b] = key
        v_buf[start:end, :b] = value
        return k_buf[:end, :b], v_buf[:end, :b]

    def advance(self, n: int) -> None:
        self.sequence_len_offset += n

    def bytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self._layers.values())
