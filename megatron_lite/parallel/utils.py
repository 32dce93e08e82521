"""Small shape helpers shared by the tensor-parallel layers and mappings."""
from __future__ import annotations

from typing import List, Sequence

import torch


def divide(numerator: int, denominator: int) -> int:
    """``numerator // denominator``, refusing sizes that do not split evenly across ranks."""
    if denominator <= 0 or numerator % denominator != 0:
        raise ValueError(f"{numerator} is not divisible by {denominator}; "
                         "choose sizes that are a multiple of the tensor-parallel size")
    return numerator // denominator


def split_tensor_along_dim(tensor: torch.Tensor, num_partitions: int, dim: int = -1,
                           contiguous: bool = False) -> Sequence[torch.Tensor]:
    """Split ``tensor`` into ``num_partitions`` equal chunks along ``dim``.

    Chunks are views unless ``contiguous``; collectives need contiguous buffers, so callers that
    hand a chunk to torch.distributed ask for it.
    """
    size = divide(tensor.size(dim), num_partitions)
    chunks = torch.split(tensor, size, dim=dim)
    if contiguous:
        return tuple(c.contiguous() for c in chunks)
    return chunks


def vocab_range_for_rank(global_vocab_size: int, rank: int, world_size: int) -> List[int]:
    """[first, last) ids of the vocabulary shard held by ``rank`` (even split, Megatron order)."""
    per_rank = divide(global_vocab_size, world_size)
    first = rank * per_rank
    return [first, first + per_rank]
