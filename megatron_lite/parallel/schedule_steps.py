"""One micro-batch's forward and backward on one stage, shared by every schedule.

Megatron-LM's ``forward_step`` / ``backward_step`` / ``deallocate_output_tensor`` plus the
hooks a schedule needs on the model: ``set_input_tensor`` (a non-first stage's input) and
``no_sync`` (defer data-parallel gradient reduction to the last backward), both found through
DDP-style ``.module`` wrappers.
"""
from __future__ import annotations

import contextlib
from typing import List

import torch


def find_attr(model, name):
    """``model.name``, looking through wrappers (DDP-style ``.module``) as Megatron does."""
    while model is not None and not hasattr(model, name):
        model = getattr(model, "module", None)
    return getattr(model, name) if model is not None else None


def _set_input_tensor(model, tensor) -> None:
    setter = find_attr(model, "set_input_tensor")
    if setter is not None:
        setter(tensor)
    elif tensor is not None:
        raise TypeError(f"{type(model).__name__} has no set_input_tensor(); a pipeline stage that is not the "
                        "first needs it to take the previous stage's activations")


def _scale_loss(loss: torch.Tensor, grad_scale) -> torch.Tensor:
    if grad_scale is None:
        return loss
    return grad_scale(loss) if callable(grad_scale) else loss * grad_scale


def forward_step(forward_step_func, data_iterator, model, input_tensor, num_microbatches: int,
                 forward_data_store: list, is_last_stage: bool, collect_non_loss_data: bool = False):
    """Run one micro-batch through ``model``; on the last stage turn the output into loss / m."""
    _set_input_tensor(model, input_tensor)
    output_tensor, loss_func = forward_step_func(data_iterator, model)
    if not is_last_stage:
        return output_tensor
    if collect_non_loss_data:
        forward_data_store.append(loss_func(output_tensor, non_loss_data=True))
        return output_tensor
    loss, reduced = loss_func(output_tensor)
    forward_data_store.append(reduced)
    return loss / num_microbatches


def backward_step(input_tensor, output_tensor, output_tensor_grad, grad_scale=None):
    """Backward through one stage; returns the gradient for the previous stage (or None).

    On the last stage ``output_tensor`` is the loss (``output_tensor_grad`` None) and is scaled
    first. Elsewhere the output's data may already be freed (``deallocate_output_tensor``), so the
    autograd engine is called directly: ``torch.autograd.backward`` would reject the shape.
    """
    if input_tensor is not None:
        input_tensor.retain_grad()
    if output_tensor_grad is None:
        torch.autograd.backward(_scale_loss(output_tensor, grad_scale))
    else:
        torch.autograd.graph._engine_run_backward(
            (output_tensor,), (output_tensor_grad,), False, False, (), allow_unreachable=True,
            accumulate_grad=True)
    return None if input_tensor is None else input_tensor.grad


def _saved_by_own_grad_fn(t: torch.Tensor) -> bool:
    """Whether t's grad_fn saved t itself for backward (tanh, sigmoid, exp, ... do)."""
    node, ptr = t.grad_fn, t.untyped_storage().data_ptr()
    saved = [getattr(node, name, None) for name in dir(node) if name.startswith("_saved_")]
    saved += list(getattr(node, "saved_tensors", ()) or ())  # custom autograd.Functions
    return any(isinstance(s, torch.Tensor) and s.untyped_storage().data_ptr() == ptr for s in saved)


def deallocate_output_tensor(output_tensor) -> None:
    """Free a sent activation's data; its grad_fn (all backward needs) stays (Megatron's trick).

    Skipped for views and for outputs whose own backward needs their value (then freeing would
    corrupt the gradient): the next stage already holds its own copy of the data.
    """
    if output_tensor is None or output_tensor.grad_fn is None or output_tensor._base is not None:
        return
    if _saved_by_own_grad_fn(output_tensor):
        return
    output_tensor.data = torch.empty((1,), device=output_tensor.device, dtype=output_tensor.dtype)


def no_sync_context(model_chunks, no_sync_func):
    """Megatron's hook: defer data-parallel grad reduction until the last backward."""
    if no_sync_func is not None:
        return no_sync_func()
    stack = contextlib.ExitStack()
    for chunk in model_chunks:
        fn = find_attr(chunk, "no_sync")
        if fn is not None:
            stack.enter_context(fn())
    return stack


def as_chunks(model) -> List[torch.nn.Module]:
    return list(model) if isinstance(model, (list, tuple)) else [model]
