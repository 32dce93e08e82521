"""Weight, gradient and optimizer-state memory per rank (Megatron-LM's theoretical memory report).

Per parameter held by a rank: its weights in the model dtype; its gradient in the contiguous
buffer (fp32 for fp16/bf16 models, which accumulate and reduce in fp32); Adam's two fp32 moments
plus, for fp16/bf16, an fp32 master copy. ZeRO-1 (``--use-distributed-optimizer``) keeps the
optimizer state of 1/DP of the parameters on each DP rank.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

ADAM_BYTES = 8  # exp_avg + exp_avg_sq, fp32
MASTER_BYTES = 4  # fp32 master weight of an fp16/bf16 parameter


@dataclass
class WeightMemory:
    params: int  # parameters held by this rank
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int  # without ZeRO-1
    optimizer_bytes_zero1: int  # with ZeRO-1 at this DP size
    dp_size: int
    zero1: bool  # whether this run shards the optimizer

    @property
    def total_bytes(self) -> int:
        return self.param_bytes + self.grad_bytes + (self.optimizer_bytes_zero1 if self.zero1 else self.optimizer_bytes)


def weight_memory(params: int, param_element_bytes: int, grad_elements: int, grad_element_bytes: int,
                  mixed: bool, dp_size: int, zero1: bool) -> WeightMemory:
    """``params`` held by this rank; ``grad_elements``: their gradient buffers' length (padding included)."""
    per_param = ADAM_BYTES + (MASTER_BYTES if mixed else 0)
    return WeightMemory(params=params, param_bytes=params * param_element_bytes,
                        grad_bytes=grad_elements * grad_element_bytes, optimizer_bytes=params * per_param,
                        optimizer_bytes_zero1=math.ceil(grad_elements / dp_size) * per_param,
                        dp_size=dp_size, zero1=zero1)


def _mib(n: int) -> str:
    return f"{n / 2 ** 20:.2f} MiB"


def format_weight_memory(mem: WeightMemory) -> str:
    used = "ZeRO-1" if mem.zero1 else "no ZeRO-1"
    return (f"> memory per rank (rank 0's stage; {used}): {mem.params:,} parameters: weights {_mib(mem.param_bytes)}, "
            f"gradients {_mib(mem.grad_bytes)}, optimizer state {_mib(mem.optimizer_bytes)} without ZeRO-1 / "
            f"{_mib(mem.optimizer_bytes_zero1)} with ZeRO-1 at DP={mem.dp_size}; total {_mib(mem.total_bytes)}")
