"""AdamW behind one interface, in fp32 or with fp32 master weights for fp16/bf16 models.

    opt = build_optimizer(model_chunks, cfg.optim, cfg.model, pstate)
    opt.zero_grad()
    ... forward/backward (loss multiplied by opt.get_loss_scale()), finalize_model_grads ...
    update_successful, grad_norm, num_zeros = opt.step()

``step`` does what Megatron-LM's ``MegatronOptimizer.step`` does: (mixed precision: copy the
model's half-precision grads to fp32 master grads, unscale, skip the step on inf/nan), clip by
the global norm over the model-parallel ranks, AdamW update, (copy masters back to the model).
ZeRO-1 (``megatron_lite.distributed.distrib_optimizer.DistributedOptimizer``) implements the same methods on this rank's
slice of every gradient bucket.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_lite.optim.clip import clip_grad_norm, count_zeros, grad_stats_all_reduce
from megatron_lite.parallel.params import copy_parallel_attributes, param_grad
from megatron_lite.optim.grad_scaler import build_grad_scaler

def param_has_no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Biases and norm weights (all 1-D parameters) are not decayed, as in Megatron-LM."""
    return name.endswith(".bias") or param.ndim == 1


def get_param_groups(model_chunks, weight_decay: float) -> List[Dict]:
    """Two AdamW groups: decayed weights and undecayed biases/norms (empty groups dropped)."""
    decay, no_decay = [], []
    for chunk in model_chunks:
        for name, p in chunk.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if param_has_no_weight_decay(name, p) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]]


class MegatronOptimizer(ABC):
    """The trainer's view of an optimizer, whatever the precision or sharding underneath.

    ``step`` is one template for every kind: ``_prepare_grads`` points the fp32 main parameters'
    ``.grad`` at their gradients (views of the data-parallel buffer when the model is wrapped: no
    copy, no allocation), then unscale and skip on inf/nan (fp16), clip, update, and
    ``_finish_step`` puts the result back into the model.
    """

    # Under ZeRO-1 each DP rank holds a slice of the gradients: statistics are summed over all ranks.
    across_dp = False

    def __init__(self, optimizer: torch.optim.Optimizer, clip_grad: float, pstate, log_num_zeros: bool = False,
                 grad_scaler=None, implementation: str = "AdamW"):
        self.optimizer = optimizer
        self.clip_grad = clip_grad
        self.pstate = pstate
        self.log_num_zeros = log_num_zeros
        self.grad_scaler = grad_scaler
        self.implementation = implementation

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def main_params(self) -> List[torch.nn.Parameter]:
        """The parameters the update is computed on (fp32): those the torch optimizer holds."""
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def get_loss_scale(self) -> float:
        return self.grad_scaler.scale if self.grad_scaler is not None else 1.0

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                _zero(p, set_to_none)

    def clip_and_count(self) -> Tuple[float, Optional[int]]:
        params = self.main_params()
        grad_norm = clip_grad_norm(params, self.clip_grad, self.pstate, across_dp=self.across_dp)
        num_zeros = count_zeros(params, self.pstate, across_dp=self.across_dp) if self.log_num_zeros else None
        return grad_norm, num_zeros

    def _unscale_and_check_inf(self) -> bool:
        """Divide the main grads by the loss scale; True when any rank saw inf/nan (every rank agrees)."""
        inv_scale = 1.0 / self.grad_scaler.scale
        found = torch.zeros(1, dtype=torch.float32, device=self.pstate.device)
        for m in self.main_params():
            if m.grad is not None:
                m.grad.mul_(inv_scale)
                found = torch.maximum(found, (~torch.isfinite(m.grad)).any().float().reshape(1))
        grad_stats_all_reduce(found, self.pstate, dist.ReduceOp.MAX, self.across_dp)
        return bool(found.item() > 0)

    def step(self) -> Tuple[bool, Optional[float], Optional[int]]:
        """Returns (update_successful, grad_norm, num_zeros_in_grad or None)."""
        self._prepare_grads()
        if self.grad_scaler is not None:
            found_inf = self._unscale_and_check_inf()
            self.grad_scaler.update(found_inf)
            if found_inf:
                return False, None, None
        grad_norm, num_zeros = self.clip_and_count()
        self.optimizer.step()
        self._finish_step()
        return True, grad_norm, num_zeros

    @abstractmethod
    def _prepare_grads(self) -> None: ...

    def _finish_step(self) -> None:
        pass

    @abstractmethod
    def state_dict(self) -> dict: ...

    @abstractmethod
    def load_state_dict(self, state: dict) -> None: ...

    def reload_model_params(self) -> None:
        """After loading model weights from a checkpoint: refresh any copies of them."""

    def _separate_main_params(self) -> bool:
        """Whether the main params are copies (fp32 masters) rather than the model's own tensors."""
        return False

    def state_bytes(self) -> int:
        """Bytes of optimizer state on this rank: Adam's moments, plus fp32 masters when they are copies."""
        total = sum(t.numel() * t.element_size() for st in self.optimizer.state.values()
                    for t in st.values() if isinstance(t, torch.Tensor) and t.dim() > 0)
        if self._separate_main_params():
            total += sum(p.numel() * p.element_size() for p in self.main_params())
        return total


def _zero(p, set_to_none: bool) -> None:
    if p.grad is None:
        return
    if set_to_none:
        p.grad = None
    else:
        p.grad.detach_().zero_()


def _as_fp32_grad(grad: torch.Tensor) -> torch.Tensor:
    """An fp32 buffer view is used as it is; anything else is converted (a copy)."""
    return grad if grad.dtype == torch.float32 else grad.detach().float()


class FP32Optimizer(MegatronOptimizer):
    """fp32 model: the torch optimizer updates the model's parameters directly."""

    def _prepare_grads(self) -> None:
        for p in self.main_params():
            main_grad = getattr(p, "main_grad", None)
            if main_grad is not None:
                p.grad = main_grad

    def _finish_step(self) -> None:
        for p in self.main_params():
            if getattr(p, "main_grad", None) is not None:
                p.grad = None  # else the next backward would accumulate into the buffer view twice

    def state_dict(self):
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(state["optimizer"])


class MixedPrecisionOptimizer(MegatronOptimizer):
    """fp16/bf16 model with fp32 master weights (Megatron's Float16OptimizerWithFloat16Params).

    The torch optimizer holds fp32 masters; each step points the masters' ``.grad`` at the model's
    fp32 main grads (unscaled by the loss scale for fp16), updates, and copies the masters back.
    """

    def __init__(self, model_groups: List[Dict], optim_cfg, pstate, grad_scaler, log_num_zeros=False,
                 fused: Optional[bool] = None):
        self.model_params: List[List[torch.nn.Parameter]] = []
        master_groups = []
        for group in model_groups:
            masters = []
            for p in group["params"]:
                m = torch.nn.Parameter(p.detach().clone().float())
                copy_parallel_attributes(p, m)
                masters.append(m)
            self.model_params.append(list(group["params"]))
            master_groups.append({**group, "params": masters})
        optimizer, name = build_adamw(master_groups, optim_cfg, pstate.device, fused)
        super().__init__(optimizer, optim_cfg.clip_grad, pstate, log_num_zeros, grad_scaler, name)

    def _model_and_main_params(self) -> Iterator[Tuple[torch.nn.Parameter, torch.nn.Parameter]]:
        """(model parameter, its fp32 master) pairs, group by group."""
        for params, group in zip(self.model_params, self.optimizer.param_groups):
            yield from zip(params, group["params"])

    def _separate_main_params(self) -> bool:
        return True

    def zero_grad(self, set_to_none: bool = True) -> None:
        for params in self.model_params:
            for p in params:
                _zero(p, set_to_none)
        super().zero_grad(set_to_none)

    def _prepare_grads(self) -> None:
        for p, m in self._model_and_main_params():
            grad = param_grad(p)
            m.grad = None if grad is None else _as_fp32_grad(grad)

    def _finish_step(self) -> None:
        with torch.no_grad():
            for p, m in self._model_and_main_params():
                p.copy_(m)

    def reload_model_params(self) -> None:
        with torch.no_grad():
            for p, m in self._model_and_main_params():
                m.copy_(p.float())

    def state_dict(self):
        state = {"optimizer": self.optimizer.state_dict(),
                 "fp32_from_fp16_params": [[m.detach().clone() for m in g["params"]]
                                           for g in self.optimizer.param_groups]}
        if self.grad_scaler is not None:
            state["grad_scaler"] = self.grad_scaler.state_dict()
        return state

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(state["optimizer"])
        with torch.no_grad():
            for group, saved in zip(self.optimizer.param_groups, state["fp32_from_fp16_params"]):
                for m, s in zip(group["params"], saved):
                    m.copy_(s)
        if self.grad_scaler is not None and "grad_scaler" in state:
            self.grad_scaler.load_state_dict(state["grad_scaler"])


def build_adamw(groups, optim_cfg, device: torch.device, fused: Optional[bool] = None
                ) -> Tuple[torch.optim.Optimizer, str]:
    """AdamW and the name of the implementation that runs, for the startup log. ``fused`` None: fused
    on CUDA; False: the per-parameter loop anywhere (the benchmarks' comparison)."""
    if optim_cfg.optimizer != "adam":
        raise ValueError(f"--optimizer {optim_cfg.optimizer!r} is not supported; use adam")
    kwargs = dict(lr=optim_cfg.lr, betas=(optim_cfg.adam_beta1, optim_cfg.adam_beta2), eps=optim_cfg.adam_eps,
                  weight_decay=optim_cfg.weight_decay)
    if device.type == "cuda" and fused is not False:
        # One fused kernel over all parameters (PyTorch's, which keeps torch's state-dict layout, so
        # checkpoints move between CPU and GPU runs).
        return torch.optim.AdamW(groups, fused=True, **kwargs), "AdamW (torch fused, CUDA)"
    # foreach=False: the per-parameter loop is bitwise reproducible across layouts (the parity tests
    # compare TP shards and ZeRO-1 slices to the whole tensor), and CPU models are small.
    return torch.optim.AdamW(groups, foreach=False, **kwargs), "AdamW (torch, per-parameter loop)"


def build_optimizer(model_chunks, optim_cfg, model_cfg, pstate, log_num_zeros: bool = False,
                    fused: Optional[bool] = None) -> MegatronOptimizer:
    """AdamW over ``model_chunks``: fp32, or fp32 masters (+ loss scaling for fp16) for --fp16/--bf16.
    (ZeRO-1 is ``megatron_lite.distributed.distrib_optimizer.DistributedOptimizer``.)"""
    groups = get_param_groups(model_chunks, optim_cfg.weight_decay)
    if model_cfg.fp16 or model_cfg.bf16:
        scaler = build_grad_scaler(optim_cfg, fp16=model_cfg.fp16)
        return MixedPrecisionOptimizer(groups, optim_cfg, pstate, scaler, log_num_zeros, fused)
    optimizer, name = build_adamw(groups, optim_cfg, pstate.device, fused)
    return FP32Optimizer(optimizer, optim_cfg.clip_grad, pstate, log_num_zeros, implementation=name)
