"""Loss scaling for fp16: a constant scale (--loss-scale) or Megatron's dynamic scaler.

Dynamic scaling (Megatron-LM's ``DynamicGradScaler``): start at --initial-loss-scale; on a step
whose gradients hold inf/nan, skip the update and, once --hysteresis such steps have accumulated,
halve the scale (never below --min-loss-scale); after --loss-scale-window clean steps in a row,
double it and re-arm the hysteresis.
"""
from __future__ import annotations


class ConstantGradScaler:
    def __init__(self, scale: float):
        self.scale = float(scale)

    def update(self, found_inf: bool) -> None:
        pass

    def state_dict(self) -> dict:
        return {"scale": self.scale}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])


class DynamicGradScaler:
    def __init__(self, initial_scale: float, min_scale: float, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 1000, hysteresis: int = 2):
        if not (initial_scale > 0 and min_scale > 0 and growth_factor > 1 and 0 < backoff_factor < 1
                and growth_interval > 0 and hysteresis > 0):
            raise ValueError("loss scaler: need initial/min scale > 0, growth > 1, 0 < backoff < 1, "
                             "--loss-scale-window > 0 and --hysteresis > 0")
        self.scale = float(initial_scale)
        self.min_scale = float(min_scale)
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = int(growth_interval)
        self.hysteresis = int(hysteresis)
        self._growth_tracker = 0
        self._hysteresis_tracker = self.hysteresis

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self._growth_tracker = 0
            self._hysteresis_tracker -= 1
            if self._hysteresis_tracker <= 0:
                self.scale = max(self.scale * self.backoff_factor, self.min_scale)
        else:
            self._growth_tracker += 1
            if self._growth_tracker == self.growth_interval:
                self._growth_tracker = 0
                self._hysteresis_tracker = self.hysteresis
                self.scale = self.scale * self.growth_factor

    def state_dict(self) -> dict:
        return {"scale": self.scale, "growth_tracker": self._growth_tracker,
                "hysteresis_tracker": self._hysteresis_tracker}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self._growth_tracker = int(state["growth_tracker"])
        self._hysteresis_tracker = int(state["hysteresis_tracker"])


def build_grad_scaler(optim_cfg, fp16: bool):
    """None for fp32/bf16 (no scaling needed); constant or dynamic for fp16."""
    if not fp16:
        return None
    if optim_cfg.loss_scale is not None:
        return ConstantGradScaler(optim_cfg.loss_scale)
    return DynamicGradScaler(initial_scale=optim_cfg.initial_loss_scale, min_scale=optim_cfg.min_loss_scale,
                             growth_interval=optim_cfg.loss_scale_window, hysteresis=optim_cfg.hysteresis)
