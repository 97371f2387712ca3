"""Training checkpoints: model checkpoint + trainer state, written atomically, indexed and pruned.

    RUN/checkpoints/step-0000100/   model.safetensors, config.yaml (the full resolved config),
                                    tokenizer/, trainer_state.pt
    RUN/checkpoints/index.json      {"latest": name, "best": name, "best_val_loss": x, "all": [...],
                                     "val_loss": {name: x}}

Each checkpoint is written into a temporary directory and renamed into place, and only then is
index.json rewritten (itself atomically), so a crash at any moment leaves the index pointing at
complete checkpoints. `trainer_state.pt` holds only tensors, lists, dicts and scalars, so it is
read back with `torch.load(..., weights_only=True)`, which runs no pickled code.
"""

from __future__ import annotations

import json
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from haina.core.errors import HainaError
from haina.core.io import atomic_dir, write_json
from haina.model.checkpoint import save_model
from haina.model.transformer import Transformer
from haina.tokenizer import Tokenizer

STATE_FILE = "trainer_state.pt"
INDEX_FILE = "index.json"


def step_name(step: int) -> str:
    return f"step-{step:07d}"


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def read_index(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's checkpoint index, or None if it has none."""
    path = checkpoints_dir(run_dir) / INDEX_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise HainaError(f"cannot parse {path}: {e}; delete it to start afresh") from None


def save_checkpoint(run_dir: str | Path, *, step: int, model: Transformer, tokenizer: Tokenizer | None,
                    config: dict[str, Any], state: dict[str, Any], val_loss: float | None, keep_last: int) -> Path:
    """Write checkpoint `step-NNNNNNN`, then update the index, then prune old checkpoints.

    Args:
        run_dir: the run directory.
        step: optimizer steps taken.
        model: the (uncompiled) model.
        tokenizer: saved beside the weights so the checkpoint is self-contained.
        config: the full resolved config, written as config.yaml (its `model` section is the model's).
        state: the trainer state (tensors, lists, dicts, scalars only).
        val_loss: validation loss of these weights, used to pick the best checkpoint.
        keep_last: how many of the most recent checkpoints to keep besides the best.
    """
    ckpts = checkpoints_dir(run_dir)
    name = step_name(step)
    extra = {k: v for k, v in config.items() if k != "model"}
    with atomic_dir(ckpts / name) as tmp:
        save_model(tmp, model, tokenizer, extra_config=extra)
        torch.save(state, tmp / STATE_FILE)

    index = read_index(run_dir) or {"all": [], "val_loss": {}}
    names = [n for n in index.get("all", []) if (ckpts / n).is_dir() and n != name] + [name]
    losses = {n: v for n, v in index.get("val_loss", {}).items() if n in names}
    losses[name] = val_loss
    scored = [n for n in names if losses.get(n) is not None]
    best = min(scored, key=lambda n: (losses[n], -names.index(n))) if scored else name
    keep = set(names[-keep_last:] if keep_last else []) | {best, name}
    names = [n for n in names if n in keep]
    write_json(ckpts / INDEX_FILE, {"latest": name, "best": best, "best_val_loss": losses.get(best),
                                    "all": names, "val_loss": {n: losses.get(n) for n in names}})
    # Prune only after the index no longer names them, so the index never points at a deleted one.
    for path in ckpts.iterdir():
        if path.is_dir() and path.name.startswith("step-") and path.name not in keep:
            shutil.rmtree(path, ignore_errors=True)
    return ckpts / name


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The latest complete checkpoint of a run, or None."""
    index = read_index(run_dir)
    if not index or not index.get("latest"):
        return None
    path = checkpoints_dir(run_dir) / index["latest"]
    if not (path / STATE_FILE).is_file():
        raise HainaError(f"{path} named as latest in {INDEX_FILE} has no {STATE_FILE}; cannot resume from it")
    return path


def load_state(ckpt_dir: str | Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """The trainer state of a checkpoint, read without unpickling arbitrary objects."""
    path = Path(ckpt_dir) / STATE_FILE
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:  # corrupt, truncated or foreign
        raise HainaError(f"cannot read trainer state {path}: {e}") from None


# ----------------------------------------------------------------- RNG state
def capture_rng() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as plain lists and tensors."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    nps = state["numpy"]
    np.random.set_state((nps["kind"], np.array(nps["keys"], dtype=np.uint32), nps["pos"], nps["has_gauss"],
                         nps["cached"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


__all__ = [
    "INDEX_FILE",
    "STATE_FILE",
    "capture_rng",
    "checkpoints_dir",
    "latest_checkpoint",
    "load_state",
    "read_index",
    "restore_rng",
    "save_checkpoint",
    "step_name",
]
