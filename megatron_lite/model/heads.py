"""Output heads: what the last pipeline stage puts on top of the final layer norm.

A head is a module with ``forward(hidden[s, b, h], weight) -> output`` and
``loss(output, labels[b, s]) -> per-token fp32 loss [b, s]``; ``GPTModel`` calls both, so a task
replaces the head (``model.output_layer = ...``) to change what the model predicts and how it
is scored, without touching the transformer. The language-model head is registered as
``output_layer``, so its weight keeps Megatron-LM's checkpoint name ``output_layer.weight``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from megatron_lite.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_lite.parallel.layers import ColumnParallelLinear, column_parallel_linear
from megatron_lite.parallel.state import ParallelState


class LMHead(nn.Module):
    """Vocab-parallel logits [s, b, V/tp]: this rank's vocabulary shard of hidden @ W^T.

    Untied, the head owns W (a column-parallel weight seeded by ``init_method``); tied, the model
    passes the word-embedding shard as ``weight`` and the head owns nothing.
    """

    def __init__(self, hidden_size: int, vocab_size: int, pstate: ParallelState, *, tied: bool,
                 sequence_parallel: bool, init_method=None, params_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.pstate, self.sequence_parallel = pstate, sequence_parallel
        self.weight: Optional[nn.Parameter] = None
        if not tied:
            # A column-parallel layer builds and shards the weight exactly as the layers do.
            proj = ColumnParallelLinear(hidden_size, vocab_size, bias=False, gather_output=False,
                                        init_method=init_method, sequence_parallel=sequence_parallel,
                                        params_dtype=params_dtype, pstate=pstate)
            self.weight = proj.weight

    def forward(self, hidden: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        weight = self.weight if self.weight is not None else weight
        if weight is None:
            raise ValueError("LMHead: a tied head needs the word-embedding weight")
        return column_parallel_linear(hidden, weight, None, self.sequence_parallel, self.pstate)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-token cross-entropy [b, s] from logits [s, b, V/tp] (never gathers the vocabulary)."""
        loss = vocab_parallel_cross_entropy(logits.float(), labels.transpose(0, 1).contiguous(),
                                            pstate=self.pstate)
        return loss.transpose(0, 1).contiguous()
