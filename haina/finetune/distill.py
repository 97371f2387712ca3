"""Knowledge distillation: a student trained on the labels and on a teacher's softened next-token distributions.

    loss = (1 − α)·CE(student, labels) + α·T²·KL(softmax(teacher/T) ‖ softmax(student/T))

Both terms are means over the batch's targets, so `loss_weight` stays the target count and gradient
accumulation weighs micro-batches exactly as for plain training. The T² keeps the soft term's gradients
on the scale of the hard term's as T grows (Hinton et al., 2015). With α = 0 the teacher is not consulted
and training is exactly plain cross-entropy training on the same batches.

The teacher is any model `load_base` reads (a haina checkpoint or run, a Hugging Face directory) that
shares the student's tokenizer: the two distributions are compared token id by token id. It is frozen
(eval mode, no gradients, never in the optimizer, never saved) and runs under `torch.no_grad()`. The
student is a --base checkpoint (optionally with LoRA) or a fresh Transformer of a --preset with the
teacher's vocabulary size and tokenizer. The data are token shards written with that tokenizer.

Two ways to get the teacher's distribution (`distill.top_k`):

- 0: a live teacher: a forward pass of the teacher on every training micro-batch, full-vocabulary KL.
- k > 0: the teacher's k largest logits are computed once, before training, on a fixed set of training
  windows (`TeacherTopK`: non-overlapping windows spread over the train split, at most TOPK_WINDOWS and
  TOPK_BYTES of targets), kept in memory as float16 values and int32 token ids; training draws those
  windows by index from the trainer's generator. The KL is then over the teacher's top-k tokens only:
  the teacher's distribution is truncated to them and renormalized, and the student's log-probabilities
  (its full-vocabulary log-softmax) are gathered at the same ids. That drops the teacher's tail (the
  mass outside its top k, small for a confident teacher), while the student's full normalizer still
  pulls its mass onto the teacher's support; with k = the vocabulary size it is the exact KL. The price:
  training sees only those windows (fewer distinct contexts than random offsets over the whole split).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from haina.core.device import autocast
from haina.core.errors import HainaError
from haina.core.log import info
from haina.core.seed import seed_everything
from haina.data.shards import TokenShards
from haina.finetune.base import (
    FinetuneTrainer,
    check_out,
    finish_report,
    load_base,
    rank_rows,
    run_command,
    run_config,
    start_run,
    training_block,
)
from haina.finetune.command import _flags, _summary, load_finetune_config
from haina.finetune.config import DistillConfig, FinetuneConfig
from haina.finetune.continued import check_shards, open_split, tokenizer_dir
from haina.model.config import ModelConfig
from haina.model.transformer import Transformer, lm_loss
from haina.tokenizer import Tokenizer
from haina.train import distributed
from haina.train.config import TrainConfig

Batch = dict[str, torch.Tensor]
IGNORE_INDEX = -100
TOPK_WINDOWS = 4096  # at most this many precomputed windows: a teacher pass over them stays minutes, not hours
TOPK_BYTES = 1 << 30  # and at most this much memory for their top-k values (2 bytes) and ids (4 bytes)


# ---------------------------------------------------------------------------------------------- the soft loss
def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(teacher/T) ‖ softmax(student/T)) at every position: (B, T, V) logits → (B, T), in float32."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)


def topk_kl(student_logits: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
            temperature: float) -> torch.Tensor:
    """The KL over the teacher's top-k tokens at every position: (B, T, V), (B, T, k), (B, T, k) → (B, T).

    The teacher's distribution is its k logits' softmax at temperature T (renormalized on its top k); the
    student's log-probabilities are its full softmax gathered at the same ids (see the module docstring).
    The result is never negative: the student's probabilities on the k ids sum to at most one.
    """
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1).gather(-1, indices.long())
    log_p = F.log_softmax(values.float() / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def masked_mean(values: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The mean of per-position `values` over the positions whose target is not IGNORE_INDEX (0 if none)."""
    mask = targets != IGNORE_INDEX
    return (values * mask).sum() / mask.sum().clamp(min=1)


# ---------------------------------------------------------------------------------------------- top-k targets
@dataclasses.dataclass
class TeacherTopK:
    """Fixed training windows and, for each, the teacher's k largest logits at every position.

    Attributes:
        rows: (N, T + 1) token ids: a window's inputs are rows[:, :-1], its targets rows[:, 1:].
        values: (N, T, k) float16 logits, or None when the teacher is not consulted (α = 0).
        indices: (N, T, k) int32 token ids of those logits, or None.
    """

    rows: torch.Tensor
    values: torch.Tensor | None = None
    indices: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.rows, self.values, self.indices) if t is not None)

    @classmethod
    @torch.no_grad()
    def compute(cls, teacher: nn.Module | None, shards: TokenShards, *, k: int, batch_size: int, block_size: int,
                device: torch.device, precision: str, max_windows: int | None = None) -> TeacherTopK:
        """The teacher's top-k logits on up to `max_windows` non-overlapping windows spread over `shards`.

        Args:
            teacher: the frozen teacher, in eval mode on `device`; None for the windows alone.
            shards: the training split.
            k: logits kept per position.
            batch_size: windows per teacher forward pass.
            block_size: tokens per window.
            device: where the teacher runs.
            precision: the training precision (the teacher runs under the same autocast).
            max_windows: at most this many windows (default: TOPK_WINDOWS and TOPK_BYTES).
        """
        if max_windows is None:
            max_windows = max(1, min(TOPK_WINDOWS, TOPK_BYTES // (block_size * k * 6)))
        rows, values, indices = [], [], []
        for x, y in shards.eval_batches(batch_size, block_size, math.ceil(max_windows / batch_size)):
            rows.append(torch.cat([x, y[:, -1:]], dim=1))
            if teacher is not None:
                with autocast(device, precision):
                    logits = teacher(x.to(device))
                v, i = logits.float().topk(k, dim=-1)
                values.append(v.half().cpu())
                indices.append(i.int().cpu())
        return cls(torch.cat(rows)[:max_windows], torch.cat(values)[:max_windows] if values else None,
                   torch.cat(indices)[:max_windows] if indices else None)

    def get_batch(self, batch_size: int, block_size: int, generator: torch.Generator) -> Batch:
        """batch_size windows drawn uniformly (with replacement) by index from `generator`."""
        if block_size + 1 != self.rows.shape[1]:
            raise ValueError(f"windows are {self.rows.shape[1] - 1} tokens long, not {block_size}")
        pick = torch.randint(len(self.rows), (batch_size,), generator=generator)
        rows = self.rows[pick]
        batch = {"x": rows[:, :-1], "y": rows[:, 1:]}
        if self.values is not None:
            batch["top_values"], batch["top_indices"] = self.values[pick], self.indices[pick]
        return batch


# ---------------------------------------------------------------------------------------------- the trainer
def freeze(teacher: nn.Module) -> nn.Module:
    """The teacher as training needs it: eval mode (no dropout) and no parameter that wants a gradient."""
    return teacher.eval().requires_grad_(False)


class DistillTrainer(FinetuneTrainer):
    """The loop with the distillation loss; validation is the student's plain cross-entropy.

    Args (besides `FinetuneTrainer`'s):
        teacher: the teacher model; frozen and moved to the trainer's device here. It is an attribute of the
            trainer, not of the student, so it is in no optimizer and no checkpoint.
        distill: α, T and top_k.
    """

    def __init__(self, model: Transformer, cfg: TrainConfig, run_dir: str | Path, *, teacher: nn.Module,
                 distill: DistillConfig, **kwargs: Any):
        super().__init__(model, cfg, run_dir, **kwargs)
        self.distill = distill
        self.teacher = freeze(teacher).to(self.device)
        self.windows: TeacherTopK | None = None
        if distill.top_k > 0:
            start = time.perf_counter()
            consult = self.teacher if distill.alpha > 0 else None
            self.windows = TeacherTopK.compute(consult, self.train_data, k=min(distill.top_k, model.cfg.vocab_size),
                                               batch_size=self.cfg.batch_size, block_size=self.cfg.block_size,
                                               device=self.device, precision=self.cfg.precision)
            what = f"the teacher's top-{distill.top_k} logits on" if consult is not None else "the windows of"
            info(f"{what} {len(self.windows):,} training windows ({len(self.windows) * self.cfg.block_size:,} "
                 f"tokens, {self.windows.nbytes / 2**20:,.1f} MiB) in {time.perf_counter() - start:.1f} s")
        # Under torchrun every rank holds all the windows (its teacher computed them) and draws its rows of each
        # global batch, as `train_data` does.
        self.window_rows = rank_rows(self.windows, self.dist) if self.windows is not None else None

    def to_device(self, batch: Batch) -> Batch:
        return {k: self._to_device(v) for k, v in batch.items()}

    def next_batch(self) -> Batch:
        if self.window_rows is not None:
            return self.to_device(self.window_rows.get_batch(self.cfg.batch_size, self.cfg.block_size, self.generator))
        x, y = self.train_data.get_batch(self.cfg.batch_size, self.cfg.block_size, self.generator)
        return self.to_device({"x": x, "y": y})

    def compute_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        logits = model(batch["x"])
        ce = lm_loss(logits, batch["y"])
        alpha, T = self.distill.alpha, self.distill.temperature
        if alpha == 0:
            return ce
        if "top_values" in batch:
            kl = topk_kl(logits, batch["top_values"], batch["top_indices"], T)
        else:
            with torch.no_grad():
                teacher_logits = self.teacher(batch["x"])
            kl = soft_kl(logits, teacher_logits, T)
        return (1 - alpha) * ce + alpha * T * T * masked_mean(kl, batch["y"])

    def loss_weight(self, batch: Batch) -> torch.Tensor:
        return (batch["y"] != IGNORE_INDEX).sum()

    def batch_tokens(self, batch: Batch) -> int:
        return batch["x"].numel()

    def eval_batches(self) -> Iterator[Batch]:
        assert self.val_data is not None
        for x, y in self.val_data.eval_batches(self.cfg.batch_size, self.cfg.block_size, self.cfg.eval_batches):
            yield self.to_device({"x": x, "y": y})

    def eval_step(self, batch: Batch) -> tuple[float, int]:
        """The student's cross-entropy: what the student is for, comparable across α, T and teachers."""
        with autocast(self.device, self.cfg.precision):
            loss = lm_loss(self.forward_model(batch["x"]), batch["y"])
        n = int(self.loss_weight(batch))
        return float(loss) * n if n else 0.0, n

    @torch.no_grad()
    def compare_with_teacher(self) -> dict[str, float] | None:
        """On the validation windows: the teacher's loss and KL(teacher ‖ student) at T = 1, per target."""
        if self.val_data is None:
            return None
        self.model.eval()
        kl_sum, teacher_sum, count = 0.0, 0.0, 0
        try:
            for batch in self.eval_batches():
                with autocast(self.device, self.cfg.precision):
                    student, teacher = self.forward_model(batch["x"]), self.teacher(batch["x"])
                n = int(self.loss_weight(batch))
                kl_sum += float(masked_mean(soft_kl(student, teacher, 1.0), batch["y"])) * n
                teacher_sum += float(lm_loss(teacher, batch["y"])) * n
                count += n
        finally:
            self.model.train()
        return {"kl": kl_sum / count, "teacher_loss": teacher_sum / count} if count else None


# ---------------------------------------------------------------------------------------------- the run
def run_distill(cfg: FinetuneConfig, *, overwrite: bool = False,
                dist: distributed.Distributed | None = None) -> dict[str, Any]:
    """Distill `cfg.distill.teacher` into a student (`cfg.base` or `cfg.preset`) on token shards; the run report.

    `dist`: this rank's place in a torchrun job (`haina.train.distributed.session`); each rank holds its own
    teacher. None for one process.
    """
    with distributed.same_on_every_rank():  # every rank reads the same models and shards: rank 0 reports a problem
        if bool(cfg.base) == bool(cfg.preset):
            raise HainaError("give the student as --base PATH (a checkpoint to start from) or --preset NAME (a fresh "
                             "model of that preset), one of the two" + (", not both" if cfg.base else ""))
        if len(cfg.data.train) != 1:
            got = "none" if not cfg.data.train else f"{len(cfg.data.train)}: {', '.join(cfg.data.train)}"
            raise HainaError(f"--data takes one token-shard directory tokenized with the teacher's tokenizer (got "
                             f"{got})")
        if cfg.preset and cfg.lora.r > 0:
            raise HainaError("LoRA adapts a trained model, and a --preset student is a fresh one; train all its "
                             "weights (drop --lora.r) or start from --base")
        check_out(cfg, "distill", [*cfg.data.train, cfg.distill.teacher, cfg.base], overwrite)
        teacher = load_base(cfg.distill.teacher, what="--teacher", command="finetune distill")
        t_model, t_tok = teacher.model, _tokenizer_of(teacher.tokenizer, "--teacher", teacher.path)
        if cfg.base:
            student = load_base(cfg.base, command="finetune distill")
            model, student_path = student.model, student.path
            s_tok = _tokenizer_of(student.tokenizer, "--base", student.path)
            if s_tok.hash() != t_tok.hash():
                raise HainaError(f"the teacher's tokenizer (hash {t_tok.hash()}, {teacher.path}) is not the "
                                 f"student's (hash {s_tok.hash()}, {student.path}); distillation compares their "
                                 "distributions token id by token id, so both need one tokenizer: pick a student of "
                                 "the teacher's, or --preset")
        else:
            seed_everything(cfg.train.seed)  # the fresh student's initialization is part of the run
            model = Transformer(ModelConfig.from_name(cfg.preset, vocab_size=t_model.cfg.vocab_size))
            student, student_path, s_tok = None, f"preset {cfg.preset}", t_tok
        if model.cfg.vocab_size != t_model.cfg.vocab_size:
            raise HainaError(f"the teacher has a vocabulary of {t_model.cfg.vocab_size} and the student of "
                             f"{model.cfg.vocab_size}; distillation needs the same one (one tokenizer, one size)")
        block = training_block(cfg, model.cfg.block_size, t_model.cfg.block_size)
        data_dir = cfg.data.train[0]
        meta = check_shards(data_dir, t_tok, vocab_size=model.cfg.vocab_size, what="--data", whose="the teacher's",
                            tokenizer_path=tokenizer_dir(teacher))
        train = open_split(data_dir, "train", block, meta, required=True)
        val = open_split(data_dir, "val", block, meta, required=False)
        if val is None:
            info(f"{data_dir} has no validation split; training without evaluation")

    run, base_hash = start_run(cfg, "distill", model, inputs=[data_dir, teacher.path, student.path if student else ""],
                               overwrite=overwrite, dist=dist)
    config = run_config(cfg, model, block, base=student.path if student else None,
                        distill={**cfg.to_dict()["distill"], "teacher": teacher.path})
    trainer = DistillTrainer(model, dataclasses.replace(cfg.train, block_size=block), run,
                             train_data=rank_rows(train, dist), val_data=val, tokenizer=s_tok, config=config,
                             lora=cfg.lora, base_hash=base_hash, base_path=student.path if student else None,
                             teacher=t_model, distill=cfg.distill, dist=dist)
    before = trainer.compare_with_teacher()  # the student's starting weights, also when fit() will resume
    report = trainer.fit()
    after = None if str(report["stopped_because"]).startswith("SIG") else trainer.compare_with_teacher()
    d = cfg.distill
    extra = {
        "method": "distill", "teacher": teacher.path, "student": student_path, "lora": cfg.lora.r > 0,
        "data": {"dir": data_dir, "train_tokens": len(train), "val_tokens": len(val) if val else 0},
        "distill": {"alpha": d.alpha, "temperature": d.temperature, "top_k": d.top_k,
                    "topk_windows": len(trainer.windows) if trainer.windows is not None else None,
                    "teacher_val_loss": before["teacher_loss"] if before else None,
                    "kl": {"before": before["kl"] if before else None, "after": after["kl"] if after else None}},
    }
    return finish_report(run, report, extra, dist)


def _tokenizer_of(tokenizer: Tokenizer | None, what: str, path: str) -> Tokenizer:
    if tokenizer is None:
        raise HainaError(f"{what} {path} has no tokenizer, so it cannot be checked that teacher and student share "
                         "one; use a checkpoint with its tokenizer/ directory")
    return tokenizer


def distill_text(report: dict[str, Any]) -> str:
    """`teacher val loss 3.21; KL(teacher ‖ student) on val 1.90 → 0.42`."""
    d = report["distill"]
    parts = [] if d["teacher_val_loss"] is None else [f"teacher val loss {d['teacher_val_loss']:.4f}"]
    kl = d["kl"]
    if kl["before"] is not None:
        after = "(not measured)" if kl["after"] is None else f"{kl['after']:.4f}"
        parts.append(f"KL(teacher ‖ student) on val {kl['before']:.4f} → {after}")
    return "; ".join(parts) or "no validation split: the student was not compared with the teacher"


def distill_command(teacher: str, data: list[str], out: str, base: str | None = None, preset: str | None = None,
                    config: str | None = None, alpha: float | None = None, temperature: float | None = None,
                    top_k: int | None = None, resume: bool = False, overwrite: bool = False, nproc: int = 1,
                    max_restarts: int = 0, overrides: list[str] = ()) -> int:
    """Knowledge distillation: train a student on the labels and on a teacher's softened distributions.

    loss = (1 − α)·CE(labels) + α·T²·KL(teacher ‖ student) at temperature T, per target. The student is --base (a
    checkpoint; --lora.r=8 trains adapters only) or --preset (a fresh model of that preset with the teacher's
    vocabulary and tokenizer); teacher and student must share a tokenizer, and --data must be token shards written
    with it. The teacher is frozen and never saved. With --top-k K the teacher's top K logits are computed once on a
    fixed set of training windows (faster, an approximation: see haina/finetune/distill.py); otherwise the teacher
    runs on every batch. Validation is the student's plain loss; report.json adds the teacher's loss and KL(teacher ‖
    student) on val before and after. Any --section.key=value overrides the recipe (--train.max_steps=500). Data
    parallel with --nproc N (or under torchrun), as `haina finetune sft`; every process holds its own teacher.

    Args:
        teacher: the teacher: a haina checkpoint or run directory, or a Hugging Face directory.
        data: one token-shard directory (train and val splits) tokenized with the teacher's tokenizer.
        out: the run directory to write.
        base: the student to start from (a checkpoint with the teacher's tokenizer); or give --preset.
        preset: a fresh student of this model preset (tiny, small, ...); or give --base.
        config: a recipe file or the name of a bundled one in recipes/finetune (default: distill).
        alpha: weight of the teacher's soft targets, in [0, 1] (default: distill.alpha).
        temperature: softening temperature T (default: distill.temperature).
        top_k: > 0: precompute the teacher's top-k logits once instead of running it live (default: distill.top_k).
        resume: continue the run in --out from its latest checkpoint.
        overwrite: start over in an existing --out.
        nproc: processes on this machine, one per GPU (or sharing the CPU cores): launches torchrun.
        max_restarts: with --nproc, how often torchrun restarts the job after a process fails (resuming from the
            last checkpoint).
    """
    args = dict(locals())  # the command's own arguments: --nproc runs them again under torchrun
    more: dict[str, Any] = {"distill.teacher": teacher}
    for name, value in (("alpha", alpha), ("temperature", temperature), ("top_k", top_k)):
        if value is not None:
            more[f"distill.{name}"] = value

    def load(resume: bool) -> FinetuneConfig:
        flags = _flags(base, data, out, resume=resume, **more)
        if preset is not None:
            flags["preset"] = preset
        return load_finetune_config("distill", config, flags, overrides)

    def summary(report: dict[str, Any], cfg: FinetuneConfig) -> None:
        _summary(report, cfg.out)
        print(distill_text(report))

    return run_command(distill_command, args, load, run_distill, summary)


__all__ = ["DistillTrainer", "TeacherTopK", "distill_command", "distill_text", "masked_mean", "run_distill",
           "soft_kl", "topk_kl"]
