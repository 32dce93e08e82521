"""Fused kernels. Nothing here imports triton at import time: the Triton code lives in
``triton_softmax`` and is imported only when the kernel path runs."""
from megatron_lite.kernels.fused_softmax import (FusedScaleMaskSoftmax, causal_mask, fused_scale_mask_softmax,
                                                 kernel_available, scale_mask_softmax_reference)

__all__ = ["FusedScaleMaskSoftmax", "causal_mask", "fused_scale_mask_softmax", "kernel_available",
           "scale_mask_softmax_reference"]
