"""What a checkpoint holds besides the weights: the trainer's state, to continue a run bit-exactly.

`Trainer.state_dict` and `Trainer.load_state_dict` are these functions, kept as methods so that a subclass adds
its own entries (DPO keeps its step-0 evaluation). The state is plain types and tensors only, written by
`haina.train.checkpoint` beside the weights (trainer_state.pt) and read back with torch's weights-only loader.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from haina.core.config import load_yaml
from haina.core.errors import HainaError
from haina.train import checkpoint as ckpt

if TYPE_CHECKING:
    from haina.model.config import ModelConfig
    from haina.train.trainer import Trainer

STATE_FORMAT = "haina-trainer-state/1"


def capture_state(trainer: Trainer) -> dict[str, Any]:
    """Everything besides the weights needed to continue bit-exactly; distributed, the optimizer's is gathered."""
    t = trainer
    state = {
        "format": STATE_FORMAT, "step": t.step, "tokens_seen": t.tokens_seen, "targets_seen": t.targets_seen,
        "best_val_loss": t.best_val_loss, "bad_evals": t.bad_evals,
        "initial_val_loss": t.initial_val_loss, "train_seconds": t.train_seconds,
        "schedule": t.schedule.state_dict(),
        "rng": ckpt.capture_rng(), "data_generator": t.generator.get_state(),
        "guard": t.guard.state_dict(), "settled_steps": t.settled_steps,
    }
    if t.scaler is not None:
        state["scaler"] = t.scaler.state_dict()
    if t.dist is not None and t.dist.sharded_checkpoints:
        state["optimizer_in_shards"] = True  # each rank writes its part with the weights (haina.train.sharded)
        return state
    # Otherwise rank 0 writes it whole; sharded parameters' state is gathered.
    state["optimizer"] = t.optimizer.state_dict() if t.dist is None else t.dist.optimizer_state(t.model, t.optimizer)
    if t.dist is not None and t.dist.sharded:
        state["optimizer_by_name"] = True  # get_optimizer_state_dict's layout: parameters by name, not index
    return state


def restore_state(trainer: Trainer, state: dict[str, Any]) -> None:
    """Put `capture_state`'s state back into `trainer` (whose weights are already loaded)."""
    t = trainer
    if state.get("format") != STATE_FORMAT:
        raise HainaError(f"trainer state has format {state.get('format')!r}, expected {STATE_FORMAT!r}")
    t.step, t.tokens_seen = int(state["step"]), int(state["tokens_seen"])
    t.targets_seen = int(state.get("targets_seen", t.tokens_seen))  # older states: every token a target
    t.best_val_loss, t.bad_evals = float(state["best_val_loss"]), int(state["bad_evals"])
    t.initial_val_loss = state["initial_val_loss"]
    t.train_seconds = float(state["train_seconds"])
    by_name = t.dist is not None and t.dist.sharded
    if state.get("optimizer_in_shards"):
        pass  # read with the weights, by every rank (`haina.train.sharded.load_shards`)
    elif bool(state.get("optimizer_by_name")) != by_name:
        raise HainaError("cannot resume: the checkpoint's optimizer state was saved whole "
                         f"{'with' if state.get('optimizer_by_name') else 'without'} FSDP sharding and this run "
                         f"is {'' if by_name else 'not '}sharded; resume with the parallel.dp_shard it was saved "
                         "with (sharded checkpoints, parallel.checkpoint=sharded, resume at any layout)")
    elif t.dist is None:
        t.optimizer.load_state_dict(state["optimizer"])
    else:
        t.dist.load_optimizer_state(t.model, t.optimizer, state["optimizer"])
    t.schedule.load_state_dict(state["schedule"])
    if t.scaler is not None and "scaler" in state:
        t.scaler.load_state_dict(state["scaler"])
    ckpt.restore_rng(state["rng"])
    t.generator.set_state(state["data_generator"].cpu())
    if "guard" in state:  # checkpoints written before the guard existed have none
        t.guard.load_state_dict(state["guard"])
    t.settled_steps = state.get("settled_steps")


def check_architecture(model_cfg: ModelConfig, path: Path) -> None:
    """Raise unless checkpoint `path` was trained with the architecture `model_cfg` describes."""
    saved = load_yaml(path / "config.yaml").get("model", {})
    current = model_cfg.to_dict()
    # A field added to ModelConfig after the checkpoint was written (head_size, causal) means its default there.
    defaults = {f.name: f.default for f in dataclasses.fields(type(model_cfg))}
    diff = [f"{k}: {saved.get(k, defaults.get(k))!r} → {v!r}" for k, v in current.items()
            if saved.get(k, defaults.get(k)) != v]
    if diff:
        raise HainaError(f"cannot resume: {path} was trained with another architecture ({'; '.join(diff[:3])}); "
                         "use the run's model config or start a new run in another --out")


__all__ = ["STATE_FORMAT", "capture_state", "check_architecture", "restore_state"]
