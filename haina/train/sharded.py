"""Sharded training checkpoints on torch.distributed.checkpoint (DCP): every rank writes its own part.

A sharded run (FSDP2, HSDP, tensor parallel) gathering its whole weights and optimizer state onto rank 0 for
every checkpoint would need rank 0 to hold the model several times over; here each rank writes the shards it
holds, in parallel, and a later run at *any* world size and layout reads back the pieces it needs (DCP plans
the resharding: save with 2 ranks, resume with 1, 2 or 4, DDP or FSDP2).

    RUN/checkpoints/step-0000100/   config.yaml, tokenizer/, trainer_state.pt (step, schedule, RNG, data
                                    position: rank 0), checksums.json
                                    shards/shard-0000R-model-00001-of-00001.safetensors, one per rank

The shards are safetensors files (torch's Hugging Face storage layout, each file's header records where its
pieces sit in the whole tensor), so reading a checkpoint never unpickles anything: DCP's default storage keeps
its metadata in a pickle. Keys are `model/NAME` for the model's state-dict entries (a tied head once) and
`optimizer/NAME/exp_avg|exp_avg_sq|step` for AdamW's per-parameter state; the optimizer's hyperparameters come
from the run's config, as the learning rate comes from the schedule at every step anyway.

`haina export checkpoint` turns a sharded checkpoint into a plain one (model.safetensors) for `generate`,
`serve`, `export hf` and the rest (`full_weights`).
"""

from __future__ import annotations

import contextlib
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from haina.core.errors import HainaError
from haina.model.checkpoint import SHARDS
from haina.train.checkpoint import checkpoints_dir, step_name

MODEL, OPTIMIZER = "model/", "optimizer/"


def holds_shards(checkpoint: str | Path) -> bool:
    """Whether a checkpoint directory is a sharded one (its weights under shards/, not model.safetensors)."""
    return (Path(checkpoint) / SHARDS).is_dir()


def _storage_key(tensor: torch.Tensor) -> int:
    """One key per storage, so a tied head (the embedding's very tensor) is written once."""
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.untyped_storage().data_ptr() if local.numel() else id(tensor)


def _flat(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """The model's (and optimizer's) state as one flat name → tensor mapping, plus the nested dicts it views.

    The tensors are the live ones (DTensor shards under FSDP2): DCP saves from them and loads into them.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model_sd = get_model_state_dict(model)
    flat: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model_sd.items():
        key = _storage_key(tensor)
        if key not in seen:
            seen.add(key)
            flat[MODEL + name] = tensor
    optim_sd: dict[str, Any] = {}
    if optimizer is not None:
        optim_sd = get_optimizer_state_dict(model, optimizer)  # initializes an empty state (a zero step at lr 0)
        for name, state in optim_sd["state"].items():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    flat[f"{OPTIMIZER}{name}/{key}"] = value
    return flat, model_sd, optim_sd


def save_shards(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank writes its part of the model's weights and the optimizer's state into `directory`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageWriter

    flat, _, _ = _flat(model, optimizer)
    dcp.save(flat, storage_writer=HuggingFaceStorageWriter(str(directory), save_distributed=True))


def stage_shards(run_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, dist: Any) -> Path:
    """Every rank writes its part of checkpoint `step` into a staging directory beside the checkpoints.

    Rank 0 moves it into the checkpoint it builds (`Trainer.write_weights`), which is swapped in whole: a crash
    while the ranks write leaves the previous checkpoints and the index as they were.
    """
    staging = _staging(run_dir, step, dist)
    save_shards(staging, model, optimizer)  # returns on every rank once all of them have written
    return staging


def _staging(run_dir: Path, step: int, dist: Any) -> Path:
    """An empty staging directory for checkpoint `step`, made by rank 0 before any rank writes into it."""
    ckpts = checkpoints_dir(run_dir)
    staging = ckpts / f".{step_name(step)}.{SHARDS}"
    if dist.is_main:
        # A crashed save's leftovers, ours by their very names (the index never names a dot directory).
        for old in ckpts.glob(f".step-*.{SHARDS}") if ckpts.is_dir() else ():
            shutil.rmtree(old, ignore_errors=True)
        staging.mkdir(parents=True)
    dist.barrier()
    return staging


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns that it 'assumes the intent is to load in a single process' when there is no process group:
    that is exactly the intent of a one-process resume or `export checkpoint`."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


class PendingShards:
    """A sharded checkpoint whose shards every rank is writing in a background thread (parallel.async_checkpoint).

    DCP copies the state to CPU memory first, so training may change the weights at once; the files are written
    while it does. `wait` returns the staging directory once every rank's shards are on disk, and the trainer
    then publishes the checkpoint as a synchronous one (the index names it only then). The background writes'
    collectives run on a process group of their own, so they never interleave with training's.
    """

    def __init__(self, run_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, dist: Any, *,
                 state: dict[str, Any], val_loss: float | None):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageWriter

        self.step, self.state, self.val_loss, self.dist = step, state, val_loss, dist
        self.staging = _staging(run_dir, step, dist)
        flat, _, _ = _flat(model, optimizer)
        self._future = dcp.async_save(flat, storage_writer=HuggingFaceStorageWriter(str(self.staging),
                                                                                    save_distributed=True),
                                      process_group=dist.checkpoint_group)

    def wait(self) -> Path:
        """Block until this rank's shards are written (DCP's own collectives make that every rank's)."""
        self._future.result()
        self.dist.barrier()
        return self.staging


def discard_staged(staging: Path | None, is_main: bool) -> None:
    """Remove what `stage_shards` wrote if the checkpoint did not take it in (a failed save); returns None."""
    if staging is not None and is_main and staging.exists():
        shutil.rmtree(staging, ignore_errors=True)


def _reader(directory: Path) -> Any:
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader

    if not any(directory.glob("*.safetensors")):
        raise HainaError(f"{directory} holds no shards (*.safetensors); the checkpoint is incomplete")
    return HuggingFaceStorageReader(str(directory))


def saved_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    """Each saved tensor's whole shape, from the shards' headers (nothing but the headers is read)."""
    try:
        metadata = _reader(directory).read_metadata()
    except HainaError:
        raise
    except Exception as e:  # noqa: BLE001 — a damaged header surfaces as anything from safetensors or DCP
        raise HainaError(f"cannot read the shards in {directory}: {str(e).splitlines()[0][:160]}") from None
    return {k: tuple(v.size) for k, v in metadata.state_dict_metadata.items()}


def _check_same_model(directory: Path, flat: dict[str, torch.Tensor]) -> None:
    """One line before any tensor is read when the shards hold another model (names or shapes differ)."""
    saved = saved_shapes(directory)
    wanted = {k: tuple(v.shape) for k, v in flat.items()}
    missing = [k for k in wanted if k not in saved and k.startswith(MODEL)]
    unexpected = [k for k in saved if k not in wanted and k.startswith(MODEL)]
    reshaped = [f"{k.removeprefix(MODEL)} {saved[k]} → {wanted[k]}" for k in wanted if k in saved and saved[k] != wanted[k]]
    if missing or unexpected or reshaped:
        what = "; ".join(filter(None, [
            f"missing {', '.join(k.removeprefix(MODEL) for k in missing[:3])}" if missing else "",
            f"unexpected {', '.join(k.removeprefix(MODEL) for k in unexpected[:3])}" if unexpected else "",
            f"shapes differ: {', '.join(reshaped[:3])}" if reshaped else ""]))
        raise HainaError(f"the sharded checkpoint {directory.parent} holds another model ({what}); resume it with "
                         "the model config it was trained with, or start a new run in another --out")
    lacking = [k for k in wanted if k not in saved]
    if lacking:
        raise HainaError(f"the sharded checkpoint {directory.parent} has no optimizer state for "
                         f"{lacking[0].removeprefix(OPTIMIZER)} (and {len(lacking) - 1} more); it was written by "
                         "another kind of run")


def load_shards(checkpoint: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Every rank reads back what it holds of a sharded checkpoint, whatever world size wrote it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    directory = Path(checkpoint) / SHARDS
    flat, model_sd, optim_sd = _flat(model, optimizer)
    _check_same_model(directory, flat)
    with _quiet_single_process():
        dcp.load(flat, storage_reader=_reader(directory))
    # The loaded tensors are the model's and the optimizer's own (or their local shards); setting them back is
    # what the state-dict API asks for, and re-registers anything a wrapper keeps apart (FSDP2's sharded params).
    set_model_state_dict(model, model_sd)
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, optim_sd)


def full_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The model's whole weights from a sharded checkpoint, in one process: state-dict names → CPU tensors."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader

    directory = Path(checkpoint) / SHARDS
    reader = _reader(directory)
    metadata = reader.read_metadata()
    template = {k: torch.empty(v.size, dtype=v.properties.dtype)
                for k, v in metadata.state_dict_metadata.items() if k.startswith(MODEL)}
    if not template:
        raise HainaError(f"{directory} holds no model weights (no {MODEL}* tensors); it is not a haina checkpoint")
    with _quiet_single_process():
        dcp.load(template, storage_reader=HuggingFaceStorageReader(str(directory)))
    return {k.removeprefix(MODEL): v for k, v in template.items()}


__all__ = ["PendingShards", "discard_staged", "full_weights", "holds_shards", "load_shards", "save_shards", "saved_shapes", "stage_shards"]
