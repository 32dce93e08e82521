"""RNG streams for tensor parallelism and activation checkpointing that replays them.

Two streams, as in Megatron-LM:
  * the default torch stream, seeded identically on every TP rank (``seed + 100 * pp_rank``),
    for dropout on activations that are replicated across TP ranks;
  * the tracker's ``model-parallel-rng`` stream, seeded ``seed + 2718 + tp_rank``, entered with
    ``get_rng_tracker().fork()`` for dropout on TP-split activations (attention probabilities),
    so each rank's shard gets its own mask.
The tracker is device-agnostic: it swaps the CUDA generator's state when activations live on a
GPU and the CPU generator's otherwise.

``checkpoint(fn, distribute_saved_activations, *args)`` is Megatron's CheckpointFunction: the
forward runs without saving activations; the backward restores the CPU, CUDA and tracker RNG
states of the forward, recomputes with grad, and puts back the states it found, so the
recomputed dropout masks are bit-identical and the surrounding RNG sequence is undisturbed.
"""
from __future__ import annotations

import contextlib
import random as _pyrandom
from typing import Dict, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_lite.parallel.state import ParallelState, require_state

MODEL_PARALLEL_RNG = "model-parallel-rng"
_TP_SEED_OFFSET = 2718
_PP_SEED_STRIDE = 100


def _cuda_rng_in_use() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


class RngStatesTracker:
    """Named RNG states that can be swapped in around a block (``fork``)."""

    def __init__(self, device_type: Optional[str] = None):
        self.device_type = device_type
        self.reset()

    def reset(self) -> None:
        self.states_: Dict[str, torch.Tensor] = {}
        self.seeds_ = set()

    # The device whose generator the streams drive: CUDA when activations live there.
    def _device(self) -> str:
        if self.device_type is not None:
            return self.device_type
        return "cuda" if torch.cuda.is_available() else "cpu"

    def _get_state(self) -> torch.Tensor:
        return torch.cuda.get_rng_state() if self._device() == "cuda" else torch.get_rng_state()

    def _set_state(self, state: torch.Tensor) -> None:
        if self._device() == "cuda":
            torch.cuda.set_rng_state(state)
        else:
            torch.set_rng_state(state)

    def get_states(self) -> Dict[str, torch.Tensor]:
        return {name: state.clone() for name, state in self.states_.items()}

    def set_states(self, states: Dict[str, torch.Tensor]) -> None:
        self.states_ = {name: state.clone() for name, state in states.items()}

    def add(self, name: str, seed: int) -> None:
        """Create stream ``name`` seeded with ``seed`` without disturbing the current stream."""
        if seed in self.seeds_:
            raise ValueError(f"RNG seed {seed} already exists in the tracker")
        if name in self.states_:
            raise ValueError(f"RNG state {name!r} already exists in the tracker")
        self.seeds_.add(seed)
        orig = self._get_state()
        if self._device() == "cuda":
            torch.cuda.manual_seed(seed)
        else:
            # torch.manual_seed would also reseed CUDA; seed only the CPU generator.
            torch.default_generator.manual_seed(seed)
        self.states_[name] = self._get_state()
        self._set_state(orig)

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG):
        """Run the block on stream ``name``; its advance is kept, the default stream is restored."""
        if name not in self.states_:
            raise KeyError(f"RNG state {name!r} is not in the tracker; call model_parallel_seed() first")
        orig = self._get_state()
        self._set_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = self._get_state()
            self._set_state(orig)


_TRACKER = RngStatesTracker()


def get_rng_tracker() -> RngStatesTracker:
    return _TRACKER


def model_parallel_seed(seed: int, pstate: Optional[ParallelState] = None) -> None:
    """Seed every stream for this rank (Megatron's _set_random_seed + model_parallel_cuda_manual_seed).

    The default stream (torch, Python, NumPy) gets ``seed + 100 * pp_rank``: equal on the TP
    ranks of a stage, different between stages. The tracker's model-parallel stream gets
    ``that + 2718 + tp_rank``.
    """
    ps = require_state(pstate)
    stage_seed = seed + _PP_SEED_STRIDE * ps.pp_rank
    _pyrandom.seed(stage_seed)
    np.random.seed(stage_seed % (2 ** 32))
    torch.manual_seed(stage_seed)
    _TRACKER.device_type = ps.device.type
    _TRACKER.reset()
    _TRACKER.add(MODEL_PARALLEL_RNG, stage_seed + _TP_SEED_OFFSET + ps.tp_rank)


# ---- activation checkpointing ------------------------------------------------------------------

def _capture_rng():
    cuda = torch.cuda.get_rng_state() if _cuda_rng_in_use() else None
    return torch.get_rng_state(), cuda, _TRACKER.get_states()


def _restore_rng(saved) -> None:
    cpu, cuda, tracker = saved
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda)
    _TRACKER.set_states(tracker)


def _split_for_rank(t: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    flat = t.detach().reshape(-1)
    if flat.numel() % ps.tp_size != 0:
        raise ValueError(f"distribute_saved_activations needs numel {flat.numel()} divisible by "
                         f"the tensor-parallel size {ps.tp_size}")
    return flat.chunk(ps.tp_size)[ps.tp_rank].clone()


def _gather_from_ranks(chunk: torch.Tensor, shape: torch.Size, ps: ParallelState) -> torch.Tensor:
    out = torch.empty(chunk.numel() * ps.tp_size, dtype=chunk.dtype, device=chunk.device)
    dist.all_gather(list(out.chunk(ps.tp_size)), chunk.contiguous(), group=ps.tp_group)
    return out.view(shape)


class CheckpointFunction(torch.autograd.Function):
    """Forward without storing activations; recompute them (same RNG) in backward."""

    @staticmethod
    def forward(ctx, run_function, distribute, ps, _grad_anchor, *args):
        ctx.run_function, ctx.ps = run_function, ps
        ctx.distribute = bool(distribute and ps.tp_size > 1 and args and torch.is_tensor(args[0]))
        ctx.fwd_rng = _capture_rng()
        with torch.no_grad():
            outputs = run_function(*args)

        # save_for_backward takes tensors only; remember where the other arguments go.
        ctx.arg_is_tensor = [torch.is_tensor(a) for a in args]
        ctx.non_tensor_args = [None if is_t else a for a, is_t in zip(args, ctx.arg_is_tensor)]
        ctx.input_requires_grad = [torch.is_tensor(a) and a.requires_grad for a in args]
        tensors = [a for a in args if torch.is_tensor(a)]
        if ctx.distribute:
            # Keep only this rank's 1/tp of the first input (the big hidden state); the other
            # ranks hold the rest, and backward all-gathers it.
            ctx.first_shape = args[0].shape
            tensors[0] = _split_for_rank(args[0], ps)
        ctx.save_for_backward(*tensors)
        return outputs

    @staticmethod
    def backward(ctx, *grad_outputs):
        if not torch.autograd._is_checkpoint_valid():
            raise RuntimeError("checkpoint() is incompatible with torch.autograd.grad(); use .backward()")
        tensors = list(ctx.saved_tensors)
        if ctx.distribute:
            tensors[0] = _gather_from_ranks(tensors[0], ctx.first_shape, ctx.ps)
        it = iter(tensors)
        inputs = []
        for is_t, other, needs_grad in zip(ctx.arg_is_tensor, ctx.non_tensor_args, ctx.input_requires_grad):
            if is_t:
                t = next(it).detach()
                t.requires_grad_(needs_grad)
                inputs.append(t)
            else:
                inputs.append(other)

        bwd_rng = _capture_rng()
        _restore_rng(ctx.fwd_rng)
        try:
            with torch.enable_grad():
                outputs = ctx.run_function(*inputs)
        finally:
            _restore_rng(bwd_rng)

        if torch.is_tensor(outputs):
            outputs = (outputs,)
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs)
                 if torch.is_tensor(o) and o.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        grads = tuple(x.grad if torch.is_tensor(x) and x.requires_grad else None for x in inputs)
        return (None, None, None, None) + grads


def checkpoint(function, distribute_saved_activations: bool, *args,
               pstate: Optional[ParallelState] = None):
    """Run ``function(*args)`` keeping only its inputs; recompute it during backward.

    ``distribute_saved_activations`` splits the saved first argument over the TP group (it is
    replicated there), cutting its memory by TP. Inputs need not require grad: the parameters
    inside ``function`` still get their gradients.
    """
    ps = require_state(pstate)
    # An input that requires grad makes the outputs part of the graph even when none of
    # ``args`` do (e.g. the first layer fed by a frozen embedding), so parameter grads flow.
    anchor = _grad_anchor() if torch.is_grad_enabled() else None
    return CheckpointFunction.apply(function, distribute_saved_activations, ps, anchor, *args)


def _grad_anchor() -> torch.Tensor:
    return torch.empty(0, requires_grad=True)
