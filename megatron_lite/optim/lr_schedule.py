"""Learning-rate schedule: linear warmup, then constant / linear / cosine decay to --min-lr.

Megatron-LM's ``OptimizerParamScheduler.get_lr`` formulas, counted in iterations (Megatron counts
samples, ``iterations x global batch``; with a fixed global batch the ratios are the same):

    warmup (step <= W, W > 0):  lr = max_lr * step / W
    constant:                   lr = max_lr
    step > D:                   lr = min_lr
    otherwise, r = (step - W) / (D - W):
        linear:                 lr = min_lr + (max_lr - min_lr) * (1 - r)
        cosine:                 lr = min_lr + (max_lr - min_lr) * 0.5 * (cos(pi * r) + 1)

``step`` is the number of optimizer steps already taken, so iteration 1 trains with lr(0); the
trainer calls ``step()`` after each successful optimizer update, as Megatron does. With
--lr-warmup-fraction, W = fraction x D stays fractional (Megatron's ``lr_warmup_steps`` is
``fraction x lr_decay_steps`` without rounding), so e.g. W = 2.5 gives lr(2) = 0.8 max_lr and
lr(3) on the decay branch.
"""
from __future__ import annotations

import math
from typing import Optional

DECAY_STYLES = ("constant", "linear", "cosine")


class LRScheduler:
    def __init__(self, optimizer, max_lr: float, min_lr: float, decay_style: str, decay_iters: int,
                 warmup_iters: int = 0, warmup_fraction: Optional[float] = None):
        if decay_style not in DECAY_STYLES:
            raise ValueError(f"--lr-decay-style must be one of {DECAY_STYLES}, got {decay_style!r}")
        if decay_iters < 1:
            raise ValueError(f"--lr-decay-iters must be >= 1, got {decay_iters}")
        if warmup_fraction is not None:
            warmup_iters = warmup_fraction * decay_iters  # kept fractional, as Megatron-LM does
        if not 0 <= warmup_iters <= decay_iters:
            raise ValueError(f"warmup ({warmup_iters} iterations) must lie within --lr-decay-iters "
                             f"({decay_iters})")
        self.optimizer = optimizer
        self.max_lr, self.min_lr = float(max_lr), float(min_lr)
        self.decay_style = decay_style
        self.decay_iters = int(decay_iters)
        self.warmup_iters = float(warmup_iters) if warmup_fraction is not None else int(warmup_iters)
        self.num_steps = 0
        self._apply()

    def get_lr(self, step: Optional[int] = None) -> float:
        step = self.num_steps if step is None else step
        if self.warmup_iters > 0 and step <= self.warmup_iters:
            return self.max_lr * step / self.warmup_iters
        if self.decay_style == "constant":
            return self.max_lr
        if step > self.decay_iters:
            return self.min_lr
        if self.decay_iters == self.warmup_iters:  # warmup covered the whole decay span
            return self.min_lr
        ratio = (step - self.warmup_iters) / (self.decay_iters - self.warmup_iters)
        if self.decay_style == "linear":
            coeff = 1.0 - ratio
        else:
            coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
        return self.min_lr + coeff * (self.max_lr - self.min_lr)

    def _apply(self) -> float:
        """Set the current step's lr on every param group (if there is an optimizer); return it."""
        lr = self.get_lr()
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        return lr

    def step(self, increment: int = 1) -> float:
        """Advance by ``increment`` optimizer steps and set the new lr on every param group."""
        self.num_steps += increment
        return self._apply()

    def state_dict(self) -> dict:
        return {"max_lr": self.max_lr, "min_lr": self.min_lr, "decay_style": self.decay_style,
                "decay_iters": self.decay_iters, "warmup_iters": self.warmup_iters,
                "num_steps": self.num_steps}

    def load_state_dict(self, state: dict) -> None:
        """Restore the position in the schedule. Its shape (lr, min-lr, style, warmup, decay span) stays
        the one the current flags give, as with Megatron's --override-opt_param-scheduler: a resumed run
        that extends --train-iters (and so the default decay span) follows its new schedule."""
        self.num_steps = int(state["num_steps"])
        self._apply()


def build_lr_scheduler(optimizer, optim_cfg, train_iters: int) -> LRScheduler:
    """From ``OptimizerConfig``: --lr-decay-iters defaults to --train-iters."""
    decay_iters = optim_cfg.lr_decay_iters or train_iters
    return LRScheduler(optimizer, max_lr=optim_cfg.lr, min_lr=optim_cfg.min_lr,
                       decay_style=optim_cfg.lr_decay_style, decay_iters=decay_iters,
                       warmup_iters=optim_cfg.lr_warmup_iters, warmup_fraction=optim_cfg.lr_warmup_fraction)
