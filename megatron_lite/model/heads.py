"""Output heads: what the last pipeline stage puts on top of the final layer norm.

A head is a module with ``forward(hidden[s, b, h], weight) -> output`` and
``loss(output, labels[b, s]) -> per-token fp32 loss [b, s]``; ``GPTModel`` calls both, so a task
replaces the head (``model.output_layer = ...``) to change what the model predicts and how it
is scored, without touching the transformer. The language-model head is registered as
``output_layer``, so its weight keeps Megatron-LM's checkpoint name ``output_layer.weight``;
``ClassificationHead`` (fine-tuning for text classification) replaces it.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from megatron_lite.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_lite.parallel.layers import ColumnParallelLinear, column_parallel_linear
from megatron_lite.parallel.mappings import gather_from_sequence_parallel
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


class ClassificationHead(nn.Module):
    """Class logits [s, b, C] from every position's final hidden state; the task scores only the
    last non-padding token (its loss mask), as a GPT classifier does.

    The head is small (C x h), so it is replicated, not split: every TP rank holds all of it and,
    given the same full hidden states, computes the same logits and the same gradients, so no
    collective is needed. Under sequence parallelism the hidden states are gathered first, and
    the gather's backward only keeps this rank's rows (the gradient is already whole on each rank).
    Logits for every position cost s x b x h x C, nothing next to the layers, and keep the head's
    contract (per-position output, per-token loss) so pipeline schedules and masks apply unchanged.
    """

    def __init__(self, hidden_size: int, num_classes: int, pstate: ParallelState, *, sequence_parallel: bool,
                 init_method=None, params_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.pstate, self.sequence_parallel, self.num_classes = pstate, sequence_parallel, num_classes
        # A submodule, so the names (output_layer.classifier.*) never collide with an LM head's weight.
        self.classifier = nn.Linear(hidden_size, num_classes, dtype=params_dtype, device=pstate.device)
        master = torch.empty((num_classes, hidden_size), dtype=torch.float32)
        if init_method is not None:
            init_method(master)  # drawn in full from the seed: every layout starts from the same head
        else:
            nn.init.normal_(master, std=0.02)
        with torch.no_grad():
            self.classifier.weight.copy_(master)
            self.classifier.bias.zero_()

    def forward(self, hidden: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.sequence_parallel:
            hidden = gather_from_sequence_parallel(hidden, tensor_parallel_output_grad=False, pstate=self.pstate)
        return self.classifier(hidden)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-position cross-entropy [b, s] against labels [b, s] (the mask picks the scored position)."""
        b, s = labels.shape
        flat = logits.transpose(0, 1).reshape(b * s, -1).float()
        return torch.nn.functional.cross_entropy(flat, labels.reshape(-1), reduction="none").view(b, s)
