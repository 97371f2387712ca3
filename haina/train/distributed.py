"""Data parallelism on torch.distributed: the processes torchrun starts, one device mesh, DDP or FSDP2.

The model code stays single-device; `Distributed.parallelize` applies parallelism to it from outside
(torchtitan's way): DDP when every rank holds the whole model, FSDP2's `fully_shard` (per block, then the
root) when parameters are sharded, HSDP when both. The `Trainer` asks this module a few things and is
otherwise the same loop: which module to run, whether a micro-batch synchronizes gradients, sums over ranks
for the log, and gathered weights and optimizer state for rank 0's checkpoint.

What makes N ranks train like one process with N times the batch:

- Every rank draws the *global* batch from the same seeded generator and keeps its own rows (`RankRows`).
  The ranks read different windows, deterministically, and the data position is one generator state on
  every rank, so the trajectory equals one process with the global batch (up to float summation order) and a
  checkpoint's data position means the same at any world size. The cost: each rank reads the token ids of
  all ranks' rows, which is small next to a step.
- Gradients are averaged over ranks by DDP and FSDP; the trainer weighs each rank's loss so that the average
  is the mean over every rank's targets, and synchronizes only on a step's last micro-batch.
- Decisions that end or shorten the loop (a signal, the time budget) are agreed by all ranks (`any_rank`),
  and the guard's verdicts come from losses and norms that are already the same on every rank: a rank that
  left the loop alone would wait forever in the next collective.

Only rank 0 writes (logs, metrics, plots, reports, checkpoints); the others' `haina` log is quiet. A failing
rank stops the job with its one-line error: its peers' collectives fail as soon as its sockets close (gloo)
or after `parallel.timeout_seconds`, and torchrun stops the rest.

Checkpoints are sharded when parameters are (`haina.train.sharded`: every rank writes its part with
torch.distributed.checkpoint, and any world size resumes them), and single files gathered on rank 0 otherwise
(the format of a one-process run); `parallel.checkpoint` chooses.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from haina.core.device import resolve_device
from haina.core.errors import HainaError
from haina.core.log import info
from haina.train.config import ParallelConfig

# Set by torchrun (and by any launcher that follows its conventions: Slurm scripts export them too).
ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# How long a rank that met an error every rank meets waits before reporting it, so that rank 0's line comes
# first and torchrun, stopping the job when rank 0 exits, keeps the others from repeating it.
QUIET_SECONDS = 3.0


def env_rank() -> int:
    """This process's global rank as torchrun set it; 0 outside torchrun."""
    return int(os.environ.get("RANK", "0"))


def env_world_size() -> int:
    """The number of processes torchrun started; 1 outside torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def restart_count() -> int:
    """How many times torchrun has restarted this job after a failure (`--max-restarts`); 0 on the first try."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


@dataclass
class Distributed:
    """This rank's place in the job and the (dp_replicate, dp_shard) mesh it trains on."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    mesh: Any  # torch.distributed.device_mesh.DeviceMesh
    replicate: int
    shard: int
    tp: int = 1  # tensor-parallel ranks per data-parallel group (haina.train.tensor_parallel)
    fsdp_one: bool = False  # FSDP2 over a shard group of one (parallel.fsdp): to measure what FSDP costs
    mixed_precision: bool = False
    timeout_seconds: float = 600.0
    sharded_checkpoints: bool = False  # each rank writes its part (haina.train.sharded), not rank 0 the whole
    checkpoint_group: Any = None  # the process group of background checkpoint writes (parallel.async_checkpoint)

    @property
    def async_checkpoints(self) -> bool:
        """Whether sharded checkpoints are written in the background while training goes on."""
        return self.checkpoint_group is not None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs and writes."""
        return self.rank == 0

    def describe(self) -> str:
        """'2 ranks, DDP (cpu)' and the like, for the log and the report."""
        how = ("DDP" if not self.fsdp else f"FSDP2 over {self.shard}" if self.replicate == 1
               else f"HSDP: {self.replicate} replicas × FSDP2 over {self.shard}")
        if self.tp > 1:
            how = f"tensor parallel over {self.tp}" + ("" if self.world_size == self.tp else f", {how}")
        return f"{self.world_size} rank{'s' if self.world_size != 1 else ''}, {how} ({self.device.type})"

    @property
    def sharded(self) -> bool:
        """Whether parameters are split over ranks (FSDP2/HSDP, tensor parallel) rather than whole on each (DDP)."""
        return self.fsdp or self.tp > 1

    @property
    def fsdp(self) -> bool:
        """Whether FSDP2 holds the parameters (sharded over dp_shard ranks, or over one with parallel.fsdp)."""
        return self.shard > 1 or self.fsdp_one

    @property
    def dp_size(self) -> int:
        """Data-parallel ranks: groups that read different rows (the ranks of a tensor-parallel group read the same)."""
        return self.world_size // self.tp

    @property
    def dp_rank(self) -> int:
        """This rank's data-parallel group (tp is the mesh's last, fastest-varying dimension)."""
        return self.rank // self.tp

    # ------------------------------------------------------------- the model
    def parallelize(self, model: nn.Module) -> nn.Module:
        """Apply data parallelism to `model` (on this rank's device); returns the module to train through.

        Tensor parallel first (each block's heads and MLP split over the `tp` mesh dimension), then sharded:
        `fully_shard` each block, then the root (embeddings, final norm, head), in place; the returned module is
        `model` itself. Replicated: a DDP wrapper around `model`.
        """
        if self.tp > 1:
            from haina.train.tensor_parallel import apply_tensor_parallel

            apply_tensor_parallel(model, self.mesh["tp"])
        if self.fsdp:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            # A 2-D (replicate, shard) mesh makes FSDP2 do HSDP.
            mesh = self.mesh["dp_replicate", "dp_shard"] if self.replicate > 1 else self.mesh["dp_shard"]
            policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                      if self.mixed_precision else MixedPrecisionPolicy())
            for block in model.blocks:
                fully_shard(block, mesh=mesh, mp_policy=policy)
            fully_shard(model, mesh=mesh, mp_policy=policy)
            return model
        if self.tp > 1:  # tensor parallel alone: every rank reads the same rows, there is nothing to average
            return model
        return self.ddp(model)

    def ddp(self, module: nn.Module, find_unused_parameters: bool = False) -> nn.Module:
        """`module` replicated on every rank with DDP (its gradients averaged over the replicas)."""
        from torch.nn.parallel import DistributedDataParallel

        # The model's buffers (rotary tables, masks) are constants: no need to broadcast them every forward.
        return DistributedDataParallel(module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                       process_group=self.mesh["dp_replicate"].get_group(), forward_sync_buffers=False,
                                       find_unused_parameters=find_unused_parameters)

    def gradient_sync(self, module: nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
        """Around a micro-batch's forward and backward: reduce gradients over ranks only if `enabled`.

        Accumulating micro-batches then reduces once per step, not once per micro-batch (DDP's `no_sync`,
        FSDP2's `set_requires_gradient_sync`).
        """
        if self.fsdp:
            module.set_requires_gradient_sync(enabled)
            return contextlib.nullcontext()
        if self.tp > 1:
            return contextlib.nullcontext()
        return contextlib.nullcontext() if enabled else module.no_sync()

    # ------------------------------------------------------------- collectives
    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over the data-parallel ranks (in place; returned for convenience).

        The ranks of a tensor-parallel group hold the same value (they read the same rows): the sum over all
        ranks counts it tp times.
        """
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.div_(self.tp) if self.tp > 1 else tensor

    def any_rank(self, *flags: bool) -> list[bool]:
        """Each flag, true if it is true on any rank: decisions every rank must take at the same step."""
        t = torch.tensor([float(f) for f in flags], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [v > 0 for v in t.tolist()]

    def from_main(self, value: int) -> int:
        """Rank 0's `value` on every rank (a number that timing decided, which differs between ranks)."""
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.broadcast(t, src=0)
        return int(t.item())

    def barrier(self) -> None:
        dist.barrier()

    # ------------------------------------------------------------- checkpoints
    @staticmethod
    def _sharded_again(model: nn.Module) -> None:
        """Back to sharded parameters: a forward without backward (evaluation) leaves FSDP2's root gathered,
        and the state-dict functions expect the sharded ones the optimizer holds."""
        from torch.distributed.fsdp import FSDPModule

        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    def full_weights(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """The model's whole weights on rank 0's CPU, by the names `model.weights()` saves; None elsewhere.

        Sharded, every rank must call this (it gathers); replicated, rank 0 already holds them.
        """
        if not self.sharded:
            return {k: v.detach().cpu() for k, v in model.weights().items()} if self.is_main else None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        self._sharded_again(model)
        if self.tp > 1:  # gathered, then back from the rows' tensor-parallel order to the model's
            from haina.train import tensor_parallel

            return tensor_parallel.full_weights(model, model.cfg, self.tp)
        names = model.weights().keys()  # sharded tensors under the saved names (a tied head appears once)
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: full[k] for k in names} if self.is_main else None

    def load_full_weights(self, model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
        """Load whole weights (every rank read the same file) into the sharded or replicated model."""
        if not self.sharded:
            model.load_weights({k: v.to(self.device) for k, v in weights.items()})
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        self._sharded_again(model)
        if self.tp > 1:
            from haina.train import tensor_parallel

            tensor_parallel.load_full_weights(model, model.cfg, self.tp, weights)
            return
        # strict=False: a tied head is saved once, as the embedding it shares its tensor with.
        set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer's whole state: replicated, its own state dict; sharded, gathered and keyed by name."""
        if not self.sharded:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        self._sharded_again(model)
        if self.tp > 1:
            from haina.train import tensor_parallel

            return tensor_parallel.full_optimizer_state(model, optimizer, model.cfg, self.tp)
        return get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        if not self.sharded:
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        self._sharded_again(model)
        if self.tp > 1:
            from haina.train import tensor_parallel

            tensor_parallel.load_full_optimizer_state(model, optimizer, model.cfg, self.tp, state)
            return
        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


class GatheredModel:
    """What `save_model` reads of a model (its config and `weights()`), for weights gathered from FSDP shards."""

    def __init__(self, cfg: Any, weights: dict[str, torch.Tensor]):
        self.cfg, self._weights = cfg, weights

    def weights(self) -> dict[str, torch.Tensor]:
        return self._weights


class QuietLog:
    """The run log of a rank other than 0: records nothing (rank 0 writes metrics.jsonl and TensorBoard)."""

    history: tuple = ()

    def log(self, record: dict[str, Any], prefix: str) -> None:
        pass

    def close(self) -> None:
        pass


class RankRows:
    """A training source whose every draw is the global batch, of which this rank keeps its own rows.

    Rank r of N asked for B rows draws N·B windows, as one process with batch N·B would, and keeps rows
    [r·B, (r+1)·B). Evaluation windows are the same on every rank (under DDP the Trainer scores each rank's share).
    """

    def __init__(self, source: Any, rank: int, world_size: int):
        self.source, self.rank, self.world_size = source, rank, world_size

    def get_batch(self, batch_size: int, block_size: int, generator: torch.Generator) -> Any:
        """This rank's rows of the global batch: (inputs, targets), or a fine-tuning batch's dict of row tensors.

        A dict's tensors with one row per example are sliced; anything else is kept as it is, so a count over
        the whole batch must come per row (a tensor) to be this rank's. A dict batch can come short (the last
        length bucket of fine-tuning data): its rows are then split as evenly as they go, since the loss is
        weighted by the global count of targets and any split gives the same gradient. Fewer rows than ranks
        are computed whole by every rank (a rank without rows would have nothing to run backward on).
        """
        n = batch_size * self.world_size
        batch = self.source.get_batch(n, block_size, generator)
        if not isinstance(batch, dict):
            rows = slice(self.rank * batch_size, (self.rank + 1) * batch_size)
            return tuple(t[rows] for t in batch)
        leading = Counter(v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.dim())
        m = n if n in leading else (leading.most_common(1)[0][0] if leading else n)
        if m < self.world_size:
            return batch
        rows = slice(self.rank * m // self.world_size, (self.rank + 1) * m // self.world_size)
        return {k: v[rows] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == m else v
                for k, v in batch.items()}

    def eval_batches(self, batch_size: int, block_size: int,
                     max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.source.eval_batches(batch_size, block_size, max_batches)

    def __getattr__(self, name: str) -> Any:  # check_length, vocab_size…: the source's
        if name == "source":  # not set yet (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self.source, name)

    def __len__(self) -> int:
        return len(self.source)


# ----------------------------------------------------------------- starting and stopping
def setup(parallel: ParallelConfig, device: str = "auto") -> Distributed | None:
    """Join the job torchrun started: process group, device, mesh. None for a single process.

    The mesh is checked against the world size before anything else, so a mismatch is one line on rank 0.
    """
    world = env_world_size()
    with same_on_every_rank():
        replicate, shard = parallel.degrees(world)
        if world == 1 and not parallel.fsdp:
            return None
        missing = [k for k in ENV if k not in os.environ]
        if missing:
            raise HainaError(f"WORLD_SIZE={world} but {', '.join(missing)} not set; launch with torchrun or "
                             "`haina pretrain --nproc N`")
        dev = resolve_device(device)
        if dev.type not in ("cpu", "cuda"):
            raise HainaError(f"distributed training runs on CUDA (nccl) or CPU (gloo), not {dev.type}; "
                             "set --train.device=cpu or cuda")
        rank, local_rank = env_rank(), int(os.environ["LOCAL_RANK"])
        if dev.type == "cuda" and local_rank >= torch.cuda.device_count():
            raise HainaError(f"{int(os.environ.get('LOCAL_WORLD_SIZE', local_rank + 1))} processes on this machine "
                             f"but {torch.cuda.device_count()} GPUs: start one process per GPU (--nproc, or "
                             "torchrun's --nproc-per-node)")
    if dev.type == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                timeout=timedelta(seconds=parallel.timeout_seconds),
                                device_id=dev if dev.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh

    # tp last: a tensor-parallel group's ranks are neighbours (the GPUs of one machine, on fast links).
    mesh = init_device_mesh(dev.type, (replicate, shard, parallel.tp), mesh_dim_names=("dp_replicate", "dp_shard", "tp"))
    sharded_checkpoints = parallel.tp == 1 and (parallel.checkpoint == "sharded" or (
        parallel.checkpoint == "auto" and (shard > 1 or parallel.fsdp or parallel.async_checkpoint)))
    # Background writes get collectives of their own (gloo: DCP's are on CPU tensors), never interleaved with
    # training's on the default group. Every rank creates it, in the same order.
    group = dist.new_group(backend="gloo") if parallel.async_checkpoint and sharded_checkpoints else None
    if rank != 0:
        logging.getLogger("haina").setLevel(logging.WARNING)  # one rank tells the story
    return Distributed(rank=rank, local_rank=local_rank, world_size=world, device=dev, mesh=mesh,
                       replicate=replicate, shard=shard, tp=parallel.tp, mixed_precision=parallel.mixed_precision,
                       timeout_seconds=parallel.timeout_seconds, fsdp_one=parallel.fsdp,
                       sharded_checkpoints=sharded_checkpoints, checkpoint_group=group)


def teardown() -> None:
    """Destroy the process group if there is one (also after an error, so no rank leaves it half open)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def session(parallel: ParallelConfig, device: str = "auto") -> Iterator[Distributed | None]:
    """`setup`, then the body; a failure is one line naming the rank; the process group is always destroyed.

    A collective that fails because a peer died or hung becomes a short line on the ranks left waiting,
    so that the failing rank's own error is the one that explains the job's end.
    """
    run = None
    try:
        run = setup(parallel, device)
        yield run
    except HainaError as e:
        if run is None or getattr(e, "same_on_every_rank", False):
            raise
        raise HainaError(f"rank {run.rank}: {e}") from None
    except RuntimeError as e:  # torch.distributed's DistError derives from it, as do gloo's failures
        if run is None or not lost_peer(e):
            raise
        if "timed out" in str(e).lower():
            raise HainaError(f"rank {run.rank}: a collective waited over {run.timeout_seconds:g} s for another "
                             "rank (parallel.timeout_seconds); one of them hung or died") from None
        raise HainaError(f"rank {run.rank}: stopped because another rank failed; that rank's error says why") from None
    finally:
        teardown()


def lost_peer(error: BaseException) -> bool:
    """Whether `error` is a collective's failure because another rank went away or stopped answering."""
    text = str(error).lower()
    return isinstance(error, dist.DistError) or any(
        s in text for s in ("connection closed by peer", "connection reset by peer", "timed out", "broken pipe"))


@contextlib.contextmanager
def same_on_every_rank() -> Iterator[None]:
    """Around checks that read the same config and files on every rank: rank 0 reports their error alone.

    The other ranks wait `QUIET_SECONDS` before raising it: rank 0 exits first, and torchrun stops them
    before they repeat it. A rank whose error rank 0 did not meet still reports it, a moment later.
    """
    try:
        yield
    except HainaError as e:
        if under_torchrun() and env_rank() != 0:
            time.sleep(QUIET_SECONDS)
        e.same_on_every_rank = True
        raise


def launch_options(nproc: int, max_restarts: int, resume: bool, overwrite: bool) -> tuple[bool, bool]:
    """Check a command's --nproc and --max-restarts; (resume, overwrite) as this process must use them.

    When torchrun has restarted the job after a process failed (`restart_count`), the run continues from its
    last checkpoint: resume, and never --overwrite it.
    """
    if nproc < 1 or max_restarts < 0:
        raise HainaError(f"--nproc must be at least 1 and --max-restarts at least 0, got {nproc} and {max_restarts}")
    if max_restarts and nproc == 1:
        raise HainaError("--max-restarts restarts the processes that --nproc starts; under your own torchrun, pass "
                         "torchrun's --max-restarts")
    if restart_count() > 0:
        if env_rank() == 0:
            info(f"restart {restart_count()} of this job: resuming from the last checkpoint")
        return True, False
    return resume, overwrite


def relaunch(nproc: int, argv: list[str], max_restarts: int = 0) -> int:
    """Run `python -m haina ARGV` in `nproc` processes on this machine under torchrun; its exit status.

    `max_restarts`: how often torchrun starts every process again after one fails; the command then resumes
    from the run's last checkpoint (`restart_count`).

    A rank that failed with a haina error printed its line (exit status 2) and that is the job's error;
    any other failure (a signal, a crash) is described in one line here.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    if max_restarts:
        # A restart reusing the rendezvous's store may read the dead ranks' addresses and fail to connect
        # (pytorch#135712); a store of the ranks' own per attempt avoids it.
        os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    if "OMP_NUM_THREADS" not in os.environ:
        # torchrun would set 1; on CPU that leaves most cores idle. Share them instead.
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    # The launcher's own log (its rendezvous, the signals it sends) would bury the ranks' one-line errors.
    for name in ("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    args = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}",
                                         f"--max-restarts={max_restarts}", "--module", "haina", *argv])
    try:
        run(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        if failure.exitcode == 2:
            return 2
        how = (f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit status {failure.exitcode}")
        raise HainaError(f"rank {rank} of {nproc} stopped with {how}; its output is above") from None
    return 0


__all__ = ["Distributed", "GatheredModel", "QuietLog", "RankRows", "env_rank", "env_world_size", "launch_options",
           "lost_peer",
           "relaunch", "restart_count", "same_on_every_rank", "session", "setup", "teardown", "under_torchrun"]
