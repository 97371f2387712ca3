"""Masked-language-model pretraining (BERT's objective) on the one training loop.

BERT (Devlin et al. 2018, section 3.1) chooses 15 % of the positions for prediction; of those, 80 % are
replaced by the mask token, 10 % by a random token and 10 % are left as they are, so that the model cannot
tell from its input which tokens it will be asked about, and must keep a good representation of every one.
The loss is the cross-entropy at the chosen positions only. Here:

- Each row gets exactly round(mask_prob · n) chosen positions (at least one) among its n ordinary tokens, as
  BERT's own data pipeline does, rather than a coin per position: no micro-batch is ever without a target.
  Special tokens (the end-of-text between documents, the mask token, chat markers) are never chosen, and
  never drawn as the random replacement.
- Windows are the same random windows of the token shards as causal pretraining: documents joined by the
  end-of-text token, which an encoder reads across (RoBERTa's FULL-SENTENCES inputs).
- Masking draws from the trainer's data generator, right after the window offsets. That generator's state is
  saved in every checkpoint, so a resumed run masks exactly as an uninterrupted one would. Validation masks
  with a generator seeded from train.seed afresh at every evaluation: the same positions every time, so
  evaluations compare.

`MLMTrainer` is the `Trainer` with its batch, loss and evaluation steps overridden; `haina pretrain
--objective mlm` builds it (`haina.train.pretrain.run_pretrain`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer
from torch import nn

from haina.core.device import autocast
from haina.core.errors import HainaError
from haina.core.io import write_json
from haina.model.transformer import lm_loss
from haina.tokenizer import Tokenizer
from haina.train.trainer import Batch, Trainer

MASK_TOKEN = "<|mask|>"
# Mask tokens a tokenizer may already have (haina's, BERT's, RoBERTa's): used as they are rather than adding one.
KNOWN_MASK_TOKENS = (MASK_TOKEN, "[MASK]", "<mask>")
# BERT's split of the chosen positions: below 0.8 -> mask token, below 0.9 -> random token, else unchanged.
MASK_SHARE, RANDOM_SHARE = 0.8, 0.1
IGNORE = -100  # label of positions without a target, as `lm_loss` expects


# ---------------------------------------------------------------------------------------- the mask token
def find_mask_token(tokenizer: Tokenizer) -> str | None:
    """The tokenizer's mask token (one of `KNOWN_MASK_TOKENS` in its vocabulary), or None."""
    return next((t for t in KNOWN_MASK_TOKENS if tokenizer.token_to_id(t) is not None), None)


def with_mask_token(tokenizer: Tokenizer | None, max_vocab: int) -> Tokenizer:
    """The tokenizer with a mask token among its special tokens: a copy, every other id unchanged.

    A mask token already in the vocabulary is kept (and marked special, so text can never spell it); otherwise
    `<|mask|>` is added with the next free id, which must stay below the model's vocabulary size.

    Args:
        tokenizer: the shards' tokenizer (None is refused: the mask token must be saved with the run).
        max_vocab: model.vocab_size.

    Raises:
        HainaError: no tokenizer, or no free id left below `max_vocab`.
    """
    if tokenizer is None:
        raise HainaError("MLM pretraining adds a mask token to the shards' tokenizer and saves it with the run, but "
                         "none was found; set data.tokenizer (or keep tokenizer/ beside the shards)")
    token = find_mask_token(tokenizer)
    if token is not None and token in tokenizer.special_strings:
        return tokenizer
    hf = tokenizer.tok
    if token is None:
        token = MASK_TOKEN
        if tokenizer.vocab_size + 1 > max_vocab:
            room = math.ceil((tokenizer.vocab_size + 1) / 64) * 64
            raise HainaError(f"the tokenizer's {tokenizer.vocab_size} tokens fill model.vocab_size {max_vocab}, "
                             f"leaving no id for the mask token {MASK_TOKEN}; raise model.vocab_size (e.g. "
                             f"--model.vocab_size={room}) or train the tokenizer with {MASK_TOKEN} among its "
                             "special tokens")
        hf = HFTokenizer.from_str(tokenizer.to_json())
        hf.add_special_tokens([AddedToken(token, special=True, normalized=False)])
    return Tokenizer(hf, eos_token=tokenizer.eos_token, bos_token=tokenizer.bos_token, pad_token=tokenizer.pad_token,
                     chat_template=tokenizer.chat_template, extra_special=(*tokenizer.extra_special, token))


# ---------------------------------------------------------------------------------------- masking
@dataclass(frozen=True, kw_only=True, eq=False)  # eq=False: tensors have no single truth value to compare by
class MLMMasking:
    """BERT's masking of token windows (see the module docstring).

    Args:
        mask_id: the mask token's id.
        special_ids: (S,) ids never chosen for prediction.
        replacements: (R,) ids the random replacements are drawn from (the ordinary tokens).
        mask_prob: the share of a row's ordinary positions chosen for prediction.
    """

    mask_id: int
    special_ids: torch.Tensor
    replacements: torch.Tensor
    mask_prob: float = 0.15

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer, mask_prob: float = 0.15) -> MLMMasking:
        """The masking for a tokenizer that has a mask token (`with_mask_token`)."""
        token = find_mask_token(tokenizer)
        if token is None:
            raise ValueError("the tokenizer has no mask token; pass it through with_mask_token first")
        special = {*tokenizer.special_strings.values(), tokenizer.eos_id, tokenizer.token_to_id(token)}
        ordinary = [i for i in range(tokenizer.vocab_size) if i not in special]
        return cls(mask_id=tokenizer.token_to_id(token), special_ids=torch.tensor(sorted(special)),
                   replacements=torch.tensor(ordinary), mask_prob=mask_prob)

    def __call__(self, ids: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (B, T) on the CPU -> (inputs, labels), both (B, T): labels are the original ids at the chosen
        positions and -100 elsewhere.

        The same number of random draws is made whatever the data holds, so the generator's state after a batch
        depends only on how many batches it has masked.
        """
        ordinary = ~torch.isin(ids, self.special_ids)  # (B, T)
        n = ordinary.sum(1)  # (B,)
        k = torch.minimum((n * self.mask_prob).round().long().clamp(min=1), n)  # (B,) positions to choose per row
        # The k lowest random scores among a row's ordinary positions; special positions score 2 and rank last.
        scores = torch.rand(ids.shape, generator=generator).masked_fill(~ordinary, 2.0)
        rank = scores.argsort(dim=1).argsort(dim=1)  # (B, T) each position's place in its row's order
        chosen = rank < k[:, None]
        action = torch.rand(ids.shape, generator=generator)
        random_ids = self.replacements[torch.randint(len(self.replacements), ids.shape, generator=generator)]
        inputs = ids.clone()
        inputs[chosen & (action < MASK_SHARE)] = self.mask_id
        swap = chosen & (action >= MASK_SHARE) & (action < MASK_SHARE + RANDOM_SHARE)
        inputs[swap] = random_ids[swap]
        labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE))
        return inputs, labels


def mlm_loss(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy at the positions with a label; the LM head runs at those positions only."""
    chosen = labels != IGNORE
    return lm_loss(model(inputs, select=chosen), labels[chosen])


# ---------------------------------------------------------------------------------------- the trainer
class MLMTrainer(Trainer):
    """The one loop with masked windows: loss and validation (loss and accuracy) at the chosen positions only.

    Args (besides `Trainer`'s):
        masking: how windows are masked (`MLMMasking.from_tokenizer`).
    """

    def __init__(self, model: nn.Module, cfg, run_dir, *, masking: MLMMasking, **kwargs: Any):
        if model.cfg.causal:
            raise HainaError("train.objective mlm needs a bidirectional model: set model.causal: false")
        self.masking = masking
        self.val_accuracy: tuple[int, float] | None = None  # (step, accuracy) of the latest evaluation
        super().__init__(model, cfg, run_dir, **kwargs)

    def next_batch(self) -> Batch:
        x, _ = self.train_data.get_batch(self.cfg.batch_size, self.cfg.block_size, self.generator)
        inputs, labels = self.masking(x, self.generator)
        return self._to_device(inputs), self._to_device(labels)

    def compute_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return mlm_loss(model, *batch)

    # loss_weight (labels != -100) and batch_tokens (every input token) are the Trainer's own.

    def eval_batches(self):
        assert self.val_data is not None
        generator = torch.Generator().manual_seed(self.cfg.seed)
        for x, _ in self.val_data.eval_batches(self.cfg.batch_size, self.cfg.block_size, self.cfg.eval_batches):
            inputs, labels = self.masking(x, generator)
            yield self._to_device(inputs), self._to_device(labels)

    @torch.no_grad()
    def validation(self) -> dict[str, float] | None:
        """Mean loss and accuracy (argmax = original token) over the validation set's chosen positions."""
        if self.val_data is None:
            return None
        self.model.eval()
        loss, correct, count = 0.0, 0, 0
        try:
            for inputs, labels in self.eval_batches():
                chosen = labels != IGNORE
                with autocast(self.device, self.cfg.precision):
                    logits = self.forward_model(inputs, select=chosen)  # (N, V)
                target = labels[chosen]
                loss += float(F.cross_entropy(logits.float(), target, reduction="sum"))
                correct += int((logits.argmax(-1) == target).sum())
                count += len(target)
        finally:
            self.model.train()
        return {"val_loss": loss / count, "val_accuracy": correct / count} if count else None

    def evaluate(self) -> float | None:
        m = self.validation()
        return None if m is None else m["val_loss"]

    def eval_and_log(self, log, say) -> float | None:
        m = self.validation()
        if m is None:
            return None
        self.val_accuracy = (self.step, m["val_accuracy"])
        log.log({"step": self.step, "val_loss": m["val_loss"], "val_accuracy": m["val_accuracy"],
                 "tokens": self.tokens_seen}, "val")
        say(f"step {self.step}: val masked-token loss {m['val_loss']:.4f}, accuracy {m['val_accuracy']:.2%}")
        return m["val_loss"]

    def fit(self) -> dict[str, Any]:
        """The Trainer's `fit`; report.json also says the objective and the final masked-token accuracy."""
        report = super().fit()
        acc = self.val_accuracy[1] if self.val_accuracy and self.val_accuracy[0] == self.step else None
        report = {**report, "objective": "mlm", "mask_prob": self.masking.mask_prob, "val_accuracy": acc}
        write_json(self.run_dir / "report.json", report)
        return report


__all__ = ["KNOWN_MASK_TOKENS", "MASK_TOKEN", "MLMMasking", "MLMTrainer", "find_mask_token", "mlm_loss",
           "with_mask_token"]
