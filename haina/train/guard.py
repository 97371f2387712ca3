"""Training that survives what training meets: bad steps, loss spikes and stop signals.

`StepGuard` judges each optimizer step from its loss and gradient norm before the update is applied:

    "ok"        apply the update
    "skip"      the loss or the gradient norm is not finite: drop the gradients, record the step
    "rollback"  `train.max_bad_steps` skipped steps in a row, or a loss spike: a loss above
                `train.spike_factor` x the mean of the last `train.spike_window` good losses (and at
                least SPIKE_MIN_NATS above it, so that a run near zero loss does not trip on noise).
                A spike before the run has any checkpoint is skipped instead.

On "rollback" the trainer reloads the latest checkpoint but keeps its data position, so the window of
data seen since that checkpoint is skipped rather than replayed (Megatron-LM's answer to NaNs and
spiky loss: back to the last good state, around the bad data). The guard records every skipped step
and rollback for report.json, and travels in the trainer state, so a resumed run judges its steps
exactly as an uninterrupted one would.

`StopSignals` turns the first SIGTERM or SIGINT into a flag that the loop reads at its next step
boundary, where it saves a checkpoint and returns; a second signal acts as if we had not caught the
first (SIGINT raises KeyboardInterrupt, SIGTERM ends the process), so nobody has to wait for a save.
"""

from __future__ import annotations

import math
import signal
import threading
from typing import Any, Literal, Self

from haina.core.errors import HainaError
from haina.train.config import TrainConfig

Verdict = Literal["ok", "skip", "rollback"]
SPIKE_MIN_NATS = 1.0
HINT = "lower train.lr, set train.grad_clip, or use train.precision=fp32"


def _plain(x: float | None) -> float | str | None:
    """A float for JSON: non-finite values as the strings 'nan', 'inf', '-inf' (JSON has no such numbers)."""
    return x if x is None or math.isfinite(x) else str(x)


class StepGuard:
    """Decides whether each step's update is applied, skipped, or answered by a rollback; keeps the record.

    Args:
        max_bad_steps: skipped (non-finite) steps in a row that trigger a rollback.
        spike_factor: a loss above this multiple of the running mean triggers a rollback; 0 turns it off.
        spike_window: good steps in the running mean; spikes are looked for once it is full.
        max_rollbacks: rollbacks allowed; the next one is an error instead.
    """

    def __init__(self, *, max_bad_steps: int, spike_factor: float, spike_window: int, max_rollbacks: int):
        self.max_bad_steps, self.spike_factor = max_bad_steps, spike_factor
        self.spike_window, self.max_rollbacks = spike_window, max_rollbacks
        self.recent: list[float] = []  # the last spike_window good losses
        self.bad_in_row = 0
        self.skipped: list[dict[str, Any]] = []  # {"step", "loss", "grad_norm", "reason"} per skipped step
        self.rollbacks: list[dict[str, Any]] = []  # {"step", "to_step", "reason", "skipped_data_steps"}
        self.reason = ""  # why the latest verdict was "rollback"

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> StepGuard:
        return cls(max_bad_steps=cfg.max_bad_steps, spike_factor=cfg.spike_factor, spike_window=cfg.spike_window,
                   max_rollbacks=cfg.max_rollbacks)

    def judge(self, step: int, loss: float, grad_norm: float | None, *, can_roll_back: bool = True) -> Verdict:
        """The verdict on the update that would complete step `step` (1-based).

        Without a checkpoint to return to (`can_roll_back` False), a spike is skipped like a non-finite
        step: not applying its update is the best that is left.
        """
        finite = math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm))
        if finite:
            full = len(self.recent) >= self.spike_window
            mean = sum(self.recent) / len(self.recent) if full else math.inf
            if not (self.spike_factor and loss > self.spike_factor * mean and loss > mean + SPIKE_MIN_NATS):
                self.bad_in_row = 0
                self.recent = (self.recent + [loss])[-self.spike_window:]
                return "ok"
            if can_roll_back:
                self.reason = f"loss spike ({loss:.4g}, over {self.spike_factor:g} x the running mean {mean:.4g})"
                return "rollback"
        self.bad_in_row += 1
        self.skipped.append({"step": step, "loss": _plain(loss), "grad_norm": _plain(grad_norm),
                             "reason": "loss spike" if finite else "non-finite"})
        if self.bad_in_row < self.max_bad_steps:
            return "skip"
        spikes = any(s["reason"] == "loss spike" for s in self.skipped[-self.bad_in_row:])
        self.reason = (f"{self.bad_in_row} steps in a row with a non-finite loss or gradient norm"
                       f"{' or a loss spike' if spikes else ''}")
        return "rollback"

    def rolled_back(self, step: int, to_step: int | None) -> None:
        """Record a rollback from `step` to the checkpoint at `to_step`; raise if there is none or too many."""
        where = f"{self.reason} at step {step}"
        if to_step is None:
            raise HainaError(f"{where}, and no checkpoint to roll back to yet (train.save_every); {HINT}")
        if len(self.rollbacks) >= self.max_rollbacks:
            raise HainaError(f"{where}, after {len(self.rollbacks)} rollbacks (train.max_rollbacks); {HINT}")
        self.rollbacks.append({"step": step, "to_step": to_step, "reason": self.reason,
                               "skipped_data_steps": step - to_step})
        self.bad_in_row = 0

    def state_dict(self) -> dict[str, Any]:
        return {"recent": list(self.recent), "bad_in_row": self.bad_in_row, "skipped": list(self.skipped),
                "rollbacks": list(self.rollbacks)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.recent = [float(x) for x in state["recent"]][-self.spike_window:]
        self.bad_in_row = int(state["bad_in_row"])
        self.skipped, self.rollbacks = list(state["skipped"]), list(state["rollbacks"])


class StopSignals:
    """Within `with StopSignals() as stop:`, the first SIGTERM or SIGINT only sets `stop.received` (its name).

    Outside the main thread, where Python cannot install handlers, signals keep their usual effect.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        # No logging here: a handler runs between two bytecodes of whatever the loop was doing.
        self.received = signal.Signals(signum).name
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def __exit__(self, *exc: object) -> None:
        self._restore()


__all__ = ["HINT", "SPIKE_MIN_NATS", "StepGuard", "StopSignals", "Verdict"]
