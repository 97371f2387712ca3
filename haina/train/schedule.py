"""Learning-rate schedules: linear warmup, then cosine, linear, constant, step decay or reduce-on-plateau.

`LRSchedule(step)` is the learning rate for optimizer step `step` (0-based). Everything but
plateau is a pure function of the step; plateau also depends on the validation losses it was
shown, which `state_dict` carries across a resume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from haina.train.config import Schedule, TrainConfig


def warmup_decay_lr(step: int, *, kind: Schedule, lr: float, min_lr: float, warmup_steps: int, decay_steps: int,
                    step_size: int = 1000, gamma: float = 0.1) -> float:
    """The learning rate of the stateless schedules at `step`.

    Warmup rises linearly and reaches `lr` at step warmup_steps - 1. Cosine and linear then fall
    to `min_lr` at `decay_steps` and stay there; step decay multiplies by `gamma` every
    `step_size` steps, never below `min_lr`; constant (and plateau, before any reduction) stays at `lr`.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if kind in ("constant", "plateau"):
        return lr
    if kind == "step":
        return max(min_lr, lr * gamma ** ((step - warmup_steps) // step_size))
    span = max(1, decay_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if kind == "cosine":
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
    if kind == "linear":
        return lr - progress * (lr - min_lr)
    raise ValueError(f"unknown schedule {kind!r}")


@dataclass
class LRSchedule:
    kind: Schedule
    lr: float
    min_lr: float
    warmup_steps: int
    decay_steps: int
    step_size: int = 1000
    gamma: float = 0.1
    plateau_factor: float = 0.5
    plateau_patience: int = 2
    plateau_threshold: float = 1e-3
    # plateau state
    scale: float = 1.0
    best: float = math.inf
    bad_evals: int = 0
    # decay_steps as configured, before train.fit_to_budget moves it: tells a resume whether the user changed it
    configured_decay_steps: int | None = None

    def __post_init__(self) -> None:
        if self.configured_decay_steps is None:
            self.configured_decay_steps = self.decay_steps

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> LRSchedule:
        return cls(kind=cfg.schedule, lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps,
                   decay_steps=cfg.decay_steps or cfg.max_steps, step_size=cfg.step_size, gamma=cfg.gamma,
                   plateau_factor=cfg.plateau_factor, plateau_patience=cfg.plateau_patience,
                   plateau_threshold=cfg.plateau_threshold)

    def __call__(self, step: int) -> float:
        base = warmup_decay_lr(step, kind=self.kind, lr=self.lr, min_lr=self.min_lr, warmup_steps=self.warmup_steps,
                               decay_steps=self.decay_steps, step_size=self.step_size, gamma=self.gamma)
        if self.kind == "plateau" and step >= self.warmup_steps:
            return max(self.min_lr, base * self.scale)
        return base

    def observe(self, val_loss: float) -> None:
        """Feed a validation loss; reduce-on-plateau cuts the lr after `plateau_patience` bad ones."""
        if self.kind != "plateau":
            return
        if val_loss < self.best - self.plateau_threshold:
            self.best, self.bad_evals = val_loss, 0
            return
        self.bad_evals += 1
        if self.bad_evals >= self.plateau_patience:
            self.scale *= self.plateau_factor
            self.bad_evals = 0

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "best": self.best, "bad_evals": self.bad_evals, "decay_steps": self.decay_steps,
                "configured_decay_steps": self.configured_decay_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale, self.best, self.bad_evals = float(state["scale"]), float(state["best"]), int(state["bad_evals"])
        # Restore a horizon moved by train.fit_to_budget, but not over a new one the user asked for on resume
        # (--train.max_steps or --train.decay_steps raised to train longer).
        if state.get("configured_decay_steps", self.configured_decay_steps) == self.configured_decay_steps:
            self.decay_steps = int(state.get("decay_steps", self.decay_steps))


__all__ = ["LRSchedule", "warmup_decay_lr"]
