"""Continued pretraining: an existing model trained further on new token shards, with replay against forgetting.

The base keeps its architecture and its tokenizer, so the new shards must have been written with that
tokenizer (`haina data tokenize --tokenizer BASE/tokenizer`); `check_shards` refuses others in one line.
The learning rate is re-warmed: the recipe's warmup from zero up to `train.lr`, then its cosine down to
`min_lr`, as in a fresh run. The base's own optimizer state and schedule are not carried over: a
checkpoint from elsewhere has none, and the new data needs a new horizon anyway.

Forgetting is measured rather than guessed: report.json holds the validation loss on the new data (the
val split of `--data`) and on the old data (the val split of `data.replay`), before and after training.

Replay: with `data.replay` and `data.replay_fraction` f, every training batch of B rows holds
round(f·B) windows of the old data after the B − round(f·B) windows of the new (`ReplayMix`). Both are
drawn from the trainer's generator, so a resumed run draws exactly the batches it would have drawn.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from haina.core.errors import HainaError
from haina.core.log import info
from haina.data.shards import TokenShards, check_tokenizer, find_tokenizer, read_meta
from haina.finetune.base import (
    Base,
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
from haina.finetune.config import FinetuneConfig
from haina.tokenizer import Tokenizer
from haina.train import distributed

Batch = tuple[torch.Tensor, torch.Tensor]


class ReplayMix:
    """Training batches of B rows: B − round(fraction·B) windows of `new`, then round(fraction·B) of `old`.

    A fixed count per batch (rather than a coin per row) gives every step the mix asked for. Every draw comes
    from the generator the trainer passes, whose state is the position in both datasets.

    Args:
        new: the new data's training split.
        old: the original data's training split; None for no replay.
        fraction: the share of each batch's rows drawn from `old`.
    """

    def __init__(self, new: TokenShards, old: TokenShards | None = None, fraction: float = 0.0):
        if old is not None and not 0.0 <= fraction < 1.0:
            raise HainaError(f"data.replay_fraction must be in [0, 1), got {fraction}")
        self.new, self.old, self.fraction = new, old, fraction if old is not None else 0.0

    def replay_rows(self, batch_size: int) -> int:
        """How many of a batch's rows come from the old data."""
        return round(self.fraction * batch_size)

    def get_batch(self, batch_size: int, block_size: int, generator: torch.Generator) -> Batch:
        n_old = self.replay_rows(batch_size)
        parts = []
        if batch_size > n_old:
            parts.append(self.new.get_batch(batch_size - n_old, block_size, generator))
        if n_old:
            parts.append(self.old.get_batch(n_old, block_size, generator))
        if len(parts) == 1:
            return parts[0]
        return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])

    def eval_batches(self, batch_size: int, block_size: int, max_batches: int | None = None):
        """The new data's evaluation windows: early stopping and the best checkpoint follow the new data."""
        return self.new.eval_batches(batch_size, block_size, max_batches)


class ContinueTrainer(FinetuneTrainer):
    """The loop on pretraining's (inputs, targets) windows, which can also score another dataset's windows."""

    @torch.no_grad()
    def val_loss_on(self, data: TokenShards | None) -> float | None:
        """The mean loss per target of the current weights on `data`'s fixed evaluation windows (None: no data)."""
        if data is None:
            return None
        cfg = self.cfg
        self.model.eval()
        total, count = 0.0, 0
        try:
            for x, y in data.eval_batches(cfg.batch_size, cfg.block_size, cfg.eval_batches):
                s, n = self.eval_step((self._to_device(x), self._to_device(y)))
                total, count = total + s, count + n
        finally:
            self.model.train()
        return total / count if count else None


def tokenizer_dir(base: Base) -> str:
    """Where the base's tokenizer lives, for a `haina data tokenize --tokenizer` hint."""
    return str(Path(base.path) / "tokenizer") if base.kind == "haina" else base.path


def check_shards(data_dir: str, tokenizer: Tokenizer | None, *, vocab_size: int, what: str, whose: str,
                 tokenizer_path: str) -> dict:
    """The meta.json of a shard directory written with `tokenizer`, whose ids all fit a model of `vocab_size`.

    Args:
        data_dir: the shard directory.
        tokenizer: the model's tokenizer; None skips the hash check (only the vocabulary size is compared).
        vocab_size: the model's vocabulary size.
        what: the option naming the directory in messages (--data, --replay).
        whose: the model the tokenizer belongs to, in messages ("the base's").
        tokenizer_path: where that tokenizer is, for the re-tokenize hint.
    """
    meta = read_meta(data_dir)
    if tokenizer is not None:
        try:
            check_tokenizer(meta, tokenizer)
        except HainaError:
            raise HainaError(f"{what} {data_dir} was tokenized with another tokenizer (hash {meta['tokenizer_hash']}) "
                             f"than {whose} (hash {tokenizer.hash()}); re-tokenize it with that one: haina data "
                             f"tokenize --tokenizer {tokenizer_path} ...") from None
    if int(meta.get("vocab_size", 0)) > vocab_size:
        raise HainaError(f"{what} {data_dir} was written with a vocabulary of {meta['vocab_size']} tokens but the model "
                         f"has {vocab_size}; re-tokenize it with {whose} tokenizer ({tokenizer_path})")
    return meta


def open_split(data_dir: str, split: str, block_size: int, meta: dict, *, required: bool) -> TokenShards | None:
    """One split of a shard directory, checked to hold a window of block_size + 1 tokens; None if absent."""
    if int(meta["splits"].get(split, {}).get("tokens", 0)) == 0:
        if required:
            raise HainaError(f"{data_dir} has no '{split}' split (or it is empty); tokenize data into it first")
        return None
    shards = TokenShards(data_dir, split)
    shards.check_length(block_size)
    return shards


def run_continue(cfg: FinetuneConfig, *, overwrite: bool = False,
                 dist: distributed.Distributed | None = None) -> dict[str, Any]:
    """Continue pretraining `cfg.base` on the token shards of `cfg.data`; returns the run report.

    `dist`: this rank's place in a torchrun job (`haina.train.distributed.session`); None for one process.
    """
    with distributed.same_on_every_rank():  # every rank reads the same shards and base: rank 0 reports a problem
        if len(cfg.data.train) != 1:
            got = "none" if not cfg.data.train else f"{len(cfg.data.train)}: {', '.join(cfg.data.train)}"
            raise HainaError(f"--data takes one token-shard directory (got {got}); tokenize the new texts into one "
                             "directory with `haina data tokenize`")
        if cfg.data.val:
            raise HainaError("continue validates on the val split of the --data shards; data.val (JSONL files) is "
                             "for sft, distill and dpo")
        data_dir, replay = cfg.data.train[0], cfg.data.replay
        fraction = cfg.data.replay_fraction
        if fraction > 0 and not replay:
            raise HainaError(f"data.replay_fraction={fraction} needs the original data's shards: pass --replay DIR")
        check_out(cfg, "continue", [data_dir, replay, cfg.base], overwrite)
        base = load_base(cfg.base, command="finetune continue")
        model = base.model
        block = training_block(cfg, model.cfg.block_size)
        checks = {"tokenizer": base.tokenizer, "vocab_size": model.cfg.vocab_size, "whose": "the base's",
                  "tokenizer_path": tokenizer_dir(base)}
        meta = check_shards(data_dir, what="--data", **checks)
        new_train = open_split(data_dir, "train", block, meta, required=True)
        new_val = open_split(data_dir, "val", block, meta, required=False)
        old_train = old_val = None
        if replay:
            replay_meta = check_shards(replay, what="--replay", **checks)
            old_train = open_split(replay, "train", block, replay_meta, required=True) if fraction > 0 else None
            old_val = open_split(replay, "val", block, replay_meta, required=False)
        train = ReplayMix(new_train, old_train, fraction)
        # The mix is the global batch's (every rank draws it whole and keeps its rows): ranks × train.batch_size.
        rows = cfg.train.batch_size * (1 if dist is None else dist.dp_size)
        n_old = train.replay_rows(rows)
        if fraction > 0 and not 0 < n_old < rows:
            what = f"train.batch_size={rows}" if dist is None else f"the global batch's {rows}"
            raise HainaError(f"data.replay_fraction={fraction} of {what} rows is {n_old} replay rows, leaving "
                             f"{'no replay' if n_old == 0 else 'no new data'}; change the fraction or the batch size")
    if new_val is None:
        info(f"{data_dir} has no validation split: the new data's loss cannot be measured")
    if replay and old_val is None:
        info(f"{replay} has no validation split: forgetting on the old data cannot be measured")
    tokenizer = base.tokenizer or find_tokenizer(data_dir)

    run, base_hash = start_run(cfg, "continue", model, inputs=[data_dir, replay or "", base.path],
                               overwrite=overwrite, dist=dist)
    trainer = ContinueTrainer(model, dataclasses.replace(cfg.train, block_size=block), run,
                              train_data=rank_rows(train, dist), val_data=new_val, tokenizer=tokenizer,
                              config=run_config(cfg, model, block, base=base.path), lora=cfg.lora,
                              base_hash=base_hash, base_path=base.path, dist=dist)
    # Before fit(): the weights are still the base's, also when fit() is about to resume a checkpoint.
    old_before = trainer.val_loss_on(old_val)
    report = trainer.fit()
    interrupted = str(report["stopped_because"]).startswith("SIG")  # a scheduler waits little after SIGTERM
    # The loop's first evaluation (step 0, restored on resume) and its last are the new data's before and after.
    forgetting = {
        "new": {"before": report.get("initial_val_loss"), "after": report.get("val_loss")},
        "old": None if old_val is None else {"before": old_before,
                                             "after": None if interrupted else trainer.val_loss_on(old_val)},
    }
    data_report = {"dir": data_dir, "train_tokens": len(new_train), "val_tokens": len(new_val) if new_val else 0,
                   "replay": replay, "replay_fraction": fraction, "replay_rows_per_batch": n_old}
    return finish_report(run, report, {"method": "continue", "base": base.path, "lora": cfg.lora.r > 0,
                                       "data": data_report, "forgetting": forgetting}, dist)


def forgetting_text(forgetting: dict[str, Any]) -> str:
    """`val loss before → after: new data 5.12 → 3.40 (-1.72); old data 4.80 → 4.95 (+0.15)`."""
    parts = []
    for key, name in (("new", "new data"), ("old", "old data")):
        entry = forgetting.get(key)
        if not entry or entry.get("before") is None:
            parts.append(f"{name} not measured" + (" (give --replay with a val split)" if key == "old" else ""))
            continue
        before, after = entry["before"], entry.get("after")
        parts.append(f"{name} {before:.4f} → {after:.4f} ({after - before:+.4f})" if after is not None
                     else f"{name} {before:.4f} → (not measured)")
    return "forgetting, val loss before → after: " + "; ".join(parts)


def continue_command(base: str, data: list[str], out: str, config: str | None = None, replay: str | None = None,
                     replay_fraction: float | None = None, resume: bool = False, overwrite: bool = False,
                     nproc: int = 1, max_restarts: int = 0, overrides: list[str] = ()) -> int:
    """Continued pretraining: train an existing model further on new token shards, all weights or LoRA.

    The shards (one directory with train and val splits) must be tokenized with the base's tokenizer
    (`haina data tokenize --tokenizer BASE/tokenizer`). The learning rate is re-warmed: the recipe's warmup, then
    cosine decay from train.lr. With --replay (the original data's shards) the loss before and after training is
    measured on its val split too, and --replay-fraction mixes that share of each batch's rows from its train
    split, against forgetting. report.json holds {"forgetting": {"new": {"before", "after"}, "old": ...}}. The
    run directory is like pretraining's and works with generate, chat, serve and export hf. Any
    --section.key=value overrides the recipe (--train.lr=1e-4 --lora.r=8). Data parallel with --nproc N (or
    under torchrun), as `haina finetune sft`: the global batch is processes × train.batch_size × train.grad_accum,
    and the replay fraction applies to it.

    Args:
        base: the model to continue: a haina checkpoint or run directory, or a Hugging Face directory.
        data: the new data: one token-shard directory (train and val splits).
        out: the run directory to write.
        config: a recipe file or the name of a bundled one in recipes/finetune (default: continue).
        replay: token shards of the original data: their val split measures forgetting, their train split is replayed.
        replay_fraction: the share of each batch's rows drawn from --replay, e.g. 0.25 (default: data.replay_fraction).
        resume: continue the run in --out from its latest checkpoint.
        overwrite: start over in an existing --out.
        nproc: processes on this machine, one per GPU (or sharing the CPU cores): launches torchrun.
        max_restarts: with --nproc, how often torchrun restarts the job after a process fails (resuming from the
            last checkpoint).
    """
    args = dict(locals())  # the command's own arguments: --nproc runs them again under torchrun
    more: dict[str, Any] = {}
    if replay is not None:
        more["data.replay"] = replay
    if replay_fraction is not None:
        more["data.replay_fraction"] = replay_fraction

    def summary(report: dict[str, Any], cfg: FinetuneConfig) -> None:
        _summary(report, cfg.out)
        print(forgetting_text(report["forgetting"]))

    return run_command(continue_command, args,
                       lambda resume: load_finetune_config("continue", config,
                                                           _flags(base, data, out, resume=resume, **more), overrides),
                       run_continue, summary)


__all__ = ["ContinueTrainer", "ReplayMix", "check_shards", "continue_command", "forgetting_text", "open_split",
           "run_continue", "tokenizer_dir"]
