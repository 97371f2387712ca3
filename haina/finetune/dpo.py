"""Direct Preference Optimization (Rafailov et al., 2023) on the one training loop.

For a pair (prompt x, chosen c, rejected r) the loss is

    −log σ(β · [(log π(c|x) − log π_ref(c|x)) − (log π(r|x) − log π_ref(r|x))])

with log π(·|x) the SUM of the answer tokens' log-probabilities (end-of-turn token included), averaged
over pairs. β · (log π − log π_ref) is the answer's implicit reward. The reference is the base: its
log-probabilities are computed once, before training, over every train and val pair, and kept beside
the pairs' tokens (`PairSet.reference`), so no second model is held in memory.

The data side (records, rendering, truncation, batches) is in `dpo_data.py`; this file is the loss,
the trainer's overridden steps, `run_dpo` and the `haina finetune dpo` command.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from haina.core.device import autocast
from haina.core.errors import HainaError
from haina.core.log import info
from haina.finetune.base import (
    FinetuneTrainer,
    check_out,
    finish_report,
    is_main,
    load_base,
    run_command,
    run_config,
    start_run,
    training_block,
)
from haina.finetune.batching import IGNORE_INDEX
from haina.finetune.command import _flags, load_finetune_config
from haina.finetune.config import FinetuneConfig
from haina.finetune.dpo_data import PairSet, RankPairs, read_preferences, split_preferences, tokenize_preferences
from haina.finetune.sft_data import prepare_chat_tokenizer, template_note, write_rejects
from haina.model.lora import LoRALinear
from haina.train import distributed

Batch = dict[str, Any]


# ---------------------------------------------------------------------------------------------- the loss
def sequence_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each row's summed log-probability of its targets (those != -100): logits (R, T, V), targets (R, T) → (R,)."""
    # cross_entropy gathers the target's log-probability without a second (R, T, V) tensor of log-softmax.
    nll = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
    return -nll.sum(-1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses and the chosen and rejected answers' implicit rewards, all (B,).

    Args:
        policy_chosen, policy_rejected: the policy's summed log-probabilities of each answer.
        ref_chosen, ref_rejected: the reference's.
        beta: the inverse temperature: larger keeps the policy closer to the reference.
    """
    chosen = beta * (policy_chosen - ref_chosen)
    rejected = beta * (policy_rejected - ref_rejected)
    return -F.logsigmoid(chosen - rejected), chosen, rejected


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run `model` as its base: every LoRALinear's scale is 0 inside the block, restored after it."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    scales = [m.scale for m in layers]
    try:
        for m in layers:
            m.scale = 0.0
        yield model
    finally:
        for m, s in zip(layers, scales):
            m.scale = s


# ---------------------------------------------------------------------------------------------- the trainer
class DPOTrainer(FinetuneTrainer):
    """The loop on batches of preference pairs; `cfg.batch_size` counts pairs (2 rows each).

    Args (besides `FinetuneTrainer`'s):
        beta: DPO's β.

    `train_data` and `val_data` are `PairSet`s; `fit` fills their reference log-probabilities first.
    Each evaluation also records the validation pairs' reward accuracy (the fraction whose chosen answer
    has the larger reward) and mean reward margin in `eval_history`, by step.
    """

    def __init__(self, *args: Any, beta: float, **kwargs: Any):
        self.beta = beta
        self.eval_history: dict[int, dict[str, float]] = {}
        self.reference_passes = 0
        self._sums: list[float] | None = None  # [pairs, chosen ahead, margin sum] of the evaluation under way
        super().__init__(*args, **kwargs)

    def to_device(self, batch: Batch) -> Batch:
        return {k: self._to_device(v) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def next_batch(self) -> Batch:
        return self.to_device(self.train_data.get_batch(self.cfg.batch_size, self.cfg.block_size, self.generator))

    def pair_terms(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(losses, chosen rewards, rejected rewards) of a batch's pairs, each (B,)."""
        logps = sequence_logps(model(batch["x"]), batch["y"])
        b = len(batch["index"])
        return dpo_loss(logps[:b], logps[b:], batch["ref"][:b], batch["ref"][b:], self.beta)

    def compute_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return self.pair_terms(model, batch)[0].mean()

    def loss_weight(self, batch: Batch) -> torch.Tensor:
        return torch.tensor(len(batch["index"]))  # the loss is a mean over pairs, not tokens

    def batch_tokens(self, batch: Batch) -> int:
        return int(batch["row_tokens"].sum())  # this rank's rows: `tokens` counts the whole batch as drawn

    def eval_batches(self) -> Iterator[Batch]:
        assert self.val_data is not None
        for batch in self.val_data.eval_batches(self.cfg.batch_size, self.cfg.block_size, self.cfg.eval_batches):
            yield self.to_device(batch)

    def eval_step(self, batch: Batch) -> tuple[float, int]:
        """(DPO loss summed over the batch's pairs, pairs): val_loss is the DPO loss."""
        with autocast(self.device, self.cfg.precision):
            losses, chosen, rejected = self.pair_terms(self.forward_model, batch)
        margin = (chosen - rejected).float()
        if self._sums is not None:
            self._sums[0] += len(margin)
            self._sums[1] += float((margin > 0).sum())
            self._sums[2] += float(margin.sum())
        return float(losses.sum()), len(margin)

    @torch.no_grad()
    def evaluate(self) -> float | None:
        self._sums = [0, 0.0, 0.0]
        try:
            val = super().evaluate()
            pairs, ahead, margin = self._sums
        finally:
            self._sums = None
        if pairs:
            self.eval_history[self.step] = {"reward_accuracy": ahead / pairs, "reward_margin": margin / pairs}
        return val

    @torch.no_grad()
    def compute_reference(self) -> None:
        """The reference log-probabilities of every train and val pair: one pass in eval mode, no grad.

        The pairs go through in `eval_batches` order, as evaluations see them, so at step 0 the policy's
        val log-probabilities equal the reference's exactly and every reward is 0. With LoRA the adapters
        are switched off for the pass; since they start with B = 0 the freshly adapted model IS the base
        anyway, so precomputing once is right for full and LoRA fine-tuning alike.
        """
        t0 = time.perf_counter()
        self.model.eval()
        n = 0
        try:
            with adapters_disabled(self.model):
                for data in (self.train_data, self.val_data):
                    if data is None:
                        continue
                    for batch in data.eval_batches(self.cfg.batch_size, self.cfg.block_size):
                        batch = self.to_device(batch)
                        with autocast(self.device, self.cfg.precision):
                            logps = sequence_logps(self.forward_model(batch["x"]), batch["y"]).float().cpu()
                        b = len(batch["index"])
                        data.reference[batch["index"].cpu()] = torch.stack([logps[:b], logps[b:]], dim=1)
                        n += b
        finally:
            self.model.train()
        self.reference_passes += 1
        info(f"reference log-probabilities of {n:,} pairs in {time.perf_counter() - t0:.1f}s")

    def fit(self) -> dict[str, Any]:
        # Before the loop: a resumed run loads its checkpoint inside `fit`, and the reference must be the base.
        # Only once: a second `fit` of this trainer would start from trained weights, which are not the base.
        if not self.reference_passes:
            self.compute_reference()
        return super().fit()

    def state_dict(self) -> dict[str, Any]:
        # The step-0 figures ("before") must survive a resume, which does not evaluate step 0 again.
        return {**super().state_dict(), "dpo_eval_history": self.eval_history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.eval_history = {int(k): dict(v) for k, v in state.get("dpo_eval_history", {}).items()}


# ---------------------------------------------------------------------------------------------- the run
def run_dpo(cfg: FinetuneConfig, *, overwrite: bool = False,
            dist: distributed.Distributed | None = None) -> dict[str, Any]:
    """DPO of `cfg.base` on the preference pairs of `cfg.data`; returns the run report.

    `dist`: this rank's place in a torchrun job (`haina.train.distributed.session`); every rank computes the
    reference log-probabilities of all the pairs itself. None for one process.
    """
    with distributed.same_on_every_rank():  # every rank reads the same pairs and base: rank 0 reports a problem
        if not cfg.data.train:
            raise HainaError("--data is required: preference JSONL files of {\"prompt\", \"chosen\", \"rejected\"}")
        check_out(cfg, "dpo", [*cfg.data.train, *cfg.data.val, cfg.base], overwrite)
        records = read_preferences(list(cfg.data.train))
        val_records = read_preferences(list(cfg.data.val)) if cfg.data.val else None
        base = load_base(cfg.base, command="finetune dpo")
        model = base.model
        tokenizer = prepare_chat_tokenizer(base.tokenizer, model.cfg.vocab_size)
        block = training_block(cfg, model.cfg.block_size)
        train_pairs, val_pairs = (records.pairs, val_records.pairs) if val_records else \
            split_preferences(records.pairs, cfg.data.val_fraction, cfg.train.seed)
        train_tok, train_rejects = tokenize_preferences(tokenizer, train_pairs, block_size=block)
        val_tok, val_rejects = tokenize_preferences(tokenizer, val_pairs, block_size=block)
        if not train_tok:
            raise HainaError(f"no training pair fits block_size {block} ({_reason_text(train_rejects)}); shorten the "
                             "answers or raise train.block_size")
    rejects = records.rejects + (val_records.rejects if val_records else []) + train_rejects + val_rejects
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    train_data = PairSet(train_tok, pad)
    val_data = PairSet(val_tok, pad) if val_tok else None
    if val_data is None:
        info("no validation pairs (give --val FILE, or at least 20 records for a held-out share); training without "
             "evaluation or reward accuracy")

    if model.cfg.dropout:
        info(f"the base has dropout {model.cfg.dropout:g}: the policy's log-probabilities are noisier than the "
             "reference's (computed without it), which biases the rewards; DPO usually trains without dropout")
    run, base_hash = start_run(cfg, "dpo", model, inputs=[*cfg.data.train, *cfg.data.val, base.path],
                               overwrite=overwrite, dist=dist)
    note = template_note(base.tokenizer, tokenizer)
    if note:
        info(note)
    config = run_config(cfg, model, block, base=base.path)
    # A rank's share of a batch is both rows of its pairs (`RankPairs`); the reference fills the pairs themselves.
    trainer = DPOTrainer(model, dataclasses.replace(cfg.train, block_size=block), run,
                         train_data=train_data if dist is None else RankPairs(train_data, dist.dp_rank, dist.dp_size),
                         val_data=val_data, tokenizer=tokenizer, config=config, lora=cfg.lora, base_hash=base_hash,
                         base_path=base.path, beta=cfg.dpo.beta, dist=dist)
    read = sum(len(r.pairs) + len(r.rejects) for r in (records, val_records) if r is not None)
    data_report = {
        "records": {"read": read, "rejected": len(rejects), "train_pairs": len(train_data), "val_pairs": len(val_tok),
                    "truncated_prompts": train_data.truncated + (val_data.truncated if val_data else 0)},
        "rejects_by_reason": dict(Counter(r["reason"] for r in rejects).most_common()),
        "answer_tokens_in_data": train_data.answer_tokens,
    }
    if rejects and is_main(dist):
        write_rejects(run / "rejects.jsonl", rejects)
        info(f"{len(rejects)} records rejected ({_reason_text(rejects)}); kept with their reasons in "
             f"{run / 'rejects.jsonl'}")
    report = trainer.fit()
    return finish_report(run, report, {"method": "dpo", "base": base.path, "lora": cfg.lora.r > 0,
                                       "pairs_seen": report["supervised_tokens"], "data": data_report,
                                       # the loop counts loss weights, which are pairs here; and exp(DPO loss)
                                       # is no perplexity
                                       "supervised_tokens": None, "supervised_tokens_per_sec": None,
                                       "val_ppl": None,
                                       "dpo": _dpo_figures(trainer, cfg.dpo.beta, report["steps"])}, dist)


def _dpo_figures(trainer: DPOTrainer, beta: float, steps: int) -> dict[str, Any]:
    """β, and the validation pairs' reward accuracy and margin before (step 0) and after training."""
    before, after = trainer.eval_history.get(0), trainer.eval_history.get(steps)
    figures: dict[str, Any] = {"beta": beta}
    for key in ("reward_accuracy", "reward_margin"):
        figures[f"val_{key}"] = {"before": None if before is None else before[key],
                                 "after": None if after is None else after[key]}
    val = trainer.val_data
    if val is not None:
        # At step 0 every reward is 0 by definition; what the base itself prefers is the informative baseline.
        n = min(len(val), trainer.cfg.batch_size * trainer.cfg.eval_batches)
        figures["val_reference_prefers_chosen"] = float((val.reference[:n, 0] > val.reference[:n, 1]).float().mean())
    return figures


def _reason_text(rejects: list[dict]) -> str:
    return ", ".join(f"{n}× {reason}" for reason, n in Counter(r["reason"] for r in rejects).most_common(3))


def dpo_command(base: str, data: list[str], out: str, config: str | None = None, val: list[str] | None = None,
                beta: float | None = None, resume: bool = False, overwrite: bool = False, nproc: int = 1,
                max_restarts: int = 0, overrides: list[str] = ()) -> int:
    """Direct Preference Optimization on preference pairs, all weights or LoRA adapters (--lora.r=8).

    Records are JSONL {"prompt", "chosen", "rejected"}: plain strings, or chat (the prompt a list of messages
    ending with the user's turn; chosen and rejected each a string or a list holding one assistant message).
    Both answers are rendered after the prompt with the base's chat template (ChatML when it has none); a
    pair is scored on its answers' tokens, end-of-turn included. The base is the reference: its
    log-probabilities are computed once before training, so no second model is held. Prompts too long for
    the context lose their start; pairs whose answer alone does not fit, and bad records, are counted and
    kept with their reason in OUT/rejects.jsonl. report.json adds the validation pairs' reward accuracy and
    margin before and after training. Any --section.key=value overrides the recipe (--train.lr=1e-6). Data
    parallel with --nproc N (or under torchrun), as `haina finetune sft`: train.batch_size counts pairs per process.

    Args:
        base: the model to start from (usually an SFT run): a haina checkpoint or run, or a Hugging Face directory.
        data: preference JSONL files.
        out: the run directory to write.
        config: a recipe file or the name of a bundled one in recipes/finetune (default: dpo).
        val: held-out preference JSONL files (default: a share of --data, data.val_fraction).
        beta: DPO's β (dpo.beta): how far the policy may move from the base; larger keeps it closer.
        resume: continue the run in --out from its latest checkpoint.
        overwrite: start over in an existing --out.
        nproc: processes on this machine, one per GPU (or sharing the CPU cores): launches torchrun.
        max_restarts: with --nproc, how often torchrun restarts the job after a process fails (resuming from the
            last checkpoint).
    """
    args = dict(locals())  # the command's own arguments: --nproc runs them again under torchrun
    more = {"dpo.beta": beta} if beta is not None else {}
    return run_command(dpo_command, args,
                       lambda resume: load_finetune_config("dpo", config, _flags(base, data, out, val, resume, **more),
                                                           overrides),
                       run_dpo, _summary)


def _summary(report: dict[str, Any], cfg: FinetuneConfig) -> None:
    d = report["dpo"]
    acc, margin = d["val_reward_accuracy"], d["val_reward_margin"]
    val_text = "" if acc["after"] is None else (f", val loss {report['val_loss']:.4f}, reward accuracy "
                                                f"{acc['after']:.1%} (margin {margin['after']:+.3f})")
    print(f"{report['steps']} steps, {report['pairs_seen']:,} pairs (β={d['beta']:g}){val_text}, "
          f"{report['tokens_per_sec']:,.0f} tokens/s, stopped by {report['stopped_because']}")
    print(f"run: {cfg.out}   checkpoint: {report.get('best_checkpoint')}")


__all__ = ["DPOTrainer", "adapters_disabled", "dpo_command", "dpo_loss", "run_dpo", "sequence_logps"]
