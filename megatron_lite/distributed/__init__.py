"""Data parallelism: gradient reduction over the data-parallel group (and the sequence-parallel
and tied-embedding reductions that run with it) before the optimizer step."""
from megatron_lite.distributed.finalize_grads import finalize_model_grads

__all__ = ["finalize_model_grads"]
