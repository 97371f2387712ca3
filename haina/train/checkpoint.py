"""Training checkpoints: model checkpoint + trainer state, written atomically, indexed and pruned.

    RUN/checkpoints/step-0000100/   model.safetensors, config.yaml (the full resolved config),
                                    tokenizer/, trainer_state.pt
    RUN/checkpoints/index.json      {"latest": name, "best": name, "best_val_loss": x, "all": [...],
                                     "val_loss": {name: x}}

Each checkpoint is written into a temporary directory and renamed into place, and only then is
index.json rewritten (itself atomically), so a crash at any moment leaves the index pointing at
complete checkpoints. Pruning (and a fresh start) deletes only `step-NNNNNNN` directories that the
index names, so nothing a user put beside them is ever removed. `trainer_state.pt` holds only tensors, lists, dicts and scalars, so it is
read back with `torch.load(..., weights_only=True)`, which runs no pickled code.
"""

from __future__ import annotations

import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from haina.core.errors import HainaError
from haina.core.io import atomic_dir, read_json, write_json
from haina.model.checkpoint import WEIGHTS, verify_checkpoint, verify_checksums, write_checksums

STATE_FILE = "trainer_state.pt"
INDEX_FILE = "index.json"


_STEP_DIR = re.compile(r"step-\d{7}")  # the only names a run's pruning or fresh start ever deletes


def step_name(step: int) -> str:
    return f"step-{step:07d}"


def is_step_name(name: object) -> bool:
    """Whether `name` is one of ours (`step-NNNNNNN`): never a path, never a name a user chose."""
    return isinstance(name, str) and _STEP_DIR.fullmatch(name) is not None


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def read_index(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's checkpoint index, or None if it has none."""
    path = checkpoints_dir(run_dir) / INDEX_FILE
    if not path.is_file():
        return None
    index = read_json(path, "a checkpoint index is an object naming 'latest'; delete it to start afresh", expect=dict)
    return index


def save_checkpoint(run_dir: str | Path, *, step: int, write_weights: Callable[[Path], None], state: dict[str, Any],
                    val_loss: float | None, keep_last: int) -> Path:
    """Write checkpoint `step-NNNNNNN`, then update the index, then prune old checkpoints.

    An OSError (a full disk) while writing leaves the previous checkpoints and the index as they were:
    the new checkpoint is built in a temporary directory, and is removed again if the index cannot be
    rewritten to name it.

    Args:
        run_dir: the run directory.
        step: optimizer steps taken.
        write_weights: writes the model's part into the directory it is given: weights (or a LoRA run's
            adapters), config.yaml with the full resolved config, the tokenizer (`Trainer.write_weights`).
        state: the trainer state (tensors, lists, dicts, scalars only).
        val_loss: validation loss of these weights, used to pick the best checkpoint.
        keep_last: how many of the most recent checkpoints to keep besides the best.
    """
    ckpts = checkpoints_dir(run_dir)
    name = step_name(step)
    index = read_index(run_dir) or {"all": [], "val_loss": {}}
    indexed = _indexed(index)
    existed = (ckpts / name).exists()
    with atomic_dir(ckpts / name) as tmp:
        write_weights(tmp)
        torch.save(state, tmp / STATE_FILE)
        write_checksums(tmp)  # once everything is written: the trainer state is covered too

    names = [n for n in indexed if (ckpts / n).is_dir() and n != name] + [name]
    old_losses = index.get("val_loss") if isinstance(index.get("val_loss"), dict) else {}
    losses = {n: v for n, v in old_losses.items() if n in names}
    losses[name] = val_loss
    scored = [n for n in names if isinstance(losses.get(n), (int, float))]
    best = min(scored, key=lambda n: (losses[n], -names.index(n))) if scored else name
    keep = set(names[-keep_last:] if keep_last else []) | {best, name}
    names = [n for n in names if n in keep]
    try:
        write_json(ckpts / INDEX_FILE, {"latest": name, "best": best, "best_val_loss": losses.get(best),
                                        "all": names, "val_loss": {n: losses.get(n) for n in names}})
    except OSError:
        if not existed:  # unindexed, it would never be pruned; the index still names the previous checkpoints
            shutil.rmtree(ckpts / name, ignore_errors=True)
        raise
    # Prune only after the index no longer names them, so the index never points at a deleted one; and only
    # checkpoints the index named: a directory nobody listed (a user's copy, say) is not ours to delete.
    for old in indexed:
        if old not in keep:
            shutil.rmtree(ckpts / old, ignore_errors=True)
    return ckpts / name


def _indexed(index: dict[str, Any]) -> list[str]:
    """The checkpoint names an index lists, ignoring anything that is not one of ours."""
    names = index.get("all")
    return [n for n in names if is_step_name(n)] if isinstance(names, list) else []


def remove_checkpoints(run_dir: str | Path) -> list[str]:
    """Delete a run's indexed checkpoints and its index (a fresh start); returns the names removed.

    Anything else under RUN/checkpoints (a file or directory the index does not name) stays.
    """
    ckpts = checkpoints_dir(run_dir)
    index = read_index(run_dir)
    if index is None:
        return []
    names = [n for n in _indexed(index) if (ckpts / n).is_dir()]
    (ckpts / INDEX_FILE).unlink()  # first: a crash from here on leaves no index naming a half-deleted checkpoint
    for n in names:
        shutil.rmtree(ckpts / n, ignore_errors=True)
    if not any(ckpts.iterdir()):
        ckpts.rmdir()
    return names


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The latest complete checkpoint of a run, or None."""
    index = read_index(run_dir)
    if not index or not index.get("latest"):
        return None
    if not is_step_name(index["latest"]):
        raise HainaError(f"{checkpoints_dir(run_dir) / INDEX_FILE} names {index['latest']!r} as latest, which is not "
                         "a checkpoint name (step-NNNNNNN); cannot resume from it")
    path = checkpoints_dir(run_dir) / index["latest"]
    if not (path / STATE_FILE).is_file():
        raise HainaError(f"{path} named as latest in {INDEX_FILE} has no {STATE_FILE}; cannot resume from it")
    if (path / WEIGHTS).is_file():
        verify_checkpoint(path)  # checksums, config, weights header, tokenizer: one line naming a damaged file
    else:
        verify_checksums(path)  # a LoRA run's checkpoint holds adapters, not weights
    return path


def load_state(ckpt_dir: str | Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """The trainer state of a checkpoint, read without unpickling arbitrary objects."""
    path = Path(ckpt_dir) / STATE_FILE
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except (PermissionError, IsADirectoryError):
        raise
    except Exception as e:  # noqa: BLE001 — damaged bytes raise anything from RuntimeError to KeyError in torch.load
        reason = str(e).splitlines()[0][:120] if str(e) else ""
        raise HainaError(f"cannot read trainer state {path}: truncated or not a haina trainer state "
                         f"({type(e).__name__}{': ' + reason if reason else ''})") from None


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
    "is_step_name",
    "latest_checkpoint",
    "load_state",
    "read_index",
    "remove_checkpoints",
    "restore_rng",
    "save_checkpoint",
    "step_name",
]
