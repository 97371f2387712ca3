"""Supervised fine-tuning: chat or instruction records → assistant-only loss on the one training loop.

The data side (records, the chat template, masks, batching) is in `sft_data.py` and `batching.py`;
this file is the trainer's overridden steps and `run_sft`, which wires base, data, LoRA and run
directory together.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import torch

from haina.core.errors import HainaError
from haina.core.log import info
from haina.finetune.base import (
    FinetuneTrainer,
    check_out,
    finish_report,
    is_main,
    load_base,
    rank_rows,
    run_config,
    start_run,
    training_block,
)
from haina.finetune.batching import PackedBatches, PaddedBatches, segment_positions_and_mask
from haina.finetune.config import FinetuneConfig
from haina.finetune.sft_data import (
    SFTRecords,
    prepare_chat_tokenizer,
    read_sft_records,
    template_note,
    tokenize_sft,
    write_rejects,
)
from haina.model.transformer import lm_loss
from haina.train import distributed

Batch = dict[str, Any]


def model_inputs(batch: Batch) -> dict[str, torch.Tensor]:
    """The extra forward arguments of a packed batch: per-document positions and the block-diagonal mask."""
    if batch.get("segments") is None:
        return {}
    positions, mask = segment_positions_and_mask(batch["segments"])
    return {"positions": positions, "attn_mask": mask}


class SFTTrainer(FinetuneTrainer):
    """The loop on batches of rendered conversations: the loss covers the supervised (answer) tokens only."""

    def next_batch(self) -> Batch:
        return self.to_device(self.train_data.get_batch(self.cfg.batch_size, self.cfg.block_size, self.generator))

    def to_device(self, batch: Batch) -> Batch:
        return {k: self._to_device(v) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def compute_loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        y = batch["y"]
        supervised = y != -100  # the LM head runs only where there is a target: prompts and padding have none
        return lm_loss(model(batch["x"], select=supervised, **model_inputs(batch)), y[supervised])

    def loss_weight(self, batch: Batch) -> torch.Tensor:
        return (batch["y"] != -100).sum()

    def batch_tokens(self, batch: Batch) -> int:
        return int(batch["row_tokens"].sum())  # this rank's rows: `tokens` counts the whole batch as drawn

    def eval_batches(self):
        assert self.val_data is not None
        for batch in self.val_data.eval_batches(self.cfg.batch_size, self.cfg.block_size, self.cfg.eval_batches):
            yield self.to_device(batch)


def split_records(records: SFTRecords, fraction: float, seed: int) -> tuple[SFTRecords, SFTRecords]:
    """(train, val): a seeded `fraction` of the records held out, at least one when there are 20 or more."""
    n = len(records.conversations)
    if fraction <= 0 or n < 20:
        return records, SFTRecords(conversations=[], origins=[], rejects=[])
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:max(1, round(fraction * n))])

    def pick(keep) -> SFTRecords:
        idx = [i for i in range(n) if keep(i)]
        return SFTRecords(conversations=[records.conversations[i] for i in idx],
                          origins=[records.origins[i] for i in idx], rejects=[])

    return pick(lambda i: i not in held), pick(lambda i: i in held)


def run_sft(cfg: FinetuneConfig, *, overwrite: bool = False,
            dist: distributed.Distributed | None = None) -> dict[str, Any]:
    """Fine-tune `cfg.base` on the chat/instruction records of `cfg.data`; returns the run report.

    `dist`: this rank's place in a torchrun job (`haina.train.distributed.session`); None for one process.
    """
    with distributed.same_on_every_rank():  # every rank reads the same records and base: rank 0 reports a problem
        if not cfg.data.train:
            raise HainaError("--data is required: chat or instruction JSONL files")
        check_out(cfg, "sft", [*cfg.data.train, *cfg.data.val, cfg.base], overwrite)
        records = read_sft_records(list(cfg.data.train))
        val_records = read_sft_records(list(cfg.data.val)) if cfg.data.val else None
        base = load_base(cfg.base, command="finetune sft")
        model = base.model
        tokenizer = prepare_chat_tokenizer(base.tokenizer, model.cfg.vocab_size)
        block = training_block(cfg, model.cfg.block_size)
        train_set, val_set = (records, val_records) if val_records else \
            split_records(records, cfg.data.val_fraction, cfg.train.seed)
        train_ex, train_rejects = tokenize_sft(tokenizer, train_set.conversations, block_size=block,
                                               train_on_prompt=cfg.data.train_on_prompt, origins=train_set.origins)
        val_ex, val_rejects = tokenize_sft(tokenizer, val_set.conversations, block_size=block,
                                           train_on_prompt=cfg.data.train_on_prompt, origins=val_set.origins)
        if not train_ex:
            raise HainaError(f"no usable training example ({_reason_text(_by_reason(train_rejects))}); "
                             f"for answers beyond the context, shorten the prompts or raise train.block_size")
    rejects = records.rejects + (val_records.rejects if val_records else []) + train_rejects + val_rejects
    source = PackedBatches if cfg.data.batching == "pack" else PaddedBatches
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    train_data = source(train_ex, pad)
    val_data = source(val_ex, pad) if val_ex else None
    if val_data is None:
        info("no validation records (give --val FILE, or at least 20 records for a held-out share); "
             "training without evaluation")

    run, base_hash = start_run(cfg, "sft", model, inputs=[*cfg.data.train, *cfg.data.val, base.path],
                               overwrite=overwrite, dist=dist)
    note = template_note(base.tokenizer, tokenizer)
    if note:
        info(note)
    config = run_config(cfg, model, block, base=base.path)
    trainer = SFTTrainer(model, dataclasses.replace(cfg.train, block_size=block), run,
                         train_data=rank_rows(train_data, dist), val_data=val_data, tokenizer=tokenizer, config=config,
                         lora=cfg.lora, base_hash=base_hash, base_path=base.path, dist=dist)
    data_report = {
        "records": {"read": len(records.conversations) + len(records.rejects), "rejected": len(rejects),
                    "train_examples": len(train_ex), "val_examples": len(val_ex)},
        "rejects_by_reason": _by_reason(rejects),
        "supervised_tokens_in_data": train_data.supervised_tokens,
        "batching": cfg.data.batching,
    }
    if rejects and is_main(dist):
        write_rejects(run / "rejects.jsonl", rejects)
        info(f"{len(rejects)} records rejected ({_reason_text(data_report['rejects_by_reason'])}); "
             f"kept with their reasons in {run / 'rejects.jsonl'}")
    report = trainer.fit()
    return finish_report(run, report, {"method": "sft", "base": base.path, "lora": cfg.lora.r > 0,
                                       "data": data_report}, dist)


def _by_reason(rejects: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in rejects:
        counts[r["reason"]] = counts.get(r["reason"], 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def _reason_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{n}× {reason}" for reason, n in list(counts.items())[:3])


__all__ = ["SFTTrainer", "model_inputs", "run_sft", "split_records"]
