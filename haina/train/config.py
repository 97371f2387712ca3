"""Pretraining configs: frozen, keyword-only dataclasses read from a YAML recipe.

A recipe has five sections:

    model:     a preset plus overrides (`preset: tiny`, `n_layer: 2`), read by `ModelConfig.from_dict`
    data:      the token-shard directory and, optionally, the tokenizer it was written with
    train:     everything about the loop (`TrainConfig`)
    parallel:  how the processes torchrun starts share the work (`ParallelConfig`; the defaults fit any number)
    out:       the run directory (default `runs/<recipe name>`)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from haina.core.config import from_dict, load_yaml, to_dict
from haina.core.errors import HainaError
from haina.model.config import ModelConfig

Schedule = Literal["cosine", "linear", "constant", "step", "plateau"]
Objective = Literal["clm", "mlm"]


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    dir: str = "runs/data"  # token shards written by `haina data tokenize`
    tokenizer: str | None = None  # None: DIR/tokenizer or DIR/../tokenizer


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    # what the model learns: clm predicts each next token (a causal model); mlm predicts masked-out tokens from
    # both sides (an encoder, model.causal false) with BERT's masking, mask_prob of the tokens (`haina.train.mlm`)
    objective: Objective = "clm"
    mask_prob: float = 0.15
    # batch: each optimizer step sees batch_size · grad_accum · block_size tokens
    batch_size: int = 12
    block_size: int | None = None  # None: the model's block_size
    grad_accum: int = 1
    # when to stop: whichever of max_steps, max_minutes and early stopping comes first
    max_steps: int = 1000
    max_minutes: float | None = None
    # With max_minutes: once warmup is over, measure the step time and shorten max_steps (and the decay
    # horizon) to what fits the budget, so a time-boxed run still anneals its learning rate to min_lr.
    fit_to_budget: bool = False
    early_stopping_patience: int = 0  # evaluations without improvement; 0 = off
    # learning rate: linear warmup, then the schedule down to min_lr
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    schedule: Schedule = "cosine"
    decay_steps: int | None = None  # cosine/linear reach min_lr here; None: max_steps
    step_size: int = 1000  # step: multiply the lr by gamma every step_size steps after warmup
    gamma: float = 0.1
    plateau_factor: float = 0.5  # plateau: multiply the lr by this after plateau_patience bad evaluations
    plateau_patience: int = 2
    plateau_threshold: float = 1e-3  # an evaluation must beat the best by this much to count as better
    # AdamW
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    # hardware
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    compile: bool = False
    # torch.compile's mode: "max-autotune-no-cudagraphs" searches matmul/attention kernels (minutes of compilation).
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    # The SDPA kernel for training on CUDA (auto: PyTorch's choice; cudnn: cuDNN's fused attention on Hopper).
    attention: Literal["auto", "flash", "cudnn", "efficient", "math"] = "auto"
    activation_checkpointing: bool = False
    # fp32 training on a CPU: Linear products of at least 1,024 rows (forward and input gradient) on oneDNN with the
    # weight packed at each call (haina.model.packed): 1.33x the step rate of a 10M model at 8 x 256 on 2 cores.
    packed_linears: bool = True
    seed: int = 1337
    # evaluation, logging, checkpoints
    eval_every: int = 250
    eval_batches: int = 20
    log_every: int = 10
    save_every: int = 500  # 0: save only at the end
    keep_last: int = 2  # checkpoints kept besides the best
    tensorboard: bool = True
    resume: bool = False  # continue from RUN/checkpoints/index.json's latest
    # bad steps (haina.train.guard): a step whose loss or gradient norm is not finite is skipped (no update) and
    # listed in report.json. A rollback reloads the latest checkpoint and goes on past the data seen since then.
    max_bad_steps: int = 5  # this many skipped steps in a row trigger a rollback
    spike_factor: float = 3.0  # a loss above this multiple of the running mean (and 1 nat above it) rolls back; 0 = off
    spike_window: int = 50  # steps in that running mean; spike detection starts once it is full
    max_rollbacks: int = 3  # one more rollback than this ends the run with an error

    def __post_init__(self) -> None:
        positive = {"batch_size": self.batch_size, "grad_accum": self.grad_accum, "eval_every": self.eval_every,
                    "eval_batches": self.eval_batches, "log_every": self.log_every, "step_size": self.step_size}
        for name, value in positive.items():
            if value < 1:
                raise HainaError(f"train.{name} must be at least 1, got {value}")
        if self.max_steps < 0 or self.warmup_steps < 0 or self.save_every < 0 or self.keep_last < 0:
            raise HainaError("train.max_steps, warmup_steps, save_every and keep_last must not be negative")
        if self.block_size is not None and self.block_size < 1:
            raise HainaError(f"train.block_size must be positive, got {self.block_size}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise HainaError(f"need 0 <= train.min_lr <= train.lr and lr > 0 (lr={self.lr}, min_lr={self.min_lr})")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise HainaError(f"train.max_minutes must be positive, got {self.max_minutes}")
        if self.max_bad_steps < 1 or self.spike_window < 1 or self.max_rollbacks < 0:
            raise HainaError("train.max_bad_steps and train.spike_window must be at least 1, train.max_rollbacks >= 0")
        if self.spike_factor != 0 and self.spike_factor <= 1:
            raise HainaError(f"train.spike_factor must be above 1 (or 0 to turn spike detection off), "
                             f"got {self.spike_factor}")
        if not 0 < self.plateau_factor <= 1 or not 0 < self.gamma <= 1:
            raise HainaError("train.gamma and train.plateau_factor must be in (0, 1]")
        if not 0 < self.mask_prob < 1:
            raise HainaError(f"train.mask_prob must be in (0, 1) (BERT's is 0.15), got {self.mask_prob}")

    @property
    def tokens_per_step(self) -> int:
        """Tokens per optimizer step (needs block_size resolved)."""
        if self.block_size is None:
            raise HainaError("train.block_size is not resolved yet")
        return self.batch_size * self.grad_accum * self.block_size


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """How the processes torchrun starts share the work, on one (dp_replicate, dp_shard, tp) device mesh.

    dp_shard > 1 shards parameters, gradients and optimizer state over that many ranks (FSDP2); dp_replicate
    copies the model (DDP when nothing is sharded, HSDP with both); tp > 1 splits every block's attention heads
    and MLP width over that many ranks (tensor parallelism), which see the same data. The product of the three is
    the number of processes; -1 takes what the others leave, so the defaults make every process a DDP replica.
    """

    dp_replicate: int = -1
    dp_shard: int = 1
    # Tensor parallelism: each rank of a group of tp holds n_head/tp heads and ffn_dim/tp of the MLP. For models
    # too wide for one device; combine it with dp_shard (FSDP2) for data parallelism, not with DDP.
    tp: int = 1
    # FSDP2 only: parameters and activations in bf16, gradients reduced in fp32 (reductions over many ranks in
    # bf16 lose the small updates). DDP keeps fp32 weights; use train.precision=bf16 (autocast) there.
    mixed_precision: bool = False
    # FSDP2 even when dp_shard is 1 (one process under torchrun, or DDP's layout): what FSDP's machinery costs
    # where nothing needs sharding, the overhead benchmarks/scaling.py --gpu measures.
    fsdp: bool = False
    # A collective that waits longer than this for another rank fails the job instead of hanging it. It must
    # cover the longest pause of one rank: rank 0 writing a checkpoint while the others wait.
    timeout_seconds: float = 600.0
    # How a distributed run writes checkpoints: "sharded", each rank its own part with torch.distributed.checkpoint
    # (resumable at any world size; `haina export checkpoint` makes a plain one); "full", gathered onto rank 0 as one
    # model.safetensors that every command reads; "auto", sharded when parameters are (dp_shard > 1), else full.
    # A single process and tensor-parallel runs write full checkpoints.
    checkpoint: Literal["auto", "full", "sharded"] = "auto"
    # Sharded checkpoints, written in the background: each rank copies its state to CPU memory and writes it in a
    # thread while training goes on; the checkpoint is indexed once every rank has written (before the next one, a
    # rollback, or the end of the run). Makes checkpoint=auto sharded.
    async_checkpoint: bool = False

    def __post_init__(self) -> None:
        for name in ("dp_replicate", "dp_shard"):
            value = getattr(self, name)
            if value != -1 and value < 1:
                raise HainaError(f"parallel.{name} must be at least 1, or -1 for what the world size leaves; "
                                 f"got {value}")
        if self.dp_replicate == -1 and self.dp_shard == -1:
            raise HainaError("parallel.dp_replicate and parallel.dp_shard cannot both be -1; set one of them")
        if self.timeout_seconds <= 0:
            raise HainaError(f"parallel.timeout_seconds must be positive, got {self.timeout_seconds}")
        if self.tp < 1:
            raise HainaError(f"parallel.tp must be at least 1, got {self.tp}")
        if self.async_checkpoint and self.checkpoint == "full":
            raise HainaError("parallel.async_checkpoint writes sharded checkpoints in the background; it needs "
                             "parallel.checkpoint sharded or auto (with parameters sharded), not full")

    def degrees(self, world_size: int) -> tuple[int, int]:
        """(dp_replicate, dp_shard) for `world_size` processes, -1 filled in; a mismatch is a one-line error."""
        if self.tp > 1:
            if world_size % self.tp:
                raise HainaError(f"parallel.tp={self.tp} does not divide the {world_size} processes: the "
                                 "processes are data-parallel groups of tp ranks each")
            if self.checkpoint == "sharded" or self.async_checkpoint:
                raise HainaError("parallel.checkpoint=sharded (and async_checkpoint) does not combine with "
                                 "parallel.tp yet; tensor-parallel runs write full checkpoints (parallel.checkpoint="
                                 "auto or full)")
            dp = ParallelConfig(dp_replicate=self.dp_replicate, dp_shard=self.dp_shard,
                                mixed_precision=self.mixed_precision)
            replicate, shard = dp.degrees(world_size // self.tp)
            if replicate > 1 and shard == 1:
                raise HainaError(f"parallel.tp={self.tp} with {replicate} data-parallel replicas needs FSDP2 for them: "
                                 f"set parallel.dp_shard={replicate} (tensor parallelism does not combine with DDP)")
            return replicate, shard
        replicate, shard = self.dp_replicate, self.dp_shard
        if replicate == -1:
            replicate = world_size // shard if world_size % shard == 0 else -1
        if shard == -1:
            shard = world_size // replicate if world_size % replicate == 0 else -1
        if replicate * shard != world_size or min(replicate, shard) < 1:
            raise HainaError(f"parallel.dp_replicate={self.dp_replicate} × parallel.dp_shard={self.dp_shard} does "
                             f"not fit {world_size} process{'es' if world_size != 1 else ''}: their product must be "
                             "the number of processes (--nproc N, or torchrun's --nproc-per-node × --nnodes); "
                             "-1 takes what the other leaves")
        if self.mixed_precision and shard == 1 and not self.fsdp:
            raise HainaError("parallel.mixed_precision is FSDP's policy and needs parallel.dp_shard > 1; "
                             "with DDP or one process use train.precision=bf16")
        return replicate, shard


@dataclass(frozen=True, kw_only=True)
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    out: str | None = None  # None: runs/<recipe name>

    def __post_init__(self) -> None:
        # Each objective needs its kind of attention: a causal model never sees the token it is asked to fill in,
        # and an encoder would see the very next token it is asked to predict.
        if self.train.objective == "mlm" and self.model.causal:
            raise HainaError("train.objective mlm needs a bidirectional model: set model.causal: false (e.g. "
                             "--model.causal=false, or model preset encoder-small)")
        if self.train.objective == "clm" and not self.model.causal:
            raise HainaError("an encoder (model.causal: false) sees the next token, so it cannot learn to predict "
                             "it: pretrain it with --objective mlm, or set model.causal: true")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PretrainConfig:
        """From a recipe mapping; unknown keys anywhere are an error with a did-you-mean."""
        data = dict(data or {})
        model = data.pop("model", None) or {}
        if not isinstance(model, dict):
            raise HainaError("the 'model' section must be a mapping (preset: NAME plus overrides)")
        # ModelConfig.from_dict expands `preset:`; the generic reader would not.
        return from_dict(cls, {**data, "model": ModelConfig.from_dict(model)})

    @classmethod
    def from_file(cls, path: str | Path) -> PretrainConfig:
        return cls.from_dict(load_yaml(path))

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def resolved(self) -> PretrainConfig:
        """block_size filled in from the model, checked against it."""
        block = self.train.block_size or self.model.block_size
        if block > self.model.block_size:
            raise HainaError(f"train.block_size {block} exceeds model.block_size {self.model.block_size}; "
                             f"lower train.block_size or raise model.block_size")
        return dataclasses.replace(self, train=dataclasses.replace(self.train, block_size=block))


__all__ = ["DataConfig", "Objective", "ParallelConfig", "PretrainConfig", "Schedule", "TrainConfig"]
