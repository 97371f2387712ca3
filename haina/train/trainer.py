"""The one training loop.

`Trainer` owns the loop: gradient accumulation, mixed precision, clipping, the learning-rate
schedule, evaluation, early stopping, time budgets, logging and checkpoints. What differs between
pretraining, SFT, LoRA and distillation lives in small methods a subclass overrides
(torchtitan's `Trainer.train_step`):

    next_batch()                  the next micro-batch, on the device ((inputs, targets) for pretraining)
    compute_loss(model, batch)    a scalar loss for one micro-batch: the mean over its targets
    loss_weight(batch)            how many targets that mean is over (supervised tokens; DPO: pairs)
    batch_tokens(batch)           the input tokens it trains on (padding excluded), for throughput
    trainable_parameters()        (name, parameter) pairs the optimizer updates
    parallelize()                 the module training runs through under torchrun (a classifier: with its head)
    write_weights(dir) / read_weights(dir)   the model's part of a checkpoint (LoRA: only its adapters)
    eval_batches() / eval_step()  validation data and the per-batch (loss sum, count)

These are also the seams for fault injection in tests: a subclass whose `compute_loss` returns NaN
at chosen steps (`self.step` is the number of steps completed) exercises the bad-step guard, one whose
`train_step` sends a signal exercises the stop at a step boundary. Bad steps, rollbacks and stop signals are handled by
`haina.train.guard`; the loop only asks it.

A step's loss is the mean over every target of its micro-batches, Σ mean_i·w_i / Σ w_i with w_i from
`loss_weight`: with masked targets (SFT), averaging micro-batch means would weight a short answer's tokens
more than a long one's, and the result would change with grad_accum.

Under torchrun the same loop runs on every rank with a `haina.train.distributed.Distributed` (`dist`): the
model trains through its DDP or FSDP2 form, gradients are reduced on a step's last micro-batch only, the
step's loss is the mean over every rank's targets, and only rank 0 writes. `dist` None is one process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm import tqdm

from haina.core.config import to_dict
from haina.core.device import attention_kernel, autocast, peak_flops, resolve_device
from haina.core.errors import HainaError
from haina.core.io import write_yaml
from haina.core.log import info, progress
from haina.core.seed import seed_everything
from haina.model.checkpoint import SHARDS, read_weights, save_model
from haina.model.packed import pack_linears
from haina.model.transformer import Transformer, lm_loss
from haina.tokenizer import Tokenizer
from haina.train import checkpoint as ckpt
from haina.train import sharded
from haina.train.config import TrainConfig
from haina.train.distributed import Distributed, GatheredModel, QuietLog
from haina.train.flops import flops_per_token, matmul_params
from haina.train.guard import StepGuard, StopSignals
from haina.train.optim import build_adamw, clip_gradients
from haina.train.report import RunLog, RunStart, clear_previous_run, finish_run, log_train
from haina.train.schedule import LRSchedule
from haina.train.state import capture_state, check_architecture, restore_state

Batch = tuple[torch.Tensor, torch.Tensor]


def next_token_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """`lm_loss(model(x), y)` as one function, so that torch.compile fuses the loss into the model's graph."""
    return lm_loss(model(x), y)


class BatchSource(Protocol):
    """What the loop needs from data (`TokenShards` is one)."""

    def get_batch(self, batch_size: int, block_size: int, generator: torch.Generator) -> Batch: ...

    def eval_batches(self, batch_size: int, block_size: int, max_batches: int | None = None) -> Iterator[Batch]: ...


class Trainer:
    """Trains `model` on `train_data` under `cfg`, writing everything into `run_dir`.

    Args:
        model: the model to train (moved to the configured device).
        cfg: the `train:` section; `block_size` None means the model's.
        run_dir: run directory for config.yaml, metrics, checkpoints, report and plot.
        train_data: source of random training windows.
        val_data: source of fixed validation windows; None disables evaluation.
        tokenizer: saved into every checkpoint.
        config: the full resolved config (all sections), written to RUN/config.yaml and beside each checkpoint.
        dist: this rank's place in a torchrun job (`haina.train.distributed.setup`); None for one process.
    """

    # What `eval_and_log` returns, as the final line names it (a classifier selecting on macro-F1: "1 - macro_f1").
    selection_label = "val loss"

    def __init__(self, model: Transformer, cfg: TrainConfig, run_dir: str | Path, *, train_data: BatchSource,
                 val_data: BatchSource | None = None, tokenizer: Tokenizer | None = None,
                 config: dict[str, Any] | None = None, dist: Distributed | None = None):
        if cfg.block_size is None:
            cfg = dataclasses.replace(cfg, block_size=model.cfg.block_size)
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.train_data, self.val_data, self.tokenizer = train_data, val_data, tokenizer
        self.config = config if config is not None else {"model": model.cfg.to_dict(), "train": to_dict(cfg)}
        self.dist, self.is_main = dist, dist is None or dist.is_main
        self.world_size = 1 if dist is None else dist.dp_size  # ranks reading different rows
        self.device = resolve_device(cfg.device) if dist is None else dist.device
        if cfg.precision == "fp16" and (self.device.type != "cuda" or (dist is not None and dist.sharded)):
            raise HainaError("train.precision=fp16 needs CUDA and no FSDP (it relies on a grad scaler); use bf16 "
                             "or fp32")
        seed_everything(cfg.seed)
        # The data position is this generator's state; it lives on the CPU so runs resume bit-exactly anywhere.
        self.generator = torch.Generator().manual_seed(cfg.seed)

        self.model = model.to(self.device)
        self.model.gradient_checkpointing = cfg.activation_checkpointing
        if (cfg.packed_linears and self.device.type == "cpu" and cfg.precision == "fp32" and not cfg.compile
                and (dist is None or not dist.sharded)):
            pack_linears(self.model, train=True)  # applied from outside: the model's layers stay nn.Linear
        # Parallelism is applied from outside: DDP wraps the model, FSDP2 shards it in place. Training runs through
        # `self.wrapped`; saving reads `self.model` (gathered onto rank 0 when sharded).
        self.wrapped: nn.Module = self.model if dist is None else self.parallelize()
        self._gathered: dict[str, torch.Tensor] | None = None  # a sharded model's whole weights while saving
        self._shards: Path | None = None  # every rank's part of a sharded checkpoint, while saving
        self._pending: sharded.PendingShards | None = None  # a checkpoint being written in the background
        # Forward passes go through `self.forward_model` (compiled or not).
        if cfg.attention != "auto" and self.device.type != "cuda":
            raise HainaError(f"train.attention={cfg.attention} selects a CUDA attention kernel; on "
                             f"{self.device.type} leave it at auto")
        self.forward_model: nn.Module = (torch.compile(self.wrapped, mode=cfg.compile_mode) if cfg.compile
                                         else self.wrapped)
        # The pretraining loss is compiled together with the model: after a compiled model alone, lm_loss would
        # materialize the full-vocabulary logits in fp32 (B·T·V·4 bytes, and as much again for their gradient).
        self._compiled_loss = torch.compile(next_token_loss, mode=cfg.compile_mode) if cfg.compile else None
        self.params = [p for _, p in self.trainable_parameters()]
        self.optimizer = self.build_optimizer()
        self.schedule = LRSchedule.from_config(cfg)
        self.scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None

        self.step = 0
        self.tokens_seen = 0
        self.targets_seen = 0  # the sum of loss weights: supervised tokens (all of them when pretraining)
        self.best_val_loss = math.inf
        self.bad_evals = 0  # scheduled evaluations since the best one, for early stopping
        self.initial_val_loss: float | None = None
        self.train_seconds = 0.0
        self.guard = StepGuard.from_config(cfg)
        self.settled_steps: int | None = None  # max_steps as train.fit_to_budget settled it, kept for a resume
        self.can_roll_back = False  # whether this run has a checkpoint on disk (saved or resumed from)
        self.flops_per_token = flops_per_token(model.cfg, matmul_params(model), cfg.block_size)
        self._peak: float | None = None

    # ----------------------------------------------------------------- overridable steps
    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) pairs to optimize; LoRA returns only its adapters."""
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def parallelize(self) -> nn.Module:
        """The module training runs through under torchrun: `self.model` as DDP, FSDP2 or tensor parallel."""
        return self.dist.parallelize(self.model)

    def build_optimizer(self) -> torch.optim.Optimizer:
        c = self.cfg
        return build_adamw(self.trainable_parameters(), lr=c.lr, weight_decay=c.weight_decay,
                           betas=(c.beta1, c.beta2), eps=c.eps, device=self.device,
                           by_mesh=self.dist is not None and self.dist.tp > 1)

    def next_batch(self) -> Batch:
        """The next training micro-batch, on the device."""
        x, y = self.train_data.get_batch(self.cfg.batch_size, self.cfg.block_size, self.generator)
        return self._to_device(x), self._to_device(y)

    def compute_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Mean next-token cross-entropy of one micro-batch."""
        x, y = batch
        if self._compiled_loss is not None and model is self.forward_model:
            return self._compiled_loss(self.wrapped, x, y)
        return lm_loss(model(x), y)

    def loss_weight(self, batch: Batch) -> torch.Tensor:
        """The number of targets `compute_loss` averages over (a tensor: counting it needs no host sync)."""
        return (batch[1] != -100).sum()

    def batch_tokens(self, batch: Batch) -> int:
        """Input tokens of the micro-batch, for tokens/s."""
        return batch[0].numel()

    def eval_batches(self) -> Iterator[Batch]:
        assert self.val_data is not None
        for x, y in self.val_data.eval_batches(self.cfg.batch_size, self.cfg.block_size, self.cfg.eval_batches):
            yield self._to_device(x), self._to_device(y)

    def eval_step(self, batch: Batch) -> tuple[float, int]:
        """(sum of per-target losses, number of targets) for one validation batch."""
        with autocast(self.device, self.cfg.precision):
            loss = self.compute_loss(self.forward_model, batch)
        n = int(self.loss_weight(batch))
        return float(loss) * n if n else 0.0, n

    def train_step(self, lr: float) -> dict[str, Any]:
        """One optimizer step over `grad_accum` micro-batches, applied only if the guard finds it sound.

        Returns the mean loss and the gradient norm before clipping (floats), the guard's verdict: "ok"
        (applied), "skip" (not finite: gradients dropped) or "rollback" (the loop rolls back), and the step's
        input tokens and loss weight (targets).
        """
        cfg = self.cfg
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # All micro-batches first (token ids: small), so each one's share of the step's targets is known up front.
        batches = [self.next_batch() for _ in range(cfg.grad_accum)]
        weights = [torch.as_tensor(self.loss_weight(b), device=self.device, dtype=torch.float32) for b in batches]
        weight = torch.stack(weights).sum()
        if self.dist is not None:
            weight = self.dist.sum(weight)  # every rank's targets: the step's loss is the mean over all of them
        total = torch.zeros((), device=self.device)
        for i, (batch, w) in enumerate(zip(batches, weights)):
            # Accumulating, gradients are reduced over ranks once: with the step's last micro-batch.
            sync = contextlib.nullcontext() if self.dist is None else self.dist.gradient_sync(
                self.wrapped, i == len(batches) - 1)
            with sync:
                with autocast(self.device, cfg.precision), attention_kernel(cfg.attention):
                    loss = self.compute_loss(self.forward_model, batch)
                # mean_i · w_i / Σw: the summed gradients are those of the mean over all the step's targets.
                scaled = loss * (w / weight.clamp(min=1))
                total += scaled.detach()
                if self.dist is not None:  # DDP and FSDP average the ranks' gradients; the mean needs their sum
                    scaled = scaled * self.world_size
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
        norm = self.clip_gradients()
        tokens = sum(self.batch_tokens(b) for b in batches)
        if self.dist is not None:  # one all-reduce for the log: the step's loss is every rank's share; tokens, too
            shares = self.dist.sum(torch.stack([total.double(), torch.tensor(float(tokens), device=total.device,
                                                                              dtype=torch.float64)]))
            total, tokens = shares[0].to(total.dtype), shares[1]
        # The one host sync per step: whether to apply this update must be known before it is applied.
        loss_value, grad_norm, weight_value = torch.stack([total, norm.to(total), weight]).tolist()
        if weight_value == 0:
            raise HainaError(f"step {self.step + 1}: every target of its {cfg.grad_accum} micro-batches is masked, so "
                             "there is nothing to learn; check that the data has answer tokens within the context")
        if self.scaler is not None and math.isfinite(loss_value) and not math.isfinite(grad_norm):
            verdict = "ok"  # an fp16 overflow: the scaler skips this update itself and lowers its scale
        else:
            verdict = self.guard.judge(self.step + 1, loss_value, grad_norm, can_roll_back=self.can_roll_back)
        if verdict == "ok":
            if self.scaler:
                self.scaler.step(self.optimizer)
            else:
                self.optimizer.step()
        if self.scaler:
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss_value, "grad_norm": grad_norm, "verdict": verdict, "tokens": int(tokens),
                "weight": int(weight_value)}

    def clip_gradients(self) -> torch.Tensor:
        """Clip the gradients to train.grad_clip (0: leave them); returns their global norm before clipping."""
        return clip_gradients(self.params, self.cfg.grad_clip, self.device,
                              mixed=self.dist is not None and self.dist.tp > 1)

    # ----------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean validation loss per token, or None without validation data. Under DDP rank r of N scores batches
        r, r + N, … and the sums are added: one process's figure for 1/N of the work. Sharded or tensor-parallel
        forwards are collectives every rank must join: there every rank scores every batch."""
        if self.val_data is None:
            return None
        split = self.dist is not None and not self.dist.sharded and self.dist.dp_size > 1
        rank, ranks = (self.dist.dp_rank, self.dist.dp_size) if split else (0, 1)
        self.model.eval()
        total, count = 0.0, 0
        try:
            for i, batch in enumerate(self.eval_batches()):
                if i % ranks == rank:
                    s, n = self.eval_step(batch)
                    total, count = total + s, count + n
        finally:
            self.model.train()
        if split:
            sums = self.dist.sum(torch.tensor([total, count], dtype=torch.float64, device=self.device))
            total, count = float(sums[0]), int(sums[1])
        return total / count if count else None

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything besides the weights needed to continue bit-exactly (plain types and tensors only)."""
        return capture_state(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        restore_state(self, state)

    def resume(self) -> bool:
        """Load the run's latest checkpoint (weights and state); False if there is none."""
        path = ckpt.latest_checkpoint(self.run_dir)
        if path is None:
            info(f"no checkpoint to resume in {self.run_dir}; starting a new run")
            return False
        self._load_checkpoint(path)
        self.can_roll_back = True
        info(f"resumed from {path} (step {self.step}, {self.tokens_seen:,} tokens)")
        return True

    def _load_checkpoint(self, path: Path) -> None:
        check_architecture(self.model.cfg, path)
        if sharded.holds_shards(path):  # each rank reads its part, whatever world size wrote them
            sharded.load_shards(path, self.model, self.optimizer)
        else:
            self.read_weights(path)
        self.load_state_dict(ckpt.load_state(path))

    def write_weights(self, directory: Path) -> None:
        """Write the model's part of a checkpoint (weights, config.yaml, tokenizer) into `directory`."""
        model = self.model if self._gathered is None else GatheredModel(self.model.cfg, self._gathered)
        save_model(directory, model, self.tokenizer, extra_config={k: v for k, v in self.config.items() if k != "model"},
                   checksums=False, weights=self._shards is None)
        if self._shards is not None:  # every rank wrote its part beside; it moves in with the rest
            self._shards.rename(directory / SHARDS)

    def read_weights(self, checkpoint: Path) -> None:
        """Load the model's part of a checkpoint that `write_weights` wrote."""
        weights = read_weights(checkpoint / "model.safetensors")
        if self.dist is not None:
            self.dist.load_full_weights(self.model, weights)  # sharded: each rank keeps its part
            return
        self.model.load_weights({k: v.to(self.device) for k, v in weights.items()})

    def roll_back(self, log: RunLog, say) -> None:
        """Back to the latest checkpoint after the guard's "rollback", past the data seen since it.

        Weights, optimizer, schedule and counters come from the checkpoint; the data position, the
        guard's record and the training time stay as they are, so the window of data between the
        checkpoint and the bad step is skipped rather than replayed.
        """
        bad_step = self.step + 1
        self.finish_checkpoint()
        path = ckpt.latest_checkpoint(self.run_dir)
        self.guard.rolled_back(bad_step, None if path is None else int(path.name.removeprefix("step-")))  # or raises
        keep = self.generator.get_state(), self.guard.state_dict(), self.train_seconds, self.settled_steps
        self._load_checkpoint(path)
        self.generator.set_state(keep[0])
        self.guard.load_state_dict(keep[1])
        self.train_seconds, self.settled_steps = keep[2], keep[3]
        record = self.guard.rollbacks[-1]
        log.log({"step": self.step, "rollback_from": bad_step, "reason": record["reason"]}, "rollback")
        say(f"step {bad_step}: {record['reason']}; rolled back to {path.name} and skipped the "
            f"{record['skipped_data_steps']} steps of data since")

    def save(self, val_loss: float | None) -> Path:
        """Write a checkpoint of this step; a failed write (a full disk) stops the run with one line.

        Distributed, every rank takes part (a sharded model's weights and optimizer state are gathered onto
        rank 0, or each rank writes its shards), rank 0 alone writes the rest, and the others wait for it: they
        may read the checkpoint next (a rollback). With parallel.async_checkpoint the shards are written in the
        background while training goes on, and the checkpoint appears when they are (`finish_checkpoint`).
        """
        step = self.step
        try:
            self.finish_checkpoint()  # the previous background save, if any: one at a time
            state = self.state_dict()
            if self.dist is not None and self.dist.async_checkpoints:
                self._pending = sharded.PendingShards(self.run_dir, step, self.model, self.optimizer, self.dist,
                                                      state=state, val_loss=val_loss)
                return ckpt.checkpoints_dir(self.run_dir) / ckpt.step_name(step)
            if self.dist is not None and self.dist.sharded_checkpoints:
                self._shards = sharded.stage_shards(self.run_dir, step, self.model, self.optimizer, self.dist)
            elif self.dist is not None and self.dist.sharded:
                self._gathered = self.dist.full_weights(self.model)
            self._publish(step, state, val_loss)
            return ckpt.checkpoints_dir(self.run_dir) / ckpt.step_name(step)
        except OSError as e:
            latest = (ckpt.read_index(self.run_dir) or {}).get("latest")
            kept = f"{latest} is still the latest checkpoint, intact" if latest else "there is no earlier checkpoint"
            raise HainaError(f"could not write checkpoint {ckpt.step_name(step)} in "
                             f"{ckpt.checkpoints_dir(self.run_dir)} ({e.strerror or e}); training stopped at step "
                             f"{self.step} and {kept}; make room and continue with --resume") from None

    def _publish(self, step: int, state: dict[str, Any], val_loss: float | None) -> None:
        """Rank 0 builds checkpoint `step` around what the ranks wrote and indexes it; the others wait."""
        try:
            if self.is_main:
                ckpt.save_checkpoint(self.run_dir, step=step, write_weights=self.write_weights, state=state,
                                     val_loss=val_loss, keep_last=self.cfg.keep_last)
        finally:
            self._gathered, self._shards = None, sharded.discard_staged(self._shards, self.is_main)
        if self.dist is not None:
            self.dist.barrier()
        self.can_roll_back = True

    def finish_checkpoint(self) -> None:
        """Wait for a checkpoint being written in the background, then publish it (a no-op without one)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            self._shards = pending.wait()  # every rank's shards are on disk
            self._publish(pending.step, pending.state, pending.val_loss)

    # ----------------------------------------------------------------- the loop
    def fit(self) -> dict[str, Any]:
        """Train until max_steps, max_minutes, early stopping or a stop signal; evaluate, save, report.

        SIGTERM or SIGINT stops the run at the next step boundary with a checkpoint (no evaluation, so
        the save is quick) and returns normally; `resume` then continues bit-exactly. Returns the report.
        """
        cfg = self.cfg
        wall_start = time.perf_counter()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        resumed = self.resume() if cfg.resume else False
        if self.is_main:  # the only rank that writes: the others' log is quiet (`haina.train.distributed`)
            if not resumed:
                clear_previous_run(self.run_dir)
            write_yaml(self.run_dir / "config.yaml", self.config)
            log = RunLog(self.run_dir, tensorboard=cfg.tensorboard, resume_step=self.step if resumed else None)
            bar = progress(total=cfg.max_steps, initial=self.step, desc="train", unit="step")
        else:
            log, bar = QuietLog(), tqdm(total=cfg.max_steps, initial=self.step, disable=True)
        say = bar.write if not bar.disable else info
        start = RunStart.of(self)
        where = f"{self.device}" if self.dist is None else self.dist.describe()
        info(f"training {self.model.num_params():,} parameters on {where} ({cfg.precision}): "
             f"up to {cfg.tokens_per_step * self.world_size:,} tokens/step, steps {self.step} → {cfg.max_steps}")

        last_eval: tuple[int, float | None] | None = None  # (step, val loss) of the latest evaluation
        last_save = -1
        stopped = "max_steps"
        eval_seconds = 0.0  # what one scheduled evaluation costs, for fit_to_budget
        if self.step == 0 and self.val_data is not None:
            t0 = time.perf_counter()
            last_eval = (0, self._scheduled_eval(log, say))
            eval_seconds = time.perf_counter() - t0
        max_steps, fit_at = cfg.max_steps, None
        if cfg.fit_to_budget and cfg.max_minutes:
            if self.settled_steps is not None:  # a resumed budget run: the horizon it settled on, not a new fit
                max_steps = min(max_steps, self.settled_steps)
                bar.total = max_steps
            else:
                fit_at = self.step + max(cfg.warmup_steps, 10)
        if max_steps < cfg.max_steps:
            stopped = "max_minutes"  # the budget, not max_steps, ends the run
        _ = self.peak_flops  # measured now (on CPU) rather than inside the first timed interval
        loop_start, loop_step = time.perf_counter(), self.step
        mark_time, mark_tokens = time.perf_counter(), self.tokens_seen
        loss_sum, loss_steps, skipped = 0.0, 0, 0
        received: str | None = None  # the stop signal this run received (distributed: on any rank)
        try:
            with StopSignals() as stop:
                while self.step < max_steps:
                    lr = self.schedule(self.step)
                    out = self.train_step(lr)
                    if out["verdict"] == "rollback":
                        mark_time = self._pause(mark_time)
                        self.roll_back(log, say)
                        bar.n, last_eval = self.step, None
                        mark_time, mark_tokens = time.perf_counter(), self.tokens_seen
                        continue
                    self.step += 1
                    self.tokens_seen += out["tokens"]
                    self.targets_seen += out["weight"]
                    if out["verdict"] == "ok":
                        loss_sum, loss_steps = loss_sum + out["loss"], loss_steps + 1
                    else:
                        skipped += 1
                        say(f"step {self.step}: skipped (loss {out['loss']}, gradient norm {out['grad_norm']})")
                    if fit_at is not None and self.step >= fit_at:
                        max_steps = self._fit_to_budget(max_steps, wall_start, loop_start, loop_step, eval_seconds,
                                                        say)
                        self.settled_steps, fit_at, bar.total = max_steps, None, max_steps
                        if max_steps < cfg.max_steps:
                            stopped = "max_minutes"
                    if self.step % cfg.log_every == 0 or self.step == max_steps:
                        log_train(self, log, bar, lr, out, loss_sum, loss_steps, skipped, mark_time, mark_tokens,
                                  max_steps)
                        loss_sum, loss_steps, skipped = 0.0, 0, 0
                        mark_time, mark_tokens = time.perf_counter(), self.tokens_seen
                    bar.update(1)
                    if self.val_data is not None and self.step % cfg.eval_every == 0:
                        mark_time = self._pause(mark_time)
                        last_eval = (self.step, self._scheduled_eval(log, say))
                        mark_time = time.perf_counter()
                        if 0 < cfg.early_stopping_patience <= self.bad_evals:
                            stopped = "early_stopping"
                            say(f"early stopping: no improvement in {self.bad_evals} evaluations")
                            break
                    over = cfg.max_minutes is not None and time.perf_counter() - wall_start >= cfg.max_minutes * 60
                    received = stop.received
                    if self.dist is not None:  # every rank leaves at the same step, or the others wait in vain
                        over, anywhere = self.dist.any_rank(over, received is not None)
                        received = received or ("SIGTERM" if anywhere else None)
                    if over:
                        stopped = "max_minutes"
                        say(f"time budget of {cfg.max_minutes:g} minutes reached at step {self.step}")
                        break
                    if received:
                        stopped = received
                        break
                    # Not in the middle of a streak of bad steps: that checkpoint would become the rollback target.
                    if (cfg.save_every and self.step % cfg.save_every == 0 and self.step < max_steps
                            and not self.guard.bad_in_row):
                        mark_time = self._pause(mark_time)
                        self.save(self._val_loss_now(last_eval, log))
                        last_save = self.step
                        mark_time = time.perf_counter()
                self._pause(mark_time)
                interrupted = received is not None and stopped == received  # not just after the last step
                if interrupted:  # save at once: a scheduler that sent SIGTERM will not wait long
                    final_val = last_eval[1] if last_eval is not None and last_eval[0] == self.step else None
                else:
                    final_val = self._val_loss_now(last_eval, log)
                if last_save != self.step:
                    self.save(final_val)
                self.finish_checkpoint()  # the run ends with its last checkpoint on disk
                if interrupted:
                    say(f"{received} received: stopped at step {self.step} with a checkpoint; continue with --resume")
        finally:
            bar.close()
            log.close()
        return finish_run(self, log, final_val=final_val, stopped=stopped, wall_start=wall_start, start=start,
                          max_steps=max_steps)

    # ----------------------------------------------------------------- helpers
    def _fit_to_budget(self, max_steps: int, wall_start: float, loop_start: float, loop_step: int,
                       eval_seconds: float, say) -> int:
        """The number of steps that fit the rest of the time budget; the decay horizon moves with it."""
        now = time.perf_counter()
        per_step = (now - loop_start) / max(1, self.step - loop_step)
        remaining = self.cfg.max_minutes * 60 - (now - wall_start) - eval_seconds  # the final evaluation
        per_step_total = per_step + (eval_seconds / self.cfg.eval_every if self.val_data is not None else 0.0)
        fit = self.step + max(0, int(0.97 * remaining / per_step_total))  # 3% slack for noise
        if self.dist is not None:
            fit = self.dist.from_main(fit)  # timed on each rank, but every rank must stop at the same step
        if fit < max_steps:
            max_steps = fit
            say(f"fit_to_budget: {per_step * 1000:.0f} ms/step, training to step {max_steps} within "
                f"{self.cfg.max_minutes:g} minutes")
        self.schedule.decay_steps = min(self.schedule.decay_steps, max_steps)
        return max_steps

    @property
    def peak_flops(self) -> float:
        if self._peak is None:
            # On CPU the peak is measured with random matrices; forking keeps that from consuming the
            # global RNG, which dropout draws from (a resumed run would otherwise diverge).
            with torch.random.fork_rng(devices=[]):
                # tokens/s are every rank's; every device (tensor-parallel ones too) counts for the peak.
                self._peak = peak_flops(self.device, self.cfg.precision) * (self.dist.world_size if self.dist else 1)
        return self._peak

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def _pause(self, mark_time: float) -> float:
        """Wait for queued device work, count the time since `mark_time` as training; return now."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.train_seconds += now - mark_time
        return now

    def _scheduled_eval(self, log: RunLog, say) -> float | None:
        """An evaluation on the eval_every grid: it drives early stopping and reduce-on-plateau."""
        val = self.eval_and_log(log, say)
        if val is None:
            return None
        if self.initial_val_loss is None:
            self.initial_val_loss = val
        self.schedule.observe(val)
        if val < self.best_val_loss:
            self.best_val_loss, self.bad_evals = val, 0
        else:
            self.bad_evals += 1
        return val

    def _val_loss_now(self, last_eval: tuple[int, float | None] | None, log: RunLog) -> float | None:
        """The validation loss of the current weights, evaluating only if not done at this step.

        Such an extra evaluation (before a save or at the end) is recorded but does not feed early
        stopping or the schedule, so a run that stopped and resumed decides exactly like one that did not.
        """
        if self.val_data is None:
            return None
        if last_eval is not None and last_eval[0] == self.step:
            return last_eval[1]
        return self.eval_and_log(log, info)

    def eval_and_log(self, log: RunLog, say) -> float | None:
        """Evaluate, log what was measured, and return the number that selects checkpoints (lower is better).

        That number feeds early stopping, reduce-on-plateau and the best checkpoint (recorded as the index's
        `val_loss`). Pretraining returns the validation loss; a method that selects on another metric (a
        classifier on macro-F1) overrides this step, logs its metrics by their names and returns 1 − metric.
        """
        val = self.evaluate()
        if val is None:
            return None
        log.log({"step": self.step, "val_loss": val, "val_ppl": math.exp(min(val, 50.0)),
                 "tokens": self.tokens_seen}, "val")
        say(f"step {self.step}: val loss {val:.4f} (perplexity {math.exp(min(val, 50.0)):.2f})")
        return val


__all__ = ["BatchSource", "Trainer", "next_token_loss"]
