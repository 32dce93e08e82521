"""What a schedule run held in memory between each micro-batch's forward and its backward.

A pipeline schedule trades activation memory for bubble: GPipe keeps every micro-batch's
autograd graph alive until the backward phase, 1F1B at most ``pp - rank``. ``ScheduleStats``
measures that without CUDA: during each forward a ``saved_tensors_hooks`` pair records the
storages autograd saves for backward (model parameters excluded: they are not activations),
plus the received input tensor. A micro-batch's bytes are "live" from its forward until its
backward. Disabled (the default inside the schedules) it records nothing and installs no hooks;
``track_memory=False`` keeps the order and the p2p time but skips the hooks (for timing runs).
"""
from __future__ import annotations

import contextlib
from typing import Dict, List, Tuple

import torch

from megatron_lite.parallel.schedule_orders import Step


def _storage_key(t: torch.Tensor):
    try:
        storage = t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse/meta/etc.: not an activation we can size
        return None, 0
    return (t.device, storage.data_ptr()), storage.nbytes()


class ScheduleStats:
    def __init__(self, enabled: bool = True, track_memory: bool = True):
        self.enabled, self.track_memory = enabled, track_memory
        self.p2p_seconds = 0.0  # time blocked in pipeline transfers (set by the schedule)
        # On CUDA a transfer's wait returns before the GPU has it: with this set, the communicator
        # synchronises after each wait so p2p_seconds is the device's wait too (timed steps only).
        self.time_transfers = False
        self.order: List[Step] = []
        self.live_microbatches = 0
        self.peak_live_microbatches = 0
        self.live_bytes = 0
        self.peak_activation_bytes = 0
        self._held: Dict[Tuple[int, int], int] = {}
        self._param_storages = set()

    def begin(self, model_chunks) -> None:
        """Reset before a run and remember parameter storages so they are not counted."""
        if not self.enabled:
            return
        self.__init__(enabled=True, track_memory=self.track_memory)
        for chunk in model_chunks:
            for p in chunk.parameters():
                self._param_storages.add(_storage_key(p)[0])

    @contextlib.contextmanager
    def forward(self, microbatch: int, chunk: int = 0, input_tensor=None):
        if not self.enabled:
            yield
            return
        if not self.track_memory:
            yield
            self._record_forward(microbatch, chunk, 0)
            return
        held: Dict[object, int] = {}

        def pack(t):
            key, nbytes = _storage_key(t)
            if key is not None and key not in self._param_storages:
                held[key] = nbytes
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield
        if input_tensor is not None:
            pack(input_tensor)
        self._record_forward(microbatch, chunk, sum(held.values()))

    def _record_forward(self, microbatch: int, chunk: int, nbytes: int) -> None:
        self._held[(microbatch, chunk)] = nbytes
        self.order.append(Step("F", microbatch, chunk))
        self.live_microbatches += 1
        self.live_bytes += nbytes
        self.peak_live_microbatches = max(self.peak_live_microbatches, self.live_microbatches)
        self.peak_activation_bytes = max(self.peak_activation_bytes, self.live_bytes)

    def backward(self, microbatch: int, chunk: int = 0) -> None:
        if not self.enabled:
            return
        self.order.append(Step("B", microbatch, chunk))
        self.live_microbatches -= 1
        self.live_bytes -= self._held.pop((microbatch, chunk))

    def as_dict(self) -> dict:
        return {"peak_live_microbatches": self.peak_live_microbatches,
                "peak_activation_bytes": self.peak_activation_bytes, "p2p_seconds": self.p2p_seconds,
                "order": [tuple(s) for s in self.order]}
